"""The process's place in the job: rank, world, device, and the few collectives the trainer needs.

Read from the torchrun environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``). A plain ``python recipe.py`` (no torchrun) is a world of one with no process
group: every method below then works locally and never touches ``torch.distributed``.

There is no tensor or context parallelism, so every rank is a data-parallel rank
(``dp_rank == rank``); the properties exist so callers say what they mean.
"""

from __future__ import annotations

import datetime
import gc
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from dmdr.errors import ConfigError


@dataclass
class DistEnv:
    """Where this process sits in the job. Build it with :func:`init_distributed`."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_process_group: bool = False
    """True when :func:`init_distributed` created the process group (and :meth:`destroy` may end it)."""

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dp_rank(self) -> int:
        """Index of this rank's slice of the data (every rank is a data-parallel rank)."""
        return self.rank

    @property
    def dp_world_size(self) -> int:
        return self.world_size

    def barrier(self) -> None:
        if self.is_distributed:
            dist.barrier()

    def any_rank(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on at least one rank (one small all-reduce)."""
        if not self.is_distributed:
            return bool(flag)
        t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def all_ranks(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on all ranks."""
        return not self.any_rank(not flag)

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """``obj`` from rank ``src`` on every rank (picklable objects; for small control data)."""
        if not self.is_distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src, device=self.device if self.device.type == "cuda" else None)
        return box[0]

    def destroy(self) -> None:
        """End the process group if this object created it (idempotent)."""
        if self.owns_process_group and dist.is_initialized():
            dist.destroy_process_group()
        self.owns_process_group = False


def collect_released_objects() -> None:
    """Free the reference cycles a finished run leaves behind, before the interpreter shuts down.

    FSDP2 modules sit in reference cycles (their hooks point back at them) together with the
    communication state of their process groups. Left to the interpreter's final teardown, those
    are destroyed after parts of the C++ runtime, and on CPU/gloo about one exit in six under load
    aborts with "terminate called without an active exception": torchrun then reports the finished
    run as failed (and with ``--max-restarts`` starts it again). Call this after the session is
    closed and its objects are out of scope.
    """
    gc.collect()


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name}={raw!r} is not an integer") from None


def registered_backend() -> str | None:
    """The name of the out-of-tree device backend registered in this process (PrivateUse1), if any."""
    name = torch._C._get_privateuse1_backend_name()
    return None if name == "privateuseone" else name


def init_distributed(device: str = "auto", backend: str | None = None,
                     timeout: datetime.timedelta | None = None) -> DistEnv:
    """Read the torchrun environment and start the process group when ``WORLD_SIZE > 1``.

    Args:
        device: ``auto`` (``cuda:LOCAL_RANK`` when CUDA is available, else CPU), ``cpu``, ``cuda``, or the
            name of a registered PrivateUse1 backend (one device per process).
        backend: process-group backend; default ``cuda:nccl,cpu:gloo`` on CUDA (CPU collectives
            such as object broadcasts keep working) and ``gloo`` on CPU.
        timeout: collective timeout (torch's default when None).

    Returns:
        The environment. Reuses an already initialised default process group (tests that set it up
        themselves) without taking ownership of it.
    """
    rank = _env_int("RANK", 0)
    world = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", rank)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    extra = registered_backend()
    if device not in ("cpu", "cuda") and device != extra:
        also = f", {extra}" if extra else ""
        raise ConfigError(f"--train.device {device!r} is not one of auto, cpu, cuda{also}")
    if device == extra:  # an out-of-tree backend (PrivateUse1), e.g. the CPU-backed test device of tests/devices
        dev = torch.device(device, 0)
    elif device == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("--train.device cuda: CUDA is not available here; use --train.device cpu")
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        dev = torch.device("cuda", torch.cuda.current_device())
    else:
        dev = torch.device("cpu")
    env = DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=dev)
    if world > 1:
        if dist.is_initialized():
            env.rank, env.world_size = dist.get_rank(), dist.get_world_size()
        else:
            backend = backend or ("cuda:nccl,cpu:gloo" if dev.type == "cuda" else "gloo")
            kwargs: dict[str, Any] = {"backend": backend, "rank": rank, "world_size": world}
            if timeout is not None:
                kwargs["timeout"] = timeout
            if dev.type == "cuda":
                kwargs["device_id"] = dev
            dist.init_process_group(**kwargs)
            env.owns_process_group = True
    return env
