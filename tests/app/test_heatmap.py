"""TensorBoard heatmaps of P and G: a rendered figure whose pixels carry the matrix, a colorbar and labelled axes.

The image is read back independently of matplotlib's layout: every pixel is matched to the nearest of viridis'
256 colours; the two largest connected viridis regions are the heatmap (square) and the colorbar (tall, narrow).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from matplotlib import colormaps
from scipy import ndimage

from selmix_dist.train.monitor import MAX_IMAGE_CLASSES, heatmap_image, heatmap_values

# The 8-bit palette as matplotlib applies it (Colormap(..., bytes=True) truncates lut · 255).
PALETTE = (colormaps["viridis"](np.arange(256))[:, :3] * 255).astype(np.uint8).astype(np.float64)  # [256, 3]
# Matplotlib quantises a normalised value v to palette entry min(floor(v · 256), 255); two entries share a
# colour, so a read-back level may be one off.
LEVEL = 1 / 255
# A heatmap cell is drawn in its exact palette colour; the colorbar is resampled to its height, so its pixels
# lie between neighbouring palette entries (a few units apart), not on them. Text, white and black are far off.
NEAR = 4.0


def viridis_levels(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(nearest palette index int[H, W], -1 where no palette colour is within NEAR; the mask of such pixels) of
    an RGB uint8 [3, H, W] image."""
    pixels = image.transpose(1, 2, 0).reshape(-1, 3)
    colours, inverse = np.unique(pixels, axis=0, return_inverse=True)
    dist = np.linalg.norm(colours[:, None, :].astype(np.float64) - PALETTE[None], axis=-1)  # [U, 256]
    nearest = np.where(dist.min(1) <= NEAR, dist.argmin(1), -1)
    levels = nearest[inverse.reshape(-1)].reshape(image.shape[1:])
    return levels, levels >= 0


def regions(exact: np.ndarray) -> list[tuple[slice, slice]]:
    """Bounding boxes of the connected palette regions, largest area first (1-px anti-aliased seams between
    cells or colorbar levels are closed first)."""
    closed = ndimage.binary_closing(exact, structure=np.ones((3, 3)), iterations=2)
    labelled, count = ndimage.label(closed)
    sizes = ndimage.sum(closed, labelled, range(1, count + 1))
    boxes = ndimage.find_objects(labelled)
    return [boxes[i] for i in np.argsort(-sizes)]


def dark_bands(profile: np.ndarray) -> int:
    """Number of runs of True in a 1-D boolean profile."""
    return int(np.count_nonzero(np.diff(np.concatenate([[False], profile]).astype(np.int8)) == 1))


def cell_values(levels: np.ndarray, box: tuple[slice, slice], k: int) -> np.ndarray:
    """Palette level / 255 at the centre of each of the k × k cells of the heatmap box."""
    rows, cols = box
    ys = rows.start + (np.arange(k) + 0.5) * (rows.stop - rows.start) / k
    xs = cols.start + (np.arange(k) + 0.5) * (cols.stop - cols.start) / k
    return levels[np.ix_(ys.astype(int), xs.astype(int))] / 255


def test_heatmap_pixels_are_the_ordered_matrix_with_a_colorbar_and_labelled_axes():
    k = 7
    gen = torch.Generator().manual_seed(0)
    matrix = torch.rand(k, k, generator=gen, dtype=torch.float64) * 3 - 1
    order = torch.tensor([4, 0, 6, 2, 1, 5, 3])
    image = heatmap_image(matrix, order)
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[0] == 3

    # the matrix in `order`, written out element by element, normalised to [0, 1]
    expected = np.array([[matrix[order[a], order[b]].item() for b in range(k)] for a in range(k)])
    expected = (expected - expected.min()) / (expected.max() - expected.min())
    levels, exact = viridis_levels(image)
    heat, bar = regions(exact)[:2]
    got = cell_values(levels, heat, k)
    np.testing.assert_allclose(got, np.minimum(np.floor(expected * 256), 255) / 255, atol=LEVEL + 1e-9)

    # the colorbar: right of the heatmap, taller than wide, the whole palette from the bottom (low) to the top
    assert bar[1].start > heat[1].stop
    height, width = bar[0].stop - bar[0].start, bar[1].stop - bar[1].start
    assert height > 4 * width
    column = levels[bar[0], (bar[1].start + bar[1].stop) // 2]
    column = column[column >= 0]
    assert column[0] >= 254 and column[-1] <= 1 and bool(np.all(np.diff(column) <= 0))
    assert len(np.unique(column)) > 100  # a continuous bar, not a few blocks

    # left of and below the heatmap, three bands of dark pixels apart from each other: tick marks, tick labels and
    # the axis label ("label class i" / "partner class j")
    dark = (image.max(axis=0) < 110) & ~exact
    assert dark_bands(dark[heat[0], :heat[1].start].any(axis=0)) >= 3
    assert dark_bands(dark[heat[0].stop:, heat[1]].any(axis=1)) >= 3


def test_class_names_replace_index_tick_labels_for_small_k():
    matrix = torch.arange(16, dtype=torch.float64).reshape(4, 4)
    by_index = heatmap_image(matrix)
    by_name = heatmap_image(matrix, class_names=["airplane", "automobile", "bird", "cat"])
    assert by_index.shape == by_name.shape and not np.array_equal(by_index, by_name)
    levels, exact = viridis_levels(by_name)
    heat = regions(exact)[0]
    expected = np.minimum(np.floor(matrix.numpy() / 15 * 256), 255) / 255
    np.testing.assert_allclose(cell_values(levels, heat, 4), expected, atol=LEVEL + 1e-9)


@pytest.mark.parametrize("k", [512, 300])
def test_large_k_is_average_pooled_in_order(k):
    gen = torch.Generator().manual_seed(1)
    matrix = torch.rand(k, k, generator=gen, dtype=torch.float64)
    order = torch.randperm(k, generator=gen)
    pooled = heatmap_values(matrix, order)
    assert pooled.shape == (MAX_IMAGE_CLASSES, MAX_IMAGE_CLASSES)
    permuted = matrix[order][:, order].numpy()
    # bin b covers rows floor(b·k/B) .. ceil((b+1)·k/B) − 1 (adaptive pooling), so for k = 512 the 2 × 2 blocks
    edges = [(b * k // MAX_IMAGE_CLASSES, -(-(b + 1) * k // MAX_IMAGE_CLASSES)) for b in range(MAX_IMAGE_CLASSES)]
    expected = np.array([[permuted[r0:r1, c0:c1].mean() for c0, c1 in edges] for r0, r1 in edges])
    np.testing.assert_allclose(pooled.numpy(), expected, rtol=1e-12)
    image = heatmap_image(matrix, order)
    assert image.dtype == np.uint8 and image.shape[0] == 3
    heat, bar = regions(viridis_levels(image)[1])[:2]
    assert bar[1].start > heat[1].stop
