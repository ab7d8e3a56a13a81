"""Per-GPU memory of a run: training state by FSDP2 unit, frozen networks, communication buffers, activations.

What each rank holds follows :mod:`dmdr.build` and :mod:`dmdr.distributed.parallelize`:

* the teacher (with the critic LoRA, and in LoRA mode the generator LoRA) is ``fully_shard``-ed per
  block and then at the root over the ``dp_shard`` group: each tensor's dim 0 is split in ``dp_shard``
  chunks (the largest on rank 0, which this counts); base weights in ``model.dtype``; with
  ``parallel.cpu_offload_teacher`` its shards live on the host;
* a full-copy generator is a second such network in fp32 (master weights), trained in full;
* trainable parameters (adapters, the full copy) have fp32 sharded gradients and two fp32 AdamW
  moments (``torch.optim.AdamW``; its ``step`` counters live on the host); the gradients of one role
  exist at a time (each optimizer step ends with ``zero_grad(set_to_none=True)``);
* buffers are not sharded (every rank holds them); text encoders and the VAE load whole in
  ``model.dtype`` (``parallel.frozen_encoders shard`` shards the text encoders' layers;
  ``data.embedding_cache`` drops them); reward models load whole in fp32 and stay for the whole run;
* FSDP2's all-gather holds the unsharded parameters of the running block and the prefetched next one
  in ``parallel.param_dtype``, the root's for the whole forward/backward, and the reduce-scatter one
  block's unsharded gradients (``param_dtype``, then ``reduce_dtype``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dmdr.config import TrainConfig
from dmdr.devices import DTYPE_BYTES
from dmdr.distributed.mesh import resolve_dp
from dmdr.planning.activations import Tokens, network_activation_bytes, no_grad_block_peak
from dmdr.planning.specs import Component, ModelSpec, Tensors, plan_hooks, resolve_hook
from dmdr.schedules import critic_steps_per_generator_step

F32 = 4


@dataclass(frozen=True)
class Layout:
    """The data-parallel layout of a job."""

    world: int
    dp_replicate: int
    dp_shard: int

    @classmethod
    def of(cls, cfg: TrainConfig, world: int) -> Layout:
        rep, shard = resolve_dp(cfg.parallel, world)
        return cls(world, rep, shard)


@dataclass
class StateBytes:
    """Training state per rank (the quantities tests compare with a measured run)."""

    params: int
    """Every parameter of the teacher network and the generator network (base + adapters / full copy)."""
    grads: int
    """Gradients of both roles (generator and critic) at once."""
    grads_peak: int
    """Gradients of the larger role (what coexists in a run)."""
    optimizer: int
    """AdamW's two moments for both optimizers."""
    frozen: int
    """Text encoders and VAE."""


def tokens_of(spec: ModelSpec, cfg: TrainConfig) -> Tokens:
    """Image and text tokens per sample at ``model.resolution`` and ``model.max_sequence_length``."""
    side = cfg.model.resolution // spec.vae_scale_factor // spec.patch_size
    text = cfg.model.max_sequence_length + plan_hooks(spec.family).extra_text_tokens
    return Tokens(image=side * side, text=text)


def _shard_tensors(t: Tensors, shard: int) -> int:
    return t.shard_bytes(shard)


def _frozen_bytes(c: Component, shard: int, sharded: bool) -> int:
    if not sharded or shard == 1:
        return c.params.nbytes
    in_blocks = Tensors([s for b in c.blocks for s in b.shapes])
    rest = c.params.nbytes - in_blocks.nbytes
    return in_blocks.shard_bytes(shard) + rest // shard  # the root's rest is sharded too


def state_bytes(spec: ModelSpec, cfg: TrainConfig, layout: Layout, text_encoders: bool = True) -> StateBytes:
    """Parameters, gradients and AdamW state per rank (rank 0, the largest shard)."""
    d = spec.denoiser
    s = layout.dp_shard
    base = d.base.shard_bytes(s)
    lora = [d.critic_lora] + ([d.generator_lora] if cfg.model.generator_mode == "lora" else [])
    lora_numel = sum(t.shard_numel(s) for t in lora)
    params = base + lora_numel * F32
    # dmd.weight 0 (RL alone): the critic never steps, so it has no gradients (its scale-0 adapter is skipped in
    # the generator's forward) and AdamW never creates its moments
    trained = critic_steps_per_generator_step(cfg.dmd.ratio, cfg.dmd.weight) > 0
    critic = d.critic_lora.shard_numel(s) * F32 if trained else 0
    if cfg.model.generator_mode == "lora":
        gen = d.generator_lora.shard_numel(s) * F32
    else:
        gen = d.base.shard_numel(s) * F32
        params += gen
    frozen = spec.vae.params.nbytes
    if text_encoders:
        frozen += sum(_frozen_bytes(c, s, cfg.parallel.frozen_encoders == "shard") for c in spec.text_encoders)
    return StateBytes(params=params, grads=gen + critic, grads_peak=max(gen, critic), optimizer=2 * (gen + critic),
                      frozen=frozen)


