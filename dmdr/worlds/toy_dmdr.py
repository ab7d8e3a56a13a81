"""The DMDR loop on the Gaussian-mixture world, through the library's own code paths.

Roles are exactly the real trainer's: the generator is a trainable copy of the teacher (full
fine-tune); the critic is a frozen copy of the teacher with the ``critic`` LoRA injected by
:func:`dmdr.models.lora.inject_lora` (real score at ``s_r(k)`` with CFG, fake score at ``s_f``).
Each iteration backward-simulates with :func:`dmdr.algorithm.backward_simulate`; every ``ratio``
iterations the generator takes the DMD loss (:func:`dmdr.algorithm.dmd_generator_loss`, the 3x batched
critic call) and/or the RL branch ``rl_method`` (ReFL, DPO or GRPO, through the one interface of
:mod:`dmdr.losses.rl`, as the trainer calls it); then the critic takes its denoising loss.
DynaDG and DynaRS come from :mod:`dmdr.schedules`. No formula is re-derived here.

The distance to the teacher is the class-wise sliced Wasserstein distance between generator
samples and guided multi-step teacher samples (:func:`dmdr.sampling.teacher_sample`, guidance
``w0``) drawn once from fixed noise.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from dmdr.algorithm import (
    backward_simulate,
    critic_step_loss,
    dmd_generator_loss,
    draw_guidance,
    generator_clean_estimate,
    generator_input,
)
from dmdr.losses.rl import GRPO, METHODS, OnPolicyDPO, PolicyAccess, ReFL, RLBatch, RLMethod
from dmdr.losses.rl.reference import FrozenReference
from dmdr.models.base import index_conditioning
from dmdr.models.lora import inject_lora, lora_parameters
from dmdr.rewards.base import Reward
from dmdr.sampling import _default_cat, few_step_sample, teacher_sample
from dmdr.schedules import DynaRSSampler, dynadg_real_scale, few_step_timesteps
from dmdr.worlds.gaussians import GaussianMixtureWorld, MLPDenoiser, class_sliced_wasserstein

GeneratorInit = Literal["teacher", "shift", "reinit"]
RLMethodName = Literal["none", "refl", "dpo", "grpo"]


@dataclass
class ToyDMDRConfig:
    """One toy run. Defaults suit the 2-D ring world (they are not the paper's image-scale values).

    The guidance is mild (``w0 = 1.25``): with a CFG'd real score DMD does not converge exactly to the
    guided teacher ODE's samples (the reference), and a mild ``w0`` keeps that gap small.

    Attributes:
        num_steps: generator steps at inference (1 or 4 in the tests).
        shift: SD3 shift of the few-step levels.
        generator_steps: how many generator updates to run (``k`` goes 0..generator_steps-1).
        ratio: critic updates per generator update (a generator step every ``ratio`` iterations).
        batch_size: samples per iteration.
        generator_lr / critic_lr / generator_weight_decay / betas / grad_clip: AdamW settings.
        dmd: whether the generator takes the DMD loss (off = ReFL alone, and no critic is trained).
        guidance / guidance_jitter: CFG of the real score, ``w ~ U[w0 - j, w0 + j]``; the reference
            teacher samples use ``w0``.
        real_scale_init / fake_scale: DynaDG's ``s_r0`` and the fake score's LoRA scale ``s_f``.
        dynadg / dynars / decay_steps / dynars_alpha / dynars_beta: the cold-start schedules.
        critic_rank / critic_alpha / critic_targets: the critic LoRA on the MLP's linears.
        reward / reward_weight / margin / rl_start_step: the RL branch's reward (off when ``reward`` is None).
        rl_method: the branch, the same names as ``--rl.method`` (``refl``, ``dpo``, ``grpo``; ``none`` = off).
        rl_weight: ``lambda`` of DPO / GRPO (``L = L_dmd + lambda L_rl``); ReFL weighs by ``reward_weight``.
        dpo_k / dpo_beta: DPO's samples per prompt ``K`` and ``beta``.
        grpo_group_size / grpo_clip / grpo_inner_updates: GRPO's ``G``, ``eps`` and updates per group.
        init: the generator's start: ``teacher`` (a copy), ``shift`` (a copy whose samples are moved
            by ``init_shift``: the output bias is offset so every Euler step carries the shift) or
            ``reinit`` (fresh random weights).
        eval_every / eval_samples / eval_projections / teacher_sample_steps: the distance measurement.
        keep_samples: keep every evaluation's generator samples in ``history.sample_history``.
        stop_distance: end the run at the first evaluation at or below this distance (None: never).
    """

    num_steps: int = 1
    shift: float = 1.0
    generator_steps: int = 400
    ratio: int = 5
    batch_size: int = 256
    generator_lr: float = 3e-4
    critic_lr: float = 1e-3
    generator_weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    backward_simulation: Literal["ode", "sde"] = "ode"
    dmd: bool = True
    guidance: float = 1.25
    guidance_jitter: float = 0.25
    real_scale_init: float = 0.5
    fake_scale: float = 2.0
    dynadg: bool = False
    dynars: bool = False
    decay_steps: int = 100
    dynars_alpha: float = 4.0
    dynars_beta: float = 1.5
    critic_rank: int = 16
    critic_alpha: float = 16.0
    critic_targets: Sequence[str] = ("re:inp", "re:hidden\\.\\d+", "re:out")
    reward: Reward | None = None
    reward_weight: float = 1.0
    margin: float = 1.0
    rl_start_step: int = 0
    rl_method: RLMethodName = "refl"
    rl_weight: float = 1.0
    dpo_k: int = 4
    dpo_beta: float = 100.0
    grpo_group_size: int = 8
    grpo_clip: float = 1e-3
    grpo_inner_updates: int = 1
    init: GeneratorInit = "teacher"
    init_shift: Sequence[float] = (8.0, 0.0)
    eval_every: int = 10
    eval_samples: int = 8192
    eval_projections: int = 128
    teacher_sample_steps: int = 64
    keep_samples: bool = False
    stop_distance: float | None = None


@dataclass
class ToyHistory:
    """Per-evaluation records of one run (evaluations at generator steps 0, eval_every, ...)."""

    steps: list[int] = field(default_factory=list)
    distance: list[float] = field(default_factory=list)
    reward: list[float] = field(default_factory=list)
    samples: Tensor | None = None
    """The last evaluation's generator samples ``(eval_samples, 2)``."""
    reference: Tensor | None = None
    """The teacher samples the distance is measured against."""
    labels: Tensor | None = None
    sample_history: list[Tensor] = field(default_factory=list)

    @property
    def initial_distance(self) -> float:
        return self.distance[0]

    @property
    def final_distance(self) -> float:
        return self.distance[-1]

    def recent_distance(self, n: int = 3) -> float:
        """The mean distance of the last ``n`` evaluations (less noisy than the last one alone)."""
        tail = self.distance[-n:]
        return sum(tail) / len(tail)

    def recent_reward(self, n: int = 3) -> float:
        """The mean reward of the last ``n`` evaluations."""
        tail = self.reward[-n:]
        return sum(tail) / len(tail)

    def steps_to(self, threshold: float) -> int | None:
        """The first evaluated generator step whose distance is at most ``threshold`` (None if never)."""
        for step, d in zip(self.steps, self.distance):
            if d <= threshold:
                return step
        return None


