"""What the planner's grounding tests share: a tiny model's plan config, the bytes autograd saves, a shipped
model's block built on the meta device, and a FLOP count (each family's test file grounds its own estimates)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from dmdr.config import TrainConfig
from dmdr.models.loading import read_model_index
from dmdr.planning.specs import SHIPPED, build_denoiser_spec


def plan_config(path: str | Path, mode: str, text_len: int, resolution: int) -> TrainConfig:
    """fp32, no activation checkpointing, DMD only: the settings the tiny models' activations are measured at."""
    cfg = TrainConfig()
    cfg.model.path = str(path)
    cfg.model.dtype = "fp32"
    cfg.model.generator_mode = mode
    cfg.model.max_sequence_length = text_len
    cfg.model.resolution = resolution
    cfg.parallel.param_dtype = "fp32"
    cfg.parallel.activation_checkpointing = "none"
    cfg.rl.method = "none"
    return cfg


def measured_saved_bytes(fn, exclude: set[int]) -> int:
    """Bytes of the unique storages autograd saves while ``fn`` runs (``exclude``: storage pointers)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in exclude:
            seen.setdefault(ptr, storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


def shipped_block_spec(model: str, family: str):
    """The shipped config ``model``'s denoiser spec in bf16 on the meta device, the critic's LoRA scale on."""
    cfg = TrainConfig()
    cfg.model.dtype = "bf16"
    spec = build_denoiser_spec(cfg, read_model_index(SHIPPED[model]), family)
    spec.denoiser.lora_scales.set(critic=1.0, generator=0.0)
    return spec


def count_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()
