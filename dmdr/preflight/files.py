"""Cheap file checks for preflight: weight-file headers, folders that must be writable, free disk.

Nothing here reads tensor data. A safetensors file is checked by its JSON header (and that the file
is as long as the header says, which catches a truncated download); a torch checkpoint by its zip
central directory (at the end of the file, so truncation shows) or the legacy pickle's magic. Each
function returns ``None`` when the file is fine, else a short reason for a
:class:`~dmdr.preflight.Problem`'s ``fix``.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import zipfile
from pathlib import Path
from typing import Any

_MAX_HEADER = 100 << 20  # safetensors caps its header at 100 MB
# torch.save(..., _use_new_zipfile_serialization=False) starts with pickle protocol 2 and a LONG1 magic number.
_LEGACY_TORCH = bytes.fromhex("8002") + b"\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")


def safetensors_header(path: str | Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (``{name: {dtype, shape, data_offsets}}`` + ``__metadata__``).

    Raises:
        ValueError: a short reason when the file is not a complete safetensors file.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise ValueError(f"{path.name} is {size} bytes, too short for a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > min(_MAX_HEADER, size - 8):
            raise ValueError(f"{path.name} is not a safetensors file (header length {n} for a {size}-byte file)")
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ValueError(f"{path.name} has no readable safetensors header (not a safetensors file)") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path.name} has no readable safetensors header (not a safetensors file)")
    end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise ValueError(f"{path.name} is truncated ({size} bytes, its header needs {8 + n + end}); "
                         "download it again")
    return header


def header_numel(header: dict[str, Any]) -> int:
    """Elements of all tensors a safetensors header lists."""
    total = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        count = 1
        for dim in info["shape"]:
            count *= int(dim)
        total += count
    return total


def torch_checkpoint_problem(path: str | Path) -> str | None:
    """Why ``path`` is not a readable ``torch.save`` file (zip or legacy format), or None."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            head = fh.read(len(_LEGACY_TORCH))
        if head == _LEGACY_TORCH:
            return None
        if not zipfile.is_zipfile(path):
            return f"{path.name} is not a torch checkpoint (no zip directory: truncated, or another format)"
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (OSError, zipfile.BadZipFile) as e:
        return f"{path.name} cannot be read ({e})"
    if not any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
        return f"{path.name} is a zip file but not a torch checkpoint (no data.pkl inside)"
    return None


def weight_file_problem(path: str | Path) -> str | None:
    """Why a weight file (``.safetensors``, or a torch ``.bin/.pt/.pth``) is not readable, or None."""
    path = Path(path)
    if not path.is_file():
        return f"{path} is missing"
    if path.name.endswith(".json") or path.suffix == ".gguf":
        return None  # index files are checked through the shards they list; GGUF is left to its loader
    if path.suffix == ".safetensors":
        try:
            safetensors_header(path)
        except (OSError, ValueError) as e:
            return str(e)
        return None
    return torch_checkpoint_problem(path)


def existing_ancestor(path: str | Path) -> Path:
    """``path`` itself if it exists, else its nearest existing parent (where it would be created)."""
    p = Path(path).expanduser().absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def writable_problem(path: str | Path) -> str | None:
    """Why folder ``path`` could not be created and written, or None (creates nothing that stays)."""
    target = Path(path).expanduser()
    base = existing_ancestor(target)
    if not base.is_dir():
        return f"is not writable: {base} is a file, not a folder"
    # Probe by writing, not os.access: root passes os.access everywhere, and /proc or a read-only
    # mount refuse only the real write. The probe is removed at once.
    probe = base / f".preflight-{os.getpid()}"
    try:
        if base == target.absolute():
            probe.write_text("ok")
            probe.unlink()
        else:
            probe.mkdir()
            probe.rmdir()
    except OSError as e:
        where = "" if base == target.absolute() else f", it would be created in {base}"
        return f"is not writable ({e.strerror or e}{where})"
    return None


def free_bytes(path: str | Path) -> int:
    """Free bytes on the filesystem where ``path`` is (or would be created)."""
    return shutil.disk_usage(existing_ancestor(path)).free