def _make_generator(teacher: MLPDenoiser, cfg: ToyDMDRConfig) -> MLPDenoiser:
    gen = copy.deepcopy(teacher)
    if cfg.init == "reinit":
        for module in gen.net.modules():
            if isinstance(module, torch.nn.Linear):
                module.reset_parameters()
    elif cfg.init == "shift":
        # velocity v -> v - shift moves every Euler step from t to t' by (t - t') * shift; the N steps
        # from 1 to t_min add up to (1 - t_min) * shift, whatever N is.
        with torch.no_grad():
            gen.net.out.bias -= torch.as_tensor(cfg.init_shift, dtype=gen.net.out.bias.dtype)
    elif cfg.init != "teacher":
        raise ValueError(f"init must be 'teacher', 'shift' or 'reinit', got {cfg.init!r}")
    return gen.train().requires_grad_(True)


def _rl_method(cfg: ToyDMDRConfig) -> RLMethod | None:
    if cfg.rl_method not in METHODS:
        raise ValueError(f"rl_method must be one of {', '.join(METHODS)}, got {cfg.rl_method!r}")
    if cfg.reward is None or cfg.rl_method == "none":
        return None
    if cfg.rl_method == "refl":
        return ReFL(cfg.margin)
    if cfg.rl_method == "dpo":
        return OnPolicyDPO(cfg.dpo_k, cfg.dpo_beta, cfg.rl_weight, sampler=cfg.backward_simulation)
    return GRPO(cfg.grpo_group_size, cfg.grpo_clip, cfg.rl_weight, cfg.grpo_inner_updates)


