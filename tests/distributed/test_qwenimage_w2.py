"""Qwen-Image at world size 2 (torchrun, gloo, FSDP2 per block + root, activation checkpointing, generator LoRA):
relaunched from a checkpoint, the run continues exactly as the straight one (its last block's text-stream
adapters, whose output nothing reads, step on zero gradients so their optimizer state is in the checkpoint).
Half of the prompts come from an embedding cache and the rest are encoded (``data.cache_miss encode``) by an
FSDP2-sharded Qwen2.5-VL (``parallel.frozen_encoders shard``): ranks whose batch is cached still join the
encoder's collectives, or the run would hang."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dmdr.distributed.offline import model_tensors

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
COMPARED = ("loss/dmd", "loss/fake", "loss/generator", "reward/brightness", "grad_norm/generator", "data/seen")


def _run(cmd: list[str], log: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    with log.open("w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=log.parent, timeout=900)
    assert proc.returncode == 0, log.read_text()[-3000:]


def _metrics(out: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def test_qwenimage_w2_resume_is_exact_with_a_partial_cache_and_a_sharded_encoder(tmp_path):
    from dmdr.cli import cache_text_embeddings
    from dmdr.models.tiny import build_tiny_qwenimage

    model = build_tiny_qwenimage(tmp_path / "tiny-qwenimage")
    prompts = [f"prompt number {i} of a small world" for i in range(24)]
    cached, everything = tmp_path / "cached.txt", tmp_path / "prompts.txt"
    cached.write_text("\n".join(prompts[::2]) + "\n")
    everything.write_text("\n".join(prompts) + "\n")
    cache = tmp_path / "cache"
    assert cache_text_embeddings.main(["--model.path", str(model), "--model.dtype", "fp32",
                                       "--model.max_sequence_length", "192", "--data.sources", str(cached),
                                       "--data.embedding_cache", str(cache), "--device", "cpu"]) == 0

    def cmd(out: Path, *extra: str) -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                str(REPO / "recipes" / "tiny_dmdr.py"), "--model.family", "qwenimage", "--model.path", str(model),
                "--data.sources", str(everything), "--data.embedding_cache", str(cache),
                "--data.cache_miss", "encode", "--parallel.frozen_encoders", "shard",
                "--parallel.activation_checkpointing", "full", "--train.output_dir", str(out),
                "--train.max_steps", "4", "--checkpoint.interval", "2", "--dmd.ratio", "1",
                "--rl.start_step", "2", "--dynamic.decay_steps", "2", "--data.batch_size", "2",
                "--data.rl_batch_size", "1", "--log.interval", "1", "--log.sample_interval", "0",
                "--log.progress_bar", "false", "--log.tensorboard", "false", *extra]

    # Two launches, not three: the resumed run starts from the straight run's step-2 checkpoint.
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _run(cmd(straight), tmp_path / "straight.txt")
    _run(cmd(resumed, "--checkpoint.resume", str(straight / "checkpoints" / "step-2")), tmp_path / "resumed.txt")
    assert "resumed from generator step 2" in (tmp_path / "resumed.txt").read_text()
    a, b = _metrics(straight), _metrics(resumed)
    assert sorted(a) == [1, 2, 3, 4] and sorted(b) == [3, 4]
    for step in (3, 4):
        for key in COMPARED:
            assert a[step].get(key) == b[step].get(key), (step, key)
        assert a[step]["grad_norm/generator"] > 0
    wa, wb = model_tensors(straight / "checkpoints" / "step-4"), model_tensors(resumed / "checkpoints" / "step-4")
    assert any("transformer_blocks.1.attn.add_q_proj.lora_A.generator" in k for k in wa)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
