"""Typed configuration: dataclass sections, a recipe is a function returning a :class:`TrainConfig`.

Every field can be overridden from the command line as ``--section.field value`` (or
``--section.field=value``). Unknown keys and bad values raise :class:`~dmdr.errors.ConfigError`
with one line naming the field and the closest valid names or the allowed values.
Defaults are the authors' values from ALGORITHM.md; recipes change what their model needs.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import json
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from dmdr.errors import ConfigError
from dmdr.models.families import FAMILIES


@dataclass
class ModelConfig:
    """Which model to distill and how the generator and critic are built."""

    path: str = ""
    """Local diffusers-format folder of the teacher (``from_pretrained(path, local_files_only=True)``)."""
    family: str = "auto"
    """Model family (a name in :data:`dmdr.models.families.FAMILIES`); ``auto`` reads ``model_index.json``."""
    dtype: Literal["fp32", "bf16", "fp16"] = "bf16"
    """Storage dtype of the frozen weights (the teacher, text encoders, VAE)."""
    generator_mode: Literal["lora", "full"] = "lora"
    """``lora``: teacher + generator LoRA; ``full``: a trainable full copy of the teacher."""
    generator_lora_rank: int = 64
    """LoRA rank of the generator adapter (``generator_mode lora``)."""
    generator_lora_alpha: float = 128.0
    """LoRA alpha of the generator adapter (its scale is alpha / rank)."""
    critic_lora_rank: int = 32
    """LoRA rank of the critic adapter on the teacher (the fake score)."""
    critic_lora_alpha: float = 32.0
    """LoRA alpha of the critic adapter."""
    lora_targets: tuple[str, ...] = ()
    """Module-name suffixes (or ``re:`` regexes) that get LoRA; empty = the family's attention projections."""
    resolution: int = 1024
    """Training image side in pixels (a multiple of 16)."""
    max_sequence_length: int = 256
    """Text tokens kept per prompt (longer prompts are truncated and counted)."""
    teacher_adapters: tuple[str, ...] = ()
    """LoRAs merged into the frozen teacher at load, ``PATH[:scale]`` each, comma-separated (re-turbo: the teacher is
    the base plus the user's adapters; diffusers, kohya and ComfyUI key formats; see :mod:`dmdr.returbo`)."""
    init_generator: str = ""
    """The generator's starting weights (re-turbo): a released few-step model (a diffusers folder, a merged export, a
    transformer file) for ``generator_mode full``, or a few-step LoRA on the base (either mode; in ``lora`` mode it
    becomes the generator adapter's first weights, rank ``generator_lora_rank``). Empty: a copy of the teacher."""
    attention: str = "auto"
    """Attention backend of the generator and the teacher, a name of diffusers' attention dispatcher
    (``native`` SDPA, ``flash``, ``flash_varlen``, ``flash3``, ``sage``, ``xformers``, ``flex``, ...);
    ``auto``: flash-attn on CUDA when it is installed (``pip install -e ".[gpu]"``), else native."""


@dataclass
class DMDConfig:
    """Distribution matching: the few-step schedule, the critic cadence, guidance and the fake scale."""

    num_steps: int = 4
    """Generator sampling steps N (1 to 4 in practice)."""
    shift: float = 3.0
    """SD3 time shift of the few-step levels (flows)."""
    t_min: float = 0.001
    """The last few-step level and the smallest renoise level."""
    timesteps: tuple[float, ...] = ()
    """Fixed generator timesteps in the network's own units, one per step (SDXL: ``999,749,499,249``;
    its one-step generator ``399``); empty = ``num_steps`` shifted levels from ``linspace(1, t_min)``."""
    backward_simulation: Literal["ode", "sde"] = "ode"
    """``ode``: the generator's Euler sample, renoised at a drawn level with fresh noise (the authors' 'ode');
    ``sde``: DMD2's chain, the generator trained on the state its sde sampler visits at the drawn level."""
    critic_samples: Literal["final", "level"] = "final"
    """What the critic (fake score) learns from: ``final`` the simulated sample ``x0_sim`` (the authors' default);
    ``level`` the generator's clean estimate at this iteration's drawn level, the outputs the DMD gradient acts
    on, first-step ones included (DMD2, FastVideo; with ``ode`` it costs one more no-grad generator call)."""
    sampler: Literal["ode", "sde"] = "ode"
    """Inference sampler (sample images, ``tools/sample.py``, the exported pipeline): ``ode`` deterministic
    steps (flows: Euler, the exported ``FlowMatchEulerDiscreteScheduler``); ``sde`` x0 then renoise with fresh
    noise (SDXL: the exported ``LCMScheduler``). They coincide for one step."""
    ratio: int = 5
    """Critic (fake score) updates per generator update."""
    guidance: float = 7.0
    """Real-score CFG scale w0; each generator step draws w ~ U[w0 - jitter, w0 + jitter]."""
    guidance_jitter: float = 0.5
    """Half-width of the uniform jitter of the guidance scale."""
    generator_guidance: float = 3.5
    """Guidance-distilled teachers (FLUX.1-dev; docs/guidance.md): the guidance embedding the generator and the fake
    score run at (and the exported pipeline's ``guidance_scale``); the real score runs at the drawn ``guidance``."""
    true_cfg: float = 1.0
    """Guidance-distilled teachers: > 1 adds true CFG with the empty-prompt negative on top of the real score's
    embedding (``FluxPipeline``'s ``true_cfg_scale``); CFG teachers ignore it."""
    fake_scale: float = 2.0
    """Critic-LoRA scale s_f of the fake score."""
    eps: float = 1e-8
    """Added to the DMD gradient's per-sample normaliser."""
    weight: float = 1.0
    """Weight of the DMD loss in the generator loss; 0 trains the RL loss alone (the paper's "only RL" rows)."""
    decoupled: bool = False
    """Decoupled DMD (arXiv 2511.22677): DM and CA terms weighted and renoised separately; off = the coupled loss."""
    dm_weight: float = 1.0
    """Decoupled DMD: weight of the distribution-matching term DM = x0_fake - x0_cond."""
    ca_weight: float = 1.0
    """Decoupled DMD: weight of the CFG-augmentation term (w - 1) CA, CA = x0_uncond - x0_cond."""
    ca_levels: Literal["shared", "beta"] = "shared"
    """Decoupled DMD: the CA term's renoise levels: the DM term's own (shared), or its own Beta(ca_alpha, ca_beta)."""
    ca_alpha: float = 1.0
    """Decoupled DMD: Beta alpha of the CA term's own levels (``ca_levels beta``)."""
    ca_beta: float = 1.0
    """Decoupled DMD: Beta beta of the CA term's own levels."""


