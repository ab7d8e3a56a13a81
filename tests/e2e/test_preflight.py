"""Preflight: each bad path or setting alone and several together are reported in one message (exit 2,
no traceback, nothing built); ``--dry-run`` on every recipe prints the plan and loads nothing; the tools
check their paths the same way; under torchrun at world size 2 the message is printed once."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dmdr.preflight.files import torch_checkpoint_problem, weight_file_problem
from dmdr.recipes import run as run_recipe
from tests.tiny_helpers import REPO, load_recipe

HPS_WHAT = "a local HPSv2.1 checkpoint file, e.g. HPS_v2.1_compressed.pt"
CLIP_WHAT = "a local open_clip folder (open_clip_config.json + open_clip_pytorch_model.bin/.safetensors)"
RECIPES = {"sd35_dmdr": "sd3", "sd3m_dmdr": "sd3", "zimage_dmdr": "zimage", "tiny_dmdr": "sd3", "shapes_dmdr": "shapes"}


@pytest.fixture(scope="module")
def assets(tiny_assets, tmp_path_factory) -> dict[str, str]:
    """The tiny SD3 folder and prompts, a tiny Z-Image folder, and reward files in their real layouts
    (only their headers are read: small random tensors stand in for the models)."""
    from dmdr.models.tiny import build_tiny_zimage

    root = tmp_path_factory.mktemp("preflight")
    hps = root / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": {"logit_scale": torch.ones(())}}, hps)
    clip = root / "dfn-clip"
    clip.mkdir()
    (clip / "open_clip_config.json").write_text(json.dumps({"model_cfg": {"embed_dim": 16}}))
    torch.save({"logit_scale": torch.ones(())}, clip / "open_clip_pytorch_model.bin")
    pick = root / "pickscore"
    pick.mkdir()
    (pick / "config.json").write_text("{}")
    (pick / "tokenizer.json").write_text("{}")
    save_file({"logit_scale": torch.ones(())}, str(pick / "model.safetensors"))
    from dmdr.worlds.shapes.pipeline import WORLD_NAME, WORLD_VERSION

    shapes = root / "shapes-teacher"  # what the shapes recipe checks of its teacher: an SD3 folder + world.json
    shutil.copytree(tiny_assets["model"], shapes)
    (shapes / "world.json").write_text(json.dumps({"world": WORLD_NAME, "version": WORLD_VERSION}))
    return {**tiny_assets, "zimage": str(build_tiny_zimage(root / "tiny-zimage")), "hps": str(hps),
            "clip": str(clip), "pickscore": str(pick), "shapes": str(shapes), "root": str(root)}


@pytest.fixture
def nothing_loads(monkeypatch):
    """Every model / reward constructor and the build raise if called: preflight and dry runs must not reach them."""
    from dmdr import build
    from dmdr.models import loading
    from dmdr.rewards import models as reward_models

    def forbidden(*args, **kwargs):
        raise AssertionError("a model was loaded or built")

    monkeypatch.setattr(loading, "load_backbone", forbidden)
    monkeypatch.setattr(loading.ModelFolder, "load", forbidden)
    monkeypatch.setattr(loading.ModelFolder, "build_on_meta", forbidden)
    monkeypatch.setattr(build, "build_run", forbidden)
    for cls in (reward_models.HPSReward, reward_models.CLIPReward, reward_models.PickScoreReward):
        monkeypatch.setattr(cls, "__init__", forbidden)
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    # Nothing was built, so there are no FSDP cycles to free; a full gc of pytest's heap costs seconds per call.
    monkeypatch.setattr("dmdr.launch.collect_released_objects", lambda: None)


def _argv(assets, tmp_path: Path, family: str = "sd3") -> list[str]:
    model = {"zimage": assets["zimage"], "shapes": assets.get("shapes")}.get(family, assets["model"])
    return ["--model.path", model, "--data.sources", assets["prompts"],
            "--rl.hps_checkpoint", assets["hps"], "--rl.clip_model", assets["clip"],
            "--train.output_dir", str(tmp_path / "out")]


def _main(recipe: str, argv: list[str]) -> int:
    return run_recipe(recipe, argv)


def _errors(err: str) -> list[str]:
    assert "Traceback" not in err, err[-3000:]
    return [line for line in err.splitlines() if line.startswith("error:")]


def _bad(kind: str, assets, tmp: Path, monkeypatch) -> tuple[list[str], str]:
    """``(overrides, expected text of the one problem line)`` for one kind of bad input."""
    def model_copy() -> Path:
        copy = tmp / "model-copy"
        shutil.copytree(assets["model"], copy)
        return copy

    if kind == "model-missing":
        return ["--model.path", "/nonexistent/sd35"], "--model.path '/nonexistent/sd35': model folder"
    if kind == "component-missing":
        copy = model_copy()
        shutil.rmtree(copy / "vae")
        return ["--model.path", str(copy)], "component folder vae/"
    if kind == "weights-truncated":
        copy = model_copy()
        f = copy / "transformer" / "diffusion_pytorch_model.safetensors"
        f.write_bytes(f.read_bytes()[:-100])
        return ["--model.path", str(copy)], "diffusion_pytorch_model.safetensors is truncated"
    if kind == "family-mismatch":
        return ["--model.path", assets["zimage"]], "--model.family 'sd3': "
    if kind == "no-sources":
        return ["--data.sources", ""], "--data.sources (): not set"
    if kind == "sources-no-match":
        return ["--data.sources", "/nonexistent/*.jsonl"], "matches no files"
    if kind == "no-good-record":
        f = tmp / "prompts.jsonl"
        f.write_text('{"text": "a cat"}\n' * 5)
        return ["--data.sources", str(f)], "no good prompt in the first records"
    if kind == "cache-missing":
        return ["--data.embedding_cache", str(tmp / "no-cache")], "--data.embedding_cache"
    if kind == "hps-unset":
        return ["--rl.hps_checkpoint", ""], "--rl.hps_checkpoint '': not set"
    if kind == "hps-not-torch":
        f = tmp / "hps.pt"
        f.write_text("not a checkpoint")
        return ["--rl.hps_checkpoint", str(f)], "hps.pt is not a torch checkpoint"
    if kind == "hps-truncated":
        f = tmp / "hps.pt"
        f.write_bytes(Path(assets["hps"]).read_bytes()[:-64])
        return ["--rl.hps_checkpoint", str(f)], "hps.pt is not a torch checkpoint"
    if kind == "clip-no-weights":
        folder = tmp / "clip"
        folder.mkdir()
        shutil.copy(Path(assets["clip"]) / "open_clip_config.json", folder)
        return ["--rl.clip_model", str(folder)], "has none of open_clip_model.safetensors"
    if kind == "pickscore-unset":
        return ["--rl.rewards", "hps,pickscore"], "--rl.pickscore_model '': not set"
    if kind == "unknown-reward":
        return ["--rl.rewards", "hps,aesthetic"], "--rl.rewards 'aesthetic': unknown reward 'aesthetic' (known: "
    if kind == "resume-not-checkpoint":
        return ["--checkpoint.resume", str(tmp)], "--checkpoint.resume"
    if kind == "output-unwritable":
        return ["--train.output_dir", "/proc/forbidden"], "--train.output_dir '/proc/forbidden': is not writable"
    if kind == "disk-full":
        monkeypatch.setattr("dmdr.preflight.run_checks.free_bytes", lambda path: 1000)
        return [], "GB free, one checkpoint needs about"
    if kind == "mesh":
        monkeypatch.setenv("WORLD_SIZE", "2")
        return ["--parallel.dp_replicate", "3"], "--parallel.dp_replicate 3 does not divide the world size 2"
    if kind == "bad-value":
        return ["--train.max_steps", "many"], "--train.max_steps: 'many' is not a valid int"
    if kind == "adapter-other-family":  # re-turbo: a Z-Image LoRA for the SD3 teacher
        from dmdr.models.tiny_lora import write_random_lora

        lora = write_random_lora(assets["zimage"], tmp / "zimage-lora", targets=("to_q",))
        return ["--model.teacher_adapters", f"{lora}:0.8"], f"--model.teacher_adapters {lora}: none of its"
    raise AssertionError(kind)


KINDS = ["model-missing", "component-missing", "weights-truncated", "family-mismatch", "no-sources",
         "sources-no-match", "no-good-record", "cache-missing", "hps-unset", "hps-not-torch", "hps-truncated",
         "clip-no-weights", "pickscore-unset", "unknown-reward", "resume-not-checkpoint", "output-unwritable",
         "disk-full", "mesh", "bad-value", "adapter-other-family"]


@pytest.mark.parametrize("kind", KINDS)
def test_each_bad_input_alone_is_one_line(kind, assets, tmp_path, monkeypatch, capsys, nothing_loads):
    extra, needle = _bad(kind, assets, tmp_path, monkeypatch)
    assert _main("sd35_dmdr", _argv(assets, tmp_path) + extra) == 2
    errors = _errors(capsys.readouterr().err)
    assert len(errors) == 1 and needle in errors[0], errors
    assert not (tmp_path / "out" / "config.json").exists()


def test_several_bad_inputs_are_all_in_one_message(assets, tmp_path, monkeypatch, capsys, nothing_loads):
    """The issue's new-user sequence (no data, no HPS, a missing model) plus a bad value: one message, every line."""
    kinds = ["model-missing", "no-sources", "hps-not-torch", "clip-no-weights", "bad-value"]
    argv, needles = _argv(assets, tmp_path), []
    for kind in kinds:
        extra, needle = _bad(kind, assets, tmp_path, monkeypatch)
        argv += extra
        needles.append(needle)
    assert _main("sd35_dmdr", argv) == 2
    err = capsys.readouterr().err
    errors = _errors(err)
    assert errors == [f"error: {len(kinds)} problems found before any work (fix them all, then relaunch):"]
    lines = err.splitlines()[err.splitlines().index(errors[0]) + 1:]
    assert len(lines) == len(kinds)
    for needle in needles:
        assert sum(needle in line for line in lines) == 1, (needle, lines)


