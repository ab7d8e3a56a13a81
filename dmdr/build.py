"""Build a run from a resolved config: environment, models by role, rewards, data, trainer, checkpoints.

Data flows one way: ``config -> preflight -> build_run -> Session.train -> checkpoints / logs``. The
launcher's preflight (:mod:`dmdr.preflight`) has already checked every path without loading anything;
the loaders' own checks here still fail with one line (library callers, files changed since).
"""

from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass
from typing import Any

import torch

from dmdr.config import TrainConfig, to_dict
from dmdr.data import EmbeddingCache, SkipMonitor, build_prompt_loader
from dmdr.devices import DTYPES
from dmdr.distributed import (
    CheckpointManager,
    PreemptionHandler,
    build_mesh,
    default_init_missing,
    init_distributed,
    materialize_from_safetensors,
    parallelize_denoiser,
    prepare_frozen,
    safetensors_files,
)
from dmdr.engine import Roles
from dmdr.guard import Guard, GuardStopped
from dmdr.guard.scorers import ProbeScorers
from dmdr.models import CRITIC, add_critic_lora, load_backbone, make_generator
from dmdr.models.attention import resolve_attention
from dmdr.models.base import Backbone, Denoiser
from dmdr.models.lora import lora_parameters
from dmdr.observability import MetricsLogger
from dmdr.returbo import prepare_roles
from dmdr.rewards import build_reward
from dmdr.rewards.base import Reward
from dmdr.run_folder import lock_run_folder
from dmdr.trainer import DMDRTrainer
from dmdr.worlds.shapes import form_reward as _shapes_form_reward  # noqa: F401  registers shapes-form
from dmdr.worlds.shapes import reward as _shapes_reward  # noqa: F401  registers --rl.rewards shapes

log = logging.getLogger("dmdr")

def build_roles(cfg: TrainConfig, backbone: Backbone) -> tuple[Denoiser, str | None]:
    """Critic LoRA into the teacher; the generator as a full fp32 copy or the teacher + generator LoRA.

    Works alike on a loaded teacher and on one built on the meta device (the copy and the adapters
    then stay on meta until :func:`materialize_roles`). LoRA ``A`` matrices are drawn from
    ``train.seed`` and each layer's name (:func:`dmdr.models.lora.lora_init`), never from the global
    RNG, so every rank and every world size starts from the same adapters.

    Returns ``(generator, generator_adapter)``. Parameter lists are taken later, after sharding
    (``fully_shard`` replaces parameters with DTensors).
    """
    m = cfg.model
    targets = m.lora_targets or None
    seed = cfg.train.seed
    backbone.teacher.configure_guidance(cfg.dmd.generator_guidance, cfg.dmd.true_cfg)  # before the full copy
    # The full copy must be taken before the critic LoRA exists (it is the teacher's weights only);
    # fp32 master weights: DMDR's learning rates vanish in bf16.
    generator, adapter = make_generator(backbone, m.generator_mode, rank=m.generator_lora_rank,
                                        alpha=m.generator_lora_alpha, targets=targets, dtype=torch.float32,
                                        seed=seed)
    add_critic_lora(backbone, rank=m.critic_lora_rank, alpha=m.critic_lora_alpha, targets=targets, seed=seed)
    return generator, adapter


def materialize_roles(cfg: TrainConfig, backbone: Backbone, generator: Denoiser, adapter: str | None,
                      device: torch.device) -> None:
    """Read each rank's shard of the meta-built (and already sharded) teacher and full-copy generator.

    Both read the teacher's safetensors files (``backbone.extras["denoiser_weights"]``): the teacher
    base in ``model.dtype``; the full-copy generator in fp32 holding the teacher's ``model.dtype``
    values (``make_generator(dtype=torch.float32)`` semantics: a copy of the loaded teacher, upcast).
    LoRA adapters get the initialisation of :meth:`~dmdr.models.lora.LoRALinear.add_adapter`.
    """
    files = safetensors_files(backbone.extras["denoiser_weights"])
    init = default_init_missing(cfg.train.seed)
    # A CPU-offloaded teacher's shards live on the host (FSDP2 copies them to the device per use).
    offload = cfg.parallel.cpu_offload_teacher and device.type != "cpu"
    materialize_from_safetensors(backbone.teacher, files, device="cpu" if offload else device, prefix="net.",
                                 init_missing=init)
    if adapter is None:
        materialize_from_safetensors(generator, files, device=device, prefix="net.", init_missing=init,
                                     round_via=DTYPES[cfg.model.dtype])


