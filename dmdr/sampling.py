"""Samplers: the generator's few-step sampler (ode / sde backward simulation) and the teacher's CFG sampler.

Both work on any :class:`~dmdr.parameterization.Parameterization` through a prediction function
``fn(x_t, t, cond) -> prediction`` with per-sample ``t`` of shape ``(B,)``. Randomness comes only
from the ``torch.Generator`` passed in, so a resumed run samples the same noise.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor

from dmdr.parameterization import Parameterization, classifier_free_guidance
from dmdr.schedules import shift_timesteps

PredictFn = Callable[[Tensor, Tensor, Any], Tensor]


def randn_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """Standard normal noise shaped like ``x``, drawn from ``generator`` on its device."""
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=torch.float32).to(x.device, x.dtype)


def few_step_sample(
    fn: PredictFn,
    noise: Tensor,
    cond: Any,
    timesteps: Tensor,
    param: Parameterization,
    mode: Literal["ode", "sde"] = "ode",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Run the few-step generator from ``noise`` (at ``timesteps[0]``) to a clean sample.

    ``timesteps`` holds N + 1 levels ending at ``t_min`` (:func:`~dmdr.schedules.few_step_timesteps`).
    ``ode``: deterministic steps (Euler for flows, DDIM for eps) between the levels; the last step is
    the clean estimate itself. ``sde`` (DMD2): predict the clean sample at every level and renoise it
    with fresh noise to the next level. Runs under whatever grad mode the caller chose.
    """
    if mode not in ("ode", "sde"):
        raise ValueError(f"backward simulation mode must be 'ode' or 'sde', got {mode!r}")
    x = noise
    batch = noise.shape[0]
    n = timesteps.numel() - 1
    for i in range(n):
        t = timesteps[i].to(x.device).expand(batch)
        pred = fn(x, t, cond)
        if i == n - 1:
            return param.to_x0(x, t, pred)
        t_next = timesteps[i + 1].to(x.device).expand(batch)
        if mode == "ode":
            x = param.step(x, t, t_next, pred)
        else:
            x = param.renoise(param.to_x0(x, t, pred), randn_like(x, generator), t_next)
    return x


def teacher_timesteps(num_steps: int, shift: float = 1.0, t_end: float = 0.0) -> Tensor:
    """``num_steps + 1`` shifted levels from 1 to ``t_end`` for the multi-step teacher sampler."""
    t = torch.linspace(1.0, t_end, num_steps + 1, dtype=torch.float64)
    return shift_timesteps(t, shift).to(torch.float32)


@torch.no_grad()
def teacher_sample(
    fn: PredictFn,
    noise: Tensor,
    cond: Any,
    uncond: Any,
    param: Parameterization,
    guidance: float,
    num_steps: int = 28,
    shift: float = 1.0,
    cat_cond: Callable[[list[Any]], Any] | None = None,
) -> Tensor:
    """The teacher's multi-step CFG sampler (deterministic steps, uncond and cond in one batch).

    ``cat_cond`` concatenates two conditionings along the batch (default:
    :func:`dmdr.models.base.cat_conditioning` for dicts, ``torch.cat`` for tensors).
    """
    if cat_cond is None:
        cat_cond = _default_cat
    timesteps = teacher_timesteps(num_steps, shift, t_end=0.0)
    x = noise
    batch = noise.shape[0]
    both = cat_cond([uncond, cond])
    for i in range(num_steps):
        t = timesteps[i].to(x.device).expand(batch)
        t_next = timesteps[i + 1].to(x.device).expand(batch)
        pred_u, pred_c = fn(torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
        pred = classifier_free_guidance(pred_u, pred_c, guidance)
        x = param.step(x, t, t_next, pred)
    return x


def _default_cat(conds: list[Any]) -> Any:
    if isinstance(conds[0], dict):
        from dmdr.models.base import cat_conditioning

        return cat_conditioning(conds)
    if conds[0] is None:
        return None
    return torch.cat(conds)
