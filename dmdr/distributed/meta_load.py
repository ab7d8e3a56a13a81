"""Load a diffusers/transformers model into FSDP2-sharded parameters without any rank holding a full copy.

The model is built with its parameters on the meta device (buffers stay real: they are small and
often computed at init, e.g. positional embeddings), prepared (LoRA, activation checkpointing,
``fully_shard``), materialised with ``to_empty`` and then each parameter's *local shard* is read
straight from the safetensors files: the byte range of the rows this rank owns is ``readinto`` the
shard's own storage (through the page cache, not an mmap, so the file never counts towards the
process's resident memory). Peak host memory per rank is about ``1/W`` of the model plus one tensor.

Parameters missing from the files are an error, except LoRA adapters, initialised by the same rule
as :meth:`dmdr.models.lora.LoRALinear.add_adapter` (``lora_A`` kaiming-uniform from a generator seeded
by the seed, the module's name and the adapter's, ``lora_B`` zero: :func:`dmdr.models.lora.lora_init`),
so every rank and every world size builds the same adapter as a model loaded whole. Buffers found in
the files are loaded; the others keep the value computed at init (``to_empty`` would otherwise leave
them uninitialised).

Usage (an adapter's loader)::

    model = load_sharded_pretrained(
        lambda: MyDenoiser(SD3Transformer2DModel.from_config(cfg)), folder / "transformer",
        prepare=lambda m: parallelize_denoiser(m, mesh, parallel, trainable=False),
        prefix="net.", device=env.device)
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from dmdr.errors import ModelLoadError
from dmdr.models.weights import meta_params, safetensors_files

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_WRAPPER_SEGMENTS = {"_checkpoint_wrapped_module", "_orig_mod", "_fsdp_wrapped_module"}

InitMissing = Callable[[str, torch.Size, torch.dtype], Tensor | None]
"""``(file key, full shape, dtype) -> full tensor`` for a parameter absent from the files, or None."""


# ------------------------------------------------------------------------------------------------ #
# Safetensors files
# ------------------------------------------------------------------------------------------------ #

@dataclass
class _Entry:
    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset of the tensor's data in the file
    nbytes: int


class SafetensorsIndex:
    """The headers of a set of safetensors files: where every tensor's bytes are. Reads on demand."""

    def __init__(self, files: Sequence[str | Path]):
        self.entries: dict[str, _Entry] = {}
        self._handles: dict[Path, BinaryIO] = {}
        for f in map(Path, files):
            with open(f, "rb") as fh:
                raw = fh.read(8)
                if len(raw) != 8:
                    raise ModelLoadError(f"{f} is not a safetensors file (too short)")
                (n,) = struct.unpack("<Q", raw)
                try:
                    header = json.loads(fh.read(n))
                except (ValueError, UnicodeDecodeError):
                    raise ModelLoadError(f"{f} is not a safetensors file (unreadable header)") from None
            for key, meta in header.items():
                if key == "__metadata__":
                    continue
                if meta["dtype"] not in _ST_DTYPES:
                    raise ModelLoadError(f"{f}: tensor {key!r} has unsupported dtype {meta['dtype']}")
                begin, end = meta["data_offsets"]
                self.entries[key] = _Entry(f, _ST_DTYPES[meta["dtype"]], tuple(meta["shape"]), 8 + n + begin,
                                           end - begin)

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def close(self) -> None:
        for fh in self._handles.values():
            fh.close()
        self._handles.clear()

    def _read_into(self, entry: _Entry, byte_offset: int, out: Tensor) -> None:
        fh = self._handles.get(entry.path)
        if fh is None:
            fh = self._handles[entry.path] = open(entry.path, "rb", buffering=0)  # noqa: SIM115
        view = memoryview(out.detach().reshape(-1).view(torch.uint8).numpy())
        fh.seek(entry.start + byte_offset)
        done = 0
        while done < len(view):
            got = fh.readinto(view[done:])
            if not got:
                raise ModelLoadError(f"{entry.path} is truncated (reading {out.numel()} values at byte "
                                     f"{entry.start + byte_offset + done})")
            done += got

    def read(self, key: str, out: Tensor, offset: Sequence[int] = ()) -> None:
        """Fill ``out`` with the block of tensor ``key`` starting at ``offset`` (per dim; default 0).

        A block of whole rows (the dim-0 shards FSDP2 makes) is one contiguous byte range read
        straight into ``out`` when dtypes match; other blocks read the rows they span.
        """
        entry = self.entries[key]
        shape = entry.shape
        offset = tuple(offset) or (0,) * len(shape)
        if len(out.shape) != len(shape) or any(o + s > g for o, s, g in zip(offset, out.shape, shape)):
            raise ModelLoadError(f"{entry.path}: tensor {key!r} has shape {list(shape)}, cannot fill "
                                 f"{list(out.shape)} at offset {list(offset)}")
        if out.numel() == 0:
            return
        row = math.prod(shape[1:]) if shape else 1
        itemsize = torch.empty((), dtype=entry.dtype).element_size()
        whole_rows = all(o == 0 for o in offset[1:]) and tuple(out.shape[1:]) == shape[1:]
        rows = out.shape[0] if shape else 1
        first = offset[0] if shape else 0
        if whole_rows:
            direct = out.dtype == entry.dtype and out.device.type == "cpu" and out.is_contiguous()
            buf = out if direct else torch.empty(out.shape, dtype=entry.dtype)
            self._read_into(entry, first * row * itemsize, buf)
            if not direct:
                out.copy_(buf)
            return
        # General block: read the spanned rows (only up to one tensor's rows), then slice.
        span = torch.empty((rows, *shape[1:]), dtype=entry.dtype)
        self._read_into(entry, first * row * itemsize, span)
        index = (slice(None),) + tuple(slice(o, o + s) for o, s in zip(offset[1:], out.shape[1:]))
        out.copy_(span[index])


