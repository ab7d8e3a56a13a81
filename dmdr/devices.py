"""Dtype names of configs and tools (``fp32`` / ``bf16`` / ``fp16``) and the ``auto`` device choice: one place each."""

from __future__ import annotations

import torch

from dmdr.errors import ConfigError

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
"""A config's or a tool's dtype name -> the torch dtype."""
DTYPE_BYTES: dict[str, int] = {name: dtype.itemsize for name, dtype in DTYPES.items()}


def torch_dtype(name: str) -> torch.dtype:
    """``fp32`` / ``bf16`` / ``fp16`` to the torch dtype; anything else is a one-line :class:`ConfigError`."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ConfigError(f"dtype {name!r} is not one of {', '.join(DTYPES)}") from None


def pick_device(name: str, setting: str = "--device", auto: torch.device | None = None) -> torch.device:
    """The device a ``--device`` / ``--train.device`` value names.

    ``auto``: the ``auto`` argument when given (a launcher's per-rank device), else the first CUDA device when
    there is one, else the CPU. A name torch does not parse is a one-line :class:`ConfigError` naming ``setting``.
    """
    if name == "auto":
        if auto is not None:
            return auto
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(f"{setting} {name!r} is not a device (use auto, cpu, cuda, cuda:N)") from None