@dataclass
class DynamicConfig:
    """The dynamic cold start: DynaDG (critic LoRA in the real score) and DynaRS (biased renoise levels)."""

    dynadg: bool = True
    """DynaDG: the critic LoRA in the real score at a scale decaying to 0."""
    real_scale_init: float = 0.5
    """s_r0: the real score's critic-LoRA scale at step 0, cosine-decayed to 0."""
    dynars: bool = True
    """DynaRS: renoise levels from a Beta biased to high noise, decaying to ``end_alpha/end_beta``."""
    alpha: float = 4.0
    """DynaRS: the Beta's alpha at step 0."""
    beta: float = 1.5
    """DynaRS: the Beta's beta at step 0."""
    decay_steps: int = 2000
    """D, in generator steps, shared by DynaDG and DynaRS."""
    end_alpha: float = 1.0
    """DynaRS: the Beta's alpha after ``decay_steps`` (see ``end_beta``)."""
    end_beta: float = 1.0
    """DynaRS decays to Beta(end_alpha, end_beta) (the paper: 1, 1, uniform levels). Above 1 / at most 1 keeps the
    renoise levels biased to high noise after the cold start (the shapes recipe: low levels, where the critic is
    weakest, otherwise carry half the DMD gradient and the student drifts; README, issue 23)."""
    schedule: Literal["cosine", "constant"] = "cosine"
    """``cosine``: both decay over D (the paper's method); ``constant``: the paper's "-Dynamic" ablation, the
    step-0 real scale s_r0 and Beta(alpha, beta) renoise levels for the whole run (``decay_steps`` unused)."""


@dataclass
class RLConfig:
    """The reward branch, on from ``start_step`` generator steps."""

    method: Literal["none", "refl", "dpo", "grpo"] = "refl"
    """The RL branch (dmdr/losses/rl/): ReFL, on-policy DPO, or GRPO with DMD in place of the KL term."""
    start_step: int = 2000
    """Generator step at which the RL branch, its learning rates and batch size start."""
    rewards: tuple[str, ...] = ("hps", "clip")
    """Reward names (hps, clip, pickscore, srpo, brightness, color, ...)."""
    weights: tuple[float, ...] = (0.3, 0.3)
    """ReFL: each reward's loss weight w_r. DPO / GRPO rank samples by the weighted sum of the scores."""
    margin: float = 0.7
    """ReFL per-reward loss relu(margin - score)."""
    dpo_k: int = 4
    """DPO: K samples per prompt from the generator's own sampler; the best and worst form the pair."""
    dpo_beta: float = 100.0
    """DPO: beta of -log sigmoid(-beta [(e_theta(w) - e_ref(w)) - (e_theta(l) - e_ref(l))])."""
    dpo_weight: float = 1.0
    """DPO: lambda in L = L_dmd + lambda L_dpo."""
    grpo_group_size: int = 0
    """GRPO: G samples per prompt (a group lives on one rank and in one micro-batch: G divides the per-rank RL
    batch / train.grad_accum); 0 = auto: 4 (Flow-GRPO's) when it divides it, else the largest G below 4 that does
    (the paper-scale recipes' RL batch of 2 per GPU gives G = 2)."""
    grpo_clip: float = 1e-3
    """GRPO: eps of clip(rho, 1 - eps, 1 + eps) (Flow-GRPO's)."""
    grpo_weight: float = 1.0
    """GRPO: lambda in L = L_dmd + lambda L_grpo."""
    grpo_inner_updates: int = 1
    """GRPO: generator updates per sampled group (mu); the group is reused (and checkpointed) between them."""
    grpo_kl_weight: float = 0.0
    """GRPO: beta of Flow-GRPO's KL term against the generator at the RL start; 0 with DMD (DMD replaces it),
    e.g. 0.04 (Flow-GRPO's) for GRPO alone (``--dmd.weight 0``)."""
    srpo_k: float = 0.1
    """srpo reward: k in r = (1 + k) cos(f, f+) - cos(f, f-)."""
    reward_resolution: int = 224
    """Reward-model input size, used only for a model whose config declares none (each model runs at its own)."""
    hps_checkpoint: str = ""
    """Local HPSv2.1 checkpoint file (loaded into an open_clip ``hps_arch`` model)."""
    hps_arch: str = "ViT-H-14"
    """open_clip architecture of the HPS checkpoint."""
    clip_model: str = ""
    """Local open_clip folder of the CLIP reward (DFN-CLIP: ``open_clip_config.json`` + weights)."""
    pickscore_model: str = ""
    """Local transformers folder of PickScore (``CLIPModel`` + tokenizer)."""


