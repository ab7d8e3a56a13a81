"""Read a DCP checkpoint in one process, without a process group (for tools, export and tests)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

from dmdr.errors import CheckpointError


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The whole saved state of ``step-<N>`` as nested dicts of full (unsharded) tensors."""
    path = Path(path)
    if not (path / ".metadata").is_file():
        raise CheckpointError(f"{path} is not a DCP checkpoint folder (no .metadata file)")
    state: dict[str, Any] = {}
    _load_state_dict(state, storage_reader=FileSystemReader(str(path)), planner=_EmptyStateDictLoadPlanner(),
                     no_dist=True)
    return state


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": t}}`` -> ``{"a.b": t}``."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def model_tensors(path: str | Path) -> dict[str, Tensor]:
    """Every model tensor of a checkpoint (generator and critic entries), flat ``entry.model.<name>`` keys."""
    flat = flatten(read_checkpoint(path))
    return {k: v for k, v in flat.items() if ".model." in f".{k}" and isinstance(v, Tensor)}
