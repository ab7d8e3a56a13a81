"""FLUX.1 and FLUX.2 [klein] at world size 2 (torchrun, gloo, FSDP2 per double/single block + root, full
activation checkpointing, meta-device sharded load, generator LoRA + shared critic LoRA): stopped at a checkpoint
and relaunched, a tiny run continues exactly as the straight run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.distributed.test_trainer_faults import COMPARED, _cmd, _metrics, _run, _trained_tensors

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("family", ["flux", "flux2"])
def test_fsdp2_resume_is_exact(family, tmp_path):
    from dmdr.models.tiny import build_tiny

    model = build_tiny(family, tmp_path / f"tiny-{family}")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"prompt number {i} of a small world" for i in range(40)) + "\n")

    def cmd(out: Path, steps: int) -> list[str]:
        return _cmd({"model": str(model), "prompts": str(prompts)}, out) + [
            "--model.family", family, "--model.max_sequence_length", "64" if family == "flux2" else "8",
            "--parallel.activation_checkpointing", "full", "--dmd.ratio", "1", "--rl.start_step", "1",
            "--checkpoint.interval", "1", "--train.max_steps", str(steps)]

    straight, split = tmp_path / "straight", tmp_path / "split"
    _run(cmd(straight, 2), tmp_path / "straight.txt")
    _run(cmd(split, 1), tmp_path / "split1.txt")
    _run(cmd(split, 2), tmp_path / "split2.txt")
    assert "resumed from generator step 1" in (tmp_path / "split2.txt").read_text()
    assert json.loads((straight / "config.json").read_text())["model"]["family"] == family
    a, b = _metrics(straight), _metrics(split)
    assert sorted(a) == sorted(b) == [1, 2]
    for step in (2,):
        for key in COMPARED:
            assert a[step].get(key) == b[step].get(key), (step, key)
    assert all(a[s]["train/skipped_steps"] == 0 for s in a)
    wa, wb = _trained_tensors(straight / "checkpoints" / "step-2"), _trained_tensors(split / "checkpoints" / "step-2")
    assert any("single_transformer_blocks" in k and "lora_A.generator" in k for k in wa)
    assert any("transformer_blocks.0.attn.add_q_proj.lora_B.critic" in k for k in wa)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