@dataclass
class OptimConfig:
    """AdamW for both networks; the learning rates switch to the RL stage's at ``rl.start_step``."""

    generator_lr: float = 1e-6
    """Generator learning rate in the cold start."""
    critic_lr: float = 5e-7
    """Critic learning rate in the cold start."""
    rl_generator_lr: float = 5e-7
    """Generator learning rate from ``rl.start_step``."""
    rl_critic_lr: float = 2e-7
    """Critic learning rate from ``rl.start_step``."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas of both optimizers."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    generator_weight_decay: float = 0.01
    """AdamW weight decay of the generator."""
    critic_weight_decay: float = 0.0
    """AdamW weight decay of the critic."""
    grad_clip: float = 1.0
    """Gradient-norm clip of each optimizer step (0 disables)."""
    ema_decay: float = 0.0
    """0 turns EMA of the generator off (the default)."""


@dataclass
class DataConfig:
    """Prompt data: sources, mixture, loader workers; see :mod:`dmdr.data`."""

    sources: tuple[str, ...] = ()
    """Paths, globs or fsspec URLs of prompt shards (.txt, .jsonl, .parquet)."""
    weights: tuple[float, ...] = ()
    """Mixture weight per source (empty = equal)."""
    format: Literal["auto", "txt", "jsonl", "parquet"] = "auto"
    """Prompt file format; ``auto`` goes by the extension."""
    field: str = "prompt"
    """JSONL field / Parquet column holding the prompt."""
    batch_size: int = 4
    """Prompts per data-parallel rank per iteration (the cold start's, and the RL stage's unless set below)."""
    rl_batch_size: int = 0
    """Prompts per rank per iteration from ``rl.start_step`` on (ALGORITHM.md halves it there); 0 = ``batch_size``."""
    rl_batch_for_distill: bool = False
    """Also switch to ``rl_batch_size`` at ``rl.start_step`` when no RL branch runs (``rl.method none``): an
    only-distill arm then trains at the RL arms' batch (off: it keeps ``batch_size``, as before)."""
    num_workers: int = 2
    """Loader worker processes per rank (0 = read in the training process)."""
    shuffle_buffer: int = 10_000
    """Records per shuffle block, per source and worker (memory and resume re-read are bounded by it)."""
    max_skip_rate: float = 0.1
    """Stop with an error if more than this fraction of records is skipped as bad."""
    embedding_cache: str = ""
    """Folder written by tools/cache_text_embeddings.py; used instead of the text encoders when set."""
    skip_check_after: int = 1000
    """Records read (per rank) before ``max_skip_rate`` is enforced (one bad first line cannot stop a run)."""
    max_prompt_chars: int = 2048
    """Prompts longer than this many characters are cut (or skipped, see ``long_prompts``) and counted."""
    long_prompts: Literal["truncate", "skip"] = "truncate"
    """What happens to a prompt longer than ``max_prompt_chars``."""
    cache_miss: Literal["error", "skip", "encode"] = "error"
    """A prompt missing from ``embedding_cache``: stop, skip it (counted), or leave it to the text encoder."""
    on_layout_change: Literal["reshuffle", "error"] = "reshuffle"
    """Resume with other ranks/workers/sources than the checkpoint's: a fresh seeded order, or stop."""
    prefetch_factor: int = 2
    """Batches each loader worker prepares ahead."""


@dataclass
class ParallelConfig:
    """FSDP2 / HSDP layout, activation checkpointing, mixed precision."""

    dp_replicate: int = 1
    """Replica groups (HSDP across nodes); 1 = plain FSDP."""
    dp_shard: int = -1
    """Shard group size; -1 = world_size // dp_replicate."""
    param_dtype: Literal["fp32", "bf16", "fp16"] = "bf16"
    """FSDP2 compute dtype of the parameters."""
    reduce_dtype: Literal["fp32", "bf16"] = "fp32"
    """FSDP2 gradient reduce-scatter dtype."""
    activation_checkpointing: Literal["none", "full", "every_k"] = "full"
    """Recompute block activations in backward: every block, every ``ac_every``-th, or none."""
    ac_every: int = 2
    """``every_k``: checkpoint one block in this many."""
    compile: bool = False
    """``torch.compile`` each transformer block (after activation checkpointing, before FSDP2)."""
    compile_backend: Literal["inductor", "aot_eager", "eager"] = "inductor"
    """``aot_eager`` / ``eager``: dynamo's graphs without inductor's code generation (to bisect a compile issue)."""
    cpu_offload_teacher: bool = False
    """Keep the teacher's shards in host memory and stream them in (slow; saves GPU memory)."""
    frozen_encoders: Literal["replicate", "shard"] = "replicate"
    """Text encoders whole on every rank, or FSDP2-sharded (T5-XXL-sized encoders)."""
    timeout_s: int = 1800
    """Collective timeout in seconds, passed to ``init_process_group`` (a rank waiting longer in an all-gather or
    barrier fails instead of hanging); raise it when a large teacher's first all-gather reads from a slow
    filesystem."""


