"""A checkpoint written by dmdr before the step engine (issue 25) resumes after it and takes the same next steps.

``fixtures/pre-engine-run/`` holds step-3 of a tiny SD3 LoRA run (DPO from generator step 2, generator EMA on), as
the trainer of commit 8bd863c wrote it, and ``expected.json`` what that code did next: the metrics of generator
steps 4 and 5 after resuming, and float64 sums of every trainable tensor and EMA / DPO-reference tensor of the
step-5 checkpoint. The tiny teacher is rebuilt from its seed (the checkpoint's teacher fingerprint must match). The
prompt file is not where it was when the fixture was written, so the data order resumes through the seeded
``data.on_layout_change=reshuffle`` path (the layout holds the shard paths), exactly as it did at fixture time.

Regenerate only on purpose (a deliberate change of the numbers): ``python -m tests.e2e.fixtures.make_pre_engine_run``
with the code whose behaviour is the reference, then say so in the commit.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from dmdr.distributed.offline import flatten, read_checkpoint
from dmdr.launch import run
from tests.tiny_helpers import tiny_config

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

FIXTURE = Path(__file__).parent / "fixtures" / "pre-engine-run"
SAVED_STEP, RESUMED_STEPS = 3, 5
OVERRIDES = {"dmd__ratio": 2, "rl__method": "dpo", "rl__dpo_k": 2, "rl__start_step": 2, "dynamic__decay_steps": 4,
             "optim__ema_decay": 0.9, "checkpoint__interval": SAVED_STEP, "log__interval": 1,
             "model__generator_lora_rank": 2, "model__generator_lora_alpha": 4.0,
             "model__critic_lora_rank": 2, "model__critic_lora_alpha": 2.0}
METRIC_KEYS = ("loss/dmd", "loss/fake", "loss/generator", "loss/rl", "grad_norm/generator", "grad_norm/critic",
               "schedule/lora_scale_real", "schedule/guidance", "lr/generator", "reward/brightness")
TENSOR_PREFIXES = ("models.model.", "trainer.ema.", "trainer.rl_reference.")


def tensor_sums(checkpoint: Path) -> dict[str, list[float]]:
    """Every trained tensor of ``checkpoint`` (LoRA weights, EMA, DPO reference) as float64 (sum, sum of squares)."""
    flat = flatten(read_checkpoint(checkpoint))
    return {k: [v.double().sum().item(), v.double().square().sum().item()] for k, v in sorted(flat.items())
            if k.startswith(TENSOR_PREFIXES) and isinstance(v, torch.Tensor) and v.is_floating_point()}


def resume(assets: dict[str, str], out: Path) -> list[dict]:
    """Copy the fixture's checkpoints into ``out`` and train on to ``RESUMED_STEPS``; the resumed steps' metrics."""
    shutil.copytree(FIXTURE / "checkpoints", out / "checkpoints")
    assert run(tiny_config(assets, out, train__max_steps=RESUMED_STEPS, **OVERRIDES)) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: r[k] for k in ("step", *METRIC_KEYS) if k in r} for r in records]


def test_a_pre_engine_checkpoint_resumes_with_the_same_next_steps(tiny_assets, tmp_path):
    expected = json.loads((FIXTURE / "expected.json").read_text())
    got = resume(tiny_assets, tmp_path / "run")
    assert [r["step"] for r in got] == [r["step"] for r in expected["metrics"]] == [4, 5]
    for g, e in zip(got, expected["metrics"]):
        assert g.keys() == e.keys()
        for key in METRIC_KEYS:
            assert g[key] == pytest.approx(e[key], rel=1e-5, abs=1e-7), (g["step"], key)
    sums = tensor_sums(tmp_path / "run" / "checkpoints" / f"step-{RESUMED_STEPS}")
    assert sums.keys() == expected["tensors"].keys()
    assert any(k.startswith("trainer.ema.") for k in sums) and any(k.startswith("trainer.rl_reference.") for k in sums)
    for key, (total, squares) in expected["tensors"].items():
        assert sums[key] == pytest.approx([total, squares], rel=1e-5, abs=1e-8), key
