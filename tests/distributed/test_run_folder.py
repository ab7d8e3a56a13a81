"""Run folders nobody can corrupt: one launch at a time (a lock that dies with its holder and names it),
every launch's config kept with what changed, old metrics kept on a fresh start, a checkpoint folder
that turns read-only reported in one line, exported weights readable by the group."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from dmdr.distributed import CheckpointManager
from dmdr.errors import CheckpointError
from dmdr.run_folder import (
    LOCK_FILE,
    RunFolderBusy,
    RunFolderLock,
    archive_metrics,
    config_changes,
    record_launch,
)

HOLD = textwrap.dedent("""
    import sys, time
    from dmdr.run_folder import RunFolderLock
    RunFolderLock(sys.argv[1]).acquire()
    print("held", flush=True)
    time.sleep(600)
""")


def _holder(folder: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_launch_is_refused_naming_the_holder_and_a_killed_holder_frees_the_folder(tmp_path):
    proc = _holder(tmp_path)
    try:
        with pytest.raises(RunFolderBusy) as err:
            RunFolderLock(tmp_path).acquire()
        msg = str(err.value)
        assert "\n" not in msg and f"in use by pid {proc.pid} on host " in msg and LOCK_FILE in msg
        assert "use another --train.output_dir" in msg
    finally:
        proc.send_signal(signal.SIGKILL)  # kill -9: no cleanup runs, the kernel drops the flock
        proc.wait()
    lock = RunFolderLock(tmp_path).acquire()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()
    with RunFolderLock(tmp_path):  # released: the same process (or any other) takes it again
        pass


def test_without_flock_a_dead_holder_on_this_host_is_stale_and_a_live_one_refuses(tmp_path, monkeypatch):
    import fcntl

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    proc = _holder(tmp_path)  # the subprocess has real flock: make it write the fallback's record
    proc.kill()
    proc.wait()
    record = {"host": os.uname().nodename, "pid": proc.pid, "started": 1.0, "process_started": 1.0,
              "command": "python old.py"}
    (tmp_path / LOCK_FILE).write_text(json.dumps(record))
    lock = RunFolderLock(tmp_path).acquire()  # its pid is gone: stale, taken over
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    with pytest.raises(RunFolderBusy, match=rf"in use by pid {os.getpid()} .*if that run is dead, delete"):
        RunFolderLock(tmp_path).acquire()  # a live holder (this process)
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()
    (tmp_path / LOCK_FILE).write_text(json.dumps({**record, "host": "another-node"}))
    with pytest.raises(RunFolderBusy, match="on host another-node"):  # cannot be checked from here: refused
        RunFolderLock(tmp_path).acquire()


def test_each_launch_config_is_kept_and_a_resume_names_what_changed(tmp_path, caplog):
    first = {"optim": {"generator_lr": 1e-5, "betas": (0.0, 0.99)}, "data": {"batch_size": 4}}
    assert record_launch(first, tmp_path, None) == []
    second = {"optim": {"generator_lr": 2e-5, "betas": (0.0, 0.99)}, "data": {"batch_size": 8}}
    with caplog.at_level("WARNING", logger="dmdr"):
        changes = record_launch(second, tmp_path, 120)
    assert changes == ["data.batch_size 4 -> 8", "optim.generator_lr 1e-05 -> 2e-05"]
    line = [r.getMessage() for r in caplog.records if "changed setting" in r.getMessage()]
    assert len(line) == 1 and "generator step 120 with 2 changed" in line[0]
    launches = sorted((tmp_path / "configs").glob("launch-*.json"))
    assert [json.loads(p.read_text())["config"]["data"]["batch_size"] for p in launches] == [4, 8]
    assert json.loads(launches[1].read_text())["resumed_from"] == 120
    assert json.loads((tmp_path / "config.json").read_text())["optim"]["generator_lr"] == 2e-5
    assert config_changes(second, second) == []


def test_a_fresh_start_keeps_the_old_metrics(tmp_path):
    from dmdr.observability import MetricsLogger

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss/dmd": 0.5}\n')
    logger = MetricsLogger(tmp_path, tensorboard=False)
    logger.log(1, {"loss/dmd": 0.25})
    kept = list(tmp_path.glob("metrics-before-*.jsonl"))
    assert len(kept) == 1 and json.loads(kept[0].read_text())["loss/dmd"] == 0.5
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["loss/dmd"] == 0.25
    assert archive_metrics(tmp_path) is not None and len(list(tmp_path.glob("metrics-before-*"))) == 2


class _Counter:
    def __init__(self) -> None:
        self.t = torch.arange(4.0)

    def state_dict(self):
        return {"t": self.t}

    def load_state_dict(self, state):
        self.t.copy_(state["t"])


def test_a_checkpoint_folder_turned_read_only_is_one_line_and_keeps_the_earlier_checkpoint(tmp_path, monkeypatch):
    mgr = CheckpointManager(tmp_path, owns_folder=True)
    mgr.save(1, {"c": _Counter()})
    root = tmp_path / "checkpoints"
    real_mkdir = Path.mkdir

    def read_only(self, *args, **kwargs):  # as a remounted read-only filesystem answers (root included)
        if self.parent == root:
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)
    with pytest.raises(CheckpointError) as err:
        mgr.save(2, {"c": _Counter()})
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"cannot write checkpoint step 2 into {root}")
    assert "Read-only file system" in msg and "earlier checkpoints are intact" in msg
    assert mgr.latest() == root / "step-1"


def test_checkpoint_temps_are_named_after_their_writer(tmp_path, monkeypatch):
    import dmdr.distributed.checkpoint as ckpt

    seen = []
    real = ckpt.dcp.save
    monkeypatch.setattr(ckpt.dcp, "save", lambda state, checkpoint_id, **kw: (seen.append(checkpoint_id),
                                                                            real(state, checkpoint_id=checkpoint_id,
                                                                                 **kw)))
    CheckpointManager(tmp_path).save(3, {"c": _Counter()})
    assert Path(seen[0]).name == f".tmp-step-3.{ckpt.writer_token()}" and str(os.getpid()) in seen[0]


def test_exported_files_follow_the_umask_not_safetensors_0600(tmp_path):
    from safetensors.torch import save_file

    from dmdr.export import write_folder

    def fill(folder: Path) -> None:
        save_file({"w": torch.zeros(2)}, str(folder / "model.safetensors"))
        (folder / "sub").mkdir()
        save_file({"w": torch.zeros(2)}, str(folder / "sub" / "lora.safetensors"))

    old = os.umask(0o022)
    try:
        import dmdr.permissions as perms

        perms._umask = None
        out = write_folder(tmp_path / "export", fill)
    finally:
        os.umask(old)
        perms._umask = None
    assert (out / "model.safetensors").stat().st_mode & 0o777 == 0o644
    assert (out / "sub" / "lora.safetensors").stat().st_mode & 0o777 == 0o644
    assert (out / "sub").stat().st_mode & 0o777 == 0o755
