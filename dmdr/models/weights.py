"""A model folder's weights before any is read: building a network with its parameters on the meta device, and
the safetensors files of a component. Used by the loaders (:mod:`dmdr.models.folder`), the sharded reader
(:mod:`dmdr.distributed.meta_load`), preflight and the teacher fingerprint (:mod:`dmdr.provenance`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from torch import nn

from dmdr.errors import ModelLoadError


@contextmanager
def meta_params() -> Iterator[None]:
    """Every parameter registered inside the block lands on the meta device; buffers stay real.

    Parameter initialisers then run on meta tensors (free); only one layer's uninitialised (never
    touched, so never resident) storage exists at a time before it is moved to meta.
    """
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and not param.is_meta:
            p = module._parameters[name]
            module._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def safetensors_files(path: str | Path, variant: str | None = None) -> list[Path]:
    """The safetensors files of a model folder (single file, or shards listed by an ``*.index.json``).

    Args:
        path: a ``.safetensors`` file or a folder written by ``save_pretrained``.
        variant: e.g. ``fp16`` for ``diffusion_pytorch_model.fp16.safetensors``; None = no variant.
    """
    p = Path(path)
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise ModelLoadError(f"model weights not found: {p} is neither a folder nor a .safetensors file")
    tag = f".{variant}" if variant else ""
    indexes = sorted(p.glob(f"*{tag}.safetensors.index.json"))
    if not variant:
        indexes = [i for i in indexes if i.name.count(".") == 3]  # name.safetensors.index.json
    if indexes:
        weight_map = json.loads(indexes[0].read_text())["weight_map"]
        files = [p / f for f in sorted(set(weight_map.values()))]
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise ModelLoadError(f"{indexes[0]} lists {missing[0].name}, which is missing from {p}")
        return files
    files = sorted(f for f in p.glob(f"*{tag}.safetensors") if variant or f.name.count(".") == 1)
    if not files:
        raise ModelLoadError(f"no {tag.lstrip('.') + ' ' if tag else ''}.safetensors weights in {p} "
                             f"(save the model with save_pretrained(..., safe_serialization=True))")
    return files
