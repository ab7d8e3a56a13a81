"""The Backbone protocol: what the trainer needs from a model family, and nothing more.

The trainer knows roles (generator, teacher with the critic LoRA), never families. A family is
one adapter file in this package that provides:

* a :class:`Denoiser` subclass: ``forward(x_t, t, cond, lora_scales=None) -> prediction`` with
  ``t`` in ``[0, 1]`` (per sample) and the prediction in its :class:`Parameterization`'s convention
  (velocity ``eps - x0`` for flows, ``eps`` for epsilon models), whatever the diffusers model's own
  calling convention is;
* a :class:`TextEncoder`: prompts to a :data:`Conditioning` (batch-first tensors), with the
  empty-prompt negative computed once;
* a :class:`LatentCodec`: differentiable ``decode`` to ``[0, 1]`` RGB (ReFL) and ``encode``;
* a loader returning a :class:`Backbone` bundle from a local diffusers folder.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from dmdr.guidance import CFG, ScoreRule
from dmdr.models.lora import LoRAScales, find_scales
from dmdr.parameterization import Parameterization

Conditioning = dict[str, Tensor]
"""Text conditioning: named tensors, all batch-first, concatenable along dim 0.

Variable-length encoders (Qwen3, Qwen2.5-VL) carry a padding mask, a bool (or 0/1 integer) key ending in
``_mask`` (``prompt_mask``, True = a token): their sequence tensors are right-padded with zeros after each prompt's
tokens, and padding of any length means the same (the denoiser masks it). So conditionings of different
lengths concatenate after padding to the longest (:func:`pad_cat`), and a cache stores each prompt at its
own length (:func:`sequence_lengths`)."""


def pad_cat(tensors: Sequence[Tensor]) -> Tensor:
    """``torch.cat`` along dim 0, right-padding every other dim with zeros (False for bool) to the largest."""
    shapes = {tuple(t.shape[1:]) for t in tensors}
    if len(shapes) == 1:
        return torch.cat(list(tensors), dim=0)
    if len({len(s) for s in shapes}) != 1:
        raise ValueError(f"cannot concatenate tensors of ranks {sorted(shapes)}")
    target = [max(s[d] for s in shapes) for d in range(len(next(iter(shapes))))]
    out = tensors[0].new_zeros((sum(t.shape[0] for t in tensors), *target))
    start = 0
    for t in tensors:
        out[(slice(start, start + t.shape[0]), *(slice(0, n) for n in t.shape[1:]))] = t
        start += t.shape[0]
    return out


def padding_mask_key(cond: Conditioning) -> str | None:
    """The key of ``cond``'s padding mask (a bool or 0/1 integer ``(B, L)`` tensor named ``*_mask``), ``None`` for
    a fixed-length conditioning."""
    return next((k for k, v in cond.items() if k.endswith("_mask") and v.ndim == 2 and not v.is_floating_point()),
                None)


def sequence_lengths(cond: Conditioning) -> Tensor | None:
    """Per sample, the length of the masked sequence up to its last token (``None`` without a mask).

    Every tensor whose dim 1 is the mask's length can be cut to it without changing what the denoiser sees.
    """
    key = padding_mask_key(cond)
    if key is None:
        return None
    mask = cond[key] != 0
    positions = torch.arange(1, mask.shape[1] + 1, device=mask.device)
    return (mask * positions).amax(dim=1) if mask.shape[1] else torch.zeros(mask.shape[0], dtype=torch.long)


def cat_conditioning(conds: list[Conditioning]) -> Conditioning:
    """Concatenate conditionings along the batch (same keys in every one; variable lengths are padded)."""
    keys = conds[0].keys()
    for c in conds[1:]:
        if c.keys() != keys:
            raise ValueError(f"conditionings have different keys: {sorted(keys)} vs {sorted(c.keys())}")
    ragged = [k for k in keys if len({tuple(c[k].shape[1:]) for c in conds}) > 1]
    if ragged and padding_mask_key(conds[0]) is None:  # padding without a mask would be read as tokens
        raise ValueError(f"conditionings differ in the shape of {ragged} and carry no padding mask")
    return {k: pad_cat([c[k] for c in conds]) for k in keys}


def repeat_conditioning(cond: Conditioning, batch_size: int) -> Conditioning:
    """A batch-1 conditioning (e.g. the empty-prompt negative) repeated ``batch_size`` times."""
    out = {}
    for k, v in cond.items():
        if v.shape[0] != 1:
            raise ValueError(f"repeat_conditioning expects batch 1, {k!r} has {v.shape[0]}")
        out[k] = v.expand(batch_size, *v.shape[1:])
    return out


def index_conditioning(cond: Conditioning, index: Tensor | slice) -> Conditioning:
    return {k: v[index] for k, v in cond.items()}


def conditioning_to(cond: Conditioning, device: torch.device | str,
                    dtype: torch.dtype | None = None) -> Conditioning:
    out = {}
    for k, v in cond.items():
        cast = dtype is not None and v.is_floating_point()
        out[k] = v.to(device=device, dtype=dtype) if cast else v.to(device)
    return out


class Denoiser(nn.Module):
    """A diffusion network behind the family-agnostic call ``(x_t, t, cond, lora_scales) -> prediction``.

    Subclasses implement :meth:`predict`; :meth:`forward` sets the runtime LoRA scales first.
    ``lora_scales`` maps adapter name to a float or a per-sample ``(B,)`` tensor; adapters not named
    keep their last value, so callers name every adapter the model carries (see :meth:`call_with`).
    """

    parameterization: Parameterization
    masked_attention: bool = False
    """Whether the network passes a padding mask to attention (then the backend must take one)."""

    def __init__(self, net: nn.Module, parameterization: Parameterization):
        super().__init__()
        self.net = net
        self.parameterization = parameterization

    @property
    def lora_scales(self) -> LoRAScales | None:
        return find_scales(self.net)

    def predict(self, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x_t: Tensor, t: Tensor, cond: Conditioning,
                lora_scales: dict[str, float | Tensor] | None = None) -> Tensor:
        if lora_scales:
            scales = self.lora_scales
            if scales is None:
                raise ValueError(f"lora_scales {sorted(lora_scales)} given but the network has no LoRA")
            scales.set(**lora_scales)
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        return self.predict(x_t, t, cond)

    def blocks(self) -> list[nn.Module]:
        """The repeated transformer blocks (the FSDP2 / activation-checkpointing units)."""
        return []

    def score_rule(self) -> ScoreRule:
        """How the DMD loss forms the real and fake scores from this network (:mod:`dmdr.guidance`): true CFG."""
        return CFG

    def configure_guidance(self, generator_guidance: float, true_cfg: float = 1.0) -> None:
        """``dmd.generator_guidance`` / ``dmd.true_cfg``: read by guidance-distilled networks (FLUX.1-dev),
        whose generator and fake score run at an embedded guidance; CFG networks have nothing to set."""

    def set_attention_backend(self, backend: str) -> None:
        """Point every attention of the network at a diffusers dispatcher backend (``native``, ``flash``, ...).

        Call it before activation checkpointing, compile and FSDP2 wrap the network; the name is
        checked first by :func:`dmdr.models.attention.resolve_attention`. Families whose processors
        bypass the dispatcher override this to install ones that use it.
        """
        self.net.set_attention_backend(backend)

    def frozen_copy_base(self) -> Denoiser:
        """A deep copy (used for the full fine-tune generator, made before any LoRA is added)."""
        return copy.deepcopy(self)


@runtime_checkable
class TextEncoder(Protocol):
    """Frozen text encoder(s) of a family."""

    def encode(self, prompts: list[str]) -> Conditioning:
        """Encode a batch of prompts (no grad)."""

    def negative(self) -> Conditioning:
        """The empty-prompt conditioning, batch 1, computed once and cached."""


@runtime_checkable
class LatentCodec(Protocol):
    """The frozen VAE of a family, in the trainer's latent convention."""

    def decode(self, latents: Tensor) -> Tensor:
        """Latents (already scaled for the denoiser) to RGB in [0, 1]; differentiable."""

    def encode(self, images: Tensor) -> Tensor:
        """RGB in [0, 1] to denoiser latents."""


@dataclass
class Backbone:
    """A loaded model family: everything the trainer uses, by role.

    Attributes:
        family: ``sd3``, ``zimage``, ...
        teacher: the frozen denoiser; the critic LoRA is injected into it by the trainer.
        text_encoder: frozen text encoder(s) (``None`` when embeddings come from a cache).
        codec: the frozen VAE.
        latent_channels: channels of the denoiser's latent space.
        vae_scale_factor: pixels per latent cell.
        lora_targets: the family's default attention-projection names for LoRA.
        path: the folder it was loaded from.
    """

    family: str
    teacher: Denoiser
    text_encoder: TextEncoder | None
    codec: LatentCodec
    latent_channels: int
    vae_scale_factor: int
    lora_targets: tuple[str, ...]
    path: str = ""
    extras: dict = field(default_factory=dict)

    @property
    def parameterization(self) -> Parameterization:
        return self.teacher.parameterization

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        side = resolution // self.vae_scale_factor
        return (self.latent_channels, side, side)