def test_rewards_are_not_required_when_rl_is_not_reached(assets, tmp_path, capsys, nothing_loads):
    argv = [*_argv(assets, tmp_path), "--rl.hps_checkpoint", "", "--rl.clip_model", "",
            "--train.max_steps", "100", "--dry-run"]
    assert _main("sd35_dmdr", argv) == 0
    assert "RL: not reached (rl.method refl, rl.start_step 2000, train.max_steps 100)" in capsys.readouterr().out
    assert _main("sd35_dmdr", [*argv[:-3], "--dry-run"]) == 2  # 4000 steps: RL is reached, HPS and CLIP needed
    err = capsys.readouterr().err
    assert "error: 2 problems" in err and [line for line in err.splitlines() if line.startswith("  --rl.")] == [
        f"  --rl.hps_checkpoint '': not set; point it at {HPS_WHAT} (or drop the reward from --rl.rewards)",
        f"  --rl.clip_model '': not set; point it at {CLIP_WHAT} (or drop the reward from --rl.rewards)"]


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_dry_run_prints_the_plan_and_loads_nothing(recipe, assets, tmp_path, capsys, nothing_loads):
    assert _main(recipe, [*_argv(assets, tmp_path, RECIPES[recipe]), "--dry-run"]) == 0
    family = "sd3" if RECIPES[recipe] == "shapes" else RECIPES[recipe]
    out = capsys.readouterr().out
    cfg = json.loads(out[out.index("{"):out.index("\nplan of the run")])
    assert cfg["model"]["family"] == family and cfg["train"]["output_dir"] == str(tmp_path / "out")
    plan = out[out.index("plan of the run"):]
    start, end = cfg["rl"]["start_step"], cfg["train"]["max_steps"]
    assert f"model    {family} (" in plan
    assert f"cold start: generator steps [0, {start}): lr generator {cfg['optim']['generator_lr']:g}" in plan
    assert f"RL (refl): generator steps [{start}, {end}): lr generator {cfg['optim']['rl_generator_lr']:g}" in plan
    assert f"{cfg['data']['rl_batch_size']} prompts per rank" in plan
    assert "world size 1, mesh dp_replicate 1 x dp_shard 1" in plan and "fresh start" in plan
    assert not (tmp_path / "out" / "config.json").exists() and not (tmp_path / "out" / "checkpoints").exists()


