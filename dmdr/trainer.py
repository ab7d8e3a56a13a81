"""The DMDR loop: a critic step every iteration, a generator step every ``ratio``, RL from ``start_step``.

The trainer knows roles, not model families:

* ``generator``: a :class:`~dmdr.models.base.Denoiser` (a full copy of the teacher, or the teacher's
  own network with the ``generator`` LoRA adapter switched on);
* ``teacher``: the frozen :class:`~dmdr.models.base.Denoiser` with the ``critic`` LoRA; evaluated at
  ``s_r(k)`` (+CFG) it is the real score, at ``s_f`` the fake score;
* ``codec`` (VAE) for ReFL, ``text_encoder`` or an embedding cache for prompts.

One iteration (ALGORITHM.md): backward-simulate ``x0_sim`` with the generator (no grad); if a
generator step is due, build ``x_t`` from ``x0_sim``, take the DMD loss (+ the RL branch's loss once RL
is on: ``rl.method`` refl, dpo or grpo, one call through :mod:`dmdr.losses.rl`) and step; then train
the critic on the same ``x0_sim``. ``k`` counts generator steps and drives
DynaDG, DynaRS, the RL switch and ``train.max_steps``.

Everything that changes during training is reachable from :meth:`DMDRTrainer.app_state`, one
``Stateful`` tree saved with torch.distributed.checkpoint, so a resumed run continues exactly.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import nullcontext
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
from dmdr.config import TrainConfig
from dmdr.losses.rl import PolicyAccess, RLBatch, build_rl_method
from dmdr.losses.rl.reference import FrozenReference
from dmdr.models.base import (
    Backbone,
    Conditioning,
    Denoiser,
    conditioning_to,
    index_conditioning,
    repeat_conditioning,
)
from dmdr.observability import MetricsLogger, ProgressBar, Throughput, gpu_peak_tflops, peak_memory_gb
from dmdr.rewards.base import Reward
from dmdr.sampling import _default_cat, few_step_sample
from dmdr.schedules import DynaRSSampler, beta_levels, dynadg_real_scale, generator_levels

log = logging.getLogger(__name__)


class FlopCount:
    """Accumulates the FLOPs of the code run inside ``with`` blocks (torch's flop counter)."""

    def __init__(self) -> None:
        self.total = 0
        self._mode = None

    def __enter__(self) -> FlopCount:
        from torch.utils.flop_counter import FlopCounterMode

        self._mode = FlopCounterMode(display=False)
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._mode.__exit__(*exc)
        self.total += self._mode.get_total_flops()


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
    extra: dict[str, Any] = field(default_factory=dict)


class DMDRTrainer:
    """The DMDR training loop as a ``Stateful`` object.

    Args:
        cfg: the resolved config.
        backbone: the loaded model family (teacher with critic LoRA already injected).
        roles: generator / teacher / trainable parameter lists.
        rewards: ``(reward, weight)`` pairs of the RL branch (may be empty when ``rl.method == "none"``).
        loader: an iterable of batches ``{"prompts": [...], ...}`` (a StatefulDataLoader in production).
        device: where the step runs.
        dist: the distributed environment (see :mod:`dmdr.distributed`); ``None`` for one process.
        skip_monitor: per-rank bad-data accounting (:class:`dmdr.data.SkipMonitor`), or None.
        compute_dtype: autocast dtype for unsharded runs (bf16 / fp16); FSDP2 runs cast through their
            MixedPrecisionPolicy instead and pass None.
    """

    optional_state_keys = ("ema", "rl_reference", "rl_reference_taken")
    """State a resumed run may have that its checkpoint lacks: EMA switched on at resume starts from the weights;
    a DPO reference (a cold start written with another ``rl.method``) is taken at the first RL step."""

    def __init__(self, cfg: TrainConfig, backbone: Backbone, roles: Roles, rewards: list[tuple[Reward, float]],
                 loader: Any, device: torch.device, dist: Any = None, skip_monitor: Any = None,
                 compute_dtype: torch.dtype | None = None):
        self.cfg = cfg
        self.backbone = backbone
        self.roles = roles
        self.rewards = rewards
        self.loader = loader
        self.device = device
        self.dist = dist
        self.skip_monitor = skip_monitor
        self.compute_dtype = compute_dtype
        self.stopped_early = False
        self.param = backbone.parameterization
        # On the training device: the samplers index them every step (a host copy there is a sync on GPUs).
        self.timesteps = generator_levels(cfg.dmd.num_steps, cfg.dmd.shift, cfg.dmd.t_min, cfg.dmd.timesteps,
                                          self.param).to(device)
        self.dynars = DynaRSSampler(cfg.dynamic.alpha, cfg.dynamic.beta, cfg.dynamic.decay_steps,
                                    t_min=cfg.dmd.t_min, enabled=cfg.dynamic.dynars, schedule=cfg.dynamic.schedule,
                                    end=(cfg.dynamic.end_alpha, cfg.dynamic.end_beta))
        self.counters = Counters()
        rank = dist.rank if dist is not None else 0
        # One noise stream per rank (ranks see different prompts and must draw different noise);
        # its state is part of the checkpoint so a resumed run draws the same noise.
        self.rng = torch.Generator(device=device).manual_seed(cfg.train.seed * 1000 + rank)
        self.generator_opt = torch.optim.AdamW(
            roles.generator_params, lr=cfg.optim.generator_lr, betas=cfg.optim.betas, eps=cfg.optim.adam_eps,
            weight_decay=cfg.optim.generator_weight_decay)
        self.critic_opt = torch.optim.AdamW(
            roles.critic_params, lr=cfg.optim.critic_lr, betas=cfg.optim.betas, eps=cfg.optim.adam_eps,
            weight_decay=cfg.optim.critic_weight_decay)
        self.ema: list[Tensor] | None = None
        if cfg.optim.ema_decay > 0:
            self.ema = [p.detach().clone() for p in roles.generator_params]
        self._ema_from_weights = False
        # The RL branch (dmdr/losses/rl/): one method called per generator step, plus what it declares it
        # needs: a frozen reference snapshot (DPO) and per-rank sampler state (GRPO), both checkpointed.
        self.rl = build_rl_method(cfg.rl, sampler=cfg.dmd.backward_simulation)
        self.reference = (FrozenReference(roles.generator_params)
                          if self.rl is not None and self.rl.needs_reference else None)
        self._negative: Conditioning | None = None
        self._data_iter: Iterator | None = None
        self._fake_losses: list[float] = []
        self.stateful_extras: dict[str, Any] = {}
        """More ``Stateful`` entries of :meth:`app_state` (the guard's state, :mod:`dmdr.guard`)."""

    # ------------------------------------------------------------------ Stateful
    def state_dict(self) -> dict[str, Any]:
        """Global values only: the step counters and the EMA (identical on every rank).

        Per-rank state (the noise RNG, the data position, the data monitor) and the models and
        optimizers are separate entries of :meth:`app_state`.
        """
        c = self.counters
        state: dict[str, Any] = {
            "iteration": c.iteration, "generator_step": c.generator_step,
            "skipped_steps": c.skipped_steps, "consecutive_bad": dict(c.consecutive_bad),
        }
        if self.ema is not None:
            state["ema"] = dict(zip(self.roles.generator_param_names(), self.ema))
        if self.reference is not None:
            state["rl_reference"] = dict(zip(self.roles.generator_param_names(), self.reference.values))
            state["rl_reference_taken"] = self.reference.taken
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        c = self.counters
        c.iteration = int(state["iteration"])
        c.generator_step = int(state["generator_step"])
        c.skipped_steps = int(state["skipped_steps"])
        c.consecutive_bad = {k: int(v) for k, v in state["consecutive_bad"].items()}
        if self.ema is not None and "ema" in state:
            for name, t in zip(self.roles.generator_param_names(), self.ema):
                t.copy_(state["ema"][name])
        if self.reference is not None and "rl_reference" in state:
            for name, t in zip(self.roles.generator_param_names(), self.reference.values):
                t.copy_(state["rl_reference"][name])
            self.reference.taken = bool(state["rl_reference_taken"])
        elif self.reference is not None and c.generator_step > self.cfg.rl.start_step:
            log.warning("the checkpoint (generator step %d) holds no %s reference although RL began at step %d: it "
                        "was written with another rl.method; the reference is taken from the resumed generator",
                        c.generator_step, self.cfg.rl.method, self.cfg.rl.start_step)
        # EMA switched on at resume: started from the resumed weights in train(), once the models are loaded.
        self._ema_from_weights = self.ema is not None and "ema" not in state

    def app_state(self) -> dict[str, Any]:
        """The whole ``Stateful`` tree of the run, as torch.distributed.checkpoint saves it."""
        from dmdr.distributed.state import DataLoaderState, ModelOptimizerState, PerRank, RNGState

        r = self.roles
        state: dict[str, Any] = {"trainer": self, "rng": RNGState({"noise": self.rng})}
        if r.shared_base:  # both adapters live in the teacher's network
            state["models"] = ModelOptimizerState(r.teacher, [self.generator_opt, self.critic_opt],
                                                  trainable_only=True)
        else:
            state["generator"] = ModelOptimizerState(r.generator, self.generator_opt)
            state["critic"] = ModelOptimizerState(r.teacher, self.critic_opt, trainable_only=True)
        if hasattr(self.loader, "state_dict"):
            state["data"] = DataLoaderState(self.loader)
        if self.skip_monitor is not None:
            state["data_monitor"] = DataLoaderState(self.skip_monitor)
        if self.rl is not None and self.rl.stateful:
            state["rl_sampler"] = PerRank(self.rl, optional=True)  # absent from a cold start of another method
        state.update(self.stateful_extras)
        return state

    def restart_iteration(self) -> None:
        """Forget the in-flight data iterator and partial averages (after loading a checkpoint mid-run)."""
        self._data_iter = None
        self._fake_losses.clear()

    # ------------------------------------------------------------------ schedule
    @property
    def step(self) -> int:
        return self.counters.generator_step

    def rl_active(self, k: int | None = None) -> bool:
        k = self.step if k is None else k
        return self.rl is not None and bool(self.rewards) and k >= self.cfg.rl.start_step

    def real_scale(self, k: int) -> float:
        d = self.cfg.dynamic
        return dynadg_real_scale(k, d.real_scale_init, d.decay_steps, d.schedule) if d.dynadg else 0.0

    def _apply_learning_rates(self, k: int) -> None:
        o = self.cfg.optim
        gen_lr, critic_lr = (o.rl_generator_lr, o.rl_critic_lr) if self.rl_active(k) else (o.generator_lr, o.critic_lr)
        for group in self.generator_opt.param_groups:
            group["lr"] = gen_lr
        for group in self.critic_opt.param_groups:
            group["lr"] = critic_lr

    # ------------------------------------------------------------------ data
    def batch_size(self, k: int | None = None) -> int:
        """Prompts per rank per iteration at generator step ``k``: ``data.rl_batch_size`` once RL is on (if set)."""
        d = self.cfg.data
        k = self.step if k is None else k
        stage = self.rl_active(k) or (d.rl_batch_for_distill and k >= self.cfg.rl.start_step)
        return d.rl_batch_size if d.rl_batch_size and stage else d.batch_size

    def _next_batch(self) -> dict[str, Any]:
        """This iteration's prompts, as whole loader batches (:func:`dmdr.data.loader_batch_size`).

        A data error on any rank stops every rank (no rank is left waiting in a collective).
        """
        from dmdr.data import loader_batch_size, merge_batches
        from dmdr.errors import DataError

        if self._data_iter is None:
            self._data_iter = iter(self.loader)
        error: DataError | None = None
        batch: dict[str, Any] = {}
        try:
            parts = []
            for _ in range(self.batch_size() // loader_batch_size(self.cfg.data)):
                parts.append(next(self._data_iter))
                if self.skip_monitor is not None:
                    self.skip_monitor.update(parts[-1])
            batch = merge_batches(parts)
        except DataError as err:
            error = err
        if self.dist is not None and self.dist.any_rank(error is not None):
            raise error or DataError("another data-parallel rank stopped on bad data (see its error line)")
        if error is not None:
            raise error
        return batch

    def _conditioning(self, batch: dict[str, Any]) -> tuple[Conditioning, Conditioning]:
        prompts = batch["prompts"]
        if "cond" in batch:
            cond = conditioning_to(batch["cond"], self.device)
        else:
            with torch.no_grad():
                cond = conditioning_to(self.backbone.text_encoder.encode(prompts), self.device)
        if self._negative is None:
            neg = self.backbone.extras.get("negative")
            if neg is None:
                with torch.no_grad():
                    neg = self.backbone.text_encoder.negative()
            self._negative = conditioning_to(neg, self.device)
        return cond, repeat_conditioning(self._negative, len(prompts))

    def _noise(self, batch_size: int) -> Tensor:
        shape = (batch_size, *self.backbone.latent_shape(self.cfg.model.resolution))
        return torch.randn(shape, generator=self.rng, device=self.device)

    # ------------------------------------------------------------------ steps
    def _clip_and_check(self, params: list[torch.nn.Parameter], loss: Tensor) -> tuple[float, bool]:
        """Clip (if configured) and agree across ranks whether the loss and the grads are finite."""
        max_norm = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else float("inf")
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

    def generator_update(self, x0_sim: Tensor, cond: Conditioning, uncond: Conditioning,
                         prompts: list[str], level: LevelInput | None = None) -> dict[str, float]:
        k = self.step
        cfg = self.cfg
        r = self.roles
        self._apply_learning_rates(k)
        if level is None:
            x_t, t = generator_input(x0_sim, self.timesteps, self.param, self.rng)
        else:
            x_t, t = level.x_t, level.t
        x0 = generator_clean_estimate(r.generator_fn, x_t, t, cond, self.param)
        s_r = self.real_scale(k)
        metrics = {"schedule/lora_scale_real": s_r, "schedule/dynars_mean": self.dynars.mean(k)}
        loss = x0.new_zeros((), dtype=torch.float32)
        if cfg.dmd.weight > 0:  # 0: the RL loss alone (an ablation), no score passes at all
            t_d = self.dynars.sample(k, x0.shape[0], self.rng, device=self.device)
            w = draw_guidance(cfg.dmd.guidance, cfg.dmd.guidance_jitter, self.rng)
            terms = dmd_generator_loss(x0, cond, uncond, r.critic_fn, self.param, t_d, w, s_r, cfg.dmd.fake_scale,
                                       generator=self.rng, eps=cfg.dmd.eps, decoupled=self._decoupled(x0.shape[0]))
            loss = cfg.dmd.weight * terms.loss
            metrics.update({"loss/dmd": terms.loss.item(), "schedule/guidance": w,
                            "dmd/grad_abs_mean": terms.grad.abs().mean().item()})
        if self.rl_active(k):
            rl, stats = self.rl.loss(RLBatch(x0=x0, prompts=prompts, cond=cond), self.policy_access(), self.rewards)
            loss = loss + rl
            metrics["loss/rl"] = rl.item()
            metrics.update(stats)
        loss.backward()
        norm, finite = self._clip_and_check(r.generator_params, loss)
        if finite:
            self.generator_opt.step()
            self._update_ema()
        self._record_step("generator", finite)
        self.generator_opt.zero_grad(set_to_none=True)
        metrics.update({"loss/generator": loss.item(), "grad_norm/generator": norm,
                        "lr/generator": self.generator_opt.param_groups[0]["lr"]})
        return metrics

    def _decoupled(self, batch: int) -> DecoupledDMD | None:
        """Decoupled DMD's settings for this step (None: the coupled loss, bit for bit)."""
        d = self.cfg.dmd
        if not d.decoupled:
            return None
        t_ca = None
        if d.ca_levels == "beta":
            t_ca = beta_levels(d.ca_alpha, d.ca_beta, batch, self.rng, d.t_min, self.device)
        return DecoupledDMD(dm_weight=d.dm_weight, ca_weight=d.ca_weight, t_ca=t_ca)

    def policy_access(self) -> PolicyAccess:
        """What the RL method may call: the generator, its reference (taken at the first RL step), the noise."""
        reference_fn = None
        if self.reference is not None:
            if not self.reference.taken:
                self.reference.take()
            reference_fn = self.reference.wrap(self.roles.generator_fn)
        return PolicyAccess(fn=self.roles.generator_fn, param=self.param, timesteps=self.timesteps, rng=self.rng,
                            noise=self._noise, decode=self.backbone.codec.decode, select=index_conditioning,
                            cat=_default_cat, reference_fn=reference_fn)

    def critic_update(self, x0_sim: Tensor, cond: Conditioning) -> dict[str, float]:
        k = self.step
        self._apply_learning_rates(k)
        t_g = self.dynars.sample(k, x0_sim.shape[0], self.rng, device=self.device)
        loss = critic_step_loss(self.roles.critic_fn, x0_sim, cond, t_g, self.param, self.cfg.dmd.fake_scale,
                                generator=self.rng)
        loss.backward()
        norm, finite = self._clip_and_check(self.roles.critic_params, loss)
        if finite:
            self.critic_opt.step()
        self._record_step("critic", finite)
        self.critic_opt.zero_grad(set_to_none=True)
        return {"loss/fake": loss.item(), "grad_norm/critic": norm, "lr/critic": self.critic_opt.param_groups[0]["lr"]}

    @torch.no_grad()
    def _start_ema_from_weights(self) -> None:
        for e, p in zip(self.ema, self.roles.generator_params):
            e.copy_(p.detach())
        self._ema_from_weights = False
        if self.dist is None or self.dist.is_main:
            log.warning("the checkpoint holds no EMA (optim.ema_decay was 0 when it was written): the EMA starts "
                        "from the resumed weights at generator step %d", self.step)

    @torch.no_grad()
    def _update_ema(self) -> None:
        if self.ema is None:
            return
        decay = self.cfg.optim.ema_decay
        for e, p in zip(self.ema, self.roles.generator_params):
            e.lerp_(p.detach(), 1 - decay)

    def autocast(self):
        """Mixed-precision compute for unsharded runs; a no-op in fp32 and under FSDP2."""
        dtype = self.compute_dtype
        if dtype in (torch.bfloat16, torch.float16):
            return torch.autocast(self.device.type, dtype=dtype)
        return nullcontext()

    def train_iteration(self) -> dict[str, float] | None:
        """One iteration; returns the generator step's metrics when a generator step ran."""
        with self.autocast():
            return self._train_iteration()

    def _simulate(self, noise: Tensor, cond: Conditioning) -> tuple[Tensor, LevelInput | None]:
        """This iteration's ``x0_sim`` and, when drawn up front (``sde``, or a critic on the level's estimate), the
        generator's input with its clean estimate; None: the generator step draws its input from ``x0_sim``."""
        d, r = self.cfg.dmd, self.roles
        if d.backward_simulation == "sde":
            chain = simulate_chain(r.generator_fn, noise, cond, self.timesteps, self.param, generator=self.rng)
            return chain.sample, chain_input(chain, self.timesteps, self.rng)
        x0_sim = backward_simulate(r.generator_fn, noise, cond, self.timesteps, self.param, mode="ode",
                                   generator=self.rng)
        if d.critic_samples != "level":
            return x0_sim, None
        x_t, t = generator_input(x0_sim, self.timesteps, self.param, self.rng)
        with torch.no_grad():
            clean = generator_clean_estimate(r.generator_fn, x_t, t, cond, self.param)
        return x0_sim, LevelInput(x_t=x_t, t=t, clean=clean)

    def _train_iteration(self) -> dict[str, float] | None:
        batch = self._next_batch()
        cond, uncond = self._conditioning(batch)
        noise = self._noise(len(batch["prompts"]))
        x0_sim, level = self._simulate(noise, cond)
        metrics = None
        if (self.counters.iteration + 1) % self.cfg.dmd.ratio == 0:
            metrics = self.generator_update(x0_sim, cond, uncond, batch["prompts"], level)
        critic_x0 = level.clean if self.cfg.dmd.critic_samples == "level" else x0_sim
        critic_metrics = self.critic_update(critic_x0, cond)
        self._fake_losses.append(critic_metrics.pop("loss/fake"))
        self.counters.iteration += 1
        if metrics is not None:
            metrics.update(critic_metrics)
            metrics["loss/fake"] = sum(self._fake_losses) / len(self._fake_losses)
            self._fake_losses.clear()
            self.counters.generator_step += 1
            metrics["train/skipped_steps"] = self.counters.skipped_steps
        return metrics

    def _reduce(self, metrics: dict[str, float], op: str) -> dict[str, float]:
        """Mean (losses, rewards, norms) or sum (counters) of every metric over the ranks."""
        if self.dist is None or not self.dist.is_distributed or not metrics:
            return metrics
        import torch.distributed as tdist

        keys = sorted(metrics)
        t = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=self.dist.device)
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
        if op == "mean":
            t /= self.dist.world_size
        return dict(zip(keys, t.tolist()))

    def _data_metrics(self) -> dict[str, float]:
        """Bad-data counters summed over ranks, on a fixed key set (every rank must send the same keys)."""
        from dmdr.data import SKIP_REASONS

        m = self.skip_monitor
        counts = {"data/seen": float(m.seen), "data/skipped": float(sum(m.skipped.values())),
                  "data/truncated": float(m.truncated)}
        counts.update({f"data/skipped/{r}": float(m.skipped.get(r, 0)) for r in SKIP_REASONS})
        counts = self._reduce(counts, "sum")
        counts["data/skip_rate"] = counts["data/skipped"] / counts["data/seen"] if counts["data/seen"] else 0.0
        return counts

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample_images(self, prompts: list[str], seed: int = 1234) -> Tensor:
        """Few-step samples (decoded to [0, 1]) for fixed prompts and fixed noise, with the ``dmd.sampler``
        (an ``sde`` sampler's fresh noise continues the seeded stream, as a diffusers pipeline's ``generator``)."""
        g = torch.Generator(device=self.device).manual_seed(seed)
        shape = (len(prompts), *self.backbone.latent_shape(self.cfg.model.resolution))
        noise = torch.randn(shape, generator=g, device=self.device)
        if self.backbone.text_encoder is not None:
            cond = conditioning_to(self.backbone.text_encoder.encode(prompts), self.device)
        else:
            cond = conditioning_to(self.backbone.extras["sample_cond"], self.device)
        with self.autocast():
            latents = few_step_sample(self.roles.generator_fn, noise, cond, self.timesteps, self.param,
                                      mode=self.cfg.dmd.sampler, generator=g)
            return self.backbone.codec.decode(latents).float()

    # ------------------------------------------------------------------ loop
    def train(self, logger: MetricsLogger, checkpoint: Any = None, should_stop: Any = None, guard: Any = None) -> int:
        """Train until ``train.max_steps`` generator steps; returns the final generator step.

        Args:
            logger: metrics sink (no-op on non-main ranks).
            checkpoint: ``callable(step, final: bool)`` that saves the app state, or None.
            should_stop: ``callable() -> bool`` agreed across ranks (preemption), or None.
            guard: a :class:`~dmdr.guard.Guard` (probe, rules, warn / stop / rollback), or None.
        """
        cfg = self.cfg
        is_main = self.dist is None or self.dist.is_main
        if self._ema_from_weights:
            self._start_ema_from_weights()
        bar = ProgressBar(cfg.train.max_steps, self.step, enabled=cfg.log.progress_bar and is_main)
        throughput = Throughput()
        peak_tflops = gpu_peak_tflops(self.device)
        world = self.dist.world_size if self.dist is not None else 1
        try:
            flops = FlopCount() if peak_tflops else None
            flops_stage: bool | None = None  # the stage (RL on?) whose FLOPs per generator step were counted
            while self.step < cfg.train.max_steps:
                stage = self.rl_active()
                if flops is not None and flops_stage != stage:
                    with flops:  # each stage's first generator step, once, to estimate TFLOP/s
                        metrics = self.train_iteration()
                    if metrics is not None:
                        flops_stage = stage
                        self.counters.extra["perf/tflops"] = flops.total / 1e12
                        flops.total = 0
                else:
                    metrics = self.train_iteration()
                if metrics is None:
                    continue
                throughput.update(1, self.batch_size(self.step - 1) * world * cfg.dmd.ratio)
                k = self.step
                verdict = guard.after_step(self, k, metrics, logger, checkpoint) if guard is not None else None
                if verdict is not None and verdict.rolled_back:
                    continue  # the step counter went back to the restored checkpoint's
                if k % cfg.log.interval == 0 or k == cfg.train.max_steps or (verdict is not None and verdict.probed):
                    metrics = self._reduce(metrics, "mean")
                    metrics.update(throughput.report())
                    metrics["perf/peak_memory_gb"] = peak_memory_gb(self.device)
                    if peak_tflops and "perf/tflops" in self.counters.extra:
                        achieved = self.counters.extra["perf/tflops"] / metrics["perf/step_time"]
                        metrics["perf/tflops"] = achieved
                        metrics["perf/mfu"] = achieved / peak_tflops
                    if self.skip_monitor is not None:
                        metrics.update(self._data_metrics())
                    logger.log(k, metrics)
                shown = (("dmd", "loss/dmd"), ("rl", "loss/rl"), ("fake", "loss/fake"))
                bar.update(1, {short: metrics[key] for short, key in shown if key in metrics})
                if cfg.log.sample_interval and k % cfg.log.sample_interval == 0 and cfg.log.sample_prompts:
                    images = self.sample_images(list(cfg.log.sample_prompts))
                    logger.log_images(k, "samples", images)
                stop = should_stop() if should_stop is not None else False
                stop = stop or (verdict is not None and verdict.stop)
                # A passing probe is a rollback target: it gets a checkpoint.
                due = (cfg.checkpoint.interval and k % cfg.checkpoint.interval == 0) or (verdict and verdict.passed)
                if checkpoint is not None and (due or stop or k == cfg.train.max_steps):
                    checkpoint(k, final=stop or k == cfg.train.max_steps)
                if stop:
                    self.stopped_early = True
                    break
        finally:
            bar.close()
        return self.step
