"""Reading a checkpoint without running code from it: plain-data unpickling for everything DCP stores as pickles.

torch.distributed.checkpoint writes every non-tensor value of the state (step counters, dicts, our per-rank
blobs) with ``torch.save``, and its ``DefaultLoadPlanner`` unpickles them fully;
its ``FileSystemReader`` reads the folder's ``.metadata`` with ``pickle.load``. A crafted file could name any
callable there and have it run on every rank at resume. dmdr loads through:

* :class:`SafeLoadPlanner`: the byte items through ``torch.load(weights_only=True)`` (tensors, numbers,
  strings, bytes, lists, tuples, dicts); anything else is refused with one :class:`~dmdr.errors.CheckpointError`.
* :class:`SafeFileSystemReader`: ``.metadata`` through an unpickler that builds only DCP's metadata classes,
  ``torch.Size``, dtypes, layouts and paths (:data:`METADATA_GLOBALS`), refusing any other global.
* :func:`load_plain`: dmdr's own per-rank blobs (RNG states, loader positions), ``weights_only=True``.

What dmdr writes is plain data by construction (``tests/distributed/test_safe_checkpoint.py`` keeps it so).
"""

from __future__ import annotations

import io
import pickle
import re
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._traverse import set_element  # what DefaultLoadPlanner.load_bytes uses
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem

from dmdr.errors import CheckpointError

_DCP_METADATA = "torch.distributed.checkpoint.metadata"
METADATA_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    [(_DCP_METADATA, n) for n in ("Metadata", "StorageMeta", "MetadataIndex", "TensorStorageMetadata",
                                  "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
                                  "_MEM_FORMAT_ENCODING")]
    + [("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
       ("torch.serialization", "_get_layout"), ("collections", "OrderedDict")]
    + [("pathlib", n) for n in ("Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath")]
    + [("torch", n) for n in dir(torch) if isinstance(getattr(torch, n, None), torch.dtype)])
"""What a DCP ``.metadata`` pickle may name: data classes and constructors that only build values."""

_GLOBAL = re.compile(r"GLOBAL (\S+)|unrecognized function (\S+)|object for \S+ but got (.+?)$", re.MULTILINE)


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file holds a pickle that is not plain data: it was not written by dmdr and may run code."""


def _refusal(what: str, detail: str) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(f"{what} is not plain data ({detail}); refusing to unpickle it, it could run "
                                 "code: dmdr checkpoints hold only tensors, numbers, strings, lists and dicts")


def _culprit(err: BaseException) -> str:
    """The global a refused pickle named, from torch's multi-line weights_only message."""
    found = _GLOBAL.search(str(err))
    name = next((g for g in found.groups() if g), "") if found else ""
    return f"it names {name.rstrip('.')}" if name else str(err).strip().splitlines()[0][:200]


def load_plain(data: bytes | io.BytesIO, what: str) -> Any:
    """``torch.load(weights_only=True)`` of ``data``; a pickle naming anything else: :class:`UnsafeCheckpointError`.

    Args:
        what: names the blob in the error (``checkpoint .../step-8 entry 'rng.rank0'``).
    """
    stream = io.BytesIO(data) if isinstance(data, bytes) else data
    try:
        return torch.load(stream, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise _refusal(what, _culprit(err)) from None
    except (RuntimeError, EOFError, ValueError) as err:  # not a torch.save stream at all
        raise CheckpointError(f"{what} is unreadable ({str(err).strip().splitlines()[0][:200]}); the checkpoint "
                              "is corrupt") from None


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default planner, reading the non-tensor items with :func:`load_plain` instead of a full unpickle."""

    checkpoint: str = "the checkpoint"

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        obj = load_plain(value, f"{self.checkpoint} entry {fqn!r}")
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj


def safe_planner(checkpoint: Any) -> SafeLoadPlanner:
    """A :class:`SafeLoadPlanner` whose errors name ``checkpoint``."""
    planner = SafeLoadPlanner()
    planner.checkpoint = f"checkpoint {checkpoint}"
    return planner


class _MetadataUnpickler(pickle.Unpickler):
    """The standard library's documented way to restrict a pickle: only :data:`METADATA_GLOBALS` resolve."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in METADATA_GLOBALS:
            raise pickle.UnpicklingError(f"GLOBAL {module}.{name}")
        return super().find_class(module, name)


class SafeFileSystemReader(FileSystemReader):
    """DCP's ``FileSystemReader`` with ``.metadata`` read by a restricted unpickler (see the module doc)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as stream:
            try:
                metadata = _MetadataUnpickler(stream).load()
            except pickle.UnpicklingError as err:
                raise _refusal(f"checkpoint file {path}", f"it names {str(err).removeprefix('GLOBAL ')}") from None
            except (EOFError, ValueError, TypeError, AttributeError) as err:
                raise CheckpointError(f"checkpoint file {path} is unreadable ({err}); the checkpoint is "
                                      "corrupt") from None
        if not isinstance(metadata, Metadata):
            raise _refusal(f"checkpoint file {path}", f"it holds a {type(metadata).__name__}, not DCP Metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

