"""The guard's actions on the tiny recipe: a rollback restores the last passing probe's checkpoint with the
learning rates halved; a run SIGKILLed at any point of a rollback (before it, between its steps, in the middle of
re-saving its target, after it) resumes to exactly the uninterrupted run's weights and losses; ``stop``
checkpoints and exits 4 with one line; ``guard/trips`` and the probe signals are logged, the probe grid written
to samples/ and TensorBoard. The trip is injected (which rules trip is tested in tests/guard)."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dmdr.distributed.offline import model_tensors
from tests.e2e.guard_helpers import guard_config, install_trip_once

pytestmark = pytest.mark.slow

CHILD = "tests.e2e.guard_kill_child"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def trip_once(monkeypatch):
    return install_trip_once(monkeypatch)


def _rows(out: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len({r["step"] for r in rows}) == len(rows), "duplicate steps in metrics.jsonl"
    return {r["step"]: r for r in rows}


def _same_weights(a: Path, b: Path) -> None:
    wa, wb = model_tensors(a / "checkpoints" / "step-8"), model_tensors(b / "checkpoints" / "step-8")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


@pytest.fixture(scope="module")
def uninterrupted(tiny_assets, tmp_path_factory):
    from dmdr.launch import run

    out = tmp_path_factory.mktemp("guard") / "straight"
    cfg = guard_config(tiny_assets, out, log__tensorboard="true")
    base_lr = cfg.optim.rl_generator_lr
    with pytest.MonkeyPatch.context() as mp:
        install_trip_once(mp)
        assert run(cfg) == 0
    return out, base_lr


def test_rollback_restores_the_passing_probe_halves_the_lr_and_logs_the_evidence(uninterrupted):
    out, base_lr = uninterrupted
    rows = _rows(out)
    assert sorted(rows) == list(range(1, 9))
    events = [json.loads(line) for line in (out / "guard.jsonl").read_text().splitlines()]
    assert [(e["step"], e["action"], e["trips"]) for e in events] == [(4, "rollback", ["saturation"])]
    assert rows[2]["guard/trips"] == 0 and rows[8]["guard/trips"] == 1 and rows[8]["guard/rollbacks"] == 1
    assert rows[3]["lr/generator"] == pytest.approx(base_lr / 2)  # the first RL step, after the rollback
    for key in ("probe/saturation", "probe/colourfulness", "probe/clipped", "probe/diversity",
                "probe/diversity_latent", "probe/reward", "probe/critic_teacher_ratio", "probe/reward_gap",
                "train/dmd_grad"):
        assert key in rows[4], key
    aside = [json.loads(line) for line in (out / "metrics-rolled-back-1.jsonl").read_text().splitlines()]
    assert [r["step"] for r in aside] == [3, 4] and aside[0]["lr/generator"] == pytest.approx(base_lr)
    assert sorted(p.name for p in (out / "samples").glob("probe-*.png")) == [
        f"probe-{k:07d}.png" for k in (2, 4, 6, 8)]


def test_the_probe_grid_is_in_tensorboard_prompts_across_seeds_down(tiny_assets, uninterrupted):
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator

    out, _ = uninterrupted
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={IMAGES: 0})
    acc.Reload()
    events = {e.step: e for e in acc.Images("probe")}  # the last one of a step (4: after the rollback)
    assert sorted(events) == [2, 4, 6, 8]
    png = np.asarray(Image.open(out / "samples" / "probe-0000004.png").convert("RGB"), dtype=np.int16)
    tb = np.asarray(Image.open(io.BytesIO(events[4].encoded_image_string)).convert("RGB"), dtype=np.int16)
    # make_grid's layout, 2 px padding: the prompts side by side, one row per seed (guard.seeds 2)
    prompts = len(guard_config(tiny_assets, out).log.sample_prompts)  # the probe's prompts
    side = (png.shape[1] - 2) // prompts - 2
    assert png.shape == (2 * (side + 2) + 2, prompts * (side + 2) + 2, 3) and side > 0
    assert tb.shape == png.shape and np.abs(tb - png).max() <= 1  # the same grid (8-bit rounding apart)


POINTS = {"tripped": 3, "discarded": 2, "loaded": 2, "swapped": 2, "after": 2}
"""Where the child kills itself in the rollback at step 4, and the checkpoint step the relaunch resumes from."""


@pytest.mark.parametrize("point", list(POINTS))
def test_a_run_sigkilled_during_or_after_a_rollback_resumes_exactly(tiny_assets, trip_once, uninterrupted, tmp_path,
                                                                     caplog, point):
    from dmdr.launch import run

    straight, _ = uninterrupted
    out = tmp_path / point
    child = subprocess.run([sys.executable, "-m", CHILD, json.dumps(tiny_assets), str(out), point,
                            str(torch.get_num_threads())], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert child.returncode == -9, child.stderr[-3000:]  # SIGKILL, at the point
    with caplog.at_level(logging.INFO, logger="dmdr"):
        assert run(guard_config(tiny_assets, out)) == 0
    assert f"resumed from generator step {POINTS[point]}" in caplog.text
    assert ("previous copy is restored" in caplog.text) == (point == "swapped")
    _same_weights(straight, out)
    a, b = _rows(straight), _rows(out)
    assert sorted(b) == list(range(1, 9))
    for step in range(1, 9):
        assert a[step]["loss/generator"] == b[step]["loss/generator"], step
        assert a[step].get("guard/rollbacks") == b[step].get("guard/rollbacks"), step
    aside = [json.loads(line)["step"] for line in (out / "metrics-rolled-back-1.jsonl").read_text().splitlines()]
    assert aside == [3, 4]
    events = [json.loads(line)["action"] for line in (out / "guard.jsonl").read_text().splitlines()]
    assert events == (["rollback"] if point == "after" else ["rollback", "rollback"])  # the others replay the trip
    assert not list((out / "checkpoints").glob(".*"))  # no temp, trash or replaced copy left behind


def test_stop_checkpoints_and_exits_4_with_one_line(tiny_assets, trip_once, tmp_path, capsys):
    from dmdr.launch import main

    out = tmp_path / "stop"
    cfg = guard_config(tiny_assets, out, guard__action="stop")
    assert main(lambda: cfg, []) == 4
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "the guard stopped the run at generator step 4: saturation: injected" in err[0]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-4"