# ------------------------------------------------------------------------------------------------ #
# Names: module parameter FQN -> key in the files
# ------------------------------------------------------------------------------------------------ #

def _clean_paths(root: nn.Module) -> dict[int, list[str]]:
    """``id(module) -> its paths`` without wrapper levels (checkpoint wrapper, compile) and LoRA's ``.base``.

    A module reachable under several names (tied embeddings: ``shared`` and ``encoder.embed_tokens``)
    has several paths; the files may use any of them.
    """
    from dmdr.models.lora import LoRALayer

    paths: dict[int, list[str]] = {id(root): [""]}

    def visit(module: nn.Module, path: str, seen: set[int]) -> None:
        for name, child in module.named_children():
            skip = name in _WRAPPER_SEGMENTS or (name == "base" and isinstance(module, LoRALayer))
            child_path = path if skip else (f"{path}.{name}" if path else name)
            known = paths.setdefault(id(child), [])
            if child_path not in known:
                known.append(child_path)
            if id(child) not in seen:
                visit(child, child_path, seen | {id(child)})

    visit(root, "", {id(root)})
    return paths


def _named_tensors(root: nn.Module, prefix: str, buffers: bool) -> Iterator[tuple[list[str], nn.Module, str]]:
    """``(candidate file keys, owner module, attribute name)`` for every parameter (or buffer) of ``root``.

    Keys under ``prefix`` lose it; keys outside it are kept whole (and so never match a file key).
    """
    paths = _clean_paths(root)
    for module in root.modules():
        store = module._buffers if buffers else module._parameters
        for name, t in store.items():
            if t is None:
                continue
            keys = []
            for path in paths[id(module)]:
                key = f"{path}.{name}" if path else name
                keys.append(key[len(prefix):] if prefix and key.startswith(prefix) else key)
            yield keys, module, name


def default_init_missing(seed: int = 0) -> InitMissing:
    """LoRA adapters absent from the base weights: ``lora_A`` kaiming-uniform (peft's init), ``lora_B`` 0.

    :func:`dmdr.models.lora.init_from_key`: the draw of ``LoRALinear.add_adapter`` for the same
    ``seed``, module name and adapter name (the file key minus ``prefix`` is the name the layer had
    in the network LoRA was injected into), so every rank and every world size draws the same full
    tensor, equal to a model loaded whole, and keeps its own slice of it.
    """
    from dmdr.models.lora import init_from_key

    def init(key: str, shape: torch.Size, dtype: torch.dtype) -> Tensor | None:
        return init_from_key(key, shape, dtype, seed=seed)

    return init


# ------------------------------------------------------------------------------------------------ #
# Materialise
# ------------------------------------------------------------------------------------------------ #

def _local_block(t: Tensor) -> tuple[Tensor, tuple[int, ...]]:
    """The local storage of a (possibly DTensor) parameter and its offset in the full tensor."""
    if isinstance(t, DTensor):
        _, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
        return t.to_local().detach(), tuple(offset)
    return t.detach(), (0,) * t.ndim


def _read(index: SafetensorsIndex, key: str, out: Tensor, offset: Sequence[int],
          round_via: torch.dtype | None) -> None:
    if round_via is not None and out.is_floating_point() and out.dtype != round_via:
        rounded = torch.empty(out.shape, dtype=round_via)
        index.read(key, rounded, offset)
        out.copy_(rounded)
    else:
        index.read(key, out, offset)


