"""The DMDR loop on the Gaussian-mixture world: the trainer's own step engine on a 2-D problem.

Roles are exactly the real trainer's: the generator is a trainable copy of the teacher (full
fine-tune); the critic is a frozen copy of the teacher with the ``critic`` LoRA injected by
:func:`dmdr.models.lora.inject_lora` (real score at ``s_r(k)`` with CFG, fake score at ``s_f``).
Every iteration is one call of :meth:`dmdr.engine.StepEngine.iteration`, the call
:class:`dmdr.trainer.DMDRTrainer` makes: backward simulation, every ``ratio`` iterations the generator's DMD
loss and/or RL branch ``rl_method`` (ReFL, DPO or GRPO, built by :func:`dmdr.losses.rl.build_rl_method` from
the same settings as ``--rl.*``), then the critic's step; DynaDG, DynaRS and the RL start are the engine's
schedules. The toy settings become a :class:`~dmdr.config.TrainConfig` (:func:`engine_config`); this module
adds only the world's data and the distance measurement.

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

from dmdr.config import TrainConfig
from dmdr.engine import Roles, StepEngine
from dmdr.losses.rl import METHODS
from dmdr.models.lora import inject_lora, lora_parameters
from dmdr.rewards.base import Reward
from dmdr.sampling import few_step_sample, teacher_sample
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
        dmd: whether the generator takes the DMD loss (off = the RL branch alone, ``--dmd.weight 0``: no critic is
            trained and the generator steps every iteration, as in the trainer).
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
        grpo_kl_weight: GRPO's KL term against the generator at the RL start (``--rl.grpo_kl_weight``).
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
    grpo_kl_weight: float = 0.0
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


def engine_config(cfg: ToyDMDRConfig, t_min: float) -> TrainConfig:
    """The trainer's config of a toy run: what :class:`~dmdr.engine.StepEngine` reads, from the toy settings.

    No learning-rate switch at the RL start (the RL-stage rates are the cold-start ones) and one batch size.
    """
    c = TrainConfig()
    d = c.dmd
    d.num_steps, d.shift, d.t_min, d.ratio = cfg.num_steps, cfg.shift, t_min, cfg.ratio
    d.backward_simulation = d.sampler = cfg.backward_simulation
    d.guidance, d.guidance_jitter, d.fake_scale = cfg.guidance, cfg.guidance_jitter, cfg.fake_scale
    d.weight = 1.0 if cfg.dmd else 0.0
    y = c.dynamic
    y.dynadg, y.dynars, y.real_scale_init, y.decay_steps = cfg.dynadg, cfg.dynars, cfg.real_scale_init, cfg.decay_steps
    y.alpha, y.beta = cfg.dynars_alpha, cfg.dynars_beta
    r = c.rl
    r.method = cfg.rl_method if cfg.reward is not None else "none"
    r.start_step, r.margin = cfg.rl_start_step, cfg.margin
    r.dpo_k, r.dpo_beta, r.dpo_weight = cfg.dpo_k, cfg.dpo_beta, cfg.rl_weight
    r.grpo_group_size, r.grpo_clip, r.grpo_weight = cfg.grpo_group_size, cfg.grpo_clip, cfg.rl_weight
    r.grpo_inner_updates, r.grpo_kl_weight = cfg.grpo_inner_updates, cfg.grpo_kl_weight
    o = c.optim
    o.generator_lr = o.rl_generator_lr = cfg.generator_lr
    o.critic_lr = o.rl_critic_lr = cfg.critic_lr
    o.generator_weight_decay, o.critic_weight_decay = cfg.generator_weight_decay, 0.0
    o.betas, o.grad_clip, o.ema_decay = cfg.betas, cfg.grad_clip, 0.0
    c.data.batch_size, c.data.rl_batch_size = cfg.batch_size, 0
    return c


def toy_engine(teacher: MLPDenoiser, world: GaussianMixtureWorld, cfg: ToyDMDRConfig,
               rng: torch.Generator, seed: int = 0) -> StepEngine:
    """The trainer's step engine on the toy world: a trainable copy of ``teacher`` as the generator, another copy
    with the ``critic`` LoRA as real and fake score, every draw from ``rng`` (LoRA init and ``reinit`` from
    ``seed``)."""
    if cfg.rl_method not in METHODS:
        raise ValueError(f"rl_method must be one of {', '.join(METHODS)}, got {cfg.rl_method!r}")
    rl_on = cfg.reward is not None and cfg.rl_method != "none"
    if not cfg.dmd and not rl_on:
        raise ValueError("a toy run needs the DMD loss, a reward (and rl_method), or both")
    if not cfg.dmd and cfg.rl_start_step > 0:
        raise ValueError("ReFL alone (dmd=False) must start at step 0: before it the generator has no loss")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # LoRA A init and 'reinit' draw from the global RNG
        generator = _make_generator(teacher, cfg)
        critic = copy.deepcopy(teacher).requires_grad_(False)
        inject_lora(critic.net, "critic", cfg.critic_rank, cfg.critic_alpha, cfg.critic_targets)
    roles = Roles(generator=generator, teacher=critic, generator_params=list(generator.parameters()),
                  critic_params=lora_parameters(critic.net, "critic"), shared_base=False)
    param = teacher.parameterization
    return StepEngine(engine_config(cfg, param.t_min), roles, param,
                      [(cfg.reward, cfg.reward_weight)] if rl_on else [], rng=rng,
                      noise=lambda n: torch.randn(n, world.dim, generator=rng), decode=lambda x: x,
                      device=torch.device("cpu"))


class _Evaluation:
    """The distance (and mean reward) of a generator's samples to guided multi-step teacher samples, from noise
    independent of the training draws, the same noise at every evaluation."""

    def __init__(self, teacher: MLPDenoiser, world: GaussianMixtureWorld, cfg: ToyDMDRConfig, seed: int):
        self.cfg, self.seed, self.param = cfg, seed, teacher.parameterization
        eval_rng = torch.Generator().manual_seed(10_000 + seed)
        self.labels = world.balanced_labels(cfg.eval_samples)
        self.cond = world.cond(self.labels)
        ref_noise = torch.randn(cfg.eval_samples, world.dim, generator=eval_rng)
        self.reference = teacher_sample(teacher, ref_noise, self.cond, world.uncond(cfg.eval_samples), self.param,
                                        cfg.guidance, num_steps=cfg.teacher_sample_steps)
        self.noise = torch.randn(cfg.eval_samples, world.dim, generator=eval_rng)
        self.prompts = [f"class {c}" for c in self.labels.tolist()]

    @torch.no_grad()
    def __call__(self, k: int, engine: StepEngine, history: ToyHistory) -> None:
        cfg = self.cfg
        samples = few_step_sample(engine.roles.generator_fn, self.noise, self.cond, engine.timesteps, self.param,
                                  mode=cfg.backward_simulation,
                                  generator=torch.Generator().manual_seed(20_000 + self.seed))
        dist = class_sliced_wasserstein(samples, self.reference, self.labels, cfg.eval_projections,
                                        torch.Generator().manual_seed(self.seed))
        score = cfg.reward(samples, self.prompts).mean().item() if cfg.reward is not None else math.nan
        history.steps.append(k)
        history.distance.append(dist.item())
        history.reward.append(score)
        history.samples = samples
        if cfg.keep_samples:
            history.sample_history.append(samples)


def run_toy_dmdr(teacher: MLPDenoiser, world: GaussianMixtureWorld, cfg: ToyDMDRConfig,
                 seed: int = 0) -> ToyHistory:
    """Train a few-step generator on the toy world with DMD and/or an RL branch; return the distance record.

    Args:
        teacher: the trained :class:`MLPDenoiser`; left untouched (the critic LoRA goes into a copy).
        world: the world whose labels condition the runs.
        cfg: the run's settings.
        seed: seeds every draw of the run (training batches, noise, levels, LoRA init, evaluation).

    Returns:
        The distance to the guided teacher samples (and the mean reward, NaN without one) at generator
        step 0 and every ``eval_every`` steps after.
    """
    rng = torch.Generator().manual_seed(seed)
    engine = toy_engine(teacher, world, cfg, rng, seed)
    evaluate = _Evaluation(teacher, world, cfg, seed)
    history = ToyHistory(reference=evaluate.reference, labels=evaluate.labels)
    evaluate(0, engine, history)
    while engine.step < cfg.generator_steps:
        batch_labels = world.sample_labels(cfg.batch_size, rng)
        prompts = [f"class {c}" for c in batch_labels.tolist()]
        if engine.iteration(world.cond(batch_labels), world.uncond(cfg.batch_size), prompts) is None:
            continue
        k = engine.step
        if k % cfg.eval_every == 0 or k == cfg.generator_steps:
            evaluate(k, engine, history)
            if cfg.stop_distance is not None and history.final_distance <= cfg.stop_distance:
                break
    return history
