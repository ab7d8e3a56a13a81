"""The run planner: will a recipe fit on a cluster, how long will it take, and what to change.

Answers come from the real model definitions and the project's own sharding, not a spreadsheet:

* :mod:`~dmdr.planning.specs`: every network of a run built on the meta device from its config files
  (shipped under ``configs/``, or the user's folder), LoRA injected by the trainer's ``build_roles``;
* :mod:`~dmdr.planning.memory`: per-GPU bytes of parameters, gradients, AdamW state, frozen networks and
  FSDP2 buffers, following ``fully_shard`` per block then root; activations per stage;
* :mod:`~dmdr.planning.activations`, :mod:`~dmdr.planning.flops`: what autograd saves and what the
  matmuls cost, per block from the architecture (grounded against the tiny models in tests/planning);
* :mod:`~dmdr.planning.planner`: one generator step (``dmd.ratio`` iterations) in FLOPs and seconds at a
  stated MFU, per stage (cold start, RL) and for the run (the GPU table: :mod:`dmdr.gpus`);
* :mod:`~dmdr.planning.advise`: the cheapest overrides that make it fit; :mod:`~dmdr.planning.report`.

CLI: ``tools/plan.py``. Extension point for a new family (SDXL is being added): its configs under
``configs/``, a block activation model (:mod:`~dmdr.planning.activations`) and a FLOP model
(:mod:`~dmdr.planning.flops`), named by the :class:`~dmdr.models.family.PlannerHooks` of its family spec.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from dmdr.config import TrainConfig
from dmdr.gpus import GPU
from dmdr.planning.advise import Advice, advise, largest_batches, with_overrides
from dmdr.planning.planner import DEFAULT_MFU, FrozenCosts, Plan, frozen_costs, plan
from dmdr.planning.specs import ModelSpec, build_model_spec


@dataclass
class PlanResult:
    plan: Plan
    advice: Advice
    spec: ModelSpec
    frozen: FrozenCosts


Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


def make_plan(cfg: TrainConfig, gpu_key: str, gpu: GPU, world: int, recipe: str = "", model: str = "",
              mfu: float = DEFAULT_MFU, progress: Progress = _quiet) -> PlanResult:
    """Build the model spec of ``cfg``, plan it on ``world`` GPUs and advise; ``progress(line)`` hears each phase
    (building the models on the meta device and costing the frozen ones take most of the time)."""
    progress("building the model specs on the meta device (teacher, text encoders, VAE, reward models)")
    spec = build_model_spec(cfg, recipe, model)
    progress("costing the frozen networks' activations (VAE decoder, reward models)")
    frozen = frozen_costs(spec, cfg)
    progress("planning memory and FLOPs per stage")
    p = plan(cfg, spec, gpu_key, gpu, world, recipe, mfu, frozen)
    if not p.fits:
        progress("does not fit: searching the cheapest change that does")
    return PlanResult(p, advise(cfg, spec, p, frozen), spec, frozen)


def largest_batch_table(cfg: TrainConfig, result: PlanResult, progress: Progress = _quiet) -> dict[str, list[int]]:
    """The largest per-GPU batch that fits per stage, for each activation-checkpointing policy."""
    out = {}
    for ac in ("none", "every_k", "full"):
        progress(f"largest batch with activation checkpointing {ac}")
        c = with_overrides(cfg, (("parallel.activation_checkpointing", ac),))
        out[ac] = largest_batches(c, result.spec, result.plan, result.frozen)
    return out


__all__ = ["PlanResult", "make_plan", "largest_batch_table", "build_model_spec", "plan", "advise"]
