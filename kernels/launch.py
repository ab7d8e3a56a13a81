"""What every Triton launcher here shares: output buffers, per-sample vectors, block sizes.

Imported only by the Triton modules (never at ``import dmdr.kernels`` time), so it may import triton.
Every buffer a kernel writes is allocated through :func:`alloc`: the tests replace it with a
function that poisons the buffer, and then check that the kernels wrote every element.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor


def interpreting() -> bool:
    """Whether Triton runs its CPU interpreter (``TRITON_INTERPRET=1``)."""
    import triton

    return bool(triton.knobs.runtime.interpret) or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def alloc(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """An uninitialised buffer a kernel fills completely (tests swap in a poisoned one)."""
    return torch.empty(shape, dtype=dtype, device=device)


def per_sample(value: float | Tensor, batch: int, device: torch.device, name: str) -> Tensor:
    """A float, 0-d or ``(batch,)`` value as a contiguous fp32 ``(batch,)`` vector on ``device``.

    Kernels read per-sample scalars (times, guidance, LoRA scales) through a pointer, so a new value
    is new data, never a new compilation.
    """
    if not isinstance(value, Tensor):
        return torch.full((batch,), float(value), dtype=torch.float32, device=device)
    if value.ndim == 0 or (value.ndim == 1 and value.shape[0] == 1):
        return value.detach().to(device=device, dtype=torch.float32).reshape(1).expand(batch).contiguous()
    if value.ndim != 1 or value.shape[0] != batch:
        raise ValueError(f"{name} must be a float, a 0-d tensor or a ({batch},) tensor, "
                         f"got shape {tuple(value.shape)}")
    return value.detach().to(device=device, dtype=torch.float32).contiguous()


def elementwise_block() -> int:
    """Elements per program of the memory-bound kernels.

    On GPU 1024 elements with 4 warps keeps 8 elements a thread in flight per stream. The interpreter
    runs programs one after another in Python, so it gets big blocks (fewer programs, same math).
    """
    return 4096 if interpreting() else 1024


def check_device(*tensors: Tensor) -> None:
    """One clear line when the Triton path is forced on tensors it cannot run on."""
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devices))}")
    device = devices.pop()
    if device.type != "cuda" and not interpreting():
        raise RuntimeError(
            f"DMDR_KERNELS=triton on {device.type} tensors needs TRITON_INTERPRET=1 set before dmdr is "
            "imported (or unset DMDR_KERNELS to use the torch reference)"
        )
