"""A plan as a text table and as JSON (the same numbers)."""

from __future__ import annotations

from typing import Any

from dmdr.gpus import GiB
from dmdr.planning.advise import Advice
from dmdr.planning.planner import RESERVE_BYTES, RESERVE_FRACTION, Plan


def _gib(x: float) -> str:
    return f"{x / GiB:.2f}"


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def to_json(p: Plan, advice: Advice | None = None, largest: dict[str, list[int]] | None = None) -> dict[str, Any]:
    """Everything in the table, bytes and FLOPs as numbers."""
    out: dict[str, Any] = {
        "recipe": p.recipe, "model": p.model, "gpu": p.gpu_key, "gpu_name": p.gpu.name,
        "gpu_memory_bytes": p.gpu.memory_bytes, "usable_bytes": p.usable, "peak_bf16_tflops": p.gpu.bf16_tflops,
        "world_size": p.layout.world, "dp_replicate": p.layout.dp_replicate, "dp_shard": p.layout.dp_shard,
        "mfu": p.mfu, "fits": p.fits,
        "stages": [],
        "run_seconds": p.run_seconds,
    }
    for i, s in enumerate(p.stages):
        out["stages"].append({
            "stage": s.stage, "batch_per_gpu": s.batch, "micro_batch_per_gpu": s.micro_batch or s.batch,
            "generator_steps": p.steps[i],
            "memory_bytes": dict(s.items), "activation_bytes": dict(s.activations),
            "peak_bytes": s.peak, "fits": s.peak <= p.usable,
            "flops_per_generator_step": dict(p.flops[i].parts), "flops_total": p.flops[i].total,
            "seconds_per_generator_step": p.step_seconds(i),
        })
    if advice is not None:
        out["advice"] = {"fits": advice.fits, "overrides": dict(advice.overrides), "notes": advice.notes}
    if largest is not None:
        out["largest_batch"] = largest
    return out


def to_table(p: Plan, advice: Advice | None = None, largest: dict[str, list[int]] | None = None) -> str:
    """The plan for a terminal: one column per stage, GiB per GPU."""
    lay = p.layout
    lines = [f"plan: {p.recipe or '-'} | model {p.model} | {lay.world} x {p.gpu.name} "
             f"(dp_replicate {lay.dp_replicate} x dp_shard {lay.dp_shard}) | MFU {p.mfu:.2f} (stated, not measured)"]
    names = [f"{s.stage} (bs {s.batch}" + (f" = {s.batch // s.micro_batch} x {s.micro_batch})"
                                         if s.micro_batch and s.micro_batch < s.batch else ")") for s in p.stages]
    rows: list[tuple[str, list[str]]] = []
    keys = list(dict.fromkeys(k for s in p.stages for k in s.items))
    for k in keys:
        rows.append((k, [_gib(s.items.get(k, 0)) for s in p.stages]))
    akeys = list(dict.fromkeys(k for s in p.stages for k in s.activations))
    for k in akeys:
        rows.append((f"activations: {k}", [_gib(s.activations[k]) if k in s.activations else "-" for s in p.stages]))
    rows.append(("peak per GPU", [_gib(s.peak) for s in p.stages]))
    rows.append((f"usable of {p.gpu.memory_gib:.1f} GiB", [_gib(p.usable)] * len(p.stages)))
    rows.append(("fits", ["yes" if s.peak <= p.usable else "NO" for s in p.stages]))
    for k in dict.fromkeys(k for f in p.flops for k in f.parts):
        rows.append((f"TFLOP/GPU: {k}", [f"{f.parts[k] / 1e12:.1f}" if k in f.parts else "-" for f in p.flops]))
    rows.append(("TFLOP/GPU per generator step", [f"{f.total / 1e12:.1f}" for f in p.flops]))
    rows.append(("s per generator step", [f"{p.step_seconds(i):.2f}" for i in range(len(p.stages))]))
    rows.append(("generator steps", [str(n) for n in p.steps]))
    rows.append(("stage time", [_hours(n * p.step_seconds(i)) for i, n in enumerate(p.steps)]))
    width = max(len(r[0]) for r in rows) + 2
    col = max(12, *(len(n) + 2 for n in names))
    lines.append("".ljust(width) + "".join(n.rjust(col) for n in names) + "   (GiB per GPU unless noted)")
    for label, values in rows:
        lines.append(label.ljust(width) + "".join(v.rjust(col) for v in values))
    lines.append(f"run: {_hours(p.run_seconds)} for {sum(p.steps)} generator steps "
                 f"(usable = memory x {1 - RESERVE_FRACTION:.2f} - {RESERVE_BYTES / GiB:.0f} GiB)")
    if largest:
        for ac, batches in largest.items():
            lines.append(f"largest (micro-)batch per GPU that fits, AC {ac}: "
                         + ", ".join(f"{s.stage} {b}" for s, b in zip(p.stages, batches)))
    if advice is not None:
        if p.fits:
            lines.append("verdict: fits")
        elif advice.fits:
            lines.append(f"verdict: does NOT fit; cheapest fix: {advice.flags()}")
            lines += [f"  cost: {n}" for n in advice.notes]
        else:
            lines.append("verdict: does NOT fit; " + "; ".join(advice.notes))
    return "\n".join(lines)
