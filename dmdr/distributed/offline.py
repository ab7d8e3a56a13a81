"""Read a DCP checkpoint in one process, without a process group (for tools, export and tests)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.metadata import BytesStorageMetadata
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

from dmdr.distributed.checkpoint import raise_dcp_error
from dmdr.distributed.safe_load import SafeFileSystemReader, SafeLoadPlanner, load_plain
from dmdr.errors import CheckpointError


class _SafeEmptyPlanner(SafeLoadPlanner, _EmptyStateDictLoadPlanner):
    """DCP's "load everything" planner, its non-tensor items read as plain data only."""


def read_checkpoint(path: str | Path, keys: list[str] | None = None) -> dict[str, Any]:
    """The saved state of ``step-<N>`` as nested dicts of full (unsharded) tensors (only ``keys``, flattened
    ``entry.key`` names, when given); non-tensor items are read as plain data only."""
    path = Path(path)
    if not (path / ".metadata").is_file():
        raise CheckpointError(f"{path} is not a DCP checkpoint folder (no .metadata file)")
    SafeFileSystemReader(str(path)).read_metadata()  # a refusal here is one line; DCP's own read is not
    state: dict[str, Any] = {}
    planner = _SafeEmptyPlanner(keys=keys)
    planner.checkpoint = f"checkpoint {path}"
    try:
        _load_state_dict(state, storage_reader=SafeFileSystemReader(str(path)), planner=planner, no_dist=True)
    except CheckpointException as err:  # a BaseException wrapping the failing rank's own error
        raise_dcp_error(err, f"cannot read checkpoint {path}")
    return state


def check_plain_items(path: str | Path) -> None:
    """Read every non-tensor item of a checkpoint folder (and dmdr's per-rank blobs in them) as plain data.

    For readers that load only some tensors (export, sampling): a folder holding any other pickle was not
    written by dmdr and is refused (:class:`~dmdr.distributed.safe_load.UnsafeCheckpointError`) before its
    weights are used. The items are small (counters, RNG states, loader positions); no tensor data is read.
    """
    held = SafeFileSystemReader(str(path)).read_metadata().state_dict_metadata
    keys = [k for k, v in held.items() if isinstance(v, BytesStorageMetadata)]
    items = flatten(read_checkpoint(path, keys)) if keys else {}
    for key, value in items.items():
        if isinstance(value, bytes) and value:  # dmdr's per-rank blobs are torch.save streams
            load_plain(value, f"checkpoint {path} entry {key!r}")


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
