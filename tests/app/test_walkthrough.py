"""The README walkthrough, command for command: tests/app/walkthrough.md is the README section (the README's
text is pasted from it), and this test runs every command of its ```bash block exactly as written, with bash,
from a folder laid out like the repository root (tools/, launch/, configs/ linked to this checkout), on
`data/my_images` = the `small_image_folder` fixture (10 classes × 30 CIFAR-10 JPEGs) and `python` = this
interpreter."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image, ImageOps
from timm.data import create_transform, resolve_data_config

REPO = Path(__file__).resolve().parents[2]
WALKTHROUGH = Path(__file__).with_name("walkthrough.md")


def walkthrough_commands(text: str) -> list[str]:
    """The commands of every ```bash block: comments and blank lines dropped, `\\` continuations joined."""
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, re.M | re.S):
        current = ""
        for line in block.splitlines():
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            current += line[:-1].rstrip() + " " if line.endswith("\\") else line.strip()
            if not line.endswith("\\"):
                commands.append(current.strip())
                current = ""
        assert not current, f"a command of {WALKTHROUGH} ends with a line continuation"
    return commands


def test_the_commands_are_parsed_as_written():
    commands = walkthrough_commands(WALKTHROUGH.read_text())
    scripts = [c.split()[1] for c in commands]
    assert scripts == ["tools/make_lt_split.py", "tools/extract_features.py", "launch/train.py", "tools/report.py",
                       "tools/export.py", "tools/predict.py"]
    assert all(c.startswith("python ") and "  " not in c for c in commands)
    assert not any(word.startswith("/") or ".." in word for c in commands for word in c.split())  # copy-pasteable


@pytest.fixture(scope="module")
def user_checkout(tmp_path_factory, small_image_folder) -> tuple[Path, dict[str, str]]:
    """(folder laid out like the repository root with the user's data in it, environment with `python`)."""
    root = tmp_path_factory.mktemp("user_checkout")
    for name in ("tools", "launch", "configs"):
        (root / name).symlink_to(REPO / name, target_is_directory=True)
    (root / "data").mkdir()
    (root / "data" / "my_images").symlink_to(small_image_folder, target_is_directory=True)
    # a new image: no file of the folder, but a real photo (a mirrored one)
    first = sorted((small_image_folder / "cat").iterdir())[0]
    ImageOps.mirror(Image.open(first).convert("RGB")).save(root / "data" / "new_image.jpg", quality=90)
    bin_dir = root / ".bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (bin_dir / "python").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    return root, env


@pytest.mark.slow
def test_every_walkthrough_command_runs_as_written(user_checkout, small_image_folder):
    root, env = user_checkout
    outputs = []
    for command in walkthrough_commands(WALKTHROUGH.read_text()):
        proc = subprocess.run(command, shell=True, executable="/bin/bash", cwd=root, env=env, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, (command, proc.stderr[-3000:])
        outputs.append(proc.stdout)
    classes = sorted(p.name for p in small_image_folder.iterdir())

    split = json.loads((root / "runs/mine/split/split.json").read_text())
    labeled = [split["counts"]["labeled"][split["class_names"].index(c)] for c in classes]
    assert max(labeled) == 15 and min(labeled) == 3 and labeled == sorted(labeled, reverse=True)  # --n1 15 --rho-l 5
    assert split["counts"]["val"] == split["counts"]["test"] == [5] * 10
    cache = json.loads((root / "runs/mine/features/manifest.json").read_text())
    assert all(cache["splits"][s]["complete"] for s in ("labeled", "unlabeled", "val", "test"))
    assert "report.md" in outputs[3] and (root / "runs/mine/run/report.md").is_file()

    # predict's line vs the exported folder loaded by timm itself, transform and all
    model = timm.create_model(f"local-dir:{root / 'runs/mine/classifier'}", pretrained=True).eval()
    transform = create_transform(**resolve_data_config({}, model=model))
    with torch.no_grad():
        probs = model(transform(Image.open(root / "data/new_image.jpg").convert("RGB"))[None]).softmax(1)[0]
    top = probs.topk(5)
    names = json.loads((root / "runs/mine/classifier/config.json").read_text())["label_names"]
    assert names == classes
    expected = "  ".join(f"{names[i]} {p:.3f}" for p, i in zip(top.values.tolist(), top.indices.tolist(), strict=True))
    (line,) = outputs[5].splitlines()
    assert line.startswith("data/new_image.jpg") and line.split(None, 1)[1] == expected


def test_readme_shows_the_walkthrough_verbatim():
    readme = (REPO / "README.md").read_text()
    assert (Path(__file__).parent / "walkthrough.md").read_text().strip() in readme