def apply_attention(cfg: TrainConfig, backbone: Backbone, generator: Denoiser, adapter: str | None,
                    device: torch.device) -> str:
    """Resolve ``model.attention`` for ``device`` and set it on the teacher and a full-copy generator.

    Runs before activation checkpointing, compile and FSDP2 wrap the networks, so every wrapper sees
    the chosen processors. Returns the backend (also kept in ``backbone.extras["attention"]``).
    """
    teacher = backbone.teacher
    backend = resolve_attention(cfg.model.attention, device, masked=teacher.masked_attention,
                                family=backbone.family)
    for net in (teacher,) if adapter is not None else (teacher, generator):  # LoRA: one shared network
        net.set_attention_backend(backend)
    backbone.extras["attention"] = backend
    log.info("attention backend: %s (model.attention=%s, %s on %s)", backend, cfg.model.attention,
             backbone.family, device.type)
    return backend


def build_models(cfg: TrainConfig, device: torch.device, mesh: Any = None,
                 load_text_encoder: bool = True) -> tuple[Backbone, Denoiser, str | None]:
    """The backbone and the roles on it, sharded over ``mesh`` (``None``: one process, no FSDP).

    The attention backend (``model.attention``) is set on both networks first (:func:`apply_attention`).
    One process: the teacher loads whole (``from_pretrained``), then :func:`build_roles` and activation
    checkpointing. Sharded: no rank ever holds a full copy of the denoiser; it is built on the meta
    device, :func:`build_roles` makes the generator (a meta copy, or a LoRA in the teacher) and the
    critic LoRA on meta, each network is sharded with ``parallelize_denoiser``, and only then each
    rank reads its rows of the weights (:func:`materialize_roles`). Text encoders and VAE load whole.
    Both paths produce the same parameters (base weights and LoRA initialisations) at any world size.

    Returns:
        ``(backbone, generator, generator_adapter)``; ``backbone.teacher`` carries the critic LoRA.
    """
    resolve_attention(cfg.model.attention, device)  # a backend this machine lacks fails before any loading
    sharded = mesh is not None
    backbone = load_backbone(cfg.model.path, family=cfg.model.family, dtype=DTYPES[cfg.model.dtype],
                             device=device, load_text_encoder=load_text_encoder, t_min=cfg.dmd.t_min,
                             max_sequence_length=cfg.model.max_sequence_length, defer_denoiser=sharded)
    generator, adapter = build_roles(cfg, backbone)
    apply_attention(cfg, backbone, generator, adapter, device)
    if adapter is None:
        parallelize_denoiser(generator, mesh, cfg.parallel, trainable=True)
    parallelize_denoiser(backbone.teacher, mesh, cfg.parallel, trainable=False)
    if sharded:
        materialize_roles(cfg, backbone, generator, adapter, device)
    prepare_roles(cfg, backbone, generator, adapter, device)  # re-turbo: teacher adapters, generator init
    return backbone, generator, adapter


def collect_roles(generator: Denoiser, teacher: Denoiser, adapter: str | None) -> Roles:
    if adapter is not None:
        generator_params = lora_parameters(generator.net, adapter)
    else:
        generator_params = [p for p in generator.parameters() if p.requires_grad]
    return Roles(generator=generator, teacher=teacher, generator_params=generator_params,
                 critic_params=lora_parameters(teacher.net, CRITIC), shared_base=adapter is not None)


def build_rewards(cfg: TrainConfig, device: torch.device) -> list[tuple[Reward, float]]:
    """The ReFL rewards named in ``rl.rewards`` with their weights (empty when RL is off)."""
    if cfg.rl.method == "none":
        return []

    return [(build_reward(name, cfg.rl, device), float(w)) for name, w in zip(cfg.rl.rewards, cfg.rl.weights)]


def run_summary(cfg: TrainConfig, backbone: Backbone, device: torch.device, world_size: int) -> str:
    """The run's TensorBoard text summary (markdown): what was resolved at build time, then the config."""
    import json

    lines = [f"- family: {backbone.family}, device: {device.type}, world size: {world_size}",
             f"- attention backend: {backbone.extras.get('attention', 'native')} "
             f"(model.attention={cfg.model.attention})",
             f"- compile: {cfg.parallel.compile} ({cfg.parallel.compile_backend}), activation checkpointing: "
             f"{cfg.parallel.activation_checkpointing}, param dtype: {cfg.parallel.param_dtype}",
             "", "```json", json.dumps(to_dict(cfg), indent=2, sort_keys=True), "```"]
    return "\n".join(lines)


