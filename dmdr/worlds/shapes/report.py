"""The demo's outputs: the comparison grid, ``results.json`` and ``report.md``.

A row of results is :func:`dmdr.worlds.shapes.evaluation.evaluate_model`'s dict plus ``model`` (its name)
and optionally ``note``. The report states, for each claim the demo tests, whether this run shows it:
the claim's ordering is computed from the numbers, never written by hand.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from dmdr.worlds.shapes.evaluation import seed_spread

KEYS = ("overall", "colour", "shape", "count", "position", "exact", "fidelity", "reward")


def save_grid(rows: list[tuple[str, Tensor]], path: str | Path, scale: int = 3) -> Path:
    """One PNG: a labelled row of images per model (same prompts and noise in every column)."""
    from PIL import Image, ImageDraw

    label_w, pad = 150, 2
    n = rows[0][1].shape[0]
    side = rows[0][1].shape[-1] * scale
    canvas = Image.new("RGB", (label_w + n * (side + pad), len(rows) * (side + pad)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for r, (name, images) in enumerate(rows):
        y = r * (side + pad)
        draw.text((4, y + side // 2 - 6), name, fill=(0, 0, 0))
        up = torch.nn.functional.interpolate(images.float().clamp(0, 1), scale_factor=scale, mode="nearest")
        for c in range(n):
            arr = (up[c].permute(1, 2, 0).numpy() * 255).round().astype("uint8")
            canvas.paste(Image.fromarray(arr), (label_w + c * (side + pad), y))
    path = Path(path)
    canvas.save(path)
    return path


def _mean(row: dict, key: str) -> float:
    return row["scores"][key]["mean"]


def claims(by_name: dict[str, dict], teacher_multi: str, teacher_few: str, dmd: str, dmdr: str,
           rl_only: str | None, init: str | None = None, margin: float = 0.05,
           reach: float = 0.03) -> list[tuple[str, bool, str]]:
    """The paper's orderings, checked on this run's numbers: ``(claim, holds, numbers)``.

    "Reaches the teacher" means within ``reach`` ShapeEval (issue 23's bar); "beats" means by more than the two
    rows' spreads over evaluation seeds combined (:func:`~dmdr.worlds.shapes.evaluation.seed_spread`), so that a
    gap inside the noise is not called a win.
    """
    out = []

    def add(text: str, holds: bool, numbers: str) -> None:
        out.append((text, bool(holds), numbers))

    se = {k: _mean(v, "overall") for k, v in by_name.items()}
    rw = {k: _mean(v, "reward") for k, v in by_name.items()}
    fid = {k: _mean(v, "fidelity") for k, v in by_name.items()}
    add(f"the few-step teacher is clearly worse than the multi-step CFG teacher (gap > {margin})",
        se[teacher_multi] - se[teacher_few] > margin, f"{se[teacher_few]:.3f} vs {se[teacher_multi]:.3f}")
    add(f"DMD few-step beats the few-step teacher by a clear margin (> {margin})",
        se[dmd] - se[teacher_few] > margin, f"{se[dmd]:.3f} vs {se[teacher_few]:.3f}")
    add(f"DMD few-step reaches the multi-step teacher (within {reach})",
        se[dmd] >= se[teacher_multi] - reach, f"{se[dmd]:.3f} vs {se[teacher_multi]:.3f}")
    add("DMDR beats DMD alone on the reward", rw[dmdr] > rw[dmd], f"{rw[dmdr]:.3f} vs {rw[dmd]:.3f}")
    for other, what in ((dmd, "DMD alone"), (teacher_multi, "the multi-step CFG teacher")):
        spread = seed_spread(by_name[dmdr], by_name[other])
        add(f"DMDR beats {what} on ShapeEval (by more than the seed spread)", se[dmdr] - se[other] > spread,
            f"{se[dmdr]:.3f} vs {se[other]:.3f}, spread {spread:.3f}")
    if rl_only is not None:
        base = init or dmd
        hacked = rw[rl_only] > rw[base] and (se[rl_only] < se[dmdr] or fid[rl_only] < fid[dmdr])
        add("ReFL alone hacks the reward: reward up from its start, ShapeEval or fidelity below DMDR's", hacked,
            f"reward {rw[base]:.3f} -> {rw[rl_only]:.3f}; ShapeEval {se[rl_only]:.3f} vs DMDR {se[dmdr]:.3f}; "
            f"fidelity {fid[rl_only]:.3f} vs DMDR {fid[dmdr]:.3f}")
    return out


def markdown_table(rows: list[dict]) -> str:
    lines = ["| model | nfe | " + " | ".join(KEYS) + " | wall_s |", "|---|---|" + "---|" * (len(KEYS) + 1)]
    for r in rows:
        cells = [f"{_mean(r, k):.3f} ± {r['scores'][k]['std']:.3f}" for k in KEYS]
        lines.append(f"| {r['model']} | {r['nfe']} | " + " | ".join(cells) + f" | {r['wall_s']:.1f} |")
    return "\n".join(lines)


def write_report(out: str | Path, rows: list[dict], checked: list[tuple[str, bool, str]], header: str) -> None:
    """``results.json`` (every number) and ``report.md`` (the table and the claims) in ``out``."""
    out = Path(out)
    (out / "results.json").write_text(json.dumps({"rows": rows, "claims": [
        {"claim": c, "holds": h, "numbers": n} for c, h, n in checked]}, indent=2) + "\n")
    lines = [header, "", markdown_table(rows), "", "## What this run shows", ""]
    lines += [f"- {'holds' if h else '**does not hold**'}: {c} ({n})" for c, h, n in checked]
    (out / "report.md").write_text("\n".join(lines) + "\n")


__all__ = ["KEYS", "save_grid", "claims", "markdown_table", "write_report"]
