"""The DMDR step engine: one iteration's generator and critic updates and their schedules.

Both loops call it: :class:`dmdr.trainer.DMDRTrainer` (data, logging, checkpoints around it) and the toy worlds'
:func:`dmdr.worlds.toy_dmdr.run_toy_dmdr` (evaluation around it), so the 2-D worlds test the real step in seconds.
The math is :mod:`dmdr.algorithm`'s pure functions; this module owns what changes from step to step.

One iteration (ALGORITHM.md): backward-simulate ``x0_sim`` with the generator (no grad); if a generator step is due,
build ``x_t`` from ``x0_sim``, take the DMD loss (+ the RL branch's loss once RL is on: ``rl.method`` refl, dpo or
grpo, one call through :mod:`dmdr.losses.rl`) and step; then train the critic on the same ``x0_sim``. ``k`` counts
generator steps and drives DynaDG, DynaRS, the RL switch (and its learning rates and batch size) and
``train.max_steps``.

Without the DMD loss (``dmd.weight 0``, the paper's "only RL" rows) nothing reads the critic: it is not trained and
the generator steps every iteration (``dmd.ratio`` is the number of critic steps per generator step, and there are
none). Training the critic anyway, as the trainer did before this module, only spent a teacher forward and
backward per iteration and ``ratio - 1`` of every ``ratio`` backward simulations on results no loss used.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from dmdr.algorithm import (
    DecoupledDMD,
    LevelInput,
    backward_simulate,
    chain_input,
    critic_step_loss,
    dmd_generator_loss,
    draw_guidance,
    generator_clean_estimate,
    generator_input,
    simulate_chain,
)
from dmdr.config import TrainConfig, grpo_group_size
from dmdr.errors import ConfigError
from dmdr.guidance import score_rule_of
from dmdr.losses.rl import PolicyAccess, RLBatch, build_rl_method
from dmdr.micro_batches import chunked, merge_stats, micro_slices, rows
from dmdr.models.base import Conditioning, Denoiser, index_conditioning
from dmdr.parameterization import Parameterization
from dmdr.rewards.base import Reward
from dmdr.sampling import _default_cat, randn_like
from dmdr.schedules import (
    DynaRSSampler,
    beta_levels,
    critic_steps_per_generator_step,
    dynadg_real_scale,
    generator_levels,
    iterations_per_generator_step,
)
from dmdr.snapshots import EMA, FrozenReference

log = logging.getLogger("dmdr.trainer")  # the loop's logger, as before the engine had a module of its own


def _rows_of(decoupled: DecoupledDMD | None, s: slice) -> DecoupledDMD | None:
    """Decoupled DMD's per-sample draws for the slice ``s`` of the batch."""
    if decoupled is None or decoupled.t_ca is None:
        return decoupled
    return DecoupledDMD(dm_weight=decoupled.dm_weight, ca_weight=decoupled.ca_weight, t_ca=decoupled.t_ca[s],
                        ca_noise=None if decoupled.ca_noise is None else decoupled.ca_noise[s])


class TrainingDiverged(RuntimeError):
    """Too many consecutive non-finite steps; the last good checkpoint is left intact."""


