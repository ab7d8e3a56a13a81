"""File modes that follow the user's umask, for files written by libraries that pick their own.

safetensors writes its files with mode 0600 (a private temp file renamed into place), so exported
weights in a shared cluster folder are unreadable by the rest of the group. :func:`respect_umask` gives
them the mode an ordinary ``open(..., "w")`` would have (``0666 & ~umask``; folders ``0777 & ~umask``).
"""

from __future__ import annotations

import os
from pathlib import Path

_umask: int | None = None


def current_umask() -> int:
    """The process umask (read once: setting it back and forth is not thread-safe)."""
    global _umask
    if _umask is None:
        _umask = os.umask(0o022)
        os.umask(_umask)
    return _umask


def respect_umask(path: str | Path) -> None:
    """Give ``path`` (a file, or a folder and everything in it) the modes the umask allows."""
    path = Path(path)
    mask = current_umask()
    targets = [path, *path.rglob("*")] if path.is_dir() else [path]
    for p in targets:
        if p.is_symlink():
            continue
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)
