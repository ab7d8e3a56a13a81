"""tools/eval.py end to end on the tiny recipe: --compare export vs base, checkpoint = export, W=2 = W=1, bad input."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.tiny_helpers import REPO, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["a photo of a cat", "a red car in the rain", "a bowl of fruit"]


def _tool(name: str):
    return importlib.import_module(f"dmdr.cli.{name}")


EVAL = _tool("eval")


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("eval-prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n\n")
    return path


@pytest.fixture(scope="module")
def trained(tiny_assets, tmp_path_factory) -> dict[str, Path]:
    """One tiny LoRA run (3 generator steps, as the export tests train) and its export."""
    from dmdr.launch import run

    root = tmp_path_factory.mktemp("eval-run")
    overrides = {"train__max_steps": 3, "dmd__ratio": 1, "checkpoint__interval": 2, "model__generator_mode": "lora"}
    assert run(tiny_config(tiny_assets, root / "run", **overrides)) == 0
    assert _tool("convert_to_diffusers").main(["--run", str(root / "run"), "--out", str(root / "export")]) == 0
    return {"run": root / "run", "export": root / "export", "checkpoint": root / "run" / "checkpoints" / "step-3",
            "base": Path(tiny_assets["model"])}


@pytest.fixture(scope="module")
def metric_args(clip_folder, pickscore_folder, hps_checkpoint, tiny_arch, tmp_path_factory) -> list[str]:
    from tests.evaluation.test_metrics import LaionMLP

    torch.manual_seed(5)
    head = tmp_path_factory.mktemp("eval-head") / "head.pth"
    torch.save(LaionMLP([16, 32, 8, 8, 4, 1]).state_dict(), head)
    return ["--clip-model", str(clip_folder[0]), "--pickscore-model", str(pickscore_folder[0]),
            "--hps-checkpoint", str(hps_checkpoint[0]), "--hps-arch", tiny_arch, "--aesthetic-head", str(head)]


def _results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


@pytest.mark.slow
def test_compare_export_and_base(trained, prompt_file, metric_args, tmp_path, capsys):
    out = tmp_path / "compare"
    argv = ["--compare", str(trained["export"]), str(trained["base"]), "--prompts", str(prompt_file), "--seeds", "2",
            "--batch-size", "4", "--out", str(out), "--no-progress", "--grid-prompts", "2", *metric_args]
    assert EVAL.main(argv) == 0
    printed = capsys.readouterr().out
    data = _results(out)
    export, base = data["models"]
    assert (export["kind"], base["kind"]) == ("export", "base")
    assert (export["nfe"], base["nfe"]) == (4, 56)  # 4 few steps; 28 CFG steps = 2 passes each
    assert data["metrics"] == ["clip", "aesthetic", "hps", "pickscore"]  # registration order
    assert data["skipped"] == {"diversity": "no --lpips-weights given (one state dict of lpips.LPIPS, see "
                                            "dmdr/evaluation/diversity.py)"}
    for row in data["models"]:
        assert row["images"] == 6 and row["images_per_s"] > 0
        for name in data["metrics"]:
            assert len(row["scores"][name]) == 6 and row["metrics"][name]["n"] == 6
        assert row["metrics"]["clip"]["mean"] >= 0
    # the same noise, two different models: different images, so different scores
    assert export["scores"]["hps"] != base["scores"]["hps"]
    table = (out / "results.md").read_text()
    assert table.splitlines()[0] == "| model | NFE | images/s | clip | aesthetic | hps | pickscore |"
    assert table.count(" ± ") == 8 and "`diversity` skipped: no --lpips-weights" in table
    assert table.split("\n- ")[0] in printed
    with Image.open(out / "grid.png") as grid:  # 2 prompts x 2 models of 16 px, make_grid's 2 px padding
        assert grid.size == (2 + 2 * 18, 2 + 2 * 18)


@pytest.mark.slow
def test_export_sampling_equals_stock_pipeline_and_checkpoint_equals_export(trained, prompt_file, metric_args,
                                                                            tmp_path):
    from diffusers import DiffusionPipeline

    from dmdr.evaluation.samplers import load_model, noise_for
    from dmdr.export import InferenceSettings

    model = load_model(trained["export"], device=torch.device("cpu"))
    noise = torch.stack([noise_for(p, 0, model.latent_shape) for p in range(len(PROMPTS))])
    ours = model.sample(PROMPTS, noise)
    pipe = DiffusionPipeline.from_pretrained(str(trained["export"]), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    settings = InferenceSettings.read(trained["export"])
    with torch.no_grad():
        stock = pipe(list(PROMPTS), latents=noise, output_type="pt", **settings.pipeline_kwargs(exact=True)).images
    torch.testing.assert_close(ours, stock.float().clamp(0, 1), rtol=0, atol=1e-4)

    runs = {}
    for name in ("export", "checkpoint"):
        out = tmp_path / name
        argv = ["--model", str(trained[name]), "--prompts", str(prompt_file), "--seeds", "2", "--out", str(out),
                "--no-progress", *metric_args, "--metrics", "clip", "hps"]
        assert EVAL.main(argv) == 0
        runs[name] = _results(out)["models"][0]
    assert runs["checkpoint"]["kind"] == "checkpoint" and runs["checkpoint"]["nfe"] == 4
    for metric in ("clip", "hps"):  # LoRA applied unmerged (checkpoint) vs merged (export): fp32 rounding only
        torch.testing.assert_close(torch.tensor(runs["checkpoint"]["scores"][metric]),
                                   torch.tensor(runs["export"]["scores"][metric]), rtol=0, atol=1e-4)


@pytest.mark.slow
def test_torchrun_two_ranks_equal_one_process(trained, prompt_file, metric_args, tmp_path):
    """Prompts split across 2 gloo ranks and gathered: the same scores as one process (3 prompts: 2 + 1)."""
    args = ["--model", str(trained["export"]), "--prompts", str(prompt_file), "--seeds", "2", "--batch-size", "3",
            "--no-progress", "--device", "cpu", *metric_args, "--metrics", "clip", "pickscore"]
    outs = {1: tmp_path / "w1", 2: tmp_path / "w2"}
    assert EVAL.main([*args, "--out", str(outs[1])]) == 0  # the one-process run
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "tools" / "eval.py"), *args, "--out", str(outs[2])]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("| model |") == 1  # only rank 0 reports
    one, two = _results(outs[1]), _results(outs[2])
    assert (one["settings"]["world_size"], two["settings"]["world_size"]) == (1, 2)
    for metric in ("clip", "pickscore"):
        a, b = one["models"][0]["scores"][metric], two["models"][0]["scores"][metric]
        assert len(a) == len(b) == 6
        torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=0, atol=1e-5)
    assert one["models"][0]["images"] == two["models"][0]["images"] == 6


# ---- bad input: one line each -----------------------------------------------------------------------------------

def _one_error(argv: list[str], capsys, *needles: str) -> str:
    assert EVAL.main(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err[-2000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def test_bad_input_is_one_line(tiny_assets, prompt_file, tmp_path, capsys):
    base = tiny_assets["model"]
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    _one_error(["--model", base, "--prompts", str(empty)], capsys, f"--prompts {empty}: has no prompts")
    binary = tmp_path / "prompts.parquet"
    binary.write_bytes(b"PAR1\x00\x15\x04\xff\xfe")
    _one_error(["--model", base, "--prompts", str(binary)], capsys, f"--prompts {binary}: not a UTF-8 text file")
    _one_error(["--model", base, "--prompts", str(tmp_path / "none.txt")], capsys, "cannot read it")
    neither = tmp_path / "some-folder"
    neither.mkdir()
    (neither / "weights.bin").write_bytes(b"x")
    _one_error(["--compare", base, str(neither), "--prompts", str(prompt_file)], capsys,
               f"--model {neither} is neither a diffusers pipeline folder")
    _one_error(["--model", str(tmp_path / "gone"), "--prompts", str(prompt_file)], capsys, "does not exist")
    _one_error(["--model", base, "--prompts", str(prompt_file), "--metrics", "fid"], capsys, "unknown metric 'fid'")


def test_wrong_metric_checkpoint_is_one_line_before_sampling(tiny_assets, prompt_file, clip_folder, hps_checkpoint,
                                                             tmp_path, capsys):
    argv = ["--model", tiny_assets["model"], "--prompts", str(prompt_file), "--out", str(tmp_path / "out"),
            "--clip-model", str(clip_folder[0]), "--aesthetic-head", str(hps_checkpoint[0])]
    _one_error(argv, capsys, "--aesthetic-head", "is not a LAION aesthetic head")
    assert not (tmp_path / "out").exists()


PLUGIN = """
from dmdr.evaluation import Metric, register_metric