@dataclass
class Session:
    """A built run: call :meth:`train`, then :meth:`close`."""

    cfg: TrainConfig
    trainer: DMDRTrainer
    logger: MetricsLogger
    checkpoints: Any
    dist: Any
    preemption: Any
    resumed_from: int | None
    lock: Any = None
    """The run folder's :class:`~dmdr.run_folder.RunFolderLock` (rank 0), released by :meth:`close`."""
    guard: Any = None
    """The :class:`~dmdr.guard.Guard` (``guard.action`` not ``off``), or None."""

    @property
    def is_main(self) -> bool:
        return self.dist is None or self.dist.is_main

    def train(self) -> int:
        with self.preemption:
            step = self.trainer.train(self.logger, checkpoint=self._save, should_stop=self.preemption.should_stop,
                                      guard=self.guard)
        if self.guard is not None and self.guard.stop_reason and not self.preemption.requested:
            raise GuardStopped(self.guard.stop_reason)
        if (self.preemption.requested or self.trainer.stopped_early) and self.is_main:
            log.warning("stopped at generator step %d after a preemption signal; checkpoint written", step)
        elif self.is_main:
            out = self.cfg.train.output_dir
            log.info("done: %d generator steps. metrics: %s/metrics.jsonl, samples: %s/samples, checkpoints: "
                     "%s/checkpoints (relaunch with a larger --train.max_steps to continue)", step, out, out, out)
        return step

    def _save(self, step: int, final: bool) -> None:
        self.checkpoints.save(step, self.trainer.app_state(), final=final)

    def close(self) -> None:
        try:
            self.checkpoints.close()
            self.logger.close()
            self.dist.destroy()
        finally:
            if self.lock is not None:
                self.lock.release()


def prepare_text_encoders(cfg: TrainConfig, backbone: Backbone, mesh: Any, device: torch.device) -> None:
    """Frozen text encoders replicated on every rank, or FSDP2-sharded (``parallel.frozen_encoders=shard``,
    for T5-XXL / Qwen3-sized encoders; every rank then encodes its own batch in lockstep)."""
    if backbone.text_encoder is None:
        return
    for module in backbone.text_encoder.modules():
        prepare_frozen(module, mesh, cfg.parallel, device=device, dtype=DTYPES[cfg.model.dtype])


def build_run(cfg: TrainConfig) -> Session:
    """Everything a run needs, checked before the first step; resumes when a checkpoint exists."""
    env = init_distributed(device=cfg.train.device, timeout=datetime.timedelta(seconds=cfg.parallel.timeout_s))
    # Before anything reads or writes the folder: two launches into one folder would mix their checkpoints
    # and metrics. The lock dies with the process (kill -9 included), so it never needs manual cleanup.
    lock = lock_run_folder(cfg.train.output_dir, env)
    try:
        return _build_locked(cfg, env, lock)
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def _build_locked(cfg: TrainConfig, env: Any, lock: Any) -> Session:
    mesh = build_mesh(cfg.parallel, env.world_size, env.device.type) if env.world_size > 1 else None
    # Data first: a bad source should fail in a second, not after loading 8B parameters.
    cache = EmbeddingCache(cfg.data.embedding_cache) if cfg.data.embedding_cache else None
    loader = build_prompt_loader(cfg.data, dp_rank=env.dp_rank, dp_world=env.dp_world_size, seed=cfg.train.seed,
                                 embedding_cache=cache)
    rewards = build_rewards(cfg, env.device)
    # The guard's CLIP / aesthetic / LPIPS models (local paths): a bad one fails here, before the big models load.
    probe_scorers = ProbeScorers.from_config(cfg.guard, env.device) if cfg.guard.action != "off" else None
    # A checkpoint of another family, generator mode or teacher is refused before any model loads.
    checkpoints = CheckpointManager.from_config(cfg, env, owns_folder=True)
    checkpoints.check_record(cfg.checkpoint.resume)
    need_encoder = cache is None or cfg.data.cache_miss == "encode"
    backbone, generator, adapter = build_models(cfg, env.device, mesh, load_text_encoder=need_encoder)
    prepare_text_encoders(cfg, backbone, mesh, env.device)
    # The same global RNG state on every rank and whichever load path ran (LoRA inits do not read it).
    torch.manual_seed(cfg.train.seed)
    if cache is not None:
        backbone.extras["negative"] = cache.negative()
        sample_cond = cache.lookup(list(cfg.log.sample_prompts)) if cfg.log.sample_prompts else None
        if sample_cond is not None:
            backbone.extras["sample_cond"] = sample_cond
    roles = collect_roles(generator, backbone.teacher, adapter)
    trainer = DMDRTrainer(cfg, backbone, roles, rewards, loader, env.device, dist=env,
                          skip_monitor=SkipMonitor.from_config(cfg.data),
                          compute_dtype=None if mesh is not None else DTYPES[cfg.parallel.param_dtype])
    guard = None
    if cfg.guard.action != "off":
        guard = Guard(cfg, trainer, checkpoints, scorers=probe_scorers)
        trainer.stateful_extras["guard"] = guard
    resumed = checkpoints.resume(trainer.app_state(), cfg.checkpoint.resume)
    if resumed is not None:
        log.info("resumed from generator step %d", resumed)
    logger = MetricsLogger(cfg.train.output_dir, enabled=env.is_main, tensorboard=cfg.log.tensorboard,
                           resume_step=resumed)
    logger.log_text(resumed or 0, "run/summary", run_summary(cfg, backbone, env.device, env.world_size))
    return Session(cfg, trainer, logger, checkpoints, env, PreemptionHandler(env), resumed, lock, guard)
