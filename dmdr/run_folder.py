"""A run folder that one launch owns at a time, and that keeps what every launch ran with.

* :class:`RunFolderLock`: rank 0 holds ``<output_dir>/.dmdr-run.lock`` for the whole run. It is an
  ``flock`` (released by the kernel when the process dies, so a run killed with ``kill -9`` or by the
  OOM killer never leaves the folder stuck); the file records the holder (host, pid, start time,
  command) so a second launch into the same folder refuses in one line naming it. Filesystems without
  ``flock`` (some Lustre / old NFS mounts) fall back to an exclusive-create lock file whose holder is
  judged stale when it ran on this host and its process is gone (or is another process with that pid).
* :func:`record_launch`: every launch's resolved config is kept as ``configs/launch-<NNN>.json`` (with
  the step it started from); on a resume the settings that changed since the previous launch are
  printed in one line, and ``config.json`` always holds the latest launch's.
* :func:`archive_metrics`: a fresh start over a folder that holds ``metrics.jsonl`` moves the old rows
  aside (``metrics-before-<time>.jsonl``) instead of deleting them.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shlex
import socket
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from dmdr.errors import UserError

log = logging.getLogger("dmdr")

LOCK_FILE = ".dmdr-run.lock"
HISTORY_DIR = "configs"
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class RunFolderBusy(UserError):
    """Another launch holds the run folder."""


def _stamp(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def _process_start(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except (psutil.Error, OSError):
        return None


class RunFolderLock:
    """The lock of one run folder (see the module doc). ``acquire`` raises :class:`RunFolderBusy`."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self._fd: int | None = None
        self._exclusive_file = False  # the fallback: we created the file and must delete it

    def _holder_record(self) -> dict[str, Any]:
        return {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
                "process_started": _process_start(os.getpid()),
                "command": shlex.join([os.path.basename(sys.executable), *sys.argv])[:500]}

    def _read_holder(self) -> dict[str, Any]:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def _describe(self, holder: dict[str, Any]) -> str:
        if not holder:
            return "another launch (its record is unreadable)"
        started = _stamp(holder["started"]) if holder.get("started") else "an unknown time"
        return (f"pid {holder.get('pid')} on host {holder.get('host')} (started {started}: "
                f"{holder.get('command', '?')})")

    def _busy(self, holder: dict[str, Any], hint: str = "") -> RunFolderBusy:
        return RunFolderBusy(f"run folder {self.folder} is in use by {self._describe(holder)}; wait for it to "
                             f"finish or use another --train.output_dir{hint} (lock file {self.path})")

    def acquire(self) -> RunFolderLock:
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise self._busy(self._read_holder()) from None
        except OSError as err:
            os.close(fd)
            if err.errno not in _NO_FLOCK:
                raise
            return self._acquire_exclusive_file()
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps(self._holder_record()) + "\n").encode())
        os.fsync(fd)
        self._fd = fd
        return self

    def _stale(self, holder: dict[str, Any]) -> bool:
        """The recorded holder is provably dead: it ran on this host and its process is gone (or reused)."""
        if not holder or holder.get("host") != socket.gethostname():
            return False
        pid = int(holder.get("pid", -1))
        started = _process_start(pid) if pid > 0 else None
        recorded = holder.get("process_started")
        return started is None or (recorded is not None and abs(started - recorded) > 1.0)

    def _acquire_exclusive_file(self) -> RunFolderLock:
        """The fallback without ``flock``: the file itself is the lock (created exclusively)."""
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = self._read_holder()
                if not holder and self.path.stat().st_size == 0:
                    self.path.unlink(missing_ok=True)  # an empty file: left by an flock-mode run
                    continue
                if self._stale(holder):
                    log.warning("run folder lock %s was held by %s, which is gone: taking it over", self.path,
                                self._describe(holder))
                    self.path.unlink(missing_ok=True)
                    continue
                raise self._busy(holder, hint=" (this filesystem has no flock: if that run is dead, delete the "
                                              "lock file)") from None
            with os.fdopen(fd, "w") as fh:
                fh.write(json.dumps(self._holder_record()) + "\n")
            self._exclusive_file = True
            return self
        raise self._busy(self._read_holder())

    def release(self) -> None:
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, 0)  # a released lock names no holder
            except OSError:
                pass
            os.close(self._fd)  # closing drops the flock
            self._fd = None
        if self._exclusive_file:
            self.path.unlink(missing_ok=True)
            self._exclusive_file = False

    def __enter__(self) -> RunFolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_run_folder(folder: str | Path, env: Any) -> RunFolderLock | None:
    """Rank 0 takes the folder's lock; every rank raises the same :class:`RunFolderBusy` when it is held."""
    lock, error = None, None
    if env.is_main:
        try:
            lock = RunFolderLock(folder).acquire()
        except RunFolderBusy as err:
            error = str(err)
    error = env.broadcast_object(error)
    if error:
        busy = RunFolderBusy(error)
        busy.reported_elsewhere = not env.is_main
        raise busy
    return lock


# ------------------------------------------------------------------------------- config history
def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``section.field old -> new`` for every setting that differs (sorted)."""
    a, b = _flat(old), _flat(new)
    return [f"{k} {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def record_launch(config: dict[str, Any], output_dir: str | Path, resumed_from: int | None) -> list[str]:
    """Keep this launch's config, write ``config.json``, and log what changed on a resume; returns the changes.

    Args:
        config: the resolved config as a dict (:func:`dmdr.config.to_dict`).
        resumed_from: the generator step resumed from, or None for a fresh start.
    """
    out = Path(output_dir)
    history = out / HISTORY_DIR
    history.mkdir(parents=True, exist_ok=True)
    launches = sorted(history.glob("launch-*.json"))
    previous = None
    if launches:
        previous = json.loads(launches[-1].read_text()).get("config")
    elif (out / "config.json").is_file():  # a folder written before the history existed
        try:
            previous = json.loads((out / "config.json").read_text())
        except ValueError:
            previous = None
    changes = config_changes(previous, config) if previous is not None and resumed_from is not None else []
    number = int(launches[-1].stem.split("-")[1]) + 1 if launches else 1
    entry = {"launch": number, "time": _stamp(time.time()), "resumed_from": resumed_from,
             "command": shlex.join([os.path.basename(sys.executable), *sys.argv]), "changed": changes,
             "config": config}
    (history / f"launch-{number:03d}.json").write_text(json.dumps(entry, indent=2, sort_keys=True) + "\n")
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if changes:
        log.warning("resuming at generator step %d with %d changed setting(s) since the previous launch: %s "
                    "(every launch's config: %s)", resumed_from, len(changes), "; ".join(changes), history)
    return changes


def archive_metrics(output_dir: str | Path) -> Path | None:
    """Move an existing ``metrics.jsonl`` aside before a fresh start writes a new one; returns its new path."""
    path = Path(output_dir) / "metrics.jsonl"
    if not path.exists():
        return None
    dest = path.with_name(f"metrics-before-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}.jsonl")
    n = 1
    while dest.exists():
        dest = dest.with_name(f"{dest.stem.split('.')[0]}.{n}.jsonl")
        n += 1
    os.replace(path, dest)
    log.warning("fresh start in %s: the earlier metrics.jsonl is kept as %s", path.parent, dest.name)
    return dest
