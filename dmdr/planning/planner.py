"""The plan of a run: memory per GPU per stage, FLOPs and time per generator step and per run, the verdict.

One generator step is ``dmd.ratio`` iterations (:class:`dmdr.engine.StepEngine`): each iteration backward-simulates
``dmd.num_steps`` generator forwards without grad, encodes its prompts (unless an embedding cache is
used) and takes one critic step (a teacher forward and backward at the critic LoRA); the last one also
takes the generator step: generator forward and backward, one teacher forward over the 3x batch
(uncond, cond, fake) without grad, and in the RL stage ReFL's decode through the VAE and the reward
models, backward through both. Without the DMD loss (``dmd.weight 0``) there is no critic step and no teacher
pass: one iteration per generator step (:func:`dmdr.schedules.iterations_per_generator_step`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dmdr.config import TrainConfig
from dmdr.gpus import GPU, GiB
from dmdr.planning.activations import saved_bytes_on_meta
from dmdr.planning.flops import meta_flops
from dmdr.planning.memory import Layout, StageMemory, stage_memory, tokens_of
from dmdr.planning.specs import Component, ModelSpec, plan_hooks, resolve_hook
from dmdr.schedules import critic_steps_per_generator_step, iterations_per_generator_step

RESERVE_FRACTION = 0.05
RESERVE_BYTES = 2 * GiB
"""Not available to tensors: CUDA context, NCCL buffers, allocator fragmentation (5% + 2 GiB)."""
DEFAULT_MFU = 0.4


@dataclass
class FrozenCosts:
    """Per-sample saved bytes and FLOPs of the networks ReFL runs through (VAE decoder, reward image towers)."""

    vae_act: int = 0
    vae_fwd: int = 0
    vae_fwd_bwd: int = 0
    reward_act: dict[str, int] = field(default_factory=dict)
    reward_fwd_bwd: dict[str, int] = field(default_factory=dict)


def _reward_image_size(c: Component) -> int:
    m = c.module
    if hasattr(m, "visual"):
        size = m.visual.image_size
        return int(size[0] if isinstance(size, (tuple, list)) else size)
    return int(m.config.vision_config.image_size)


def _reward_image_fn(c: Component, pixels: torch.Tensor):
    m = c.module
    if hasattr(m, "encode_image"):
        return lambda: m.encode_image(pixels)
    return lambda: m.visual_projection(m.vision_model(pixel_values=pixels).pooler_output)


def frozen_costs(spec: ModelSpec, cfg: TrainConfig) -> FrozenCosts:
    """Run the VAE decoder and the reward image towers once per sample on the meta device."""
    out = FrozenCosts()
    if cfg.rl.method == "none":
        return out
    side = cfg.model.resolution // spec.vae_scale_factor
    vae = spec.vae.module

    def decode() -> torch.Tensor:
        frames = (1,) if spec.vae_frames else ()
        z = torch.empty(1, spec.latent_channels, *frames, side, side, device="meta", dtype=vae.dtype,
                        requires_grad=True)
        return vae.decode(z, return_dict=False)[0]

    out.vae_act = saved_bytes_on_meta(decode)
    out.vae_fwd = meta_flops(decode)
    out.vae_fwd_bwd = meta_flops(decode, backward=True)
    for name, c in spec.rewards.items():
        size = _reward_image_size(c)
        pixels = torch.empty(1, 3, size, size, device="meta", requires_grad=True)
        fn = _reward_image_fn(c, pixels)
        out.reward_act[name] = saved_bytes_on_meta(fn)
        out.reward_fwd_bwd[name] = meta_flops(fn, backward=True)
    return out


@dataclass
class StageFlops:
    """FLOPs per GPU of one generator step (``dmd.ratio`` iterations) in one stage."""

    parts: dict[str, float]

    @property
    def total(self) -> float:
        return sum(self.parts.values())


def stage_flops(spec: ModelSpec, cfg: TrainConfig, rl: bool, frozen: FrozenCosts) -> StageFlops:
    batch = (cfg.data.rl_batch_size or cfg.data.batch_size) if rl else cfg.data.batch_size
    tokens = tokens_of(spec, cfg)
    hooks = plan_hooks(spec.family)
    count = resolve_hook(hooks.flops)
    teacher = spec.denoiser.denoiser
    lora_gen = cfg.model.generator_mode == "lora"
    gen_blocks = count(teacher, tokens, ("generator",) if lora_gen else ())
    critic_blocks = count(teacher, tokens, ("critic",))
    gen_fwd = sum(b.forward for b in gen_blocks)
    critic_fwd = sum(b.forward for b in critic_blocks)
    ac = cfg.parallel.activation_checkpointing
    n_blocks = len(gen_blocks)
    wrapped = n_blocks if ac == "full" else (len(range(0, n_blocks, cfg.parallel.ac_every)) if ac == "every_k" else 0)

    def recompute(blocks) -> int:
        idx = range(n_blocks) if ac == "full" else range(0, n_blocks, cfg.parallel.ac_every)
        return sum(blocks[i].forward for i in idx) if wrapped else 0

    gen_mode = "lora" if lora_gen else "full"
    iterations = iterations_per_generator_step(cfg.dmd.ratio, cfg.dmd.weight)
    critic_steps = critic_steps_per_generator_step(cfg.dmd.ratio, cfg.dmd.weight)
    parts = {"backward simulation": iterations * cfg.dmd.num_steps * batch * gen_fwd}
    if critic_steps:  # dmd.weight 0 (RL alone) trains no critic
        parts["critic steps"] = critic_steps * batch * (critic_fwd + sum(b.backward("lora") for b in critic_blocks)
                                                        + recompute(critic_blocks))
    parts["generator step"] = batch * (gen_fwd + sum(b.backward(gen_mode) for b in gen_blocks) + recompute(gen_blocks))
    if cfg.dmd.weight > 0:  # dmd.weight 0 (RL alone) runs no score pass
        parts["teacher 3x-batch pass"] = 3 * batch * critic_fwd
    if not (cfg.data.embedding_cache and cfg.data.cache_miss != "encode"):
        text = 0
        for c in spec.text_encoders:
            seq = hooks.fixed_text_lengths.get(c.name, cfg.model.max_sequence_length)
            text += 2 * c.params.numel * seq
        parts["text encoders"] = iterations * batch * text
    if rl and spec.rewards:
        refl = frozen.vae_fwd_bwd + sum(frozen.reward_fwd_bwd.values())
        parts["ReFL: VAE decode + rewards, fwd+bwd"] = batch * refl
    return StageFlops(parts)


@dataclass
class Plan:
    """Everything :func:`plan` finds, for the table and the JSON."""

    recipe: str
    model: str
    gpu_key: str
    gpu: GPU
    layout: Layout
    mfu: float
    stages: list[StageMemory]
    flops: list[StageFlops]
    steps: list[int]
    """Generator steps per stage."""

    @property
    def usable(self) -> int:
        return int(self.gpu.memory_bytes * (1 - RESERVE_FRACTION) - RESERVE_BYTES)

    @property
    def fits(self) -> bool:
        return all(s.peak <= self.usable for s in self.stages)

    def step_seconds(self, i: int) -> float:
        return self.flops[i].total / (self.gpu.bf16_tflops * 1e12 * self.mfu)

    @property
    def run_seconds(self) -> float:
        return sum(n * self.step_seconds(i) for i, n in enumerate(self.steps))


def stage_steps(cfg: TrainConfig) -> list[int]:
    """Generator steps of the cold start and of the RL stage."""
    if cfg.rl.method == "none":
        return [cfg.train.max_steps, 0]
    cold = min(cfg.rl.start_step, cfg.train.max_steps)
    return [cold, cfg.train.max_steps - cold]


def plan(cfg: TrainConfig, spec: ModelSpec, gpu_key: str, gpu: GPU, world: int, recipe: str = "",
         mfu: float = DEFAULT_MFU, frozen: FrozenCosts | None = None) -> Plan:
    """The plan of ``cfg`` on ``world`` GPUs of type ``gpu`` (``frozen``: reuse :func:`frozen_costs`)."""
    layout = Layout.of(cfg, world)
    frozen = frozen if frozen is not None else frozen_costs(spec, cfg)
    stages = [stage_memory(spec, cfg, layout, rl=False)]
    flops = [stage_flops(spec, cfg, False, frozen)]
    if cfg.rl.method != "none":
        stages.append(stage_memory(spec, cfg, layout, rl=True, reward_acts=frozen.reward_act, vae_act=frozen.vae_act))
        flops.append(stage_flops(spec, cfg, True, frozen))
    steps = stage_steps(cfg)[:len(stages)]
    return Plan(recipe=recipe, model=spec.name, gpu_key=gpu_key, gpu=gpu, layout=layout, mfu=mfu, stages=stages,
                flops=flops, steps=steps)
