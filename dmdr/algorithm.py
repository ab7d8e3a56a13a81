"""One DMDR iteration's math at the level of model calls, shared by the trainer and the toy worlds.

Networks enter as plain functions, so the same code runs a diffusers transformer under FSDP2
and a 2-D MLP in a unit test:

* ``generator_fn(x_t, t, cond) -> prediction`` (the trainable generator);
* ``critic_fn(x_t, t, cond, lora_scale) -> prediction``: the frozen teacher plus the critic LoRA at a
  runtime scale (a float or a per-sample ``(B,)`` tensor). At ``s_r(k)`` with CFG it is the real
  score, at ``s_f`` the fake score.

Randomness comes only from the ``torch.Generator`` arguments, so a resumed run redraws the same
levels and noise. See ALGORITHM.md for every formula; the arithmetic itself lives in
:mod:`dmdr.parameterization`, :mod:`dmdr.schedules` and :mod:`dmdr.losses.dmd`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from dmdr.guidance import CFG, ScoreRule
from dmdr.losses.dmd import critic_loss, decoupled_dmd_gradient, dmd_loss, score_difference
from dmdr.parameterization import Parameterization, classifier_free_guidance
from dmdr.sampling import SDETrajectory, _default_cat, few_step_sample, randn_like, sde_sample_with_log_probs

GeneratorFn = Callable[[Tensor, Tensor, Any], Tensor]
CriticFn = Callable[[Tensor, Tensor, Any, "float | Tensor"], Tensor]


@torch.no_grad()
def backward_simulate(generator_fn: GeneratorFn, noise: Tensor, cond: Any, timesteps: Tensor,
                      param: Parameterization, mode: Literal["ode", "sde"] = "ode",
                      generator: torch.Generator | None = None) -> Tensor:
    """The generator's own N-step sample ``x0_sim`` (no grad): the training input of this iteration."""
    return few_step_sample(generator_fn, noise, cond, timesteps, param, mode=mode, generator=generator)


