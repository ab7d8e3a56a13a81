"""The cheapest settings that make a plan fit, and the largest batch that fits.

Changes are tried in the order of what they cost the run (throughput first, the algorithm last):
shard the text encoders, use the text-embedding cache, stronger activation checkpointing, a larger
shard group, gradient accumulation (``train.grad_accum K``: the same update from K micro-batches, each forward
and backward at 1/K of the activations; no extra FLOPs, only the matmuls get smaller), offload the teacher to the
host, and only if even a micro-batch of one does not fit a smaller batch (which changes the recipe's training
signal). The first single change that fits is the advice; if none does, they are accumulated in that order until
the plan fits. The project offers no 8-bit optimizer and no reward model sharding or offload (reward models load
whole in fp32), so neither is proposed.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

from dmdr.config import TrainConfig, set_value, validate
from dmdr.errors import ConfigError
from dmdr.planning.planner import FrozenCosts, Plan, plan
from dmdr.planning.specs import ModelSpec

CACHE_PLACEHOLDER = "<folder written by tools/cache_text_embeddings.py>"
MAX_BATCH = 256


@dataclass(frozen=True)
class Change:
    """One candidate change: overrides and why it costs what it costs."""

    overrides: tuple[tuple[str, str], ...]
    cost: str

    def flags(self) -> str:
        return " ".join(f"--{k} {v}" for k, v in self.overrides)


def with_overrides(cfg: TrainConfig, overrides: tuple[tuple[str, str], ...]) -> TrainConfig:
    out = copy.deepcopy(cfg)
    for key, value in overrides:
        set_value(out, key, value)
    validate(out)
    return out


def candidates(cfg: TrainConfig, world: int) -> list[Change]:
    """The changes that apply to ``cfg``, cheapest first."""
    p = cfg.parallel
    out = []
    uses_encoders = not (cfg.data.embedding_cache and cfg.data.cache_miss != "encode")
    if uses_encoders and p.frozen_encoders == "replicate" and world > 1:
        out.append(Change((("parallel.frozen_encoders", "shard"),), "text encoders run in lockstep over the shards"))
    if uses_encoders:
        out.append(Change((("data.embedding_cache", CACHE_PLACEHOLDER),),
                          "one pass of tools/cache_text_embeddings.py before the run; no encoders on the GPUs"))
    if p.activation_checkpointing == "none":
        out.append(Change((("parallel.activation_checkpointing", "every_k"), ("parallel.ac_every", "2")),
                          "recomputes half the blocks' forwards"))
    if p.activation_checkpointing != "full":
        out.append(Change((("parallel.activation_checkpointing", "full"),), "recomputes every block's forward"))
    if p.dp_replicate > 1:
        out.append(Change((("parallel.dp_replicate", "1"), ("parallel.dp_shard", str(world))),
                          "shards over all GPUs: all-gathers cross nodes"))
    if not p.cpu_offload_teacher:
        out.append(Change((("parallel.cpu_offload_teacher", "true"),),
                          "teacher shards stream from host memory every pass (slow)"))
    return out


def _plan_with(cfg: TrainConfig, spec: ModelSpec, base: Plan, frozen: FrozenCosts,
               overrides: tuple[tuple[str, str], ...]) -> Plan:
    return plan(with_overrides(cfg, overrides), spec, base.gpu_key, base.gpu, base.layout.world, base.recipe,
                base.mfu, frozen)


@dataclass
class Advice:
    fits: bool
    overrides: tuple[tuple[str, str], ...]
    notes: list[str]
    plan: Plan | None

    def flags(self) -> str:
        return " ".join(f"--{k} {v}" for k, v in self.overrides)


def advise(cfg: TrainConfig, spec: ModelSpec, base: Plan, frozen: FrozenCosts) -> Advice:
    """The cheapest overrides that make ``base`` fit (empty when it fits already)."""
    if base.fits:
        return Advice(True, (), [], base)
    changes = candidates(cfg, base.layout.world)
    for change in changes:
        p = _plan_with(cfg, spec, base, frozen, change.overrides)
        if p.fits:
            return Advice(True, change.overrides, [change.cost], p)
    acc: tuple[tuple[str, str], ...] = ()
    notes: list[str] = []
    p = base
    for change in changes:
        # Accumulation costs no FLOPs: it comes before streaming the teacher from the host.
        if "parallel.cpu_offload_teacher" in dict(change.overrides):
            if (fit := _with_accumulation(cfg, spec, base, frozen, acc, notes)) is not None:
                return fit
        acc = _merge(acc, change.overrides)
        notes.append(change.cost)
        p = _plan_with(cfg, spec, base, frozen, acc)
        if p.fits:
            return Advice(True, acc, notes, p)
    if (fit := _with_accumulation(cfg, spec, base, frozen, acc, notes)) is not None:
        return fit
    batches = largest_batches(with_overrides(cfg, acc), spec, base, frozen)
    if all(b >= 1 for b in batches):
        acc = _merge(acc, (("data.batch_size", str(batches[0])),) +
                     ((("data.rl_batch_size", str(batches[1])),) if len(batches) > 1 else ()))
        notes.append("a smaller per-GPU batch changes the recipe's training signal (raise the GPU count instead)")
        return Advice(True, acc, notes, _plan_with(cfg, spec, base, frozen, acc))
    notes.append("does not fit at batch 1 with every setting the project offers: add GPUs or use a larger GPU")
    return Advice(False, acc, notes, p)


def _with_accumulation(cfg: TrainConfig, spec: ModelSpec, base: Plan, frozen: FrozenCosts,
                       acc: tuple[tuple[str, str], ...], notes: list[str]) -> Advice | None:
    """``acc`` plus the smallest ``train.grad_accum`` that makes the plan fit, or None."""
    accum = accumulation_that_fits(cfg, largest_batches(with_overrides(cfg, acc), spec, base, frozen))
    if accum <= max(1, cfg.train.grad_accum):
        return None
    with_accum = _merge(acc, (("train.grad_accum", str(accum)),))
    p = _plan_with(cfg, spec, base, frozen, with_accum)
    if not p.fits:
        return None
    return Advice(True, with_accum, [*notes, f"{accum} micro-batches per step keep the recipe's batch and its update "
                                              f"(each forward and backward runs 1/{accum} of it; no extra FLOPs, "
                                              "smaller matmuls)"], p)


def accumulation_that_fits(cfg: TrainConfig, micro_fits: list[int]) -> int:
    """The smallest ``train.grad_accum`` whose micro-batches fit (``micro_fits``: the largest per stage) and
    divide every stage's batch, GRPO's groups whole in a micro-batch; 0 if none."""
    batches = [cfg.data.batch_size] + ([cfg.data.rl_batch_size or cfg.data.batch_size] if len(micro_fits) > 1 else [])
    for k in range(1, max(batches) + 1):
        if any(b % k for b in batches):
            continue
        if cfg.rl.method == "grpo" and (batches[-1] // k) % (cfg.rl.grpo_group_size or 2):
            continue
        if all(b // k <= fit for b, fit in zip(batches, micro_fits)):
            return k
    return 0


def _merge(a: tuple[tuple[str, str], ...], b: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    out = dict(a)
    out.update(dict(b))
    return tuple(out.items())


def _largest(fits: Callable[[int], bool]) -> int:
    """The largest ``b`` in ``[1, MAX_BATCH]`` with ``fits(b)`` (memory grows with the batch), 0 if none."""
    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= MAX_BATCH and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, MAX_BATCH + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def largest_batches(cfg: TrainConfig, spec: ModelSpec, base: Plan, frozen: FrozenCosts) -> list[int]:
    """The largest per-GPU batch that fits without accumulation, per stage (cold start, RL): with
    ``train.grad_accum K`` the largest micro-batch."""
    cfg = with_overrides(cfg, (("train.grad_accum", "1"),))

    def stage_fits(stage: int, key: str) -> Callable[[int], bool]:
        def fits(b: int) -> bool:
            try:
                p = _plan_with(cfg, spec, base, frozen, ((key, str(b)),))
            except ConfigError:
                return False
            return p.stages[stage].peak <= p.usable
        return fits

    out = [_largest(stage_fits(0, "data.batch_size"))]
    if len(base.stages) > 1:
        out.append(_largest(stage_fits(1, "data.rl_batch_size")))
    return out
