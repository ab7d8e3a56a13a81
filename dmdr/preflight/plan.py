"""The ``--dry-run`` report: the resolved config and the plan of the run, from the config and preflight's facts.

Nothing here loads a model: the family and parameter counts come from ``model_index.json`` and the
weight headers preflight read (:func:`dmdr.preflight.run_checks.check_model`).
"""

from __future__ import annotations

import json
from typing import Any

from dmdr.config import grpo_group_size, to_dict
from dmdr.distributed.checkpoint import read_marker
from dmdr.preflight import RunContext
from dmdr.preflight.rewards import rl_reached
from dmdr.preflight.run_checks import checkpoint_bytes, text_encoders_needed


def _count(n: int | None) -> str:
    if n is None:
        return "unknown"
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M" if n >= 1e5 else str(n)


def _gb(n: int | None) -> str:
    return "unknown" if n is None else f"{n / 1e9:.2f} GB" if n >= 1e7 else f"{n / 1e6:.2f} MB"


def _resume(cfg: Any, facts: dict[str, Any]) -> str:
    path = facts.get("resume")
    if cfg.checkpoint.resume == "never" or not path:
        return "fresh start" + (" (checkpoint.resume never)" if cfg.checkpoint.resume == "never" else
                                " (no complete checkpoint in the output folder)")
    step = read_marker(path).get("step")
    past = " (>= train.max_steps: nothing left to train)" if step is not None and step >= cfg.train.max_steps else ""
    return f"from {path} (generator step {step}){past}"


def plan_lines(cfg: Any, ctx: RunContext) -> list[str]:
    """The plan, one ``name  text`` row per aspect of the run."""
    f, m, d, p = ctx.facts, cfg.model, cfg.data, cfg.parallel
    rep, shard = f.get("mesh", (p.dp_replicate, p.dp_shard))
    w = ctx.world_size
    rows = [("model", f"{f.get('family', m.family)} ({f.get('pipeline_class', '?')}) from {m.path}; denoiser "
                      f"{_count(f.get('denoiser_numel'))} parameters stored in {m.dtype}")]
    if m.generator_mode == "lora":
        gen = f"LoRA rank {m.generator_lora_rank} alpha {m.generator_lora_alpha:g} in the teacher's network (fp32)"
    else:
        gen = "a full trainable fp32 copy of the teacher"
    rows += [("roles", f"generator: {gen}"),
             ("", f"teacher: frozen; real score at critic-LoRA scale s_r (DynaDG {_real_scale_plan(cfg.dynamic)})"
              if cfg.dynamic.dynadg else "teacher: frozen real score"),
             ("", f"critic: LoRA rank {m.critic_lora_rank} alpha {m.critic_lora_alpha:g} in the teacher, fake score "
                  f"at s_f {cfg.dmd.fake_scale:g}, {cfg.dmd.ratio} critic steps per generator step"),
             ("", "text encoders: loaded, frozen" if text_encoders_needed(cfg)
              else f"text encoders: not loaded (embedding cache {d.embedding_cache})")]
    rows.append(("job", f"world size {w}, mesh dp_replicate {rep} x dp_shard {shard}, device {cfg.train.device}"))
    if w > 1:
        what = "teacher" + (" and generator copy" if m.generator_mode == "full" else " (with both LoRAs)")
        rows.append(("sharded", f"FSDP2 {'HSDP ' if rep > 1 else ''}over dp_shard {shard}: {what}; params "
                                f"{p.param_dtype}, reduce {p.reduce_dtype}; text encoders {p.frozen_encoders}"
                                f"{'; teacher offloaded to CPU' if p.cpu_offload_teacher else ''}"))
    else:
        rows.append(("sharded", "nothing (one process)"))
    rows.append(("", f"activation checkpointing {p.activation_checkpointing}, compile {p.compile}, collective "
                     f"timeout {p.timeout_s} s"))
    k = cfg.train.grad_accum
    if k > 1:
        rows.append(("", f"gradient accumulation: {k} micro-batches per step ({d.batch_size // k} prompts per "
                         f"forward in the cold start, {(d.rl_batch_size or d.batch_size) // k} in the RL stage)"))
    start = min(cfg.rl.start_step, cfg.train.max_steps) if cfg.rl.method != "none" else cfg.train.max_steps
    rows.append(("stages", f"cold start: generator steps [0, {start}): lr generator {cfg.optim.generator_lr:g}, "
                           f"critic {cfg.optim.critic_lr:g}; {d.batch_size} prompts per rank ({d.batch_size * w} "
                           f"per step); DMD {cfg.dmd.num_steps}-step generator, guidance {cfg.dmd.guidance:g}"))
    if rl_reached(cfg):
        rewards = ", ".join(f"{n} x{wt:g}" for n, wt in zip(cfg.rl.rewards, cfg.rl.weights))
        rl_batch = d.rl_batch_size or d.batch_size
        rows.append(("", f"RL ({cfg.rl.method}): generator steps [{start}, {cfg.train.max_steps}): lr generator "
                         f"{cfg.optim.rl_generator_lr:g}, critic {cfg.optim.rl_critic_lr:g}; {rl_batch} prompts per "
                         f"rank ({rl_batch * w} per step); rewards {rewards}, margin {cfg.rl.margin:g}"
                         + (f"; GRPO groups of {grpo_group_size(cfg)}" if cfg.rl.method == "grpo" else "")))
    else:
        rows.append(("", f"RL: not reached (rl.method {cfg.rl.method}, rl.start_step {cfg.rl.start_step}, "
                         f"train.max_steps {cfg.train.max_steps})"))
    rows.append(("resume", _resume(cfg, f)))
    out, ck = cfg.train.output_dir, cfg.checkpoint
    every = f"every {ck.interval} steps" if ck.interval else "at the end and on preemption"
    rows += [("outputs", f"{out}/config.json, metrics.jsonl (every {cfg.log.interval} steps)"
                         f"{', tensorboard/' if cfg.log.tensorboard else ''}"
                         f"{f', samples/ every {cfg.log.sample_interval} steps' if cfg.log.sample_interval else ''}"),
             ("", f"{out}/checkpoints/step-<N>/ {every}, keep {ck.keep_last}; about "
                  f"{_gb(checkpoint_bytes(cfg, f))} each ({_gb(f.get('free_bytes'))} free)")]
    width = max(len(name) for name, _ in rows)
    return [f"  {name:<{width}}  {text}" for name, text in rows]


def describe(cfg: Any, ctx: RunContext) -> str:
    """The ``--dry-run`` output: the resolved config (JSON) and the plan."""
    return "\n".join(["resolved config:", json.dumps(to_dict(cfg), indent=2, sort_keys=True), "",
                      "plan of the run (dry run: nothing was loaded):", *plan_lines(cfg, ctx)])


def _real_scale_plan(d) -> str:
    if d.schedule == "constant":
        return f"{d.real_scale_init:g} held for the whole run: the -Dynamic ablation"
    return f"{d.real_scale_init:g} -> 0 over {d.decay_steps} steps"
