"""Load a model family from a local diffusers folder: pick the family, check every component, call its adapter.

The folder machinery (``model_index.json``, checked component loading, building on meta) is
:mod:`dmdr.models.folder`; the families are :mod:`dmdr.models.families`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dmdr.errors import ModelLoadError
from dmdr.models.base import Backbone, TextEncoder
from dmdr.models.families import FAMILIES, family_of_pipeline
from dmdr.models.family import FamilySpec
from dmdr.models.folder import LoadOptions, ModelFolder, read_model_index

__all__ = ["detect_family", "load_backbone", "load_text_encoders", "read_model_index", "ModelFolder", "LoadOptions"]


def detect_family(folder: ModelFolder, requested: str = "auto") -> FamilySpec:
    """The registered family of ``folder``; a mismatch with ``requested`` (unless ``auto``) is an error."""
    known = ", ".join(f"{f.name} ({f.pipeline_class})" for f in FAMILIES.values())
    if requested != "auto" and requested not in FAMILIES:
        raise ModelLoadError(f"unknown model family {requested!r}; dmdr loads: auto, {', '.join(FAMILIES)}")
    found = family_of_pipeline(folder.pipeline_class)
    if found is None:
        raise ModelLoadError(f"{folder.path} is a {folder.pipeline_class} folder, which dmdr cannot load; "
                             f"supported: {known}")
    if requested != "auto" and requested != found.name:
        raise ModelLoadError(f"{folder.path} is a {folder.pipeline_class} folder, not {requested} "
                             f"(set model.family to {found.name} or auto)")
    return found


def load_backbone(path: str | Path, family: str = "auto", dtype: torch.dtype = torch.bfloat16,
                  device: torch.device | str = "cpu", load_text_encoder: bool = True, t_min: float = 0.001,
                  max_sequence_length: int = 256, defer_denoiser: bool = False) -> Backbone:
    """Load a model family's frozen teacher, text encoder(s) and VAE from a local diffusers folder.

    Args:
        path: the pipeline folder (``model_index.json`` at its top).
        family: ``auto`` (read ``model_index.json``) or a registered family name (``sd3``, ``zimage``, ``sdxl``).
        dtype: storage dtype of every loaded weight.
        device: where the modules are moved.
        load_text_encoder: ``False`` skips the text encoders and tokenizers (prompt embeddings come
            from a cache); ``Backbone.text_encoder`` is then ``None``.
        t_min: the flow parameterization's clean-estimate level.
        max_sequence_length: text tokens kept per prompt (T5 for SD3, Qwen3 for Z-Image).
        defer_denoiser: build the teacher's network from its config with parameters on the meta device
            (buffers real; ``dtype`` applied, ``device`` not) and read none of its weights; its weight
            folder is ``Backbone.extras["denoiser_weights"]``. For sharded runs: shard it, then
            materialise each rank's rows (:func:`dmdr.build.build_models`). The folder must hold
            ``.safetensors`` weights. Text encoders and VAE load as without it.

    Returns:
        A :class:`Backbone` whose modules are all frozen (``requires_grad=False``, eval mode).

    Raises:
        ModelLoadError: the folder is missing, incomplete, or of another family (one line).
    """
    folder = read_model_index(path)
    fam = detect_family(folder, family)
    options = LoadOptions(dtype=dtype, device=torch.device(device), load_text_encoder=load_text_encoder,
                          t_min=t_min, max_sequence_length=max_sequence_length, defer_denoiser=defer_denoiser)
    for name in fam.required_components(folder, options):
        folder.check(name)  # every component checked before the first (slow) weight load
    backbone = fam.load(folder, options)
    backbone.path = str(folder.path)
    scheduler_config = folder.path / "scheduler" / "scheduler_config.json"
    if folder.declared("scheduler") and scheduler_config.is_file():
        backbone.extras.setdefault("scheduler_config", json.loads(scheduler_config.read_text()))
    return backbone


def load_text_encoders(path: str | Path, family: str = "auto", dtype: torch.dtype = torch.bfloat16,
                       device: torch.device | str = "cpu", max_sequence_length: int = 256) -> TextEncoder:
    """Only a family's frozen text encoder(s) and tokenizer(s): no denoiser, no VAE weights are read.

    For tools that only encode prompts (``tools/cache_text_embeddings.py``); same arguments and
    checks as :func:`load_backbone`.

    Raises:
        ModelLoadError: the folder is missing, incomplete, or of another family (one line).
    """
    folder = read_model_index(path)
    fam = detect_family(folder, family)
    options = LoadOptions(dtype=dtype, device=torch.device(device), load_text_encoder=True, t_min=0.0,
                          max_sequence_length=max_sequence_length)
    for name in fam.text_components(folder, options):
        folder.check(name)
    return fam.load_text_encoder(folder, options)
