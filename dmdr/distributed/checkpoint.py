"""Checkpoints: one ``Stateful`` tree saved with torch.distributed.checkpoint (DCP), atomically.

Layout::

    <output_dir>/checkpoints/
        step-250/            complete checkpoints (DCP files + COMPLETE.json)
        step-500/
        .tmp-step-750.host-4242/  a save in progress (or one that died); never loaded, pruned later
        latest               "step-500": updated last, for people and tools

A save writes into ``.tmp-step-<N>.<host>-<pid>`` (named after rank 0's process, so two writers never
share a temp folder, and a writer deletes only its own temps, or every stale one when it holds the run
folder's lock, :mod:`dmdr.run_folder`); when every rank has written, each rank CRC32s a share of
the files, rank 0 writes ``COMPLETE.json`` (step, world size, every file with its size and CRC32),
renames the folder to ``step-<N>``, points ``latest`` at it (tmp file + ``os.replace``) and prunes
all but the newest ``keep_last`` complete checkpoints. A crash at any moment leaves either the
previous checkpoints or the new one complete, never a half-written folder named ``step-<N>``.

Choosing one: :meth:`CheckpointManager.latest` is the newest ``step-<N>`` whose marker exists and
whose files all have their recorded sizes (cheap); :meth:`CheckpointManager.resume` also checks the
CRC32s (each rank reads a share of the files) and falls back to the next older checkpoint when one
fails; when every checkpoint fails it refuses in one line (a fresh start over a run folder is only done
when asked, ``--checkpoint.resume never``). Loading an explicit path that fails raises
:class:`~dmdr.errors.CheckpointError` naming the file.

World-size changes (resharding):

* models and optimizer states (DTensor or plain) are resharded by DCP: a checkpoint written at
  W ranks loads at any W' (including one process); step counters and other global values too.
* per-rank entries (:class:`~dmdr.distributed.state.RankLocal`: RNG states, data-loader positions)
  are restored only when W' == W. Otherwise an entry that defines ``load_resharded_state(states)``
  receives the W old states (so a loader can re-split the stream); any other keeps the fresh state
  it was built with (RNGs seeded from ``train.seed`` and the new rank; the data loader restarts its
  pass over the data in its seed's order), and rank 0 logs a warning naming the entries. Training
  then continues correctly but not bit-for-bit like the W-rank run would have.

Trust. Loading runs no code from the folder: the marker is JSON; every file is checked against it (sizes,
the SHA-256 of ``.metadata``, CRC32s) before DCP opens any; DCP's ``.metadata`` and its non-tensor items,
and our per-rank blobs, are unpickled as plain data only (:mod:`dmdr.distributed.safe_load`); and the
marker's record (:mod:`dmdr.provenance`: family, generator mode, teacher fingerprint) must match the run's
before any weights load. The checksums detect corruption, not forgery (whoever can write the folder can
rewrite the marker): a checkpoint someone else wrote can still hold wrong *values* (weights, counters,
data positions), so trust its author for what it trains into, not for your machine's safety.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import socket
import time
import warnings
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from dmdr.distributed.env import DistEnv
from dmdr.distributed.safe_load import SafeFileSystemReader, load_plain, safe_planner
from dmdr.distributed.state import RankLocal
from dmdr.errors import CheckpointError
from dmdr.provenance import RECORD_KEY, record_mismatch

log = logging.getLogger("dmdr")

MARKER = "COMPLETE.json"
POINTER = "latest"
_PREFIX = "step-"
_TMP = ".tmp-step-"
_TRASH = ".trash-"
REPLACED = ".replaced-"
"""The old copy of a step being re-saved (the guard's rollback re-saves its target), between the two renames
that swap the new copy in: a process killed there leaves it as the step's only copy, put back at resume."""
_FORMAT = 1
_RECORD_FIX = "resume with the same settings, or start the new run in another --train.output_dir"


def _step_of(path: Path) -> int | None:
    name = path.name
    if not name.startswith(_PREFIX):
        return None
    try:
        return int(name[len(_PREFIX):])
    except ValueError:
        return None


def _crc32(path: Path) -> str:
    crc = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def _data_files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != MARKER)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def writer_token() -> str:
    """This process's name in temp folders (``<host>-<pid>``): two writers never pick the same one."""
    host = "".join(c if c.isalnum() or c in "-_" else "_" for c in socket.gethostname()) or "host"
    return f"{host}-{os.getpid()}"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