@dataclass
class StageMemory:
    """Peak memory per rank of one stage (cold start or RL)."""

    stage: str
    batch: int
    items: dict[str, int] = field(default_factory=dict)
    """Static bytes per rank by item."""
    activations: dict[str, int] = field(default_factory=dict)
    """Activation bytes per phase (critic step, generator step), of one micro-batch."""
    micro_batch: int = 0
    """Samples per forward with grad (``batch / train.grad_accum``; 0: ``batch``)."""

    @property
    def static(self) -> int:
        return sum(self.items.values())

    @property
    def peak(self) -> int:
        return self.static + max(self.activations.values(), default=0)


def _comm_buffers(spec: ModelSpec, cfg: TrainConfig, layout: Layout) -> int:
    if layout.dp_shard == 1:
        return 0
    d = spec.denoiser
    p = DTYPE_BYTES[cfg.parallel.param_dtype]
    biggest = max(b.numel for b in d.blocks)
    gather = 2 * biggest * p + d.root.numel * p
    if cfg.model.generator_mode == "full":
        trainable = biggest
    else:
        trainable = max(g.numel + c.numel for g, c in zip(d.block_generator_lora, d.block_critic_lora))
    return gather + trainable * (p + DTYPE_BYTES[cfg.parallel.reduce_dtype])


def denoiser_activations(spec: ModelSpec, cfg: TrainConfig, batch: int, role: str) -> int:
    """Saved bytes of one denoiser forward with grad under the run's AC: ``role`` ``critic`` (the teacher at
    the critic LoRA) or ``generator`` (its LoRA, or the full copy in ``model.generator_mode full``)."""
    full = role == "generator" and cfg.model.generator_mode == "full"
    acts = resolve_hook(plan_hooks(spec.family).activations)(spec.denoiser.denoiser, tokens_of(spec, cfg),
                                           DTYPE_BYTES[cfg.parallel.param_dtype], "full" if full else "lora",
                                           adapter=None if full else role)
    return network_activation_bytes(acts, batch, cfg.parallel.activation_checkpointing, cfg.parallel.ac_every)


def _teacher_pass(spec: ModelSpec, cfg: TrainConfig, batch: int) -> int:
    t = tokens_of(spec, cfg)
    d = spec.denoiser.config
    width = int(d.get("dim") or d["num_attention_heads"] * d["attention_head_dim"])
    num, den = plan_hooks(spec.family).mlp_ratio
    hidden = width * num // den
    return no_grad_block_peak(width, t.image + t.text, hidden, DTYPE_BYTES[cfg.parallel.param_dtype], batch)


def stage_memory(spec: ModelSpec, cfg: TrainConfig, layout: Layout, rl: bool,
                 reward_acts: dict[str, int] | None = None, vae_act: int = 0) -> StageMemory:
    """Peak per-rank memory of the cold start (``rl=False``) or the RL stage.

    ``reward_acts`` / ``vae_act``: saved bytes per sample of each reward model's image tower and of the
    VAE decoder (ReFL backward), from :func:`dmdr.planning.planner.frozen_activations`.
    """
    # Activations are one micro-batch's (train.grad_accum slices run their forward and backward one at a time).
    full = (cfg.data.rl_batch_size or cfg.data.batch_size) if rl else cfg.data.batch_size
    batch = max(1, full // max(1, cfg.train.grad_accum))
    out = StageMemory("RL" if rl else "cold start", full, micro_batch=batch)
    st = state_bytes(spec, cfg, layout, text_encoders=False)
    d = spec.denoiser
    s = layout.dp_shard
    base = d.base.shard_bytes(s)
    offload = cfg.parallel.cpu_offload_teacher
    out.items["teacher base" + (" (offloaded to host)" if offload else "")] = 0 if offload else base
    out.items["trainable params (fp32)"] = st.params - base
    out.items["gradients (fp32, one role)"] = st.grads_peak
    out.items["AdamW moments (fp32)"] = st.optimizer
    out.items["buffers (not sharded)"] = d.buffers * (2 if cfg.model.generator_mode == "full" else 1)
    if cfg.data.embedding_cache and cfg.data.cache_miss != "encode":
        out.items["text encoders (embedding cache)"] = 0
    else:
        shard = cfg.parallel.frozen_encoders == "shard"
        out.items["text encoders" + (" (sharded)" if shard else "")] = sum(
            _frozen_bytes(c, s, shard) for c in spec.text_encoders)
    out.items["VAE"] = spec.vae.params.nbytes
    out.items["reward models (fp32)"] = sum(r.params.nbytes for r in spec.rewards.values())
    out.items["FSDP2 all-gather / reduce-scatter"] = _comm_buffers(spec, cfg, layout)
    if critic_steps_per_generator_step(cfg.dmd.ratio, cfg.dmd.weight):
        out.activations["critic step"] = denoiser_activations(spec, cfg, batch, "critic")
    gen = denoiser_activations(spec, cfg, batch, "generator")
    after = _teacher_pass(spec, cfg, 3 * batch) if cfg.dmd.weight > 0 else 0  # weight 0: no score pass
    if rl and reward_acts is not None:
        after = max(after, batch * (vae_act + sum(reward_acts.values())))
    out.activations["generator step" + (" + ReFL" if rl else "")] = gen + after
    return out