@dataclass
class CheckpointConfig:
    """Checkpoints: how often, how many are kept, what a launch resumes from."""

    interval: int = 250
    """Generator steps between checkpoints (0 = only at the end and on preemption)."""
    keep_last: int = 3
    """Complete checkpoints kept (older ones are pruned; guard rollback targets are never pruned)."""
    async_save: bool = False
    """Write checkpoints in the background (torch.distributed.checkpoint's async save)."""
    resume: str = "auto"
    """``auto`` (latest complete checkpoint in output_dir), ``never``, or a checkpoint folder."""


@dataclass
class LogConfig:
    """Metrics, sample grids and the console."""

    interval: int = 10
    """Generator steps between metric rows (``metrics.jsonl``, TensorBoard); without a progress bar (no TTY, or
    ``progress_bar false``) also a plain log line."""
    tensorboard: bool = True
    """Mirror the metrics to ``<output_dir>/tensorboard``."""
    sample_interval: int = 250
    """Generator steps between sample grids of ``sample_prompts`` (0 = none)."""
    sample_prompts: tuple[str, ...] = ("a photo of a cat", "a red car in the rain", "an astronaut riding a horse")
    """Fixed prompts of the sample grids (fixed noise too)."""
    progress_bar: bool = True
    """A tqdm bar on rank 0 when stderr is a terminal; otherwise a log line every ``interval`` steps."""


@dataclass
class ProfileConfig:
    """The torch profiler and the CUDA memory snapshot over a window of generator steps (off by default)."""

    enabled: bool = False
    """Trace generator steps ``start_step .. end_step`` with ``torch.profiler`` (CPU, and CUDA when on a GPU)."""
    start_step: int = 5
    """First traced generator step (the ones before warm up: allocator, compile, first all-gathers)."""
    end_step: int = 7
    """Last traced generator step (inclusive)."""
    folder: str = "profile"
    """Where traces go, relative to ``train.output_dir`` unless absolute: ``rank<R>.steps<N>-<M>.pt.trace.json``
    (Perfetto, chrome://tracing; ``tensorboard --logdir`` with the torch-tb-profiler plugin)."""
    memory_snapshot: bool = True
    """On CUDA, also record the allocator's history over the window and dump ``rank<R>.memory.pickle``
    (drag it onto https://pytorch.org/memory_viz)."""
    record_shapes: bool = False
    """Record operator input shapes (larger traces)."""
    with_stack: bool = False
    """Record Python stacks (much larger traces)."""