def test_dry_run_plans_the_sharded_mesh(assets, tmp_path, monkeypatch, capsys, nothing_loads):
    """At world size 2 (RANK 0 of it) the plan shows the mesh and what is sharded; the other ranks print nothing."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert _main("tiny_dmdr", [*_argv(assets, tmp_path), "--dry-run"]) == 0
    plan = capsys.readouterr().out.split("plan of the run")[1]
    assert "world size 2, mesh dp_replicate 1 x dp_shard 2" in plan and "FSDP2 over dp_shard 2" in plan
    assert "MB each" in plan
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert _main("tiny_dmdr", [*_argv(assets, tmp_path), "--dry-run"]) == 0
    assert capsys.readouterr().out == ""


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["lora", "full"])
def test_checkpoint_size_estimate_matches_a_real_checkpoint(mode, tiny_assets, tmp_path):
    """The free-disk check's estimate (from the weight headers only) against the checkpoint a run then writes."""
    from dmdr.launch import run
    from dmdr.preflight import preflight_run
    from dmdr.preflight.run_checks import checkpoint_bytes
    from tests.tiny_helpers import tiny_config

    cfg = tiny_config(tiny_assets, tmp_path / "out", train__max_steps=1, rl__start_step=5, dmd__ratio=1,
                      model__generator_mode=mode, optim__ema_decay=0.5 if mode == "full" else 0.0)
    estimate = checkpoint_bytes(cfg, preflight_run(cfg).facts)
    assert run(cfg) == 0
    written = sum(f.stat().st_size for f in (tmp_path / "out" / "checkpoints" / "step-1").iterdir())
    assert 0.8 < estimate / written < 1.25, (estimate, written)


