"""The DMDR training loop: data, the step engine, metrics, samples and checkpoints around it.

The trainer knows roles, not model families:

* ``generator``: a :class:`~dmdr.models.base.Denoiser` (a full copy of the teacher, or the teacher's
  own network with the ``generator`` LoRA adapter switched on);
* ``teacher``: the frozen :class:`~dmdr.models.base.Denoiser` with the ``critic`` LoRA; evaluated at
  ``s_r(k)`` (+CFG) it is the real score, at ``s_f`` the fake score;
* ``codec`` (VAE) for ReFL, ``text_encoder`` or an embedding cache for prompts.

One iteration's updates and their schedules are :class:`dmdr.engine.StepEngine`'s (the toy worlds call it too);
this module feeds it prompts, logs what it returns (:mod:`dmdr.observability`), samples grids
(:func:`dmdr.generate.sample_images`) and calls the checkpoint and stop hooks. ``k`` counts generator steps and
ends the run at ``train.max_steps``.

Everything that changes during training is reachable from :meth:`DMDRTrainer.app_state`, one
``Stateful`` tree saved with torch.distributed.checkpoint, so a resumed run continues exactly.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import Tensor

from dmdr.config import TrainConfig
from dmdr.data import SKIP_REASONS, loader_batch_size, merge_batches
from dmdr.distributed.state import DataLoaderState, ModelOptimizerState, PerRank, RNGState
from dmdr.engine import Counters, Roles, StepEngine, TrainingDiverged
from dmdr.errors import DataError
from dmdr.generate import autocast, sample_images
from dmdr.models.base import Backbone, Conditioning, conditioning_to, repeat_conditioning
from dmdr.observability import MetricsLogger, ProgressBar, StepPerf, data_metrics, reduce_over_ranks, step_line
from dmdr.profiling import StepProfiler
from dmdr.rewards.base import Reward

log = logging.getLogger(__name__)

__all__ = ["DMDRTrainer", "Roles", "Counters", "TrainingDiverged"]


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
        self.loader = loader
        self.device = device
        self.dist = dist
        self.skip_monitor = skip_monitor
        self.compute_dtype = compute_dtype
        self.stopped_early = False
        rank = dist.rank if dist is not None else 0
        # One noise stream per rank (ranks see different prompts and must draw different noise);
        # its state is part of the checkpoint so a resumed run draws the same noise.
        self.rng = torch.Generator(device=device).manual_seed(cfg.train.seed * 1000 + rank)
        self.engine = StepEngine(cfg, roles, backbone.parameterization, rewards, rng=self.rng, noise=self._noise,
                                 decode=backbone.codec.decode, device=device, dist=dist)
        """The updates and their state: ``engine.step``, ``counters``, ``rewards``, ``ema``, ``rl``, ``reference``."""
        self._ema_from_weights = False
        self._negative: Conditioning | None = None
        self._data_iter: Iterator | None = None
        self.stateful_extras: dict[str, Any] = {}
        """More ``Stateful`` entries of :meth:`app_state` (the guard's state, :mod:`dmdr.guard`)."""

    # ------------------------------------------------------------------ Stateful
    def state_dict(self) -> dict[str, Any]:
        """Global values only: the step counters, the EMA and the RL reference (identical on every rank).

        Per-rank state (the noise RNG, the data position, the data monitor) and the models and
        optimizers are separate entries of :meth:`app_state`.
        """
        return self.engine.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # EMA switched on at resume: started from the resumed weights in train(), once the models are loaded.
        self._ema_from_weights = self.engine.load_state_dict(state)

    def app_state(self) -> dict[str, Any]:
        """The whole ``Stateful`` tree of the run, as torch.distributed.checkpoint saves it."""
        r, e = self.roles, self.engine
        state: dict[str, Any] = {"trainer": self, "rng": RNGState({"noise": self.rng})}
        if r.shared_base:  # both adapters live in the teacher's network
            state["models"] = ModelOptimizerState(r.teacher, [e.generator_opt, e.critic_opt], trainable_only=True)
        else:
            state["generator"] = ModelOptimizerState(r.generator, e.generator_opt)
            state["critic"] = ModelOptimizerState(r.teacher, e.critic_opt, trainable_only=True)
        if hasattr(self.loader, "state_dict"):
            state["data"] = DataLoaderState(self.loader)
        if self.skip_monitor is not None:
            state["data_monitor"] = DataLoaderState(self.skip_monitor)
        if e.rl is not None and e.rl.stateful:
            state["rl_sampler"] = PerRank(e.rl, optional=True)  # absent from a cold start of another method
        state.update(self.stateful_extras)
        return state

    def restart_iteration(self) -> None:
        """Forget the in-flight data iterator and partial averages (after loading a checkpoint mid-run)."""
        self._data_iter = None
        self.engine.restart_iteration()

    # ------------------------------------------------------------------ data
    def _next_batch(self) -> dict[str, Any]:
        """This iteration's prompts, as whole loader batches (:func:`dmdr.data.loader_batch_size`).

        A data error on any rank stops every rank (no rank is left waiting in a collective).
        """
        if self._data_iter is None:
            self._data_iter = iter(self.loader)
        error: DataError | None = None
        batch: dict[str, Any] = {}
        try:
            parts = []
            for _ in range(self.engine.batch_size() // loader_batch_size(self.cfg.data)):
                parts.append(next(self._data_iter))
                if self.skip_monitor is not None:
                    self.skip_monitor.update(parts[-1])
            batch = merge_batches(parts)
        except DataError as err:
            error = err
            error.rank_local = True  # this rank's shard: it prints the line, the others stay quiet
        if self.dist is not None and self.dist.any_rank(error is not None):
            if error is None:
                mirror = DataError("another data-parallel rank stopped on bad data (see its error line)")
                mirror.reported_elsewhere = True
                raise mirror
            raise error
        if error is not None:
            raise error
        return batch

    def _conditioning(self, batch: dict[str, Any]) -> tuple[Conditioning, Conditioning]:
        prompts = batch["prompts"]
        encode = "cond" not in batch
        if self._encoders_in_lockstep():  # a sharded encoder runs on every rank or none (data.cache_miss encode)
            encode = self.dist.any_rank(encode)
        if encode:
            with torch.no_grad():
                encoded = self.backbone.text_encoder.encode(prompts)
        cond = conditioning_to(batch["cond"] if "cond" in batch else encoded, self.device)
        if self._negative is None:
            neg = self.backbone.extras.get("negative")
            if neg is None:
                with torch.no_grad():
                    neg = self.backbone.text_encoder.negative()
            self._negative = conditioning_to(neg, self.device)
        return cond, repeat_conditioning(self._negative, len(prompts))

    def _encoders_in_lockstep(self) -> bool:
        """FSDP2-sharded text encoders (``parallel.frozen_encoders=shard``): every rank must call them together."""
        return (self.backbone.text_encoder is not None and self.dist is not None and self.dist.is_distributed
                and self.cfg.parallel.frozen_encoders == "shard")

    def _noise(self, batch_size: int) -> Tensor:
        shape = (batch_size, *self.backbone.latent_shape(self.cfg.model.resolution))
        return torch.randn(shape, generator=self.rng, device=self.device)

    # ------------------------------------------------------------------ steps
    def autocast(self) -> AbstractContextManager:
        """Mixed-precision compute for unsharded runs; a no-op in fp32 and under FSDP2."""
        return autocast(self.device, self.compute_dtype)

    def train_iteration(self) -> dict[str, float] | None:
        """One iteration; returns the generator step's metrics when a generator step ran."""
        with self.autocast():
            batch = self._next_batch()
            cond, uncond = self._conditioning(batch)
            return self.engine.iteration(cond, uncond, batch["prompts"])

    def _start_ema_from_weights(self) -> None:
        self.engine.ema.restart_from_weights()
        self._ema_from_weights = False
        if self.dist is None or self.dist.is_main:
            log.warning("the checkpoint holds no EMA (optim.ema_decay was 0 when it was written): the EMA starts "
                        "from the resumed weights at generator step %d", self.engine.step)

    def sample_images(self, prompts: list[str], seed: int = 1234) -> Tensor:
        """Few-step samples in [0, 1] for fixed prompts and noise (:func:`dmdr.generate.sample_images`)."""
        return sample_images(self.backbone, self.roles.generator_fn, self.cfg, prompts, seed=seed, device=self.device,
                             compute_dtype=self.compute_dtype)

    # ------------------------------------------------------------------ loop
    def train(self, logger: MetricsLogger, checkpoint: Any = None, should_stop: Any = None, guard: Any = None) -> int:
        """Train until ``train.max_steps`` generator steps; returns the final generator step.

        Args:
            logger: metrics sink (no-op on non-main ranks).
            checkpoint: ``callable(step, final: bool)`` that saves the app state, or None.
            should_stop: ``callable() -> bool`` agreed across ranks (preemption), or None.
            guard: a :class:`~dmdr.guard.Guard` (probe, rules, warn / stop / rollback), or None.
        """
        cfg, engine = self.cfg, self.engine
        is_main = self.dist is None or self.dist.is_main
        if self._ema_from_weights:
            self._start_ema_from_weights()
        bar = ProgressBar(cfg.train.max_steps, engine.step, enabled=cfg.log.progress_bar and is_main)
        perf = StepPerf(self.device)
        world = self.dist.world_size if self.dist is not None else 1
        profiler = StepProfiler(cfg, self.dist.rank if self.dist is not None else 0, self.device)
        try:
            while engine.step < cfg.train.max_steps:
                stage = engine.rl_active()
                with perf.measure(stage) as measured, profiler.iteration(engine.step, lambda: engine.step):
                    metrics = self.train_iteration()
                if metrics is None:
                    continue
                samples = engine.batch_size(engine.step - 1) * world * engine.iterations_per_generator_step
                perf.generator_step(stage, samples, counted=measured is not None)
                k = engine.step
                verdict = guard.after_step(self, k, metrics, logger, checkpoint) if guard is not None else None
                if verdict is not None and verdict.rolled_back:
                    continue  # the step counter went back to the restored checkpoint's
                if k % cfg.log.interval == 0 or k == cfg.train.max_steps or (verdict is not None and verdict.probed):
                    metrics = reduce_over_ranks(metrics, self.dist, "mean")
                    metrics.update(perf.report())
                    if self.skip_monitor is not None:
                        metrics.update(data_metrics(self.skip_monitor, self.dist, SKIP_REASONS))
                    logger.log(k, metrics)
                    if is_main and not bar.shown:
                        log.info(step_line(k, cfg.train.max_steps, metrics))
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
            profiler.close()
        return engine.step
