"""How the DMD loss forms the real and the fake score from ONE batched teacher call (docs/guidance.md).

Two kinds of teacher:

* **CFG teachers** (SD3, SD3.5, Z-Image, SDXL, FLUX.2 [klein] base): ALGORITHM.md's rule. The batch is
  ``[uncond, cond, cond]`` at LoRA scales ``(s_r, s_r, s_f)``; ``v_real = v_u + w (v_c - v_u)``, ``v_fake`` the
  third chunk.
* **Guidance-distilled teachers** (FLUX.1-dev): the guidance scale is an *input* of the network (an
  embedding, like the timestep), and the teacher was trained to reproduce CFG at that scale in one call.
  The real score is the teacher called with guidance ``w`` (the step's ``dmd.guidance`` draw); the fake
  score is the same network called with the generator's own embedding ``g_gen`` (``model.guidance_embedding``),
  the value the generator runs at in training and in the exported pipeline. The batch is ``[cond @ w,
  cond @ g_gen]`` at scales ``(s_r, s_f)``: two thirds of the CFG pass. Optional true CFG on top
  (``dmd.true_cfg > 1``, the empty-prompt negative, as ``FluxPipeline(true_cfg_scale=...)`` does) makes it
  ``[uncond @ w, cond @ w, cond @ g_gen]`` with ``v_real = v_u + true_cfg (v_c - v_u)``.

Why the fake score takes ``g_gen`` (and not ``w``, and not 1): the fake score models the generator's samples,
and the critic's denoising loss trains it at the same embedding it is read at; at the start (critic LoRA zero)
it is the teacher at ``g_gen``, i.e. the distribution the generator (initialised from the teacher and run at
``g_gen``) starts from, as a fake score initialised from the teacher should be. NVlabs/FastGen's FLUX.1-dev
DMD2 (``configs/experiments/Flux/config_dmd2.py``, ``networks/Flux/network.py``) calls teacher, fake score
and student all at the embedded 3.5 with no true CFG: the special case ``w = g_gen = 3.5`` of this rule.

The per-sample embedding travels in the conditioning under :data:`GUIDANCE_KEY` (a ``(B,)`` float tensor);
a conditioning without it is read at the network's own default (the generator's ``g_gen``), so every other
call (generator, critic step, samplers) is unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

GUIDANCE_KEY = "guidance"
"""Conditioning key of the per-sample guidance-embedding value (guidance-distilled families only)."""


def with_guidance(cond: dict[str, Tensor], value: float) -> dict[str, Tensor]:
    """``cond`` with a per-sample guidance embedding ``value`` (fp32, on the conditioning's device)."""
    first = next(iter(cond.values()))
    return {**cond, GUIDANCE_KEY: torch.full((first.shape[0],), float(value), device=first.device,
                                             dtype=torch.float32)}


@dataclass(frozen=True)
class ScoreRule:
    """How the real score is formed from the teacher (see the module doc).

    Attributes:
        embedded: the teacher takes the guidance scale as an input (FLUX.1-dev); ``False``: true CFG.
        generator_guidance: ``g_gen``, the embedding of the fake score (and of the generator); embedded only.
        true_cfg: embedded only: true CFG with the negative on top of the embedding (``> 1`` turns it on).
    """

    embedded: bool = False
    generator_guidance: float = 1.0
    true_cfg: float = 1.0

    @property
    def has_uncond(self) -> bool:
        """Whether the real score needs the unconditional (negative-prompt) branch."""
        return not self.embedded or self.true_cfg > 1.0

    def branches(self, cond: Any, uncond: Any, guidance: float) -> tuple[list[Any], int]:
        """The conditionings of the one teacher call, and how many leading ones are real-score branches
        (the rest, one, is the fake score)."""
        if not self.embedded:
            return [uncond, cond, cond], 2
        real = [with_guidance(cond, guidance)]
        if self.true_cfg > 1.0:
            real = [with_guidance(uncond, guidance), *real]
        return [*real, with_guidance(cond, self.generator_guidance)], len(real)

    def combine(self, preds: list[Tensor], guidance: float) -> tuple[Tensor, Tensor, float, Tensor]:
        """``(pred_uncond, pred_cond, scale, pred_fake)`` for :func:`dmdr.losses.dmd.score_difference`, whose
        ``uncond + scale (cond - uncond)`` is then the real score (exactly the one real branch when there is no
        uncond: ``u + 1 (u - u) = u``)."""
        if not self.embedded:
            uncond, cond, fake = preds
            return uncond, cond, guidance, fake
        if self.true_cfg > 1.0:
            uncond, cond, fake = preds
            return uncond, cond, self.true_cfg, fake
        real, fake = preds
        return real, real, 1.0, fake


CFG = ScoreRule()
"""ALGORITHM.md's rule: true CFG with the empty-prompt negative."""


def score_rule_of(denoiser: Any) -> ScoreRule:
    """The rule of a teacher network (its ``score_rule``; CFG for networks that declare none)."""
    rule: Callable[[], ScoreRule] | None = getattr(denoiser, "score_rule", None)
    return rule() if rule is not None else CFG
