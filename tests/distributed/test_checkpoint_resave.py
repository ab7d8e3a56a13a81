"""Re-saving a step (the guard's rollback re-saves its target) swaps the new copy in with two renames; a process
killed between them leaves the old copy as the step's only one, under ``.replaced-``: the next resume puts it
back (and deletes the leftover of a swap that completed). The guard's end-to-end SIGKILL test of this window is
tests/e2e/test_guard_actions.py."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pytest
import torch

import dmdr.distributed.checkpoint as ckpt
from dmdr.distributed import CheckpointManager


class _Values:
    def __init__(self, start: float) -> None:
        self.t = torch.arange(4.0) + start

    def state_dict(self):
        return {"t": self.t}

    def load_state_dict(self, state):
        self.t.copy_(state["t"])


class Killed(BaseException):
    """Stands for SIGKILL: no handler of the save catches it."""


def test_a_resave_killed_between_its_renames_resumes_from_the_previous_copy(tmp_path, monkeypatch, caplog):
    mgr = CheckpointManager(tmp_path, owns_folder=True)
    mgr.save(2, {"v": _Values(0.0)})
    root = tmp_path / "checkpoints"
    real = os.replace

    def replace_then_die(src, dst):
        real(src, dst)
        if Path(dst).name.startswith(ckpt.REPLACED):
            raise Killed

    with monkeypatch.context() as m:
        m.setattr(ckpt.os, "replace", replace_then_die)
        with pytest.raises(Killed):
            mgr.save(2, {"v": _Values(10.0)})
    assert not (root / "step-2").exists()
    assert [p.name for p in root.glob(f"{ckpt.REPLACED}*")] == [f"{ckpt.REPLACED}step-2.{mgr.writer}"]

    got = _Values(-1.0)
    with caplog.at_level(logging.WARNING, logger="dmdr"):
        assert CheckpointManager(tmp_path, owns_folder=True).resume({"v": got}) == 2
    assert torch.equal(got.t, torch.arange(4.0))  # the previous copy, whole
    assert "step-2: its re-save was interrupted; the previous copy is restored" in caplog.text
    assert not list(root.glob(f"{ckpt.REPLACED}*"))


def test_a_completed_swaps_leftover_is_deleted_and_the_new_copy_kept(tmp_path):
    mgr = CheckpointManager(tmp_path, owns_folder=True)
    mgr.save(2, {"v": _Values(0.0)})
    root = tmp_path / "checkpoints"
    stale = root / f"{ckpt.REPLACED}step-2.otherhost-1"  # killed after the second rename, before the delete
    shutil.copytree(root / "step-2", stale)
    mgr.save(2, {"v": _Values(10.0)})  # an ordinary re-save leaves nothing of its own behind
    assert sorted(p.name for p in root.iterdir()) == [stale.name, "latest", "step-2"]
    # Only the folder's lock holder touches them (another writer may be mid-swap).
    CheckpointManager(tmp_path).resume({"v": _Values(-1.0)})
    assert stale.exists()
    got = _Values(-1.0)
    assert CheckpointManager(tmp_path, owns_folder=True).resume({"v": got}) == 2
    assert torch.equal(got.t, torch.arange(4.0) + 10.0) and not stale.exists()
