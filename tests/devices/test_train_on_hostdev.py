"""The training path, sampling, export and evaluation with every tensor on hostdev (``--train.device hostdev``).

hostdev computes with the CPU's kernels and draws from the CPU's random streams, so a run on it must equal
the same run on CPU; what it adds is that any tensor or generator left on the wrong device raises, as on CUDA.
The runs use the real entry point (``dmdr.launch.run``): DynaRS, DynaDG, decoupled DMD with Beta CA levels,
the generator and critic steps, every RL branch (ReFL, DPO, GRPO), EMA, samples during training, checkpoints
and an exact resume.
"""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from dmdr.distributed.offline import model_tensors
from dmdr.launch import run
from tests.tiny_helpers import REPO, load_recipe, tiny_config

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

DEV = "hostdev"
QUICK = {"train__max_steps": 4, "dmd__ratio": 2, "rl__start_step": 2, "dynamic__decay_steps": 4,
         "checkpoint__interval": 2, "log__sample_interval": 2, "optim__ema_decay": 0.9,
         "dmd__decoupled": "true", "dmd__ca_levels": "beta"}
LOSSES = ("loss/dmd", "loss/fake", "loss/generator", "loss/rl", "grad_norm/generator", "grad_norm/critic")


def _tool(name: str):
    return importlib.import_module(f"dmdr.cli.{name}")


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, str]:
    from dmdr.models.tiny import build_tiny_sd3

    root = tmp_path_factory.mktemp("hostdev-assets")
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(load_recipe("tiny_dmdr").DEMO_PROMPTS) + "\n")
    return {"model": str(build_tiny_sd3(root / "tiny-sd3", seed=0)), "prompts": str(prompts)}


@pytest.fixture(scope="module")
def runs(hostdev, assets, tmp_path_factory) -> dict[str, Path]:
    """The same ReFL run on CPU and on hostdev."""
    root = tmp_path_factory.mktemp("hostdev-runs")
    out = {}
    for device in ("cpu", DEV):
        calls = hostdev.fallback_calls()
        assert run(tiny_config(assets, root / device, train__device=device, **QUICK)) == 0
        out[device] = root / device
        if device == DEV:
            assert hostdev.fallback_calls() - calls > 1000  # the run computed on the device
    return out


def test_a_run_on_the_device_equals_the_run_on_cpu(runs):
    cpu, dev = _metrics(runs["cpu"]), _metrics(runs[DEV])
    assert [r["step"] for r in dev] == [1, 2, 3, 4]
    assert "loss/rl" in dev[-1] and dev[-1]["train/skipped_steps"] == 0
    for a, b in zip(cpu, dev):
        for key in LOSSES:
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    _assert_same_tensors(model_tensors(runs["cpu"] / "checkpoints" / "step-4"),
                         model_tensors(runs[DEV] / "checkpoints" / "step-4"))


def test_a_resumed_run_on_the_device_equals_the_uninterrupted_one(hostdev, runs, assets, tmp_path):
    resumed = tmp_path / "resumed"
    shutil.copytree(runs[DEV], resumed, ignore=shutil.ignore_patterns("step-4"))
    (resumed / "checkpoints" / "latest").write_text("step-2\n")
    assert run(tiny_config(assets, resumed, train__device=DEV, **QUICK)) == 0
    _assert_same_tensors(model_tensors(runs[DEV] / "checkpoints" / "step-4"),
                         model_tensors(resumed / "checkpoints" / "step-4"))


@pytest.mark.parametrize("method", ["dpo", "grpo", "sdxl-refl"])
def test_rl_branches_and_epsilon_models_train_on_the_device(hostdev, assets, tmp_path, method):
    overrides = {**QUICK, "rl__method": method, "rl__grpo_group_size": 2, "checkpoint__interval": 0,
                 "log__sample_interval": 0, "train__max_steps": 3, "dmd__ratio": 1, "rl__start_step": 1}
    if method == "sdxl-refl":  # an epsilon-prediction UNet at fixed integer timesteps (the EpsilonPrediction path)
        from dmdr.models.tiny import build_tiny_sdxl

        overrides.update(rl__method="refl", model__path=str(build_tiny_sdxl(tmp_path / "tiny-sdxl")),
                         model__family="sdxl", dmd__num_steps=2, dmd__timesteps="999,499")
    assert run(tiny_config(assets, tmp_path / method, train__device=DEV, **overrides)) == 0
    records = _metrics(tmp_path / method)
    assert all("loss/rl" in r and torch.isfinite(torch.tensor(r["loss/rl"])) for r in records[1:])
    assert records[-1]["train/skipped_steps"] == 0


def test_sampling_and_export_on_the_device_match_cpu(hostdev, runs, tmp_path):
    from PIL import Image

    sample = _tool("sample")
    export = tmp_path / "export"
    assert _tool("convert_to_diffusers").main(["--run", str(runs[DEV]), "--out", str(export)]) == 0
    for source in (["--run", str(runs[DEV])], ["--pipeline", str(export)]):
        grids = {}
        for device in ("cpu", DEV):
            out = tmp_path / f"{source[0][2:]}-{device}.png"
            assert sample.main([*source, "--prompts", "a photo of a cat", "a bowl of fruit", "--out", str(out),
                                "--device", device]) == 0
            grids[device] = torch.tensor(list(Image.open(out).convert("RGB").tobytes()), dtype=torch.float32)
        assert (grids["cpu"] - grids[DEV]).abs().max() <= 1  # 8-bit images of the same latents


def test_evaluation_on_the_device_matches_cpu(hostdev, tmp_path):
    from dmdr.worlds.shapes.evaluation import heldout_prompts

    evaluate = _tool("eval")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(heldout_prompts(4)) + "\n")
    scores = {}
    for device in ("cpu", DEV):
        out = tmp_path / device
        assert evaluate.main(["--model", str(REPO / "assets" / "shapes-teacher"), "--prompts", str(prompts),
                              "--steps", "2", "--metrics", "shapeeval", "--device", device, "--out", str(out),
                              "--grid-prompts", "0"]) == 0
        scores[device] = json.loads((out / "results.json").read_text())
    assert scores["cpu"]["models"][0]["scores"] == scores[DEV]["models"][0]["scores"]
