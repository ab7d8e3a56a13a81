"""The evaluation's outputs: one markdown table, one JSON file, one grid PNG (rows = prompts, columns = models)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from dmdr.evaluation.runner import ModelResult
from dmdr.evaluation.stats import summarize

TABLE_FILE = "results.md"
JSON_FILE = "results.json"
GRID_FILE = "grid.png"


def _fmt(x: float) -> str:
    return "nan" if math.isnan(x) else f"{x:.4g}" if abs(x) >= 1e-3 or x == 0 else f"{x:.3e}"


def summaries(results: list[ModelResult]) -> list[dict[str, Any]]:
    """Per model: its settings, NFE, images/s and each metric's :func:`~dmdr.evaluation.stats.summarize`."""
    return [{"name": r.name, "path": r.path, "kind": r.kind, "nfe": r.nfe, "steps": r.steps, "guidance": r.guidance,
             "resolution": r.resolution, "images": r.images, "seconds": r.seconds, "images_per_s": r.images_per_s,
             "metrics": {name: summarize(values) for name, values in r.scores.items()}} for r in results]


def markdown_table(rows: list[dict[str, Any]], metric_names: list[str]) -> str:
    """``| model | NFE | images/s | <metric> ... |`` with ``mean ± std [95% CI]`` cells."""
    head = ["model", "NFE", "images/s", *metric_names]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["name"], str(row["nfe"]), _fmt(row["images_per_s"])]
        for name in metric_names:
            m = row["metrics"].get(name)
            cells.append("-" if m is None else
                         f"{_fmt(m['mean'])} ± {_fmt(m['std'])} [{_fmt(m['ci95'][0])}, {_fmt(m['ci95'][1])}]")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_grid(results: list[ModelResult], path: Path) -> Path:
    """Rows = the first prompts (first seed), columns = models; images resized to the largest side."""
    import torch.nn.functional as F
    from torchvision.utils import make_grid, save_image

    side = max(img.shape[-1] for r in results for img in r.grid)
    rows = min(len(r.grid) for r in results)
    tiles = []
    for i in range(rows):
        for r in results:
            img = r.grid[i][None]
            if img.shape[-1] != side or img.shape[-2] != side:
                img = F.interpolate(img, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
            tiles.append(img[0].clamp(0, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(make_grid(torch.stack(tiles), nrow=len(results), padding=2), path)
    return path


def write_report(results: list[ModelResult], out: Path, *, prompts: list[str], seeds: list[int],
                 metric_names: list[str], skipped: dict[str, str], settings: dict[str, Any]) -> dict[str, Path]:
    """Write :data:`TABLE_FILE`, :data:`JSON_FILE` (with every per-image score) and :data:`GRID_FILE` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    rows = summaries(results)
    table = markdown_table(rows, metric_names)
    notes = "".join(f"\n- `{name}` skipped: {note}" for name, note in skipped.items())
    (out / TABLE_FILE).write_text(table + (f"\n{notes.strip()}\n" if notes else ""))
    for row, r in zip(rows, results):
        row["scores"] = r.scores
    data = {"prompts": len(prompts), "seeds": seeds, "metrics": metric_names, "skipped": skipped,
            "settings": settings, "models": rows, "prompt_list": prompts}
    (out / JSON_FILE).write_text(json.dumps(data, indent=2) + "\n")
    paths = {"table": out / TABLE_FILE, "json": out / JSON_FILE}
    if all(r.grid for r in results):
        paths["grid"] = write_grid(results, out / GRID_FILE)
    return paths


__all__ = ["markdown_table", "summaries", "write_grid", "write_report", "TABLE_FILE", "JSON_FILE", "GRID_FILE"]
