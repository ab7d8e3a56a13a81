"""Samplers: the generator's few-step sampler (ode / sde backward simulation) and the teacher's CFG sampler.

Both work on any :class:`~dmdr.parameterization.Parameterization` through a prediction function
``fn(x_t, t, cond) -> prediction`` with per-sample ``t`` of shape ``(B,)``. Randomness comes only
from the ``torch.Generator`` passed in, so a resumed run samples the same noise.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from dmdr.parameterization import Parameterization, TimeLike, classifier_free_guidance
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


@dataclass
class SDETrajectory:
    """A few-step *sde* sample with what GRPO needs of it (ALGORITHM.md, GRPO).

    Attributes:
        states: ``N`` tensors ``x_0 .. x_{N-1}``: the noise and each renoised state the sampler visited.
        log_probs: ``(B, N - 1)`` per-dimension Gaussian log-density of each stochastic step
            ``x_i -> x_{i+1}`` under the sampling policy (the last step is deterministic: none).
        sample: the clean sample ``x0`` (the last step's clean estimate).
        clean: ``N`` tensors ``x0^(0) .. x0^(N-1)``: the clean estimate made at each level (``clean[i]`` from
            ``states[i]``; the last is ``sample``). DMD2's backward simulation trains on these pairs.
    """

    states: list[Tensor]
    log_probs: Tensor
    sample: Tensor
    clean: list[Tensor] = field(default_factory=list)


def sde_step_log_prob(param: Parameterization, x_next: Tensor, x0_hat: Tensor, t_next: TimeLike) -> Tensor:
    """Per-dimension log-density of ``x_next`` under the sde step ``N(renoise(x0_hat, 0, t'), s(t')^2 I)``.

    The sde sampler draws ``x_next = renoise(x0_hat, eps, t_next)``: affine in ``eps``, so the step is a
    Gaussian with mean ``renoise(x0_hat, 0, t')`` and standard deviation ``renoise(0, 1, t')`` (``t'`` for
    flows). The exact log-density is the sum over dimensions; this returns it divided by their count
    (Flow-GRPO's mean), so ratios stay O(1) at any resolution. Shape ``(B,)``, fp32.
    """
    x_next, x0_hat = x_next.float(), x0_hat.float()
    mean = param.renoise(x0_hat, torch.zeros_like(x0_hat), t_next)
    std = param.renoise(torch.zeros_like(x0_hat), torch.ones_like(x0_hat), t_next)
    z = (x_next - mean) / std
    logp = -0.5 * z ** 2 - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return logp.mean(dim=tuple(range(1, logp.ndim)))


def sde_step_kl(param: Parameterization, x0_hat: Tensor, x0_ref: Tensor, t_next: TimeLike) -> Tensor:
    """KL between two policies' sde steps from one state, ``KL(N(m, s^2 I) || N(m_ref, s^2 I))`` per dimension.

    Both steps share the standard deviation ``s = renoise(0, 1, t')`` and differ in the mean
    ``renoise(x0_hat, 0, t')``, so the KL is ``(m - m_ref)^2 / (2 s^2)``: averaged over dimensions (Flow-GRPO's
    KL term, and the same per-dimension mean as :func:`sde_step_log_prob`). Shape ``(B,)``, fp32.
    """
    x0_hat, x0_ref = x0_hat.float(), x0_ref.float()
    gap = param.renoise(x0_hat - x0_ref, torch.zeros_like(x0_hat), t_next)  # renoise is affine: m - m_ref
    std = param.renoise(torch.zeros_like(x0_hat), torch.ones_like(x0_hat), t_next)
    kl = gap ** 2 / (2 * std ** 2)
    return kl.mean(dim=tuple(range(1, kl.ndim)))


def sde_sample_with_log_probs(fn: PredictFn, noise: Tensor, cond: Any, timesteps: Tensor, param: Parameterization,
                              generator: torch.Generator | None = None) -> SDETrajectory:
    """The *sde* few-step sampler of :func:`few_step_sample`, keeping the states and each step's log-prob.

    The same draws as ``few_step_sample(..., mode="sde")`` from the same generator state.
    """
    x = noise
    batch = noise.shape[0]
    n = timesteps.numel() - 1
    states, log_probs, clean = [noise], [], []
    for i in range(n):
        t = timesteps[i].to(x.device).expand(batch)
        x0_hat = param.to_x0(x, t, fn(x, t, cond))
        clean.append(x0_hat)
        if i == n - 1:
            break
        t_next = timesteps[i + 1].to(x.device).expand(batch)
        x = param.renoise(x0_hat, randn_like(x, generator), t_next)
        log_probs.append(sde_step_log_prob(param, x, x0_hat, t_next))
        states.append(x)
    lp = torch.stack(log_probs, dim=1) if log_probs else noise.new_zeros((batch, 0), dtype=torch.float32)
    return SDETrajectory(states=states, log_probs=lp, sample=x0_hat, clean=clean)


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