@contextmanager
def _quiet_single_process():
    """DCP warns that it "assumes" one process even when told so with ``no_dist``."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninit")
        yield


def _to_bytes(state: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def rank_error(err: BaseException) -> BaseException:
    """The failing rank's own exception inside DCP's :class:`CheckpointException` (``err`` itself otherwise)."""
    if isinstance(err, CheckpointException) and err.failures:
        return next(iter(err.failures.values()))[0]
    return err


def raise_dcp_error(err: BaseException, context: str) -> None:
    """Re-raise a DCP failure as one line: our own :class:`CheckpointError` as is, any other after ``context``."""
    own = rank_error(err)
    if isinstance(own, CheckpointError):
        raise type(own)(str(own)) from None
    raise CheckpointError(f"{context}: {dcp_error_line(err)}") from err


def dcp_error_line(err: BaseException) -> str:
    """One line for a DCP failure: the failing rank's own exception, not DCP's multi-line wrapper.

    DCP wraps per-rank failures in :class:`CheckpointException`, a ``BaseException`` (so ``except
    Exception`` does not catch it: catch ``(Exception, CheckpointException)``).
    """
    err = rank_error(err)
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def saved_keys(path: str | Path) -> set[str]:
    """The flattened state keys a DCP checkpoint folder holds (``entry.key.subkey``), from its metadata."""
    return set(SafeFileSystemReader(str(path)).read_metadata().state_dict_metadata)


def _drop_unsaved_optional(name: str, obj: Any, state: dict[str, Any], held: set[str]) -> None:
    """Remove from ``state`` the keys ``obj.optional_state_keys`` names that the checkpoint lacks.

    A Stateful lists there what a run may add after the checkpoint was written (the trainer's EMA,
    switched on at resume); its ``load_state_dict`` then sees the key missing and starts it fresh.
    """
    for key in getattr(obj, "optional_state_keys", ()):
        prefix = f"{name}.{key}"
        if key in state and not any(k == prefix or k.startswith(prefix + ".") for k in held):
            del state[key]


def read_marker(path: str | Path) -> dict[str, Any]:
    """The ``COMPLETE.json`` of a checkpoint folder (raises :class:`CheckpointError` if absent/unreadable)."""
    marker = Path(path) / MARKER
    if not marker.is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint: {MARKER} is missing (the save did not "
                              f"finish or this is not a checkpoint folder)")
    try:
        return json.loads(marker.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{marker} is unreadable ({err}); the checkpoint is corrupt") from None


def verify_checkpoint(path: str | Path, checksums: bool = False,
                      share: tuple[int, int] = (0, 1)) -> str | None:
    """Why ``path`` is not a usable checkpoint (one line naming the file), or None when it is.

    Args:
        path: a ``step-<N>`` folder.
        checksums: also compare CRC32s (reads the files); sizes are always checked.
        share: ``(i, n)``: check CRC32s only of files ``i::n`` (ranks split the reading).
    """
    path = Path(path)
    try:
        marker = read_marker(path)
    except CheckpointError as err:
        return str(err)
    files: dict[str, dict[str, Any]] = marker.get("files", {})
    if ".metadata" not in files:
        return f"{path / MARKER} lists no .metadata file; the checkpoint is corrupt"
    for rel, info in files.items():
        f = path / rel
        if not f.is_file():
            return f"checkpoint file {f} is missing"
        size = f.stat().st_size
        if size != info["size"]:
            return f"checkpoint file {f} has {size} bytes, expected {info['size']} (truncated or corrupt)"
    recorded = marker.get("metadata_sha256")
    if recorded and hashlib.sha256((path / ".metadata").read_bytes()).hexdigest() != recorded:
        return f"checkpoint file {path / '.metadata'} does not match its recorded SHA-256 (corrupt)"
    if checksums:
        i, n = share
        for rel in sorted(files)[i::n]:
            if _crc32(path / rel) != files[rel]["crc32"]:
                return f"checkpoint file {path / rel} does not match its recorded CRC32 (corrupt)"
    return None


class CheckpointManager:
    """Save, find, verify and load checkpoints of one run. Every method is collective: call it on all ranks.

    Args:
        output_dir: the run folder; checkpoints go to ``<output_dir>/checkpoints``.
        keep_last: complete checkpoints kept (older ones are deleted after each save).
        async_save: write in a background thread (DCP ``async_save`` over a dedicated gloo group):
            :meth:`save` returns once the state is staged in host memory; the checkpoint is finalised
            (marker, rename, ``latest``) at the next :meth:`save`, :meth:`wait` or :meth:`close`.
        env: the distributed environment (None = one process).
        owns_folder: the run holds the run folder's lock (:class:`dmdr.run_folder.RunFolderLock`): temp
            folders of earlier (dead) writers are deleted too. Without it only this writer's own are.
        record: what the run trains (:func:`dmdr.provenance.run_record`): written into every marker and
            compared at :meth:`load`, which refuses a checkpoint whose record differs (None: not checked).
    """

    def __init__(self, output_dir: str | Path, keep_last: int = 3, async_save: bool = False,
                 env: DistEnv | None = None, record: dict[str, Any] | None = None, owns_folder: bool = False):
        if keep_last < 1:
            raise CheckpointError(f"--checkpoint.keep_last {keep_last}: must be >= 1")
        self.root = Path(output_dir) / "checkpoints"
        self.keep_last = keep_last
        self.async_save = async_save
        self.env = env or DistEnv()
        self.record = record
        self.owns_folder = owns_folder
        self.protected: set[int] = set()
        """Steps never pruned (the guard's last passing probe: its rollback target)."""
        self.writer = writer_token()  # rank 0's is the one used (it names and prunes the temps)
        self._pending: tuple[Any, int, Path, dict[str, Any]] | None = None
        self._group = None
        if async_save and self.env.is_distributed:
            # The background writer's collectives must not interleave with training's on one group.
            self._group = dist.new_group(backend="gloo")

    @classmethod
    def from_config(cls, cfg: Any, env: DistEnv | None = None, owns_folder: bool = False) -> CheckpointManager:
        """From a :class:`~dmdr.config.TrainConfig` (``train.output_dir``, the ``checkpoint`` section, the record)."""
        from dmdr.provenance import run_record

        return cls(cfg.train.output_dir, cfg.checkpoint.keep_last, cfg.checkpoint.async_save, env,
                   record=run_record(cfg), owns_folder=owns_folder)

    # ------------------------------------------------------------------ paths
    def step_dir(self, step: int) -> Path:
        return self.root / f"{_PREFIX}{step}"

    def checkpoints(self) -> list[Path]:
        """Every ``step-<N>`` folder, newest first (complete or not)."""
        if not self.root.is_dir():
            return []
        found = [(s, p) for p in self.root.iterdir() if p.is_dir() and (s := _step_of(p)) is not None]
        return [p for _, p in sorted(found, reverse=True)]

    # ------------------------------------------------------------------ save
    def save(self, step: int, app_state: dict[str, Any], *, final: bool = False) -> Path:
        """Write ``app_state`` as ``step-<step>``; ``final`` (or ``async_save=False``) waits for completion.

        ``app_state`` maps names to ``Stateful`` objects (``state_dict`` / ``load_state_dict``);
        :class:`~dmdr.distributed.state.RankLocal` ones are stored once per rank.
        """
        self.wait()
        tmp = self._make_temp(step)
        state: dict[str, Any] = {}
        kinds: dict[str, str] = {}
        for name, obj in app_state.items():
            if isinstance(obj, RankLocal):
                state[name] = {f"rank{self.env.rank}": _to_bytes(obj.state_dict())}
                kinds[name] = "rank"
            else:
                state[name] = obj.state_dict()
                kinds[name] = "global"
        meta = {"format": _FORMAT, "step": step, "world_size": self.env.world_size,
                "dp_world_size": self.env.dp_world_size, "entries": kinds}
        if self.record is not None:
            meta[RECORD_KEY] = self.record
        if self.async_save and not final:
            with _quiet_single_process():
                future = dcp.async_save(state, checkpoint_id=str(tmp), process_group=self._group,
                                        no_dist=not self.env.is_distributed)
            self._pending = (future, step, tmp, meta)
        else:
            try:
                with _quiet_single_process():
                    dcp.save(state, checkpoint_id=str(tmp), no_dist=not self.env.is_distributed)
            except (Exception, CheckpointException) as err:  # noqa: BLE001 - disk full, permissions: one line
                raise CheckpointError(f"cannot write checkpoint {tmp} (earlier checkpoints are intact): "
                                      f"{dcp_error_line(err)}") from err
            self._finalize(step, tmp, meta)
        return self.step_dir(step)

    def _make_temp(self, step: int) -> Path:
        """Rank 0 creates this writer's temp folder for ``step``; every rank gets its path, or one error line.

        A folder that became read-only (or a full disk) must stop every rank with one line, not leave
        the other ranks waiting in the next collective while rank 0 prints a traceback.
        """
        found: tuple[str | None, str | None] = (None, None)
        if self.env.is_main:
            tmp = self.root / f"{_TMP}{step}.{self.writer}"
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir()
                found = (str(tmp), None)
            except OSError as err:
                found = (None, f"{err.strerror or err}: {err.filename or tmp}")
        path, error = self.env.broadcast_object(found)
        if error is not None:
            raise CheckpointError(f"cannot write checkpoint step {step} into {self.root} (earlier checkpoints are "
                                  f"intact): {error}")
        return Path(path)

    def wait(self) -> None:
        """Finish a pending asynchronous save (collective; a no-op when none is pending)."""
        if self._pending is None:
            return
        future, step, tmp, meta = self._pending
        self._pending = None
        error = None
        try:
            future.result()
        except (Exception, CheckpointException) as err:  # noqa: BLE001 - reported on every rank below
            error = err
        if self.env.any_rank(error is not None):
            raise CheckpointError(f"asynchronous save of checkpoint step {step} failed (earlier checkpoints are "
                                  f"intact){': ' + dcp_error_line(error) if error else ' on another rank'}")
        self._finalize(step, tmp, meta)

    def close(self) -> None:
        self.wait()

    def _finalize(self, step: int, tmp: Path, meta: dict[str, Any]) -> None:
        self.env.barrier()
        # One listing (rank 0's) for everyone: a shared filesystem may show other ranks' files late.
        files = self.env.broadcast_object(_data_files(tmp) if self.env.is_main else None)
        mine = {rel: {"size": (tmp / rel).stat().st_size, "crc32": _crc32(tmp / rel)}
                for rel in files[self.env.rank::self.env.world_size]}
        shares = [mine]
        if self.env.is_distributed:
            shares = [None] * self.env.world_size
            dist.all_gather_object(shares, mine)
        error = None
        if self.env.is_main:
            try:
                self._commit(step, tmp, meta, {k: v for share in shares for k, v in share.items()})
            except OSError as err:  # disk full, permissions: every rank must hear of it, not hang
                error = f"{err.strerror or err}: {err.filename or tmp}"
        if self.env.any_rank(error is not None):
            raise CheckpointError(f"could not finish checkpoint step {step}: "
                                  f"{error or 'rank 0 failed to write it'}")

    def _commit(self, step: int, tmp: Path, meta: dict[str, Any], files: dict[str, Any]) -> None:
        """Rank 0: marker, atomic rename, ``latest`` pointer, pruning."""
        meta["files"] = files
        meta["metadata_sha256"] = hashlib.sha256((tmp / ".metadata").read_bytes()).hexdigest()
        meta["time"] = time.time()
        _write_atomic(tmp / MARKER, json.dumps(meta, indent=1, sort_keys=True) + "\n")
        final = self.step_dir(step)
        if final.exists():  # re-saving a step: swap, then delete the old copy
            old = self.root / f"{REPLACED}{final.name}.{self.writer}"
            os.replace(final, old)
            os.replace(tmp, final)  # killed before this line: restore_replaced() puts the old copy back
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(self.root)
        _write_atomic(self.root / POINTER, final.name + "\n")
        self._prune()
        log.info("checkpoint %s written", final)

    def _prune(self) -> None:
        pending = self._pending[2] if self._pending is not None else None
        for p in self.root.iterdir():
            if not (p.name.startswith(_TMP) or p.name.startswith(_TRASH)) or p == pending:
                continue
            # Another writer's temp may be a save in progress; only the lock holder knows there is none.
            if self.owns_folder or p.name.endswith(f".{self.writer}"):
                shutil.rmtree(p, ignore_errors=True)
        complete = [p for p in self.checkpoints() if verify_checkpoint(p) is None]
        kept = complete[: self.keep_last]
        if not kept:
            return
        oldest = _step_of(kept[-1])
        for p in self.checkpoints():
            if p not in kept and (_step_of(p) or 0) < (oldest or 0) and _step_of(p) not in self.protected:
                shutil.rmtree(p, ignore_errors=True)

    def restore_replaced(self) -> None:
        """Rank 0: a step whose re-save was killed between its two renames gets its old copy back; leftovers of
        completed swaps are deleted. Only the folder's lock holder may (another writer may be mid-swap)."""
        if not (self.env.is_main and self.owns_folder and self.root.is_dir()):
            return
        for p in self.root.iterdir():
            if not p.name.startswith(REPLACED) or not p.is_dir():
                continue
            final = self.root / p.name[len(REPLACED):].split(".")[0]  # writer tokens hold no dots
            if final.exists() or _step_of(final) is None:
                shutil.rmtree(p, ignore_errors=True)
            else:
                os.replace(p, final)
                log.warning("checkpoint %s: its re-save was interrupted; the previous copy is restored", final.name)
        _fsync_dir(self.root)

    def discard_after(self, step: int) -> None:
        """Delete every checkpoint newer than ``step`` (a rolled-back branch); collective."""
        self.wait()
        if self.env.is_main:
            for p in self.checkpoints():
                if (_step_of(p) or 0) > step:
                    trash = self.root / f"{_TRASH}{p.name}.{self.writer}"
                    os.replace(p, trash)  # atomically out of the step-<N> namespace, then deleted
                    shutil.rmtree(trash, ignore_errors=True)
            _fsync_dir(self.root)
        self.env.barrier()

    # ------------------------------------------------------------------ find and load
    def latest(self, warn: bool = True) -> Path | None:
        """The newest complete checkpoint (marker present, file sizes as recorded), agreed by all ranks."""
        choice = None
        if self.env.is_main:
            for p in self.checkpoints():
                reason = verify_checkpoint(p)
                if reason is None:
                    choice = str(p)
                    break
                if warn:
                    log.warning("skipping checkpoint %s: %s", p.name, reason)
        choice = self.env.broadcast_object(choice)
        return Path(choice) if choice else None

    def _verify_all_ranks(self, path: Path, checksums: bool) -> str | None:
        share = (self.env.rank, self.env.world_size)
        return self._first_reason(verify_checkpoint(path, checksums=checksums, share=share))

    def _first_reason(self, reason: str | None) -> str | None:
        """The first rank's non-None ``reason``, on every rank (so that all ranks stop together)."""
        if not self.env.is_distributed:
            return reason
        reasons: list[str | None] = [None] * self.env.world_size
        dist.all_gather_object(reasons, reason)
        return next((r for r in reasons if r), None)

    def check_record(self, resume: str = "auto") -> None:
        """Refuse, before any model is built, a checkpoint ``resume`` would load whose record differs from the run's.

        ``auto`` looks at :meth:`latest`; a checkpoint without a record (or no checkpoint) passes here,
        :meth:`load` warns or reports it.
        """
        if resume == "never":
            return
        if resume == "auto" and self.checkpoints() and self.latest(warn=False) is None:
            # Cheap (sizes only) and before any model loads; resume() repeats it with the CRC32s.
            raise CheckpointError(self._none_usable([(p, verify_checkpoint(p)) for p in self.checkpoints()]))
        if self.record is None:
            return
        path = self.latest(warn=False) if resume == "auto" else Path(resume)
        if path is None or not (path / MARKER).is_file():
            return
        try:
            saved = read_marker(path).get(RECORD_KEY)
        except CheckpointError:
            return  # load() reports the unreadable marker
        reason = self._first_reason(record_mismatch(saved, self.record, path) if saved else None)
        if reason:
            raise CheckpointError(f"{reason}: {_RECORD_FIX}")

    def load(self, app_state: dict[str, Any], path: str | Path, checksums: bool = True) -> int:
        """Load ``app_state`` in place from the checkpoint folder ``path``; returns its step.

        The folder is verified (sizes, SHA-256 of ``.metadata``, CRC32s) and its record compared with
        this run's before DCP reads anything in it; DCP then reads with the plain-data reader and
        planner of :mod:`dmdr.distributed.safe_load`.

        Raises:
            CheckpointError: the folder is incomplete, truncated or corrupt (the message names the
                file), it was trained with another family, generator mode or teacher (the message names
                the setting, saved vs current), it does not hold an entry of ``app_state``, or it holds a
                pickle that is not plain data.
        """
        path = Path(path)
        reason = self._verify_all_ranks(path, checksums)
        if reason:
            raise CheckpointError(reason)
        meta = read_marker(path)
        if self.record is not None:
            reason = self._first_reason(record_mismatch(meta.get(RECORD_KEY), self.record, path))
            if reason:
                raise CheckpointError(f"{reason}: {_RECORD_FIX}")
        # DCP swallows a failed metadata read into a multi-line "metadata is None": read it here first.
        SafeFileSystemReader(str(path)).read_metadata()
        old_world = int(meta["world_size"])
        state: dict[str, Any] = {}
        skipped = []
        for name, obj in app_state.items():
            if name not in meta["entries"] and getattr(obj, "optional", False):
                if self.env.is_main:
                    log.info("checkpoint %s has no entry %r: it starts fresh", path.name, name)
                continue
            if name not in meta["entries"]:
                held = ", ".join(sorted(meta["entries"]))
                raise CheckpointError(f"checkpoint {path} has no entry {name!r} (it holds {held}); "
                                      f"was it written by another setup?")
            if isinstance(obj, RankLocal):
                if old_world == self.env.world_size:
                    state[name] = {f"rank{self.env.rank}": b""}
                elif hasattr(obj, "load_resharded_state"):
                    state[name] = {f"rank{r}": b"" for r in range(old_world)}
                else:
                    skipped.append(name)
            else:
                state[name] = obj.state_dict()
                if getattr(obj, "optional_state_keys", ()):
                    _drop_unsaved_optional(name, obj, state[name], saved_keys(path))
        if skipped and self.env.is_main:
            log.warning("checkpoint %s was written by %d ranks, this run has %d: per-rank state %s "
                        "starts fresh (models, optimizers and counters are restored)",
                        path.name, old_world, self.env.world_size, ", ".join(skipped))
        try:
            with _quiet_single_process():
                dcp.load(state, checkpoint_id=str(path), storage_reader=SafeFileSystemReader(str(path)),
                         planner=safe_planner(path), no_dist=not self.env.is_distributed)
        except (Exception, CheckpointException) as err:  # noqa: BLE001 - the user gets one line
            raise_dcp_error(err, f"cannot load checkpoint {path}")
        # Per-rank blobs are decoded here, not by DCP: every rank must hear of a refused one (or it would hang).
        decoded: dict[str, Any] = {}
        refused: CheckpointError | None = None
        for name, blobs in state.items():
            if isinstance(app_state[name], RankLocal):
                ranks = [self.env.rank] if old_world == self.env.world_size else range(old_world)
                try:
                    decoded[name] = [load_plain(blobs[f"rank{r}"], f"checkpoint {path} entry '{name}.rank{r}'")
                                     for r in ranks]
                except CheckpointError as err:
                    refused = refused or err
        reason = self._first_reason(str(refused) if refused else None)
        if reason:
            raise refused or CheckpointError(reason)
        for name, obj in app_state.items():
            if name not in state:
                continue
            if name in decoded:
                if old_world == self.env.world_size:
                    obj.load_state_dict(decoded[name][0])
                else:
                    obj.load_resharded_state(decoded[name])
            else:
                obj.load_state_dict(state[name])
        if self.env.is_main:
            log.info("resumed from %s (step %d)", path, meta["step"])
        return int(meta["step"])

    def resume(self, app_state: dict[str, Any], resume: str = "auto") -> int | None:
        """Apply ``--checkpoint.resume``: ``auto`` (newest usable checkpoint, if any), ``never``, or a folder.

        ``auto`` skips (with a warning) checkpoints that fail verification, newest first, so a corrupt
        latest falls back to the previous one. Returns the step resumed from, or None for a fresh start.
        """
        if resume == "never":
            return None
        if resume != "auto":
            return self.load(app_state, resume)
        self.restore_replaced()
        found = [str(p) for p in self.checkpoints()] if self.env.is_main else None
        candidates = self.env.broadcast_object(found)
        skipped: list[tuple[Path, str | None]] = []
        for p in map(Path, candidates):
            reason = self._verify_all_ranks(p, checksums=True)
            if reason is None:
                if self.env.is_main:
                    for old, why in skipped:
                        log.warning("skipping checkpoint %s: %s", old.name, why)
                return self.load(app_state, p, checksums=False)
            skipped.append((p, reason))
        if skipped:
            raise CheckpointError(self._none_usable(skipped))
        return None

    def _none_usable(self, failed: list[tuple[Path, str | None]]) -> str:
        """One line for a run folder whose every checkpoint fails verification (newest first in ``failed``)."""
        newest, reason = failed[0]
        return (f"none of the {len(failed)} checkpoint(s) in {self.root} is usable (newest, {newest.name}: {reason}); "
                f"nothing was changed: resume an older copy with --checkpoint.resume <folder>, or start over in "
                f"this folder with --checkpoint.resume never (metrics.jsonl is kept under another name)")
