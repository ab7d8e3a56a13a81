"""The committed shapes-world teacher: it loads like any SD3 folder, its few-step gap exists, bad folders fail."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dmdr.errors import ModelLoadError
from dmdr.worlds.shapes.pipeline import MAX_SEQUENCE_LENGTH, build_components, check_teacher_folder, save_pipeline

REPO = Path(__file__).resolve().parents[2]
TEACHER = REPO / "assets" / "shapes-teacher"

pytestmark = pytest.mark.usefixtures("one_thread")


def _recipe():
    from dmdr.recipes import shapes_dmdr

    return shapes_dmdr


@pytest.fixture(scope="module")
def teacher():
    from dmdr.models import load_backbone

    return load_backbone(TEACHER, dtype=torch.float32, device="cpu", max_sequence_length=MAX_SEQUENCE_LENGTH)


def test_committed_teacher_is_small_and_records_how_it_was_made():
    info = check_teacher_folder(TEACHER)
    assert info["command"].startswith("python tools/pretrain_teacher.py")
    assert info["evaluation"] and info["stats"]["config"]["steps"] > 0
    weights = sum(p.stat().st_size for p in TEACHER.rglob("*.safetensors"))
    assert weights <= 20 * 2**20


def test_teacher_multi_step_cfg_beats_its_few_step_sampler(teacher):
    from dmdr.worlds.shapes.evaluation import Sampler, evaluate_model, heldout_prompts
    from dmdr.worlds.shapes.scene import IMAGE_SIZE

    cfg = _recipe().shapes_dmdr()
    prompts = heldout_prompts(48)
    multi = evaluate_model(teacher, teacher.teacher, Sampler("teacher", 25, cfg.dmd.guidance), prompts, [0], IMAGE_SIZE)
    few = evaluate_model(teacher, teacher.teacher, Sampler("few_step", cfg.dmd.num_steps, 1.0, cfg.dmd.shift),
                         prompts, [0], IMAGE_SIZE)
    assert multi["scores"]["overall"]["mean"] > few["scores"]["overall"]["mean"] + 0.15
    assert multi["nfe"] == 50 and few["nfe"] == cfg.dmd.num_steps


def test_stock_pipeline_loads_the_teacher_and_generates():
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(TEACHER, local_files_only=True)
    assert type(pipe).__name__ == "StableDiffusion3Pipeline"
    image = pipe("a red circle left of a blue square", num_inference_steps=4, height=32, width=32,
                 max_sequence_length=MAX_SEQUENCE_LENGTH, output_type="pt",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 3, 32, 32) and torch.isfinite(image).all()


def test_saved_pipeline_round_trips_through_the_library_loader(tmp_path):
    from dmdr.models import load_backbone

    folder = save_pipeline(build_components(seed=1), tmp_path / "fresh", {"note": "untrained"})
    assert check_teacher_folder(folder)["note"] == "untrained"
    backbone = load_backbone(folder, dtype=torch.float32, device="cpu", max_sequence_length=MAX_SEQUENCE_LENGTH)
    cond = backbone.text_encoder.encode(["a red circle", "two blue squares"])
    assert cond["prompt_embeds"].shape == (2, 12 + MAX_SEQUENCE_LENGTH, 128)
    assert backbone.latent_shape(32) == (4, 16, 16)


def _launch(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "recipes" / "shapes_dmdr.py"), *argv], capture_output=True,
                          text=True, cwd=cwd, timeout=300)


def test_a_teacher_of_another_world_is_refused_in_one_line(tmp_path):
    from dmdr.models.tiny import build_tiny_sd3

    plain = build_tiny_sd3(tmp_path / "plain-sd3")
    with pytest.raises(ModelLoadError, match="not a shapes-world teacher"):
        check_teacher_folder(plain)
    other = tmp_path / "other-world"
    shutil.copytree(plain, other)
    (other / "world.json").write_text(json.dumps({"world": "dmdr-gaussians", "version": 1}))
    with pytest.raises(ModelLoadError, match="names world 'dmdr-gaussians'"):
        check_teacher_folder(other)
    done = _launch(["--model.path", str(other), "--train.output_dir", str(tmp_path / "run")], tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("error: ") and "dmdr-gaussians" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_corrupt_weights_file_is_named_in_one_line(tmp_path):
    broken = tmp_path / "broken-teacher"
    shutil.copytree(TEACHER, broken)
    weights = next((broken / "transformer").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])
    done = _launch(["--model.path", str(broken), "--train.output_dir", str(tmp_path / "run"),
                    "--parallel.dp_shard", "1"], tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "transformer" in last and "Traceback" not in done.stderr


@pytest.mark.slow
def test_pretrain_tool_writes_a_loadable_teacher_with_its_scores(tmp_path):
    out = tmp_path / "teacher"
    done = subprocess.run([sys.executable, str(REPO / "tools" / "pretrain_teacher.py"), "--out", str(out),
                           "--steps", "3", "--vae-steps", "3", "--batch-size", "4", "--vae-batch-size", "4",
                           "--eval-every", "2", "--eval-prompts", "4", "--guidance", "2", "--few-steps", "1",
                           "--threads", "1"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    info = check_teacher_folder(out)
    assert info["stats"]["config"]["steps"] == 3 and "--steps 3" in info["command"]
    assert [r["model"] for r in info["evaluation"]] == ["teacher 25-step CFG 2", "teacher 1-step"]
    assert info["history"][0]["step"] == 2 and (tmp_path / "teacher.step-2" / "model_index.json").is_file()
    assert "| teacher 1-step | 1 |" in (out / "pretrain_report.md").read_text()


@pytest.mark.slow
def test_a_short_run_of_the_recipe_moves_shapeeval_up_from_its_init(tmp_path):
    """The recipe's code path at CI size: a few DMD steps from the committed teacher lift its 2-step ShapeEval."""
    from dmdr.launch import run
    from dmdr.worlds.shapes.ablations import score_checkpoint
    from dmdr.worlds.shapes.evaluation import Sampler, evaluate_model, heldout_prompts
    from dmdr.worlds.shapes.scene import IMAGE_SIZE

    recipe = _recipe()
    cfg = recipe.shapes_dmdr()
    steps = 12
    from dmdr.config import apply_overrides

    cfg = apply_overrides(cfg, ["--train.output_dir", str(tmp_path / "run"), "--train.max_steps", str(steps),
                                "--dynamic.decay_steps", str(steps), "--rl.start_step", str(steps),
                                "--checkpoint.interval", str(steps), "--dmd.ratio", "2", "--data.batch_size", "8",
                                "--log.sample_interval", "0", "--log.progress_bar", "false",
                                "--log.tensorboard", "false"])
    recipe.prepare_assets(cfg)
    assert run(cfg) == 0
    prompts = 48
    from dmdr.models import load_backbone

    teacher = load_backbone(TEACHER, dtype=torch.float32, device="cpu", max_sequence_length=MAX_SEQUENCE_LENGTH)
    init = evaluate_model(teacher, teacher.teacher, Sampler("few_step", cfg.dmd.num_steps, 1.0, cfg.dmd.shift),
                          heldout_prompts(prompts), [0], IMAGE_SIZE)["scores"]["overall"]["mean"]
    after = score_checkpoint(tmp_path / "run", steps, prompts, 1)["overall"]
    print(f"ShapeEval {init:.3f} -> {after:.3f}")
    assert after > init + 0.05, (init, after)
