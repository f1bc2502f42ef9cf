"""Mode 'online': the frozen backbone runs on (augmented) images every step, from a split directory."""

from __future__ import annotations

import torch

from selmix_dist.config import load_config
from selmix_dist.data.sources import ImageFolderSource
from selmix_dist.data.splits import load_split, make_lt_split
from selmix_dist.features.backbones import build_backbone
from selmix_dist.features.load import online_train_data
from selmix_dist.train.trainer import Trainer

OVERRIDES = ["model.mode=online", "model.backbone=test_efficientnet", "model.weights=none", "model.image_size=32",
             "model.init_head=la", "model.init_head_steps=30", "run.steps=12", "run.refresh_every=6",
             "run.checkpoint_every=0", "optim.batch_size=8", "optim.lr=0.05", "data.eval_batch_size=32",
             "log.progress=false", "objective.name=h_mean"]


def _split(tmp_path, folder):
    split_dir = tmp_path / "split"
    make_lt_split(ImageFolderSource(folder), split_dir, n1=8, rho_l=4, m1=6, rho_u=2, n_val=4, n_test=4, seed=0)
    return split_dir


def _run(tmp_path, split_dir, name):
    cfg = load_config(None, [*OVERRIDES, f"data.split_dir={split_dir}", f"run.dir={tmp_path / name}"])
    trainer = Trainer(cfg, online_train_data(cfg, torch.device("cpu")))
    summary = trainer.run()
    weight = trainer.acc.unwrap_model(trainer.head).weight.detach().clone()
    trainer.close()
    return weight, summary


def test_online_features_are_the_backbone_on_eval_images(tmp_path, small_image_folder):
    split_dir = _split(tmp_path, small_image_folder)
    cfg = load_config(None, [*OVERRIDES, f"data.split_dir={split_dir}", f"run.dir={tmp_path / 'r'}"])
    data = online_train_data(cfg, torch.device("cpu"))
    source = ImageFolderSource(small_image_folder)
    val = load_split(split_dir, "val", source=source)
    backbone = build_backbone("test_efficientnet", "none", seed=0, image_size=32)
    tf = backbone.transform(train=False)
    expected = backbone(torch.stack([tf(source[int(i)][0]) for i in val.items[:5]]))
    torch.testing.assert_close(data.val.take(torch.arange(5)), expected)
    part = data.val.subset(torch.tensor([4, 1]), "val-part")  # a view: rows 4 and 1 of the same images
    torch.testing.assert_close(part.take(torch.tensor([1, 0, 1])), expected[[1, 4, 1]])
    assert torch.equal(part.labels, torch.as_tensor(val.labels)[[4, 1]])
    assert torch.equal(data.val.labels, torch.as_tensor(val.labels))
    assert bool((data.partners.labels == -1).all())  # unlabeled labels stay hidden
    # training draws are augmented, and reproducibly so for the same (seed, rank, step)
    a = data.labeled.take(torch.arange(4), augment_seed=(0, 0, 3, 0))
    b = data.labeled.take(torch.arange(4), augment_seed=(0, 0, 3, 0))
    c = data.labeled.take(torch.arange(4), augment_seed=(0, 0, 4, 0))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_online_run_is_deterministic(tmp_path, small_image_folder):
    split_dir = _split(tmp_path, small_image_folder)
    w1, s1 = _run(tmp_path, split_dir, "a")
    w2, s2 = _run(tmp_path, split_dir, "b")
    assert s1["step"] == s2["step"] == 12
    assert torch.equal(w1, w2)
    assert '"status": "complete"' in (tmp_path / "a" / "run.json").read_text()