def generator_input(x0_sim: Tensor, timesteps: Tensor, param: Parameterization,
                    generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Per sample, one level drawn uniformly from the first N few-step levels, and ``x_t`` at it.

    At the first level the input is the fresh noise itself, what the sampler starts from: for flows
    (``t_0 = 1``) that is the renoised sample anyway; for epsilon models it is what their fixed first
    timestep sees at inference (SDXL's one-step generator is called at 399 on pure noise).
    """
    n = timesteps.numel() - 1
    device = generator.device if generator is not None else torch.device("cpu")
    # Drawn where the generator lives and indexed where the data lives: no host round trip (a sync on GPUs).
    idx = torch.randint(0, n, (x0_sim.shape[0],), generator=generator, device=device).to(x0_sim.device)
    t = timesteps.to(x0_sim.device)[idx]
    noise = randn_like(x0_sim, generator)
    first = (idx == 0).reshape(-1, *([1] * (x0_sim.ndim - 1)))
    return torch.where(first, noise, param.renoise(x0_sim, noise, t)), t


@dataclass
class LevelInput:
    """This iteration's generator input: per sample one level ``t`` and ``x_t`` there, and the clean estimate
    the generator makes from it (no grad), which a critic trained "at the sampled level" learns from."""

    x_t: Tensor
    t: Tensor
    clean: Tensor


@torch.no_grad()
def simulate_chain(generator_fn: GeneratorFn, noise: Tensor, cond: Any, timesteps: Tensor, param: Parameterization,
                   generator: torch.Generator | None = None) -> SDETrajectory:
    """*sde* backward simulation: the generator's stochastic chain, keeping every state and clean estimate.

    Its ``sample`` is bit for bit ``backward_simulate(..., mode="sde")`` from the same generator state.
    """
    return sde_sample_with_log_probs(generator_fn, noise, cond, timesteps, param, generator=generator)


def chain_input(chain: SDETrajectory, timesteps: Tensor, generator: torch.Generator | None = None) -> LevelInput:
    """DMD2's generator input: per sample one level ``i`` drawn uniformly from the first N, the state the chain
    visited there (``x0^(i-1)`` renoised to ``t_i``; the noise itself at ``i = 0``) and the clean estimate
    ``x0^(i)`` the generator made from it.

    The generator is thereby trained on exactly the inputs its sde sampler feeds it, and a critic on
    ``clean`` learns the distribution the DMD gradient is applied to (first-step outputs included).
    """
    batch = chain.sample.shape[0]
    device = generator.device if generator is not None else torch.device("cpu")
    idx = torch.randint(0, len(chain.states), (batch,), generator=generator, device=device).cpu()
    rows = torch.arange(batch)
    x_t = torch.stack(chain.states)[idx.to(chain.sample.device), rows.to(chain.sample.device)]
    clean = torch.stack(chain.clean)[idx.to(chain.sample.device), rows.to(chain.sample.device)]
    return LevelInput(x_t=x_t, t=timesteps[idx].to(x_t.device), clean=clean)


def draw_guidance(w0: float, jitter: float, generator: torch.Generator | None = None) -> float:
    """One guidance scale per generator step, ``w ~ U[w0 - jitter, w0 + jitter]``."""
    device = generator.device if generator is not None else torch.device("cpu")
    u = torch.rand((), generator=generator, device=device).item()
    return w0 - jitter + 2.0 * jitter * u


def critic_step_loss(critic_fn: CriticFn, x0_sim: Tensor, cond: Any, t_g: Tensor, param: Parameterization,
                     fake_scale: float, generator: torch.Generator | None = None,
                     noise: Tensor | None = None) -> Tensor:
    """The fake score's denoising loss on the generator's samples at levels ``t_g`` (DynaRS).

    ``noise``: the renoising noise, drawn by the caller (gradient accumulation draws it for the whole batch);
    None draws it from ``generator``."""
    x0_sim = x0_sim.detach()
    noise = randn_like(x0_sim, generator) if noise is None else noise
    x = param.renoise(x0_sim, noise, t_g)
    pred = critic_fn(x, t_g, cond, fake_scale)
    return critic_loss(pred, param.target(x0_sim, noise))


def generator_clean_estimate(generator_fn: GeneratorFn, x_t: Tensor, t: Tensor, cond: Any,
                             param: Parameterization) -> Tensor:
    """Step 1 of the generator update: ``x0 = to_x0(x_t, t, G(x_t, t))`` with grad."""
    return param.to_x0(x_t, t, generator_fn(x_t, t, cond))


@dataclass
class DMDTerms:
    """The DMD loss and what the trainer logs about it."""

    loss: Tensor
    grad: Tensor
    x_d: Tensor


@dataclass
class DecoupledDMD:
    """Decoupled DMD's settings for one generator step (:func:`dmdr.losses.dmd.decoupled_dmd_gradient`).

    Attributes:
        dm_weight / ca_weight: the DM and CA terms' weights (1 and 1: the coupled gradient).
        t_ca: the CA term's own renoise levels ``(B,)`` (renoised with their own noise); ``None`` shares the
            DM term's levels and noise.
        ca_noise: that noise, drawn by the caller; None draws it after the DM term's.
    """

    dm_weight: float = 1.0
    ca_weight: float = 1.0
    t_ca: Tensor | None = None
    ca_noise: Tensor | None = None


def dmd_generator_loss(
    x0: Tensor,
    cond: Any,
    uncond: Any,
    critic_fn: CriticFn,
    param: Parameterization,
    t_d: Tensor,
    guidance: float,
    real_scale: float,
    fake_scale: float,
    generator: torch.Generator | None = None,
    cat_cond: Callable[[list[Any]], Any] | None = None,
    eps: float = 1e-8,
    decoupled: DecoupledDMD | None = None,
    noise: Tensor | None = None,
    rule: ScoreRule = CFG,
) -> DMDTerms:
    """Steps 2-5 of the generator update: renoise, score difference, the DMD loss.

    The score evaluations run as ONE forward of the critic with per-sample LoRA scales: with CFG
    (``rule``, :mod:`dmdr.guidance`) uncond and cond at ``s_r`` and fake at ``s_f`` over a 3x batch; for a
    guidance-distilled teacher the real score at embedding ``guidance`` and the fake at the generator's
    embedding over a 2x batch. With ``decoupled`` the gradient is Decoupled DMD's (CFG teachers only); a CA
    term at its own levels adds uncond and cond there to the same one forward (a 5x batch). ``noise``: the
    renoising noise drawn by the caller (None: drawn from ``generator``).
    """
    cat_cond = cat_cond or _default_cat
    batch = x0.shape[0]
    if decoupled is not None:
        if rule.embedded:
            raise ValueError("dmd.decoupled needs a CFG teacher; this teacher's guidance is an embedding "
                             "(FLUX.1-dev): turn dmd.decoupled off")
        return _decoupled_loss(x0, cond, uncond, critic_fn, param, t_d, guidance, real_scale, fake_scale,
                               generator, cat_cond, eps, decoupled, noise)
    with torch.no_grad():
        x_d = param.renoise(x0.detach(), randn_like(x0, generator) if noise is None else noise, t_d)
        conds, n_real = rule.branches(cond, uncond, guidance)
        scales = torch.tensor([real_scale] * (n_real * batch) + [fake_scale] * batch, device=x0.device,
                              dtype=torch.float32)
        preds = critic_fn(torch.cat([x_d] * len(conds)), torch.cat([t_d] * len(conds)), cat_cond(conds), scales)
        pred_uncond, pred_cond, scale, pred_fake = rule.combine(list(preds.chunk(len(conds))), guidance)
        grad = score_difference(param, x0, x_d, t_d, pred_uncond, pred_cond, scale, pred_fake, eps=eps)
    return DMDTerms(loss=dmd_loss(x0, grad), grad=grad, x_d=x_d)


def _decoupled_loss(x0: Tensor, cond: Any, uncond: Any, critic_fn: CriticFn, param: Parameterization, t_d: Tensor,
                    guidance: float, real_scale: float, fake_scale: float, generator: torch.Generator | None,
                    cat_cond: Callable[[list[Any]], Any], eps: float, d: DecoupledDMD,
                    noise: Tensor | None = None) -> DMDTerms:
    batch = x0.shape[0]
    with torch.no_grad():
        x_d = param.renoise(x0.detach(), randn_like(x0, generator) if noise is None else noise, t_d)
        xs, ts, conds = [x_d, x_d, x_d], [t_d, t_d, t_d], [uncond, cond, cond]
        scales = [real_scale] * (2 * batch) + [fake_scale] * batch
        if d.t_ca is not None:
            ca_noise = randn_like(x0, generator) if d.ca_noise is None else d.ca_noise
            x_ca = param.renoise(x0.detach(), ca_noise, d.t_ca)
            xs, ts, conds = xs + [x_ca, x_ca], ts + [d.t_ca, d.t_ca], conds + [uncond, cond]
            scales += [real_scale] * (2 * batch)
        preds = critic_fn(torch.cat(xs), torch.cat(ts), cat_cond(conds),
                          torch.tensor(scales, device=x0.device, dtype=torch.float32)).float()
        chunks = preds.chunk(len(xs))
        x_d32 = x_d.float()
        u, c, f = (param.to_x0(x_d32, t_d, p) for p in chunks[:3])
        real = param.to_x0(x_d32, t_d, classifier_free_guidance(chunks[0], chunks[1], guidance))
        ca = (u, c, real)
        if d.t_ca is not None:
            x_ca32 = x_ca.float()
            u_ca, c_ca = (param.to_x0(x_ca32, d.t_ca, p) for p in chunks[3:])
            ca = (u_ca, c_ca, param.to_x0(x_ca32, d.t_ca, classifier_free_guidance(chunks[3], chunks[4], guidance)))
        grad = decoupled_dmd_gradient(x0.detach(), (c, f, real), ca, guidance, d.dm_weight, d.ca_weight, eps)
    return DMDTerms(loss=dmd_loss(x0, grad), grad=grad, x_d=x_d)
