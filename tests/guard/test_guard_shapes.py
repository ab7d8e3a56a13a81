"""The guard on the shapes world at CI size: it trips on ReFL alone and not on DMDR (issue 28, item 3).

The real code path end to end: ``benchmarks/guard_shapes.py`` at a small size, which trains
``recipes/shapes_dmdr.py`` with the committed teacher (``assets/shapes-teacher``) in fresh interpreters: a
cold start, then from its last checkpoint ReFL alone (``--dmd.weight 0``) and DMDR, each with
``--guard.action warn`` and otherwise the same flags (learning rates, reward weight, ``--train.seed``). What the
live guard did is read back from ``guard.jsonl`` and ``metrics.jsonl``; ShapeEval's fidelity, which the guard
never sees, checks that what tripped was hacking.

The size was measured over training seeds 0-3 before being fixed here (README, "Guard-rails"): ReFL alone
tripped at every seed, first at step 50, 50, 55, 50 (``critic_lag``: the student outruns its critic), then at 55-60
on ``clipped`` too (its black backgrounds take a haze); DMDR at none. At batch 4
or after a cold start of 20 steps DMDR itself drifts (its fidelity falls as ReFL's does), so there is no smaller
honest setting. About 175 s of CPU in all (cold start, two arms, two fidelity scores; one thread each).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow

COLD_START, RL_STEPS, INTERVAL = 40, 40, 5
SIZE = ["--data.batch_size", "8", "--data.rl_batch_size", "8"]
"""The recipe's learning rates, critic ratio and reward weight; batch 8 (the recipe: 16 for the cold start)."""
END = COLD_START + RL_STEPS


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("guard-shapes")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "guard_shapes.py"), "--out", str(out),
                           "--seeds", "0", "--arms", "refl", "dmdr", "--cold-start", str(COLD_START), "--rl-steps",
                           str(RL_STEPS), "--interval", str(INTERVAL), "--no-fidelity", "--", *SIZE],
                          capture_output=True, text=True, env=env, timeout=1500)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return out


def _events(run: Path) -> list[dict]:
    path = run / "guard.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def _probe_rows(run: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "guard/trips" in r]


def test_the_guard_trips_on_refl_alone(bench):
    run = bench / "seed-0" / "refl"
    rows, events = _probe_rows(run), _events(run)
    # the baseline at the first step after the cold start's checkpoint, then every INTERVAL steps
    assert [r["step"] for r in rows] == [COLD_START + 1, *range(COLD_START + INTERVAL, END + 1, INTERVAL)]
    assert events, "ReFL alone hacked the colour reward and the guard did not notice"
    assert all(e["action"] == "warn" for e in events)
    assert rows[-1]["guard/trips"] == sum(len(e["trips"]) for e in events)
    first = events[0]
    # Caught by the critic falling behind, with its evidence, at the first probe where its fidelity is clearly below
    # DMDR's (seeds 0-3: steps 50, 50, 55, 50; fidelity below DMDR's by > 0.005 from 50, 50, 55, 55):
    assert first["step"] <= COLD_START + 3 * INTERVAL, first
    assert "critic_lag" in first["trips"], first
    lag = first["evidence"]["critic_lag"]
    assert lag["probe/critic_loss"] > 1.25 * lag["baseline probe/critic_loss"]
    # ... and the haze itself (its black backgrounds take a tint) trips the clipped rule soon after.
    hazy = [e for e in events if "clipped" in e["trips"]]
    assert hazy and hazy[0]["step"] <= END - 2 * INTERVAL, events
    clipped = hazy[0]["evidence"]["clipped"]
    assert clipped["baseline probe/clipped"] - clipped["probe/clipped"] > 0.2


def test_the_guard_does_not_trip_on_dmdr(bench):
    run = bench / "seed-0" / "dmdr"
    rows = _probe_rows(run)
    assert len(rows) == RL_STEPS // INTERVAL + 1
    assert _events(run) == [] and rows[-1]["guard/trips"] == 0
    assert "train/dmd_grad" in rows[-1] and "probe/reward" in rows[-1]  # the DMD and reward signals were judged


def test_what_tripped_was_hacking(bench):
    """ShapeEval's fidelity (the guard never sees it) at the end: ReFL alone below DMDR."""
    from dmdr.worlds.shapes.ablations import score_checkpoint

    refl, dmdr = (score_checkpoint(bench / "seed-0" / arm, END, 16)["fidelity"] for arm in ("refl", "dmdr"))
    assert refl < dmdr - 0.01, (refl, dmdr)