def test_weight_file_headers():
    """Truncated safetensors and torch zips are refused, a legacy (non-zip) torch file is accepted."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        save_file({"w": torch.zeros(64, 64)}, str(d / "a.safetensors"))
        assert weight_file_problem(d / "a.safetensors") is None
        (d / "b.safetensors").write_bytes((d / "a.safetensors").read_bytes()[:-1])
        assert "truncated" in weight_file_problem(d / "b.safetensors")
        torch.save({"w": torch.zeros(4)}, d / "legacy.pt", _use_new_zipfile_serialization=False)
        assert torch_checkpoint_problem(d / "legacy.pt") is None
        with zipfile.ZipFile(d / "other.zip", "w") as zf:
            zf.writestr("readme.txt", "hello")
        assert "no data.pkl" in torch_checkpoint_problem(d / "other.zip")


def _tool(name: str):
    import importlib

    return importlib.import_module(f"dmdr.cli.{name}")


def test_tools_report_all_their_bad_paths_at_once(assets, tmp_path, capsys, nothing_loads):
    run = tmp_path / "run"
    run.mkdir()
    cfg = load_recipe("tiny_dmdr").tiny_dmdr()
    cfg.model.path = str(tmp_path / "moved-away")
    from dmdr.config import save_config

    save_config(cfg, run)
    assert _tool("convert_to_diffusers").main(["--run", str(run), "--out", "/proc/forbidden"]) == 2
    err = capsys.readouterr().err
    assert _errors(err)[0].startswith("error: 3 problems")
    assert "--model-path" in err and "--step 'latest': no complete checkpoint" in err
    assert "--out '/proc/forbidden': is not writable" in err

    assert _tool("sample").main(["--run", str(tmp_path / "nope"), "--prompt-file", str(tmp_path / "p.txt"),
                                 "--out", "/proc/x/grid.png"]) == 2
    err = capsys.readouterr().err
    assert _errors(err)[0].startswith("error: 3 problems") and "--run" in err and "--prompt-file" in err

    cache = _tool("cache_text_embeddings")
    assert cache.main(["--model.path", str(tmp_path / "nope"), "--data.sources", str(tmp_path / "none.txt"),
                       "--data.embedding_cache", str(tmp_path / "cache")]) == 2
    err = capsys.readouterr().err
    assert _errors(err)[0].startswith("error: 2 problems") and "--model.path" in err and "--data.sources" in err
    assert not (tmp_path / "cache").exists()


@pytest.mark.slow
def test_world_size_2_prints_the_message_once(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "recipes" / "tiny_dmdr.py"), "--model.path", "/nonexistent/tiny", "--data.sources",
           str(tmp_path / "missing.txt"), "--train.output_dir", str(tmp_path / "out")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    assert output.count("error: 2 problems found before any work") == 1, output[-3000:]
    lines = output.splitlines()
    assert sum("--model.path '/nonexistent/tiny'" in line for line in lines) == 1
    assert sum("--data.sources" in line and "missing.txt" in line for line in lines) == 1
    assert "exitcode  : 2" in output  # each rank exited 2 (torchrun's summary)
    assert not (tmp_path / "out" / "checkpoints").exists()
