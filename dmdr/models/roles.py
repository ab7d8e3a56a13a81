"""Build the trainable roles on a loaded :class:`~dmdr.models.base.Backbone`: generator and critic LoRA.

* The critic LoRA (adapter ``"critic"``, *default* r=32, alpha=32 on the attention projections) is
  injected into the frozen teacher: at scale ``s_r(k)`` it is the real score, at ``s_f`` the fake
  score, switched per call (or per sample) through ``lora_scales``.
* The generator is either a full trainable copy of the teacher (taken BEFORE any LoRA exists), or
  the teacher's own network with adapter ``"generator"`` (*default* r=64, alpha=128): it shares the
  frozen base, and is called with ``lora_scales={"generator": 1.0, "critic": 0.0}`` while the teacher
  is called with ``{"generator": 0.0, "critic": s}``.

Only LoRA parameters (and the full copy's) have ``requires_grad``; every base weight is frozen.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from dmdr.models.base import Backbone, Denoiser
from dmdr.models.lora import LoRALayer, find_scales, inject_lora, lora_parameters

GENERATOR = "generator"
CRITIC = "critic"


def _freeze_base(net: nn.Module) -> None:
    """``requires_grad`` only on LoRA adapter weights (of every adapter) in ``net``."""
    net.requires_grad_(False)
    for module in net.modules():
        if isinstance(module, LoRALayer):
            module.lora_A.requires_grad_(True)
            module.lora_B.requires_grad_(True)


def make_generator(backbone: Backbone, mode: Literal["lora", "full"] = "lora", rank: int = 64,
                   alpha: float = 128.0, targets: tuple[str, ...] | list[str] | None = None,
                   dtype: torch.dtype | None = None, seed: int = 0) -> tuple[Denoiser, str | None]:
    """The generator: a full trainable copy of the teacher, or the teacher with a generator LoRA.

    Call before :func:`add_critic_lora` (the full copy must not contain the critic adapter).

    Args:
        backbone: the loaded model family.
        mode: ``"full"`` deep-copies the teacher (all parameters trainable); ``"lora"`` injects
            adapter ``"generator"`` into the teacher's own network and returns the teacher.
        rank, alpha: the generator LoRA's rank and alpha (``"lora"`` mode).
        targets: module-name suffixes (or ``re:`` regexes) for the LoRA; ``None`` = the family's default.
        dtype: optional dtype of the full copy (e.g. fp32 master weights); ignored in ``"lora"`` mode.
        seed: the LoRA initialisation seed (:func:`dmdr.models.lora.lora_init`; ``"lora"`` mode).

    Returns:
        ``(generator, adapter_name)``; the adapter name is ``None`` for the full copy.
    """
    teacher = backbone.teacher
    if mode == "full":
        if find_scales(teacher.net) is not None:
            raise ValueError("make_generator(mode='full') must run before any LoRA is injected "
                             "into the teacher")
        generator = teacher.frozen_copy_base()
        if dtype is not None:
            generator.to(dtype)
        generator.requires_grad_(True)
        return generator, None
    if mode != "lora":
        raise ValueError(f"generator mode must be 'lora' or 'full', got {mode!r}")
    inject_lora(teacher.net, GENERATOR, rank, alpha, targets or backbone.lora_targets, seed=seed)
    _freeze_base(teacher.net)
    return teacher, GENERATOR


def add_critic_lora(backbone: Backbone, rank: int = 32, alpha: float = 32.0,
                    targets: tuple[str, ...] | list[str] | None = None, seed: int = 0) -> list[nn.Parameter]:
    """Inject adapter ``"critic"`` into the teacher; returns its trainable parameters.

    The base stays frozen; a generator adapter already in the teacher stays trainable. ``seed``: see
    :func:`dmdr.models.lora.lora_init`. On a teacher built on the meta device the adapter stays on
    meta (materialised by the sharded loader with the same initialisation).
    """
    net = backbone.teacher.net
    inject_lora(net, CRITIC, rank, alpha, targets or backbone.lora_targets, seed=seed)
    _freeze_base(net)
    return lora_parameters(net, CRITIC)