register_metric(Metric("mean_rgb", load=lambda options, device: lambda images, prompts: images.mean(dim=(1, 2, 3)),
                       check=lambda options: None))
"""


def test_plugin_metric_on_saved_images(tiny_assets, prompt_file, tmp_path, monkeypatch, capsys):
    """A metric registered by a --plugin module scores the images the tool samples (and saves)."""
    from dmdr.evaluation import registry

    monkeypatch.setattr(registry, "METRICS", dict(registry.METRICS))
    (tmp_path / "dmdr_test_plugin.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "out"
    argv = ["--model", tiny_assets["model"], "--prompts", str(prompt_file), "--steps", "2", "--out", str(out),
            "--plugin", "dmdr_test_plugin", "--metrics", "mean_rgb", "--save-images", "--no-progress"]
    assert EVAL.main(argv) == 0
    row = _results(out)["models"][0]
    saved = [torch.tensor(np.array(Image.open(out / "tiny-sd3" / f"p{p:05d}-s0.png")), dtype=torch.float64) / 255
             for p in range(len(PROMPTS))]
    torch.testing.assert_close(torch.tensor(row["scores"]["mean_rgb"], dtype=torch.float64),
                               torch.stack([im.mean() for im in saved]), rtol=0, atol=1 / 255)
    assert row["nfe"] == 4 and row["steps"] == 2  # base model: CFG doubles the passes
    _one_error([*argv[:-4], "--plugin", "no_such_module_xyz"], capsys, "--plugin no_such_module_xyz: cannot import")
