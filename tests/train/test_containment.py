"""No write, append, lock or removal outside run.dir (issue 19; each case failed before the fix).

Every case runs the real launcher (launch/train.py) on a small synthetic feature cache and keeps a victim
file outside the run directory that must come out byte for byte unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "scripts"))
from synthetic_run import write_synthetic_cache  # noqa: E402

RUN = ["run.steps=20", "run.refresh_every=10", "run.checkpoint_every=10", "run.test_every=10",
       "objective.name=min_recall", "model.init_head=la", "model.init_head_steps=30", "optim.lr=0.05",
       "optim.batch_size=32", "selmix.setting=supervised", "log.progress=false"]
PRECIOUS = "precious\n"


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("containment") / "cache"
    write_synthetic_cache(path)
    return path


def train(cache: Path, run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "launch" / "train.py"), f"run.dir={run_dir}",
                           f"data.features={cache}", *RUN, *extra], env={**os.environ, "OMP_NUM_THREADS": "1"},
                          cwd=REPO, capture_output=True, text=True, timeout=300)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    """The single `error:` line of a refused run (exit 2, no traceback)."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    (line,) = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    return line


def digest(root: Path) -> dict[str, str]:
    """Every file and link under `root` (links by their target text, not followed)."""
    out = {}
    for p in sorted(root.rglob("*")):
        key = str(p.relative_to(root))
        if p.is_symlink():
            out[key] = "-> " + os.readlink(p)
        elif p.is_file():
            out[key] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def test_a_planted_lock_symlink_is_refused_and_its_target_untouched(cache, tmp_path):
    """Before: a directory holding only .lock counted as empty, and the lock JSON went into ../victim."""
    run, victim = tmp_path / "d", tmp_path / "victim"
    run.mkdir()
    victim.write_text(PRECIOUS)
    (run / ".lock").symlink_to("../victim")
    line = one_error_line(train(cache, run))
    assert str(run / ".lock") in line and "outside run.dir" in line
    assert victim.read_text() == PRECIOUS
    assert digest(run) == {".lock": "-> ../victim"}  # nothing written into the run directory either


@pytest.mark.parametrize("entry", ["../victim2", "checkpoints/../../victim2", "ABSOLUTE", "link.pt"])
def test_a_tampered_manifest_removes_nothing(cache, tmp_path, entry):
    """Before: "../victim2" in run.json's artifacts was removed by run.overwrite=true run.resume=never."""
    run, victim = tmp_path / "run", tmp_path / "victim2"
    assert train(cache, run).returncode == 0
    victim.write_text(PRECIOUS)
    if entry == "ABSOLUTE":
        entry = str(victim)
    if entry == "link.pt":  # a relative name, but a link inside run.dir that leads out
        (run / "link.pt").symlink_to(victim)
    manifest = json.loads((run / "run.json").read_text())
    manifest["artifacts"].append(entry)
    (run / "run.json").write_text(json.dumps(manifest))
    before = digest(run)
    line = one_error_line(train(cache, run, "run.overwrite=true", "run.resume=never"))
    assert repr(entry) in line or str(run / entry) in line, line
    assert victim.read_text() == PRECIOUS
    assert digest(run) == before  # checked before anything was removed (nor was the lock taken)


@pytest.mark.parametrize("name", ["train.log", "history.jsonl", "tb", "checkpoints"])
def test_a_layout_link_leading_out_of_an_extended_run_is_refused(cache, tmp_path, name):
    """A file the run appends to (train.log, history.jsonl) or a folder it creates files in (tb, checkpoints),
    replaced by a link out of run.dir: the resumed run refuses before its first write. Before the fix the
    extension appended its log to the victim (train.log) or wrote event files beside it (tb)."""
    run, outside = tmp_path / "run", tmp_path / "outside"
    assert train(cache, run).returncode == 0
    outside.mkdir()
    target = outside / "victim"
    if name in ("tb", "checkpoints"):
        (run / name).rename(outside / name)
        target = outside / name
    else:
        (run / name).rename(target)
        target.write_text(PRECIOUS)
    (run / name).symlink_to(target)
    before_run, before_outside = digest(run), digest(outside)
    line = one_error_line(train(cache, run, "run.steps=30", "run.extend_steps=true"))
    assert str(run / name) in line and "outside run.dir" in line
    assert digest(outside) == before_outside and digest(run) == before_run


def test_the_lock_never_follows_a_link(tmp_path):
    """The lock itself refuses a symlink (O_NOFOLLOW), also where RunDir's check is not in front of it."""
    from selmix_dist.train.lock import RunLock

    victim = tmp_path / "victim"
    victim.write_text(PRECIOUS)
    (tmp_path / ".lock").symlink_to(victim)
    with pytest.raises(ValueError, match="is a symbolic link"):
        RunLock(tmp_path / ".lock").acquire()
    assert victim.read_text() == PRECIOUS


def test_a_link_at_an_atomic_writes_temporary_name_is_replaced_not_followed(tmp_path):
    from selmix_dist import atomic

    victim = tmp_path / "victim"
    victim.write_text(PRECIOUS)
    target = tmp_path / "run" / "meta.json"
    target.parent.mkdir()
    atomic.temporary_name(target).symlink_to(victim)
    atomic.write_text(target, "{}\n")
    assert victim.read_text() == PRECIOUS and target.read_text() == "{}\n"
    assert sorted(p.name for p in target.parent.iterdir()) == ["meta.json"]
