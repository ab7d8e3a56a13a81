"""``make demo``'s code path end to end at CI size: torchrun W=2 training stages, exports, evaluation, report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def test_quick_demo_trains_exports_evaluates_and_reports(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(REPO / "tools" / "demo.py"), "--out", str(out), "--quick"],
                          capture_output=True, text=True, env=env, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for stage in ("1/5 cold start", "2/5 (1/3) DMDR", "2/5 (2/3) DMD only", "2/5 (3/3) ReFL only", "3/5 export",
                  "4/5 evaluation", "5/5 report"):
        assert stage in done.stdout
    results = json.loads((out / "results.json").read_text())
    names = [r["model"] for r in results["rows"]]
    assert len(names) == 6 and names[0].startswith("teacher 25-step CFG") and names[4].startswith("DMDR")
    for row in results["rows"]:
        assert set(row["scores"]) >= {"overall", "colour", "shape", "count", "position", "fidelity", "reward"}
        assert row["nfe"] >= 1 and row["wall_s"] > 0 and len(row["per_seed"]) == 1
    assert len(results["claims"]) == 7 and all(isinstance(c["holds"], bool) for c in results["claims"])
    assert "## What this run shows" in (out / "report.md").read_text()
    assert (out / "grid.png").stat().st_size > 0
    # the branches started from the cold start's checkpoint and trained on; DMD-only never turned RL on
    dmdr = [json.loads(x) for x in (out / "dmdr" / "metrics.jsonl").read_text().splitlines()]
    dmd = [json.loads(x) for x in (out / "dmd" / "metrics.jsonl").read_text().splitlines()]
    refl = [json.loads(x) for x in (out / "refl" / "metrics.jsonl").read_text().splitlines()]
    assert dmdr[0]["step"] == 3 and "reward/shapes" in dmdr[-1] and "loss/dmd" in dmdr[-1]
    assert "reward/shapes" not in dmd[-1] and "loss/dmd" in dmd[-1]
    assert "reward/shapes" in refl[-1] and "loss/dmd" not in refl[-1]
    # the exported student loads in the stock pipeline
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(out / "export", local_files_only=True)
    assert type(pipe).__name__ == "StableDiffusion3Pipeline"
