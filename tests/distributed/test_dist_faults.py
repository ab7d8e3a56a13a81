"""Faults: preemption agreed across ranks; under torchrun a killed rank resumes from the latest checkpoint,
SIGTERM finishes the step, checkpoints and exits 0, and a run of non-finite steps stops with the last
good checkpoint intact. Resumed runs end with exactly the parameters of an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dmdr.distributed import CheckpointManager, DistEnv, PreemptionHandler
from tests.distributed.dist_toy import run_workers

REPO = Path(__file__).resolve().parents[2]
SCRIPT = "tests.distributed.dist_toy_train"
"""The toy loop, run as a module (``torchrun -m``) with the repo on ``PYTHONPATH``."""


def _preemption(env: DistEnv) -> None:
    with PreemptionHandler(env) as preempt:
        assert not preempt.should_stop()
        if env.rank == 1:
            os.kill(os.getpid(), signal.SIGUSR1)
        assert preempt.requested == (env.rank == 1)
        assert preempt.should_stop()  # every rank stops, not only the signalled one
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL


def test_preemption_flag_is_agreed_across_ranks():
    run_workers(_preemption)


def _torchrun(out: Path, *args: str, restarts: int = 0) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           f"--max-restarts={restarts}", "-m", SCRIPT, "--out", str(out), *args]
    # A fresh rendezvous store per restart attempt (pytorch#135712: otherwise restarted workers can hang
    # or fail in init_process_group on the store they share with torchrun).
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p))
    return subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)


def _final(out: Path) -> dict:
    return torch.load(out / "final.pt", weights_only=False)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("baseline")
    res = _torchrun(out, "--nan-at", "4")
    assert res.returncode == 0, res.stdout + res.stderr
    final = _final(out)
    assert final["skipped"] == 1  # step 4 was non-finite on rank 1: skipped on both ranks
    return final


def _assert_same_params(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0, msg=k)


def test_killed_rank_restarts_from_latest_checkpoint(tmp_path, baseline):
    res = _torchrun(tmp_path, "--nan-at", "4", "--crash-at", "3", restarts=1)
    assert res.returncode == 0, res.stdout + res.stderr
    log = res.stdout + res.stderr
    assert "rank 0 resumed from None" in log and "rank 1 resumed from 2" in log
    final = _final(tmp_path)
    assert final["skipped"] == 1
    _assert_same_params(final["params"], baseline["params"])


def test_sigterm_checkpoints_and_exits_zero_then_resumes(tmp_path, baseline):
    res = _torchrun(tmp_path, "--nan-at", "4", "--signal-at", "2")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "rank 0 preempted after step 3" in res.stdout and "rank 1 preempted after step 3" in res.stdout
    assert not (tmp_path / "final.pt").exists()
    assert CheckpointManager(tmp_path).latest() == tmp_path / "checkpoints" / "step-3"
    res = _torchrun(tmp_path, "--nan-at", "4")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "rank 0 resumed from 3" in res.stdout
    _assert_same_params(_final(tmp_path)["params"], baseline["params"])


def test_run_of_nonfinite_steps_stops_with_last_checkpoint_intact(tmp_path):
    res = _torchrun(tmp_path, "--nan-at", "3,4,5", "--max-bad", "2")
    assert res.returncode != 0
    assert "2 consecutive non-finite steps at step 4" in res.stdout
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-2", "step-4"]
    assert CheckpointManager(tmp_path).latest() == root / "step-4"
