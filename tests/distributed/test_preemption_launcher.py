"""Preemption and run-folder safety end to end, on the tiny recipe:

* W=2 under ``python -m dmdr.launcher`` inside the README's SLURM batch script: SIGUSR1 to the batch
  shell (``#SBATCH --signal=B:USR1@300``) reaches the workers, they checkpoint and everything exits 0;
  a second launch into the running job's folder is refused in one line (exit 2, no torchrun traceback);
  the run then resumes at W=1 (another world size) to the end, printing the changed settings and no
  false "sources changed".
* W=1: Ctrl-C checkpoints and exits 0; with every checkpoint corrupt a relaunch refuses in one line
  before loading anything and leaves metrics.jsonl alone; ``--checkpoint.resume never`` starts over
  and keeps the old rows aside.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
RECIPE = str(REPO / "recipes" / "tiny_dmdr.py")
FAST = ["--train.max_steps", "400", "--checkpoint.interval", "4", "--log.interval", "1", "--log.sample_interval",
        "0", "--log.progress_bar", "false", "--log.tensorboard", "false", "--rl.start_step", "2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}

# The README's SLURM script, with srun's job step replaced by the launcher itself (srun forwards the
# signals it gets to its tasks, the launchers).
BATCH = """#!/bin/bash
"$@" &
pid=$!
trap 'kill -USR1 $pid' USR1
wait $pid; rc=$?
while kill -0 $pid 2>/dev/null; do wait $pid; rc=$?; done
exit $rc
"""


def _latest(out: Path) -> int | None:
    p = out / "checkpoints" / "latest"
    return int(p.read_text().strip().split("-")[1]) if p.exists() else None


def _wait_for(proc: subprocess.Popen, out: Path, step: int, log: Path) -> None:
    deadline = time.time() + 300
    while (_latest(out) or 0) < step:
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.time() < deadline, "no checkpoint in time"
        time.sleep(0.05)


def _errors(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


def test_slurm_usr1_to_the_batch_shell_checkpoints_w2_then_resumes_at_w1(tmp_path):
    out = tmp_path / "run"
    script = tmp_path / "job.sh"
    script.write_text(BATCH)
    launcher = [sys.executable, "-m", "dmdr.launcher", "--standalone", "--nproc_per_node=2", RECIPE]
    log = tmp_path / "job.txt"
    job = subprocess.Popen(["bash", str(script), *launcher, "--train.output_dir", str(out), *FAST],
                           stdout=log.open("w"), stderr=subprocess.STDOUT, env=ENV, start_new_session=True)
    try:
        _wait_for(job, out, 4, log)
        # A second launch into the same folder while the job runs: one line, exit 2, no torchrun traceback.
        second = subprocess.run([*launcher, "--train.output_dir", str(out), *FAST], capture_output=True, text=True,
                                env=ENV, timeout=300)
        text = second.stdout + second.stderr
        assert second.returncode == 2, text[-3000:]
        assert len(_errors(text)) == 1 and "is in use by pid" in _errors(text)[0], text[-3000:]
        assert "Traceback" not in text and "ChildFailedError" not in text
        os.kill(job.pid, signal.SIGUSR1)  # what SLURM does with --signal=B:USR1@300
        assert job.wait(timeout=300) == 0, log.read_text()[-3000:]
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    text = log.read_text()
    assert "received SIGUSR1" in text and "Traceback" not in text
    stopped = _latest(out)
    assert stopped is not None and 4 <= stopped < 400
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == stopped

    # Resume at W=1 (another world size) with a changed setting, to the end.
    end = stopped + 3
    res = subprocess.run([sys.executable, RECIPE, "--train.output_dir", str(out), *FAST, "--train.max_steps",
                          str(end), "--optim.generator_lr", "5e-5"], capture_output=True, text=True, env=ENV,
                         timeout=300)
    text = res.stdout + res.stderr
    assert res.returncode == 0, text[-3000:]
    assert f"resumed from generator step {stopped}" in text
    assert "optim.generator_lr 0.0001 -> 5e-05" in text and "train.max_steps 400 -> " in text
    assert "data layout changed since the checkpoint (dp_world 2 -> 1)" in text and "sources" not in text
    assert _latest(out) == end
    launches = sorted((out / "configs").glob("launch-*.json"))
    assert [json.loads(p.read_text())["config"]["train"]["max_steps"] for p in launches] == [400, end]


def test_ctrl_c_at_w1_checkpoints_and_corrupt_checkpoints_are_refused(tmp_path):
    out = tmp_path / "run"
    log = tmp_path / "run.txt"
    proc = subprocess.Popen([sys.executable, RECIPE, "--train.output_dir", str(out), *FAST], stdout=log.open("w"),
                            stderr=subprocess.STDOUT, env=ENV, start_new_session=True)
    try:
        _wait_for(proc, out, 4, log)
        os.kill(proc.pid, signal.SIGINT)  # Ctrl-C
        assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert "received SIGINT" in text and "KeyboardInterrupt" not in text and "Traceback" not in text
    stopped = _latest(out)
    assert stopped is not None and stopped >= 4
    metrics = (out / "metrics.jsonl").read_text()

    for step_dir in (out / "checkpoints").glob("step-*"):
        (step_dir / ".metadata").write_bytes(b"garbage")
    res = subprocess.run([sys.executable, RECIPE, "--train.output_dir", str(out), *FAST], capture_output=True,
                         text=True, env=ENV, timeout=300)
    text = res.stdout + res.stderr
    assert res.returncode == 2, text[-3000:]
    assert len(_errors(text)) == 1 and "is usable" in _errors(text)[0] and "Traceback" not in text
    assert "--checkpoint.resume never" in _errors(text)[0]
    assert (out / "metrics.jsonl").read_text() == metrics  # nothing dropped

    res = subprocess.run([sys.executable, RECIPE, "--train.output_dir", str(out), *FAST, "--train.max_steps", "2",
                          "--checkpoint.resume", "never"], capture_output=True, text=True, env=ENV, timeout=300)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    kept = list(out.glob("metrics-before-*.jsonl"))
    assert len(kept) == 1 and kept[0].read_text() == metrics
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