@torch.no_grad()
def materialize_from_safetensors(module: nn.Module, files: Sequence[str | Path], *,
                                 device: torch.device | str = "cpu", prefix: str = "",
                                 init_missing: InitMissing | None = None,
                                 round_via: torch.dtype | None = None) -> None:
    """Allocate a meta-device (optionally FSDP2-sharded) module on ``device`` and fill it from files.

    Args:
        module: the root module, parameters on meta (built under :func:`meta_params`), already
            sharded with ``fully_shard`` or plain (one process). Call on the FSDP root, not a child.
        files: safetensors files (see :func:`safetensors_files`).
        device: where the parameters live (``cpu`` for a CPU-offloaded teacher).
        prefix: module-name prefix absent from the file keys (``"net."`` for a Denoiser around a
            diffusers model); a parameter outside the prefix must come from ``init_missing``.
        init_missing: initialiser for parameters not in the files (default: LoRA adapters only).
        round_via: floating tensors read from the files pass through this dtype before the
            parameter's (or buffer's) own: a fp32 trainable copy of a bf16 teacher holds the
            teacher's bf16 values, as ``from_pretrained(dtype=bf16)`` then ``.float()`` would.
            ``None``: no rounding.

    Raises:
        ModelLoadError: a parameter is neither in the files nor initialisable, or shapes disagree;
            the message names the parameter and the folder.
    """
    index = SafetensorsIndex(files)
    init_missing = init_missing or default_init_missing()
    where = Path(files[0]).parent if files else "?"
    # Buffers computed at init (non-persistent positional tables, ...) survive to_empty through a copy.
    saved = {(id(m), n): m._buffers[n].detach().clone()
             for _, m, n in _named_tensors(module, "", buffers=True) if not m._buffers[n].is_meta}
    owners: dict[int, list[tuple[nn.Module, str]]] = {}
    for m in module.modules():
        for n, p in m._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append((m, n))
    module.to_empty(device=device)
    for places in owners.values():  # to_empty gives each owner its own tensor: tie them again
        first = places[0][0]._parameters[places[0][1]]
        for m, n in places[1:]:
            m._parameters[n] = first
    try:
        params: dict[int, tuple[Tensor, list[str]]] = {}  # tied weights: one tensor, several names
        for keys, owner, name in _named_tensors(module, prefix, buffers=False):
            param = owner._parameters[name]
            params.setdefault(id(param), (param, []))[1].extend(keys)
        missing = []
        for param, keys in params.values():
            local, offset = _local_block(param)
            key = next((k for k in keys if k in index), None)
            if key is not None:
                entry = index.entries[key]
                if tuple(param.shape) != entry.shape:
                    raise ModelLoadError(f"{entry.path}: {key!r} has shape {list(entry.shape)}, the model "
                                         f"expects {list(param.shape)} (a checkpoint of another config?)")
                _read(index, key, local, offset, round_via)
            else:
                full = init_missing(keys[0], param.shape, param.dtype)
                if full is None:
                    missing.append(keys[0])
                    continue
                local.copy_(full[tuple(slice(o, o + s) for o, s in zip(offset, local.shape))])
        if missing:
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise ModelLoadError(f"{where}: weights for {', '.join(missing[:5])}{more} are missing "
                                 f"(a model of another family or config?)")
        for keys, owner, name in _named_tensors(module, prefix, buffers=True):
            buf = owner._buffers[name]
            key = next((k for k in keys if k in index), None)
            if key is not None:
                _read(index, key, buf, (), round_via)
            elif (id(owner), name) in saved:
                buf.copy_(saved[(id(owner), name)])
            else:
                raise ModelLoadError(f"{where}: buffer {keys[0]!r} is neither in the weights nor computable "
                                     f"at init (it was created on the meta device)")
    finally:
        index.close()


def load_sharded_pretrained(build: Callable[[], nn.Module], weights: str | Path | Sequence[str | Path], *,
                            prepare: Callable[[nn.Module], nn.Module | None] | None = None,
                            device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                            prefix: str = "", init_missing: InitMissing | None = None) -> nn.Module:
    """Build on meta, prepare (LoRA, AC, ``fully_shard``), then read each rank's shard from safetensors.

    Args:
        build: constructs the model, e.g. ``lambda: SD3Transformer2DModel.from_config(config)``;
            it runs under :func:`meta_params`.
        weights: a model folder, a file, or a list of safetensors files.
        prepare: called on the meta model; returns the model to materialise (or None for "same").
        device: where parameters are allocated.
        dtype: storage dtype applied to the meta model before ``prepare`` (e.g. bf16 for the teacher).
        prefix: see :func:`materialize_from_safetensors`.
        init_missing: see :func:`materialize_from_safetensors`.
    """
    files = safetensors_files(weights) if isinstance(weights, str | Path) else [Path(w) for w in weights]
    with meta_params():
        model = build()
    if dtype is not None:
        model.to(dtype)
    if prepare is not None:
        model = prepare(model) or model
    materialize_from_safetensors(model, files, device=device, prefix=prefix, init_missing=init_missing)
    return model
