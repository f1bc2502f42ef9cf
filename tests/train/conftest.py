"""Fixtures shared by the trainer-component tests."""

from __future__ import annotations

import pytest

from selmix_dist.train.rundir import RunDir


@pytest.fixture
def run_dir(tmp_path) -> RunDir:
    """A freshly opened run directory under tmp_path (closed after the test)."""
    rd = RunDir(tmp_path / "run")
    rd.open(fresh=True)
    yield rd
    rd.close()