def run_toy_dmdr(teacher: MLPDenoiser, world: GaussianMixtureWorld, cfg: ToyDMDRConfig,
                 seed: int = 0) -> ToyHistory:
    """Train a few-step generator on the toy world with DMD and/or ReFL; return the distance record.

    Args:
        teacher: the trained :class:`MLPDenoiser`; left untouched (the critic LoRA goes into a copy).
        world: the world whose labels condition the runs.
        cfg: the run's settings.
        seed: seeds every draw of the run (training batches, noise, levels, LoRA init, evaluation).

    Returns:
        The distance to the guided teacher samples (and the mean reward, NaN without one) at generator
        step 0 and every ``eval_every`` steps after.
    """
    method = _rl_method(cfg)
    if not cfg.dmd and method is None:
        raise ValueError("a toy run needs the DMD loss, a reward (and rl_method), or both")
    if not cfg.dmd and cfg.rl_start_step > 0:
        raise ValueError("ReFL alone (dmd=False) must start at step 0: before it the generator has no loss")
    param = teacher.parameterization
    rng = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # LoRA A init and 'reinit' draw from the global RNG
        generator = _make_generator(teacher, cfg)
        critic = copy.deepcopy(teacher).requires_grad_(False)
        inject_lora(critic.net, "critic", cfg.critic_rank, cfg.critic_alpha, cfg.critic_targets)
    critic_params = lora_parameters(critic.net, "critic")
    gen_params = list(generator.parameters())
    gen_opt = torch.optim.AdamW(gen_params, lr=cfg.generator_lr, betas=cfg.betas,
                                weight_decay=cfg.generator_weight_decay)
    critic_opt = torch.optim.AdamW(critic_params, lr=cfg.critic_lr, betas=cfg.betas, weight_decay=0.0)

    def generator_fn(x: Tensor, t: Tensor, cond: dict) -> Tensor:
        return generator(x, t, cond)

    def critic_fn(x: Tensor, t: Tensor, cond: dict, scale: float | Tensor) -> Tensor:
        return critic(x, t, cond, lora_scales={"critic": scale})

    timesteps = few_step_timesteps(cfg.num_steps, cfg.shift, param.t_min)
    dynars = DynaRSSampler(cfg.dynars_alpha, cfg.dynars_beta, cfg.decay_steps, param.t_min, enabled=cfg.dynars)
    rewards = [(cfg.reward, cfg.reward_weight)] if method is not None else []
    rl_reference = FrozenReference(gen_params) if method is not None and method.needs_reference else None

    def policy_access() -> PolicyAccess:
        if rl_reference is not None and not rl_reference.taken:
            rl_reference.take()  # the generator at the RL start
        return PolicyAccess(fn=generator_fn, param=param, timesteps=timesteps, rng=rng,
                            noise=lambda n: torch.randn(n, world.dim, generator=rng), decode=lambda x: x,
                            select=index_conditioning, cat=_default_cat,
                            reference_fn=rl_reference.wrap(generator_fn) if rl_reference is not None else None)

    # The reference: guided multi-step teacher samples, from noise independent of the training draws.
    eval_rng = torch.Generator().manual_seed(10_000 + seed)
    labels = world.balanced_labels(cfg.eval_samples)
    eval_cond = world.cond(labels)
    ref_noise = torch.randn(cfg.eval_samples, world.dim, generator=eval_rng)
    reference = teacher_sample(teacher, ref_noise, eval_cond, world.uncond(cfg.eval_samples), param,
                               cfg.guidance, num_steps=cfg.teacher_sample_steps)
    gen_noise = torch.randn(cfg.eval_samples, world.dim, generator=eval_rng)
    eval_prompts = [f"class {c}" for c in labels.tolist()]
    history = ToyHistory(reference=reference, labels=labels)

    def evaluate(k: int) -> None:
        with torch.no_grad():
            samples = few_step_sample(generator_fn, gen_noise, eval_cond, timesteps, param,
                                      mode=cfg.backward_simulation,
                                      generator=torch.Generator().manual_seed(20_000 + seed))
            dist = class_sliced_wasserstein(samples, reference, labels, cfg.eval_projections,
                                            torch.Generator().manual_seed(seed))
            score = cfg.reward(samples, eval_prompts).mean().item() if cfg.reward is not None else math.nan
        history.steps.append(k)
        history.distance.append(dist.item())
        history.reward.append(score)
        history.samples = samples
        if cfg.keep_samples:
            history.sample_history.append(samples)

    def clip_and_step(params: list[torch.nn.Parameter], opt: torch.optim.Optimizer) -> None:
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        if torch.isfinite(norm):
            opt.step()
        opt.zero_grad(set_to_none=True)

    evaluate(0)
    k = 0
    iteration = 0
    while k < cfg.generator_steps:
        batch_labels = world.sample_labels(cfg.batch_size, rng)
        cond, uncond = world.cond(batch_labels), world.uncond(cfg.batch_size)
        noise = torch.randn(cfg.batch_size, world.dim, generator=rng)
        x0_sim = backward_simulate(generator_fn, noise, cond, timesteps, param, mode=cfg.backward_simulation,
                                   generator=rng)
        stepped = (iteration + 1) % cfg.ratio == 0 or not cfg.dmd
        if stepped:
            x_t, t = generator_input(x0_sim, timesteps, param, rng)
            x0 = generator_clean_estimate(generator_fn, x_t, t, cond, param)
            loss = x0.new_zeros(())
            if cfg.dmd:
                t_d = dynars.sample(k, cfg.batch_size, rng)
                w = draw_guidance(cfg.guidance, cfg.guidance_jitter, rng)
                s_r = dynadg_real_scale(k, cfg.real_scale_init, cfg.decay_steps) if cfg.dynadg else 0.0
                loss = loss + dmd_generator_loss(x0, cond, uncond, critic_fn, param, t_d, w, s_r,
                                                 cfg.fake_scale, generator=rng).loss
            if rewards and k >= cfg.rl_start_step:
                prompts = [f"class {c}" for c in batch_labels.tolist()]
                loss = loss + method.loss(RLBatch(x0=x0, prompts=prompts, cond=cond), policy_access(), rewards)[0]
            loss.backward()
            clip_and_step(gen_params, gen_opt)
        if cfg.dmd:  # the critic trains every iteration on the same x0_sim, at the same k (as the trainer)
            t_g = dynars.sample(k, cfg.batch_size, rng)
            critic_step_loss(critic_fn, x0_sim, cond, t_g, param, cfg.fake_scale, generator=rng).backward()
            clip_and_step(critic_params, critic_opt)
        iteration += 1
        if stepped:
            k += 1
            if k % cfg.eval_every == 0 or k == cfg.generator_steps:
                evaluate(k)
                if cfg.stop_distance is not None and history.final_distance <= cfg.stop_distance:
                    break
    return history