@dataclass
class GuardConfig:
    """The guard-rails (:mod:`dmdr.guard`): a health probe every ``interval`` generator steps, rules on its
    signals, and what a trip does. Every threshold is relative to the baseline probe (the first one at or
    after ``start_step``) unless it says otherwise; ``docs`` of each rule: :mod:`dmdr.guard.rules`."""

    action: Literal["off", "warn", "stop", "rollback"] = "off"
    """``warn``: log the trip with its evidence; ``stop``: checkpoint, one line, exit 4; ``rollback``: restore the
    last checkpoint that passed the probe, lower ``rollback_target`` by ``rollback_factor``, continue."""
    interval: int = 250
    """Generator steps between probes (each passing probe also writes a checkpoint: a rollback target)."""
    start_step: int = -1
    """The baseline probe's step; -1: ``rl.start_step`` (reward hacking begins with the RL branch)."""
    prompts: tuple[str, ...] = ()
    """Held-out probe prompts; empty: ``log.sample_prompts``."""
    seeds: int = 2
    """Noise draws per prompt (fixed, the same at every probe); diversity is measured across them."""
    max_saturation_rise: float = 0.15
    """Mean HSV saturation of the probe images may rise at most this much (absolute, in [0, 1])."""
    max_colourfulness_rise: float = 1.0
    """Hasler-Suesstrunk colourfulness may rise at most this fraction above the baseline (a colour reward raises
    it legitimately: on the shapes world DMDR up to +21%, ReFL alone +57-62% in 60 RL steps, training seeds 0-2;
    before issue 23's recipe, reward weight 1: DMDR +42% in 20 steps; only a doubling trips)."""
    max_clipped_rise: float = 0.1
    """Fraction of channel values at 0 or 1 may rise at most this much (absolute)."""
    max_clipped_drop: float = 0.2
    """... and fall at most this much (absolute). The shapes world's black backgrounds take a haze under ReFL alone:
    0.70-0.73 -> 0.37-0.45 after 20 RL steps (full size, training seeds 0-2), while DMDR's fell at most 0.15 (seed 1;
    0.1 tripped on DMDR at seeds 1 and 2) and DMD alone's 0.03 (README, guard-rails). Where few pixels are clipped
    (most real images) it cannot trip."""
    min_diversity_ratio: float = 0.5
    """Distance between seeds of one prompt may fall to this fraction of the baseline, no lower (each diversity
    measured: pixels, VAE latents, and CLIP embeddings / LPIPS where configured)."""
    min_critic_teacher_ratio: float = 0.75
    """Critic / teacher denoising loss on the probe samples may fall to this fraction of the baseline (lower: the
    samples left what the teacher models). Shapes world, recipe before issue 23: DMDR stayed above 0.94, ReFL alone
    fell to 0.74 after 20 steps. With issue 23's recipe ReFL alone's stays at 1.0-1.2 (the clipped rule catches
    it), while the ratio wobbles: DMD alone's dipped to 0.91 (full size, seeds 0-2) and DMDR's to 0.80 of a high
    baseline at CI size (seed 3, fidelity unchanged; 0.85 tripped there three times)."""
    max_critic_loss_rise: float = 0.25
    """The critic's denoising loss on the probe samples may rise at most this fraction above the baseline. The
    critic trains on the student's samples every step; a student that runs from the teacher faster than its critic
    can follow (a reward pulling alone) leaves it behind. Shapes world, full size, training seeds 0-2: DMDR and DMD
    alone stayed within +22% over 60 RL steps, ReFL alone rose +28% / +48% / +52% by its first probe (10 RL steps)
    and +81-120% by the second, where the clipped rule first trips. Judged whenever the run has a critic (with
    ``dmd.weight 0`` too: the critic still trains on the student's samples)."""
    max_dmd_grad_rise: float = 3.0
    """The DMD gradient scale may grow to this multiple of the baseline."""
    max_reward_gap: float = 0.25
    """Training-batch reward minus probe reward may be at most this (absolute, weighted reward sum)."""
    min_clip_score_ratio: float = 0.9
    """With ``clip_model``: the probe's CLIP score may fall to this fraction of the baseline (prompt alignment traded
    for reward; not measured on a real model yet, a conservative starting point)."""
    max_aesthetic_drop: float = 0.5
    """With ``aesthetic_head``: the LAION aesthetic score (about 1-10) may fall at most this much (absolute; not
    measured on a real model yet)."""
    clip_model: str = ""
    """Local CLIP folder (open_clip hub layout or transformers ``CLIPModel``, as ``tools/eval.py --clip-model``) for
    ``probe/clip_score`` and ``probe/diversity_clip``; empty: not measured. Nothing is downloaded."""
    aesthetic_head: str = ""
    """Local LAION aesthetic head (``sac+logos+ava1-l14-linearMSE.pth``) on ``clip_model`` (CLIP ViT-L/14):
    ``probe/aesthetic``; empty: not measured."""
    lpips_weights: str = ""
    """One local ``lpips.LPIPS`` state dict (see :mod:`dmdr.evaluation.diversity`): ``probe/diversity_lpips``;
    empty: not measured (diversity is then measured in pixels, VAE latents and, with ``clip_model``, CLIP)."""
    trend_window: int = 3
    """A trend trip: saturation or colourfulness rose at each of this many probes in a row, by more than half its
    threshold in all, to more than half its threshold above the baseline (0: no trend rule)."""
    rollback_target: Literal["lr", "rl_weight"] = "lr"
    """What a rollback lowers: the generator's learning rates, or the RL rewards' weights (under Adam the RL weight
    only matters relative to the DMD loss: with ``dmd.weight 0`` use ``lr``)."""
    rollback_factor: float = 0.5
    """Multiplier applied per rollback (after n rollbacks: factor ** n)."""
    max_rollbacks: int = 2
    """Rollbacks before a trip stops the run instead."""


@dataclass
class RunConfig:
    """The run: its folder, length, seed, device and step shape."""

    output_dir: str = "runs/dmdr"
    """The run folder: config, checkpoints, metrics, samples (a relaunch into it resumes)."""
    max_steps: int = 4000
    """Generator steps to train for."""
    seed: int = 0
    """Seeds the noise streams (per rank), the LoRA inits and the data order."""
    device: str = "auto"
    """``auto`` (CUDA when available), ``cpu``, ``cuda``, or a registered out-of-tree device."""
    max_bad_steps: int = 10
    """Consecutive non-finite steps tolerated before the run stops."""
    grad_accum: int = 1
    """Micro-batches per step: every generator and critic step (and the RL branch) runs its per-rank batch in this
    many equal slices, one backward each, then one optimizer step: the same update as the whole batch at the
    activation memory of one slice (must divide ``data.batch_size`` and ``data.rl_batch_size``)."""


