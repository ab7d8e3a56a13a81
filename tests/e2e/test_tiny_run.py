"""The trainer end to end on the tiny SD3 pipeline: metrics, RL switch, checkpoints, exact resume, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dmdr.distributed.offline import model_tensors
from dmdr.launch import run
from tests.tiny_helpers import REPO, tiny_config

pytestmark = pytest.mark.slow

LOSS_KEYS = ("loss/dmd", "loss/fake", "loss/generator", "schedule/lora_scale_real", "schedule/dynars_mean")


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _trainable(out: Path, step: int) -> dict[str, torch.Tensor]:
    return model_tensors(out / "checkpoints" / f"step-{step}")


def _record_prompts(monkeypatch) -> list[list[str]]:
    """The prompts of every training iteration, in order (wraps the trainer's conditioning step)."""
    from dmdr.trainer import DMDRTrainer

    seen: list[list[str]] = []
    conditioning = DMDRTrainer._conditioning

    def record(self, batch):
        seen.append(list(batch["prompts"]))
        return conditioning(self, batch)

    monkeypatch.setattr(DMDRTrainer, "_conditioning", record)
    return seen


def test_run_writes_config_metrics_checkpoints_and_switches_on_rl(tiny_assets, tmp_path, monkeypatch):
    from dmdr.data import build_prompt_loader

    monkeypatch.setenv("DMDR_PEAK_TFLOPS", "100")  # what a known GPU provides: enables the MFU estimate
    cfg = tiny_config(tiny_assets, tmp_path / "run")
    assert (cfg.data.batch_size, cfg.data.rl_batch_size, cfg.dmd.ratio, cfg.rl.start_step) == (4, 2, 2, 4)
    seen = _record_prompts(monkeypatch)
    assert run(cfg) == 0
    # The RL stage takes 2 prompts per iteration instead of 4, from the same stream: none dropped or repeated.
    assert [len(p) for p in seen] == [4] * 8 + [2] * 8
    loader = build_prompt_loader(cfg.data, dp_rank=0, dp_world=1, seed=cfg.train.seed)
    stream = [p for _, batch in zip(range(24), loader) for p in batch["prompts"]]
    assert [p for batch in seen for p in batch] == stream[:48]
    out = tmp_path / "run"
    assert json.loads((out / "config.json").read_text())["model"]["path"] == tiny_assets["model"]
    records = _metrics(out)
    assert [r["step"] for r in records] == list(range(1, 9))
    for r in records:
        assert all(k in r and r[k] is not None for k in LOSS_KEYS)
    # DynaDG: s_r(k) = 0.5 * cos-decay over D = 4 steps, logged for k = step - 1
    assert records[0]["schedule/lora_scale_real"] == pytest.approx(0.5)
    assert records[2]["schedule/lora_scale_real"] == pytest.approx(0.25)
    assert records[4]["schedule/lora_scale_real"] == 0.0
    # RL from k >= 4 (logged step 5 on), with the RL-stage learning rates
    assert all("reward/brightness" not in r for r in records[:4])
    assert all("reward/brightness" in r and "reward/brightness_std" in r for r in records[4:])
    assert records[0]["lr/generator"] == 1e-4 and records[-1]["lr/generator"] == 5e-5
    for r in records[1:]:
        assert r["perf/tflops"] > 0 and r["perf/mfu"] == pytest.approx(r["perf/tflops"] / 100)
        assert r["perf/samples_per_s"] > 0 and r["perf/peak_memory_gb"] > 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step-4", "step-8"]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-8"


def test_resume_equals_uninterrupted(tiny_assets, tmp_path):
    straight = tmp_path / "straight"
    assert run(tiny_config(tiny_assets, straight)) == 0
    split = tmp_path / "split"
    assert run(tiny_config(tiny_assets, split, train__max_steps=4)) == 0
    assert run(tiny_config(tiny_assets, split)) == 0  # same output_dir: resumes from step-4
    a, b = _metrics(straight), _metrics(split)
    assert [r["step"] for r in b] == list(range(1, 9))
    for ra, rb in zip(a[4:], b[4:]):
        for key in (*LOSS_KEYS, "reward/brightness", "grad_norm/generator", "schedule/guidance"):
            assert ra[key] == rb[key], (ra["step"], key)
    wa, wb = _trainable(straight, 8), _trainable(split, 8)
    assert wa.keys() == wb.keys() and len(wa) > 0
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def _launch(argv: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ""}
    return subprocess.run([sys.executable, str(REPO / "recipes" / "tiny_dmdr.py"), *argv], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.parametrize("argv,needle", [
    (["--optim.lr", "1e-5"], "unknown config key --optim.lr; did you mean --optim.generator_lr"),
    (["--model.path", "/nonexistent/model"], "/nonexistent/model"),
    (["--data.sources", "/nonexistent/prompts-*.jsonl"], "/nonexistent/prompts-*.jsonl"),
    (["--train.output_dir", "/proc/forbidden"], "--train.output_dir '/proc/forbidden': is not writable"),
    (["--model.attention", "flash"], 'flash-attn runs only on GPUs and this run is on cpu; use --model.attention '
                                     'native (or auto), or on a CUDA machine install it with pip install -e ".[gpu]"'),
])
def test_bad_input_one_line_before_training(argv, needle, tmp_path, tiny_assets):
    base = ["--model.path", tiny_assets["model"], "--data.sources", tiny_assets["prompts"],
            "--train.output_dir", str(tmp_path / "out")]
    proc = _launch(base + argv, tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_non_finite_steps_are_skipped_then_stop_with_checkpoint_intact(tiny_assets, tmp_path, monkeypatch):
    import dmdr.engine
    import dmdr.trainer as trainer_mod
    from dmdr.launch import main, run

    real = dmdr.engine.dmd_generator_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        terms = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] in (3, 5, 6, 7):  # one isolated bad step, then a run of three
            terms.loss = terms.loss * float("nan")
        return terms

    monkeypatch.setattr(dmdr.engine, "dmd_generator_loss", poisoned)
    out = tmp_path / "run"
    cfg = tiny_config(tiny_assets, out, train__max_bad_steps=3, checkpoint__interval=2, rl__start_step=100)

    with pytest.raises(trainer_mod.TrainingDiverged, match="3 consecutive non-finite generator steps"):
        run(cfg)
    records = _metrics(out)
    assert records[2]["train/skipped_steps"] == 1 and records[3]["train/skipped_steps"] == 1
    # steps 5 and 6 were skipped (checkpointed at 6), step 7 was the third in a row: stop
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-6"
    at4, at6 = _trainable(out, 4), _trainable(out, 6)
    generator_keys = [k for k in at6 if k.endswith(".generator")]
    assert generator_keys and all(torch.equal(at4[k], at6[k]) for k in generator_keys)
    assert all(torch.isfinite(t).all() for t in at6.values())
    # through the launcher: one line, exit 3, the checkpoint still there
    calls["n"] = 0
    assert main(lambda: tiny_config(tiny_assets, tmp_path / "again", train__max_bad_steps=3,
                                    checkpoint__interval=2, rl__start_step=100), argv=[]) == 3


def test_activation_checkpointing_changes_nothing_in_lora_mode(tiny_assets, tmp_path):
    """LoRA mode shares one network between generator and teacher: AC's recompute must see the scales of
    its own forward. Same run with and without activation checkpointing: same losses, same weights."""
    for ac in ("none", "full"):
        assert run(tiny_config(tiny_assets, tmp_path / ac, parallel__activation_checkpointing=ac,
                               train__max_steps=4)) == 0
    a, b = _metrics(tmp_path / "none"), _metrics(tmp_path / "full")
    for ra, rb in zip(a, b):
        for key in LOSS_KEYS:
            assert ra[key] == pytest.approx(rb[key], rel=1e-5, abs=1e-7), (ra["step"], key)
    wa, wb = _trainable(tmp_path / "none", 4), _trainable(tmp_path / "full", 4)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)


def test_dmd_weight_zero_trains_the_rl_loss_alone(tiny_assets, tmp_path, monkeypatch):
    import dmdr.engine

    def no_score_passes(*args, **kwargs):
        raise AssertionError("dmd.weight 0 must not run the DMD score passes")

    monkeypatch.setattr(dmdr.engine, "dmd_generator_loss", no_score_passes)
    cfg = tiny_config(tiny_assets, tmp_path / "run", dmd__weight=0, rl__start_step=0, train__max_steps=2)
    assert run(cfg) == 0
    records = _metrics(tmp_path / "run")
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        assert "loss/dmd" not in r and "schedule/guidance" not in r
        assert r["loss/generator"] == pytest.approx(r["loss/rl"]) and "reward/brightness" in r