@dataclass
class Roles:
    """The networks by role, plus how to call them."""

    generator: Denoiser
    teacher: Denoiser
    generator_params: list[torch.nn.Parameter]
    critic_params: list[torch.nn.Parameter]
    shared_base: bool
    """True when the generator is the teacher's own network with the ``generator`` adapter."""

    def generator_param_names(self) -> list[str]:
        """Names of :attr:`generator_params` in the generator's network, independent of how it is wrapped.

        LoRA mode names them in the teacher (which holds the adapter), full mode in the copy. Activation
        checkpointing's ``_checkpoint_wrapped_module`` level is dropped, so a training run and a one-process
        reader (export, sampling) use the same names (the EMA is keyed by them).
        """
        owner = self.teacher if self.shared_base else self.generator
        names = {id(p): n.replace("_checkpoint_wrapped_module.", "") for n, p in owner.named_parameters()}
        return [names[id(p)] for p in self.generator_params]

    def generator_fn(self, x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        scales = {"generator": 1.0, "critic": 0.0} if self.shared_base else None
        return self.generator(x, t, cond, lora_scales=scales)

    def critic_fn(self, x: Tensor, t: Tensor, cond: Conditioning, scale: float | Tensor) -> Tensor:
        scales: dict[str, float | Tensor] = {"critic": scale}
        if self.shared_base:
            scales["generator"] = 0.0
        return self.teacher(x, t, cond, lora_scales=scales)


@dataclass
class Counters:
    """Step counters and the running record of skipped (non-finite) steps."""

    iteration: int = 0
    generator_step: int = 0
    skipped_steps: int = 0
    consecutive_bad: dict[str, int] = field(default_factory=lambda: {"generator": 0, "critic": 0})
    """Non-finite steps in a row, per optimizer (a good critic step says nothing about the generator)."""


class StepEngine:
    """The generator and critic updates of DMDR, their optimizers, schedules, EMA and RL branch.

    Args:
        cfg: the resolved config (its ``dmd``, ``dynamic``, ``rl``, ``optim`` and ``data`` sections are read).
        roles: generator / teacher / trainable parameter lists.
        param: the family's parameterization.
        rewards: ``(reward, weight)`` pairs of the RL branch (may be empty: no RL).
        rng: the run's noise stream (every draw of a step comes from it).
        noise: ``n -> (n, *latent)`` standard normal noise from ``rng`` on the step's device.
        decode: latents to images in [0, 1] (the rewards' input); identity for the toy worlds.
        device: where the step runs.
        dist: the distributed environment (ranks agree on finiteness), or None for one process.
    """

    def __init__(self, cfg: TrainConfig, roles: Roles, param: Parameterization, rewards: list[tuple[Reward, float]],
                 *, rng: torch.Generator, noise: Callable[[int], Tensor], decode: Callable[[Tensor], Tensor],
                 device: torch.device, dist: Any = None):
        self.cfg = cfg
        self.roles = roles
        self.param = param
        self.rewards = rewards
        self.rng = rng
        self.noise = noise
        self.decode = decode
        self.device = device
        self.dist = dist
        # On the training device: the samplers index them every step (a host copy there is a sync on GPUs).
        self.timesteps = generator_levels(cfg.dmd.num_steps, cfg.dmd.shift, cfg.dmd.t_min, cfg.dmd.timesteps,
                                          param).to(device)
        self.dynars = DynaRSSampler(cfg.dynamic.alpha, cfg.dynamic.beta, cfg.dynamic.decay_steps,
                                    t_min=cfg.dmd.t_min, enabled=cfg.dynamic.dynars, schedule=cfg.dynamic.schedule,
                                    end=(cfg.dynamic.end_alpha, cfg.dynamic.end_beta))
        self.counters = Counters()
        o = cfg.optim
        self.generator_opt = torch.optim.AdamW(roles.generator_params, lr=o.generator_lr, betas=o.betas,
                                               eps=o.adam_eps, weight_decay=o.generator_weight_decay)
        self.critic_opt = torch.optim.AdamW(roles.critic_params, lr=o.critic_lr, betas=o.betas, eps=o.adam_eps,
                                            weight_decay=o.critic_weight_decay)
        self.ema = EMA(roles.generator_params, o.ema_decay, roles.generator_param_names) if o.ema_decay > 0 else None
        # The RL branch (dmdr/losses/rl/): one method called per generator step, plus what it declares it
        # needs: a frozen reference snapshot (DPO, GRPO's KL term) and per-rank sampler state (GRPO).
        self.rl = build_rl_method(cfg.rl, sampler=cfg.dmd.backward_simulation, group_size=grpo_group_size(cfg))
        self.reference = (FrozenReference(roles.generator_params)
                          if self.rl is not None and self.rl.needs_reference else None)
        self._fake_losses: list[float] = []

    # ------------------------------------------------------------------ schedules
    @property
    def step(self) -> int:
        """``k``: generator steps taken."""
        return self.counters.generator_step

    @property
    def trains_critic(self) -> bool:
        """Whether the critic is trained: only the DMD loss reads it (``dmd.weight 0`` runs the RL loss alone)."""
        return critic_steps_per_generator_step(self.cfg.dmd.ratio, self.cfg.dmd.weight) > 0

    @property
    def iterations_per_generator_step(self) -> int:
        """``dmd.ratio`` (critic steps per generator step); 1 when no critic is trained."""
        return iterations_per_generator_step(self.cfg.dmd.ratio, self.cfg.dmd.weight)

    @property
    def grad_accum(self) -> int:
        """Micro-batches per step (``train.grad_accum``)."""
        return max(1, self.cfg.train.grad_accum)

    def generator_step_due(self) -> bool:
        """Whether this iteration ends with a generator step (the last of every ``ratio`` iterations)."""
        return (self.counters.iteration + 1) % self.iterations_per_generator_step == 0

    def rl_active(self, k: int | None = None) -> bool:
        """Whether generator step ``k`` (default: the next) takes the RL loss."""
        k = self.step if k is None else k
        return self.rl is not None and bool(self.rewards) and k >= self.cfg.rl.start_step

    def real_scale(self, k: int) -> float:
        """DynaDG's real-score LoRA scale ``s_r(k)`` (0 without DynaDG: the teacher itself)."""
        d = self.cfg.dynamic
        return dynadg_real_scale(k, d.real_scale_init, d.decay_steps, d.schedule) if d.dynadg else 0.0

    def batch_size(self, k: int | None = None) -> int:
        """Prompts per rank per iteration at generator step ``k``: ``data.rl_batch_size`` once RL is on (if set;
        with ``data.rl_batch_for_distill`` from ``rl.start_step`` even without an RL branch)."""
        d = self.cfg.data
        k = self.step if k is None else k
        stage = self.rl_active(k) or (d.rl_batch_for_distill and k >= self.cfg.rl.start_step)
        return d.rl_batch_size if d.rl_batch_size and stage else d.batch_size

    def apply_learning_rates(self, k: int) -> None:
        """The cold-start learning rates, or the RL stage's from ``rl.start_step``."""
        o = self.cfg.optim
        gen_lr, critic_lr = (o.rl_generator_lr, o.rl_critic_lr) if self.rl_active(k) else (o.generator_lr, o.critic_lr)
        for group in self.generator_opt.param_groups:
            group["lr"] = gen_lr
        for group in self.critic_opt.param_groups:
            group["lr"] = critic_lr

    def decoupled(self, batch: int) -> DecoupledDMD | None:
        """Decoupled DMD's settings for this step (None: the coupled loss, bit for bit)."""
        d = self.cfg.dmd
        if not d.decoupled:
            return None
        t_ca = None
        if d.ca_levels == "beta":
            t_ca = beta_levels(d.ca_alpha, d.ca_beta, batch, self.rng, d.t_min, self.device)
        return DecoupledDMD(dm_weight=d.dm_weight, ca_weight=d.ca_weight, t_ca=t_ca)

    def restart_iteration(self) -> None:
        """Forget the partial critic-loss average (after loading a checkpoint mid-run)."""
        self._fake_losses.clear()

    # ------------------------------------------------------------------ steps
    def iteration(self, cond: Conditioning, uncond: Conditioning, prompts: list[str]) -> dict[str, float] | None:
        """One iteration on a batch; returns the generator step's metrics when a generator step ran.

        ``loss/fake`` is the mean of the critic losses since the previous generator step.
        """
        x0_sim, level = self.simulate(self.noise(len(prompts)), cond)
        metrics = self.generator_update(x0_sim, cond, uncond, prompts, level) if self.generator_step_due() else None
        critic_metrics: dict[str, float] = {}
        if self.trains_critic:
            critic_x0 = level.clean if self.cfg.dmd.critic_samples == "level" else x0_sim
            critic_metrics = self.critic_update(critic_x0, cond)
            self._fake_losses.append(critic_metrics.pop("loss/fake"))
        self.counters.iteration += 1
        if metrics is None:
            return None
        metrics.update(critic_metrics)
        if self._fake_losses:
            metrics["loss/fake"] = sum(self._fake_losses) / len(self._fake_losses)
            self._fake_losses.clear()
        self.counters.generator_step += 1
        metrics["train/skipped_steps"] = self.counters.skipped_steps
        return metrics

    def simulate(self, noise: Tensor, cond: Conditioning) -> tuple[Tensor, LevelInput | None]:
        """This iteration's ``x0_sim`` and, when drawn up front (``sde``, or a critic on the level's estimate), the
        generator's input with its clean estimate; None: the generator step draws its input from ``x0_sim``."""
        d = self.cfg.dmd
        fn = chunked(self.roles.generator_fn, self.grad_accum)  # no grad: grad_accum chunks, same values
        if d.backward_simulation == "sde":
            chain = simulate_chain(fn, noise, cond, self.timesteps, self.param, generator=self.rng)
            return chain.sample, chain_input(chain, self.timesteps, self.rng)
        x0_sim = backward_simulate(fn, noise, cond, self.timesteps, self.param, mode="ode", generator=self.rng)
        if d.critic_samples != "level":
            return x0_sim, None
        x_t, t = generator_input(x0_sim, self.timesteps, self.param, self.rng)
        with torch.no_grad():
            clean = generator_clean_estimate(fn, x_t, t, cond, self.param)
        return x0_sim, LevelInput(x_t=x_t, t=t, clean=clean)

    def generator_update(self, x0_sim: Tensor, cond: Conditioning, uncond: Conditioning, prompts: list[str],
                         level: LevelInput | None = None) -> dict[str, float]:
        """The generator's DMD (+ RL) step at ``k``; skipped (and counted) when its loss or gradient is not finite.

        ``level``: the input drawn by :meth:`simulate` (None: drawn here from ``x0_sim``). With
        ``train.grad_accum K`` every draw is made for the whole batch first, in the order of a one-slice step, and
        each of the ``K`` slices then runs its forward, losses and backward (:mod:`dmdr.micro_batches`)."""
        k = self.step
        cfg = self.cfg
        r = self.roles
        self.apply_learning_rates(k)
        if not self.trains_critic and not self.rl_active(k):
            raise ConfigError(f"dmd.weight 0 trains the RL loss alone, but generator step {k} has no RL loss "
                              f"(rl.method {cfg.rl.method}, rl.start_step {cfg.rl.start_step}, rl.rewards "
                              f"{', '.join(cfg.rl.rewards) or 'none'}): start RL at or before step {k}")
        if level is None:
            x_t, t = generator_input(x0_sim, self.timesteps, self.param, self.rng)
        else:
            x_t, t = level.x_t, level.t
        batch = x_t.shape[0]
        slices = micro_slices(batch, self.grad_accum)
        first = slices[0]
        x0_first = generator_clean_estimate(r.generator_fn, x_t[first], t[first], rows(cond, first, batch), self.param)
        s_r = self.real_scale(k)
        metrics: dict[str, float] = {"schedule/lora_scale_real": s_r, "schedule/dynars_mean": self.dynars.mean(k)}
        dmd = None
        if cfg.dmd.weight > 0:  # 0: the RL loss alone (an ablation), no score passes at all
            template = torch.empty((batch, *x0_first.shape[1:]), dtype=x0_first.dtype, device=x0_first.device)
            t_d = self.dynars.sample(k, batch, self.rng, device=self.device)
            w = draw_guidance(cfg.dmd.guidance, cfg.dmd.guidance_jitter, self.rng)
            decoupled = self.decoupled(batch)
            noise = randn_like(template, self.rng)
            if decoupled is not None and decoupled.t_ca is not None:
                decoupled.ca_noise = randn_like(template, self.rng)
            dmd = (t_d, w, decoupled, noise)
            metrics["schedule/guidance"] = w
        rl_on = self.rl_active(k)
        access = self.policy_access() if rl_on else None
        prepared, rl_stats = self.rl.prepare(prompts, cond, access, self.rewards) if rl_on else (None, {})
        parts: list[tuple[float, dict[str, float]]] = []
        total = x0_first.new_zeros((), dtype=torch.float32)
        for s in slices:
            share = (s.stop - s.start) / batch
            c = rows(cond, s, batch)
            x0 = x0_first if s is first else generator_clean_estimate(r.generator_fn, x_t[s], t[s], c, self.param)
            loss = x0.new_zeros((), dtype=torch.float32)
            part: dict[str, float] = {}
            if dmd is not None:
                t_d, w, decoupled, noise = dmd
                terms = dmd_generator_loss(x0, c, rows(uncond, s, batch), r.critic_fn, self.param, t_d[s], w, s_r,
                                           cfg.dmd.fake_scale, eps=cfg.dmd.eps, decoupled=_rows_of(decoupled, s),
                                           noise=noise[s], rule=score_rule_of(r.teacher))
                loss = cfg.dmd.weight * terms.loss
                part.update({"loss/dmd": terms.loss.item(), "dmd/grad_abs_mean": terms.grad.abs().mean().item()})
            if rl_on:
                rl, stats = self.rl.micro_loss(prepared, RLBatch(x0=x0, prompts=prompts[s], cond=c), access,
                                               self.rewards, s)
                loss = loss + rl
                part["loss/rl"] = rl.item()
                part.update(stats)
            (share * loss).backward()
            total = total + share * loss.detach()
            parts.append((share, part))
        metrics.update(merge_stats(parts))
        metrics.update(rl_stats)
        norm, finite = self._clip_and_check(r.generator_params, total)
        if finite:
            self.generator_opt.step()
            if self.ema is not None:
                self.ema.update()
        self._record_step("generator", finite)
        self.generator_opt.zero_grad(set_to_none=True)
        metrics.update({"loss/generator": total.item(), "grad_norm/generator": norm,
                        "lr/generator": self.generator_opt.param_groups[0]["lr"]})
        return metrics

    def critic_update(self, x0_sim: Tensor, cond: Conditioning) -> dict[str, float]:
        """The critic's denoising step on this iteration's ``x0_sim`` at DynaRS levels (in ``grad_accum``
        slices, levels and noise drawn for the whole batch first)."""
        k = self.step
        self.apply_learning_rates(k)
        batch = x0_sim.shape[0]
        t_g = self.dynars.sample(k, batch, self.rng, device=self.device)
        noise = randn_like(x0_sim, self.rng)
        total = x0_sim.new_zeros((), dtype=torch.float32)
        for s in micro_slices(batch, self.grad_accum):
            share = (s.stop - s.start) / batch
            loss = critic_step_loss(self.roles.critic_fn, x0_sim[s], rows(cond, s, batch), t_g[s], self.param,
                                    self.cfg.dmd.fake_scale, noise=noise[s])
            (share * loss).backward()
            total = total + share * loss.detach()
        norm, finite = self._clip_and_check(self.roles.critic_params, total)
        if finite:
            self.critic_opt.step()
        self._record_step("critic", finite)
        self.critic_opt.zero_grad(set_to_none=True)
        return {"loss/fake": total.item(), "grad_norm/critic": norm, "lr/critic": self.critic_opt.param_groups[0]["lr"]}

    def policy_access(self) -> PolicyAccess:
        """What the RL method may call: the generator, its reference (taken at the first RL step), the noise."""
        reference_fn = None
        if self.reference is not None:
            if not self.reference.taken:
                self.reference.take()
            reference_fn = self.reference.wrap(self.roles.generator_fn)
        # Sampling without grad (DPO's candidates, GRPO's group) runs in grad_accum chunks: one slice's activations.
        return PolicyAccess(fn=chunked(self.roles.generator_fn, self.grad_accum), param=self.param,
                            timesteps=self.timesteps, rng=self.rng, noise=self.noise,
                            decode=chunked(self.decode, self.grad_accum), select=index_conditioning,
                            cat=_default_cat, reference_fn=reference_fn)

    def _clip_and_check(self, params: list[torch.nn.Parameter], loss: Tensor) -> tuple[float, bool]:
        """Clip (if configured) and agree across ranks whether the loss and the grads are finite."""
        max_norm = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else float("inf")
        for p in params:
            # A trained parameter the loss never reached (Qwen-Image's last block: its text stream's output is
            # never read) steps on a zero gradient, as every other one steps: AdamW then keeps state for every
            # parameter, which is what a resumed run's fresh optimizer expects to load from the checkpoint.
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        finite = bool(torch.isfinite(loss.detach()).item() and torch.isfinite(norm).item())
        if self.dist is not None:
            finite = not self.dist.any_rank(not finite)
        return float(norm), finite

    def _record_step(self, role: str, finite: bool) -> None:
        c = self.counters
        if finite:
            c.consecutive_bad[role] = 0
            return
        c.skipped_steps += 1
        c.consecutive_bad[role] += 1
        if c.consecutive_bad[role] >= self.cfg.train.max_bad_steps:
            raise TrainingDiverged(
                f"{c.consecutive_bad[role]} consecutive non-finite {role} steps at generator step {self.step}; "
                f"stopping (the last good checkpoint is intact; lower the learning rates or check the data)")

    # ------------------------------------------------------------------ Stateful
    def state_dict(self) -> dict[str, Any]:
        """Global values only: the step counters, the EMA and the RL reference (identical on every rank)."""
        c = self.counters
        state: dict[str, Any] = {
            "iteration": c.iteration, "generator_step": c.generator_step,
            "skipped_steps": c.skipped_steps, "consecutive_bad": dict(c.consecutive_bad),
        }
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        if self.reference is not None:
            state["rl_reference"] = dict(zip(self.roles.generator_param_names(), self.reference.values))
            state["rl_reference_taken"] = self.reference.taken
        return state

    def load_state_dict(self, state: dict[str, Any]) -> bool:
        """Restore :meth:`state_dict`; returns whether the EMA must restart from the weights (the checkpoint has
        none: it was written with ``optim.ema_decay 0``), which the caller does once the models are loaded."""
        c = self.counters
        c.iteration = int(state["iteration"])
        c.generator_step = int(state["generator_step"])
        c.skipped_steps = int(state["skipped_steps"])
        c.consecutive_bad = {k: int(v) for k, v in state["consecutive_bad"].items()}
        if self.ema is not None and "ema" in state:
            self.ema.load_state_dict(state["ema"])
        if self.reference is not None and "rl_reference" in state:
            for name, t in zip(self.roles.generator_param_names(), self.reference.values):
                t.copy_(state["rl_reference"][name])
            self.reference.taken = bool(state["rl_reference_taken"])
        elif self.reference is not None and c.generator_step > self.cfg.rl.start_step:
            log.warning("the checkpoint (generator step %d) holds no %s reference although RL began at step %d: it "
                        "was written with another rl.method; the reference is taken from the resumed generator",
                        c.generator_step, self.cfg.rl.method, self.cfg.rl.start_step)
        return self.ema is not None and "ema" not in state