@dataclass
class TrainConfig:
    """The whole run. A recipe is a function that returns one."""

    model: ModelConfig = field(default_factory=ModelConfig)
    dmd: DMDConfig = field(default_factory=DMDConfig)
    dynamic: DynamicConfig = field(default_factory=DynamicConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    train: RunConfig = field(default_factory=RunConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)


# --------------------------------------------------------------------------------------------- #
# Command-line overrides
# --------------------------------------------------------------------------------------------- #

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _field_types(obj: Any) -> dict[str, Any]:
    return typing.get_type_hints(type(obj))


def all_keys(cfg: TrainConfig) -> list[str]:
    """Every overridable key, ``section.field``."""
    keys = []
    for section in dataclasses.fields(cfg):
        for f in dataclasses.fields(getattr(cfg, section.name)):
            keys.append(f"{section.name}.{f.name}")
    return keys


def _convert(key: str, raw: str, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Literal:
        if raw not in args and not any(str(a) == raw for a in args):
            raise ConfigError(f"--{key}: {raw!r} is not one of {', '.join(map(str, args))}")
        return next(a for a in args if str(a) == raw)
    if origin in (types.UnionType, typing.Union):
        non_none = [a for a in args if a is not type(None)]
        if raw.lower() in {"none", "null"} and type(None) in args:
            return None
        return _convert(key, raw, non_none[0])
    if origin is tuple:
        parts = [p.strip() for p in raw.split(",")] if raw.strip() else []
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(key, p, args[0]) for p in parts)
        if len(parts) != len(args):
            raise ConfigError(f"--{key}: expected {len(args)} comma-separated values, got {raw!r}")
        return tuple(_convert(key, p, a) for p, a in zip(parts, args))
    if tp is bool:
        low = raw.lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ConfigError(f"--{key}: {raw!r} is not a boolean (use true/false)")
    if tp in (int, float, str):
        try:
            if tp is int:
                value = float(raw)
                if not value.is_integer():
                    raise ValueError
                return int(value)
            return tp(raw)
        except ValueError:
            raise ConfigError(f"--{key}: {raw!r} is not a valid {tp.__name__}") from None
    raise ConfigError(f"--{key}: unsupported field type {tp}")


def _suggest(cfg: TrainConfig, key: str) -> str:
    """``; did you mean ...?`` with the closest valid keys (same-section substring matches first)."""
    keys = all_keys(cfg)
    section, _, name = key.partition(".")
    close = [k for k in keys if name and k.startswith(section + ".") and name in k.partition(".")[2]]
    close += [k for k in difflib.get_close_matches(key, keys, n=4, cutoff=0.5) if k not in close]
    return f"; did you mean {', '.join('--' + c for c in close[:4])}?" if close else ""


def _resolve(cfg: TrainConfig, key: str) -> tuple[Any, str, Any]:
    """``(section object, field name, field type)`` of ``section.field``; unknown keys fail with suggestions."""
    section, _, name = key.partition(".")
    sub = getattr(cfg, section, None)
    if sub is None or not dataclasses.is_dataclass(sub) or not name or name not in _field_types(sub):
        raise ConfigError(f"unknown config key --{key}{_suggest(cfg, key)}")
    return sub, name, _field_types(sub)[name]


def set_value(cfg: TrainConfig, key: str, raw: str) -> None:
    """Set ``section.field`` from its string form, with type conversion and a clear error."""
    sub, name, tp = _resolve(cfg, key)
    setattr(sub, name, _convert(key, raw, tp))


def apply_overrides(cfg: TrainConfig, argv: list[str], problems: list[tuple[str, str]] | None = None) -> TrainConfig:
    """Apply ``--section.field value`` pairs from ``argv`` to ``cfg`` (in place) and validate.

    With ``problems`` given, nothing raises: every bad argument and failed check is appended as
    ``(key, message)`` (the field keeps its recipe value) so that preflight reports them all at once.
    """
    i = 0
    while i < len(argv):
        arg = argv[i]
        key, raw = arg[2:], None
        try:
            if not arg.startswith("--"):
                i += 1
                raise ConfigError(f"unexpected argument {arg!r}; overrides look like --section.field value")
            if "=" in key:
                key, raw = key.split("=", 1)
                i += 1
            else:
                if i + 1 >= len(argv):
                    i += 1
                    raise ConfigError(f"--{key} needs a value")
                raw = argv[i + 1]
                i += 2
            set_value(cfg, key, raw)
        except ConfigError as err:
            if problems is None:
                raise
            problems.append((key if arg.startswith("--") else "", str(err)))
    validate(cfg, problems)
    return cfg


def grpo_group_size(cfg: TrainConfig) -> int:
    """GRPO's group size ``G``: ``rl.grpo_group_size``, or for 0 (auto) 4 when it divides the per-rank RL
    micro-batch, else the largest ``G < 4`` that does (0 when not even 2 does)."""
    if cfg.rl.grpo_group_size:
        return cfg.rl.grpo_group_size
    micro = (cfg.data.rl_batch_size or cfg.data.batch_size) // max(1, cfg.train.grad_accum)
    return next((g for g in (4, 3, 2) if micro and micro % g == 0), 0)


def validate(cfg: TrainConfig, problems: list[tuple[str, str]] | None = None) -> None:
    """Range and consistency checks that types alone cannot express.

    Raises a one-line :class:`ConfigError` on the first failed check, or, with ``problems`` given,
    appends every failed check to it as ``(key, "--key: message")``.
    """
    def _require(ok: bool, key: str, message: str) -> None:
        if ok:
            return
        if problems is None:
            raise ConfigError(f"--{key}: {message}")
        problems.append((key, f"--{key}: {message}"))

    families = ("auto", *FAMILIES)
    _require(cfg.model.family in families, "model.family", f"{cfg.model.family!r} is not one of {', '.join(families)}")
    _require(cfg.train.max_steps >= 1, "train.max_steps", "must be >= 1")
    _require(cfg.dmd.num_steps >= 1, "dmd.num_steps", "must be >= 1")
    _require(cfg.dmd.ratio >= 1, "dmd.ratio", "must be >= 1")
    _require(cfg.dmd.shift > 0, "dmd.shift", "must be > 0")
    _require(not cfg.dmd.timesteps or len(cfg.dmd.timesteps) == cfg.dmd.num_steps, "dmd.timesteps",
             f"{len(cfg.dmd.timesteps)} timesteps for dmd.num_steps={cfg.dmd.num_steps} (give one per step)")
    _require(all(a > b for a, b in zip(cfg.dmd.timesteps, cfg.dmd.timesteps[1:])) and
             all(ts > 0 for ts in cfg.dmd.timesteps), "dmd.timesteps", "must be positive and decreasing")
    _require(0 <= cfg.dmd.t_min < 1, "dmd.t_min", "must be in [0, 1)")
    _require(cfg.dmd.guidance_jitter >= 0, "dmd.guidance_jitter", "must be >= 0")
    _require(cfg.dmd.true_cfg >= 1, "dmd.true_cfg", "must be >= 1 (1: no true CFG on top of the embedding)")
    _require(cfg.dmd.weight >= 0, "dmd.weight", "must be >= 0 (0 = the RL loss alone)")
    _require(cfg.dmd.ca_alpha > 0 and cfg.dmd.ca_beta > 0, "dmd.ca_alpha", "ca_alpha and ca_beta must be > 0")
    _require(cfg.dynamic.decay_steps >= 0, "dynamic.decay_steps", "must be >= 0")
    _require(cfg.dynamic.alpha > 0 and cfg.dynamic.beta > 0, "dynamic.alpha", "alpha and beta must be > 0")
    _require(cfg.dynamic.end_alpha > 0 and cfg.dynamic.end_beta > 0, "dynamic.end_alpha",
             "end_alpha and end_beta must be > 0")
    _require(cfg.model.critic_lora_rank >= 1, "model.critic_lora_rank", "must be >= 1")
    _require(cfg.model.generator_lora_rank >= 1, "model.generator_lora_rank", "must be >= 1")
    _require(cfg.model.resolution % 16 == 0, "model.resolution", "must be a multiple of 16")
    from dmdr.models.attention import check_name  # device and package checks run at build time

    check_name(cfg.model.attention)
    if cfg.rl.method != "none":
        _require(len(cfg.rl.rewards) > 0, "rl.rewards", "at least one reward when rl.method is not none")
        _require(len(cfg.rl.weights) == len(cfg.rl.rewards), "rl.weights",
                 f"{len(cfg.rl.weights)} weights for {len(cfg.rl.rewards)} rewards")
    rl_batch = cfg.data.rl_batch_size or cfg.data.batch_size
    if cfg.rl.method == "dpo":
        _require(cfg.rl.dpo_k >= 2, "rl.dpo_k", f"DPO needs K >= 2 samples per prompt to form a pair, got "
                 f"{cfg.rl.dpo_k}")
        _require(cfg.rl.dpo_beta > 0, "rl.dpo_beta", "must be > 0")
    accum = cfg.train.grad_accum
    _require(accum >= 1, "train.grad_accum", "must be >= 1 (1 = no accumulation)")
    accum = max(accum, 1)
    for key, batch in (("data.batch_size", cfg.data.batch_size), ("data.rl_batch_size", cfg.data.rl_batch_size)):
        _require(batch % accum == 0, "train.grad_accum",
                 f"{accum} micro-batches do not divide {key} {batch} (per rank); use a divisor of it")
    if cfg.rl.method == "grpo":
        g = grpo_group_size(cfg)
        _require(g >= 2, "rl.grpo_group_size", f"GRPO needs groups of >= 2 samples, got {g}" if cfg.rl.grpo_group_size
                 else f"auto finds no group of >= 2 in the per-rank RL micro-batch {rl_batch // accum} "
                      f"(data.rl_batch_size or data.batch_size / train.grad_accum); raise it to 2 or more")
        micro = rl_batch // accum
        _require(rl_batch % accum or micro % g == 0, "rl.grpo_group_size",
                 f"{g} does not divide the per-rank RL batch {rl_batch} (data.rl_batch_size or data.batch_size)"
                 + (f" / train.grad_accum {accum} = {micro}" if accum > 1 else "")
                 + "; a group must live on one rank" + (" and in one micro-batch" if accum > 1 else ""))
        _require(cfg.dmd.num_steps >= 2, "dmd.num_steps",
                 "GRPO needs >= 2 sampler steps (the last step is deterministic and carries no log-prob)")
        _require(cfg.rl.grpo_clip > 0, "rl.grpo_clip", "must be > 0")
        _require(cfg.rl.grpo_inner_updates >= 1, "rl.grpo_inner_updates", "must be >= 1")
        _require(cfg.rl.grpo_kl_weight >= 0, "rl.grpo_kl_weight", "must be >= 0 (0: no KL term)")
    _require(cfg.rl.start_step >= 0, "rl.start_step", "must be >= 0")
    for name in ("generator_lr", "critic_lr", "rl_generator_lr", "rl_critic_lr"):
        _require(getattr(cfg.optim, name) >= 0, f"optim.{name}", "must be >= 0")
    _require(cfg.optim.grad_clip >= 0, "optim.grad_clip", "must be >= 0 (0 disables clipping)")
    _require(0 <= cfg.optim.ema_decay < 1, "optim.ema_decay", "must be in [0, 1)")
    _require(cfg.data.batch_size >= 1, "data.batch_size", "must be >= 1")
    _require(cfg.data.rl_batch_size >= 0, "data.rl_batch_size", "must be >= 0 (0 = data.batch_size)")
    _require(cfg.data.num_workers >= 0, "data.num_workers", "must be >= 0")
    _require(0 <= cfg.data.max_skip_rate <= 1, "data.max_skip_rate", "must be in [0, 1]")
    _require(not cfg.data.weights or len(cfg.data.weights) == len(cfg.data.sources), "data.weights",
             f"{len(cfg.data.weights)} weights for {len(cfg.data.sources)} sources")
    _require(all(w >= 0 for w in cfg.data.weights) and (not cfg.data.weights or sum(cfg.data.weights) > 0),
             "data.weights", "must be >= 0 with a positive sum")
    _require(cfg.data.shuffle_buffer >= 0, "data.shuffle_buffer", "must be >= 0 (0 or 1 = no shuffle buffer)")
    _require(cfg.data.skip_check_after >= 0, "data.skip_check_after", "must be >= 0")
    _require(cfg.data.max_prompt_chars >= 1, "data.max_prompt_chars", "must be >= 1")
    _require(cfg.data.prefetch_factor >= 1, "data.prefetch_factor", "must be >= 1")
    _require(bool(cfg.data.field.strip()), "data.field", "must name a JSONL field / Parquet column")
    _require(cfg.parallel.dp_replicate >= 1, "parallel.dp_replicate", "must be >= 1")
    _require(cfg.parallel.dp_shard == -1 or cfg.parallel.dp_shard >= 1, "parallel.dp_shard", "must be -1 or >= 1")
    _require(cfg.parallel.ac_every >= 1, "parallel.ac_every", "must be >= 1")
    _require(cfg.checkpoint.interval >= 0, "checkpoint.interval", "must be >= 0")
    _require(cfg.checkpoint.keep_last >= 1, "checkpoint.keep_last", "must be >= 1")
    _require(cfg.log.interval >= 1, "log.interval", "must be >= 1")
    _require(cfg.train.max_bad_steps >= 1, "train.max_bad_steps", "must be >= 1")
    _require(cfg.guard.interval >= 1, "guard.interval", "must be >= 1")
    _require(cfg.guard.seeds >= 2, "guard.seeds", "must be >= 2 (diversity is measured across seeds)")
    _require(0 < cfg.guard.rollback_factor < 1, "guard.rollback_factor", "must be in (0, 1)")
    _require(cfg.guard.max_rollbacks >= 0, "guard.max_rollbacks", "must be >= 0")
    _require(cfg.guard.trend_window >= 0, "guard.trend_window", "must be >= 0")
    _require(cfg.parallel.timeout_s >= 1, "parallel.timeout_s", "must be >= 1 (seconds)")
    if cfg.profile.enabled:
        _require(0 <= cfg.profile.start_step <= cfg.profile.end_step, "profile.end_step",
                 f"the window {cfg.profile.start_step}..{cfg.profile.end_step} must have 0 <= start_step <= end_step")
    _require(not cfg.guard.aesthetic_head or bool(cfg.guard.clip_model), "guard.aesthetic_head",
             "needs --guard.clip_model (the CLIP ViT-L/14 folder under the head)")


def to_dict(cfg: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_dict(data: dict[str, Any]) -> TrainConfig:
    """Rebuild a config from :func:`to_dict` output (e.g. a run's ``config.json``)."""
    cfg = TrainConfig()
    for section, values in data.items():
        for name, value in values.items():
            key = f"{section}.{name}"
            if isinstance(value, list | tuple):  # element by element: a prompt may contain a comma
                sub, name, tp = _resolve(cfg, key)
                args = typing.get_args(tp)
                types_ = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else list(args)
                if len(types_) != len(value):
                    raise ConfigError(f"--{key}: expected {len(types_)} values, got {len(value)}")
                setattr(sub, name, tuple(_convert(key, str(v), t) for v, t in zip(value, types_)))
            else:
                set_value(cfg, key, str(value))
    validate(cfg)
    return cfg


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The attribute docstrings of a config dataclass (the string literal under each field), by field name.

    Python keeps them only in the source, so they are read with :mod:`ast`; ``--help`` prints them."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError, SyntaxError):  # no source (a frozen build): help without descriptions
        return {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    docs: dict[str, str] = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def describe_fields(cfg: TrainConfig, width: int = 110) -> list[str]:
    """``--help``'s body: per section its description, then every field with its value and docstring."""
    lines: list[str] = []
    for section in dataclasses.fields(cfg):
        sub = getattr(cfg, section.name)
        summary = " ".join((type(sub).__doc__ or "").split())
        lines += ["", f"{section.name}: {summary}" if summary else f"{section.name}:"]
        docs = field_docs(type(sub))
        for f in dataclasses.fields(sub):
            lines.append(f"  --{section.name}.{f.name} {getattr(sub, f.name)!r}")
            if f.name in docs:
                lines += textwrap.wrap(docs[f.name], width, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return lines


def save_config(cfg: TrainConfig, output_dir: str | Path) -> Path:
    """Write the resolved config to ``<output_dir>/config.json``."""
    path = Path(output_dir) / "config.json"
    path.write_text(json.dumps(to_dict(cfg), indent=2, sort_keys=True) + "\n")
    return path
