"""Export to diffusers: the stock pipeline reproduces dmdr's few-step sampler; sampling tool; one-line errors.

The tiny runs and their merged exports are the session fixtures ``runs`` / ``exports`` of conftest.py.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from dmdr import export
from dmdr.distributed.offline import model_tensors
from dmdr.parameterization import FlowMatching
from dmdr.sampling import few_step_sample
from tests.e2e.export_checks import sample_run
from tests.tiny_helpers import one_error_line as _one_error_line
from tests.tiny_helpers import script as _script
from tests.tiny_helpers import tool as _tool

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

TOL = 1e-5
"""fp32 rounding: a merged LoRA and the same LoRA applied unmerged differ by a few ulps."""
PROMPTS = ["a photo of a cat", "a red car in the rain", "a bowl of fruit"]
WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.mark.parametrize("name", ["lora", "full", "zimage"])
def test_stock_pipeline_reproduces_the_training_sampler(name, runs, exports):
    from diffusers import DiffusionPipeline

    sampled = sample_run(runs[name], PROMPTS)
    assert sampled.weights == "trained"  # these runs have no EMA
    cfg, backbone, roles, levels = sampled.cfg, sampled.backbone, sampled.roles, sampled.levels
    noise, cond, ours, teacher = sampled.noise, sampled.cond, sampled.ours, sampled.teacher
    with torch.no_grad():
        to_zero = few_step_sample(roles.generator_fn, noise, cond, levels, FlowMatching(t_min=0.0), mode="ode")

    pipe = DiffusionPipeline.from_pretrained(str(exports[name]), local_files_only=True)
    expected_class = "ZImagePipeline" if name == "zimage" else "StableDiffusion3Pipeline"
    assert type(pipe).__name__ == expected_class
    pipe.set_progress_bar_config(disable=True)
    settings = export.InferenceSettings.read(exports[name])
    assert settings.sigmas == levels[:-1].tolist() and settings.levels == levels.tolist()
    assert pipe.scheduler.config.shift == 1.0 and not pipe.scheduler.config.use_dynamic_shifting
    assert settings.guidance_scale == (0.0 if name == "zimage" else 1.0)  # CFG off for either pipeline
    saved = json.loads((exports[name] / export.SETTINGS_FILE).read_text())
    assert saved["num_inference_steps"] == cfg.dmd.num_steps and saved["sigmas"] == settings.sigmas

    with torch.no_grad():
        exact = pipe(list(PROMPTS), latents=noise.clone(), output_type="latent",
                     **settings.pipeline_kwargs(exact=True)).images
        # the scheduler ran our levels bit for bit: model timesteps 1000 t_i, Euler steps down to t_min
        assert torch.equal(pipe.scheduler.timesteps, levels * 1000)
        assert torch.equal(pipe.scheduler.sigmas[:-1], levels)
        plain = pipe(list(PROMPTS), latents=noise.clone(), output_type="latent",
                     **settings.pipeline_kwargs(exact=False)).images
    torch.testing.assert_close(exact, ours, atol=TOL, rtol=0)
    for n in (1, 2):  # the mapping holds for any step count (here on the same generator)
        short = export.InferenceSettings(**{**dataclasses.asdict(settings), "num_inference_steps": n})
        with torch.no_grad():
            ref = few_step_sample(roles.generator_fn, noise, cond, torch.tensor(short.levels),
                                  backbone.parameterization, mode="ode")
            got = pipe(list(PROMPTS), latents=noise.clone(), output_type="latent",
                       **short.pipeline_kwargs(exact=True)).images
        torch.testing.assert_close(got, ref, atol=TOL, rtol=0)
    # the documented residual of the plain call: the last step lands on 0, not t_min
    torch.testing.assert_close(plain, to_zero, atol=TOL, rtol=0)
    assert (plain - ours).abs().max() > 50 * TOL
    # and the trained generator is not the teacher, so the match above means something
    assert (teacher - ours).abs().max() > 50 * TOL


def test_lora_export_is_teacher_plus_generator_adapter_only(tiny_assets, runs, exports):
    cfg = export.read_run_config(runs["lora"])
    teacher = load_file(Path(tiny_assets["model"]) / "transformer" / WEIGHTS)
    exported = load_file(exports["lora"] / "transformer" / WEIGHTS)
    assert exported.keys() == teacher.keys() and not any("lora" in k for k in exported)
    ckpt = model_tensors(export.resolve_checkpoint(runs["lora"]))
    gen_scale = cfg.model.generator_lora_alpha / cfg.model.generator_lora_rank
    critic_scale = cfg.model.critic_lora_alpha / cfg.model.critic_lora_rank
    prefix, suffix = "models.model.net.", ".lora_A.generator"
    layers = [k[len(prefix):-len(suffix)] for k in ckpt if k.endswith(suffix)]
    assert len(layers) > 0
    critic_seen = 0.0
    for layer in layers:
        a, b = ckpt[f"{prefix}{layer}.lora_A.generator"], ckpt[f"{prefix}{layer}.lora_B.generator"]
        expected = teacher[f"{layer}.weight"] + gen_scale * (b @ a)
        torch.testing.assert_close(exported[f"{layer}.weight"], expected, atol=1e-6, rtol=0)
        critic = critic_scale * (ckpt[f"{prefix}{layer}.lora_B.critic"] @ ckpt[f"{prefix}{layer}.lora_A.critic"])
        critic_seen = max(critic_seen, critic.abs().max().item())
    assert critic_seen > 1e-5  # the critic adapter was trained, and none of it is in the export
    assert max((exported[k] - teacher[k]).abs().max().item() for k in teacher) > 1e-5
    untouched = [k for k in teacher if not any(k == f"{layer}.weight" for layer in layers)]
    assert all(torch.equal(exported[k], teacher[k]) for k in untouched)


def test_full_export_is_the_full_copy(tiny_assets, runs, exports):
    teacher = load_file(Path(tiny_assets["model"]) / "transformer" / WEIGHTS)
    exported = load_file(exports["full"] / "transformer" / WEIGHTS)
    assert exported.keys() == teacher.keys() and not any("lora" in k for k in exported)
    ckpt = model_tensors(export.resolve_checkpoint(runs["full"]))
    for k, v in exported.items():
        assert torch.equal(v, ckpt[f"generator.model.net.{k}"]), k
    assert any(k.startswith("critic.") and k.endswith(".lora_B.critic") for k in ckpt)
    assert max((exported[k] - teacher[k]).abs().max().item() for k in teacher) > 1e-5


def _broken(kind: str, runs: dict[str, Path], tmp: Path) -> list[str]:
    """Argv (without --out) for one kind of bad input, built from a copy of the LoRA run."""
    good = runs["lora"]
    if kind == "missing-run":
        return ["--run", str(tmp / "no-such-run")]
    if kind == "no-step":
        return ["--run", str(good), "--step", "7"]
    copy = tmp / "run"
    if kind == "no-checkpoint":
        copy.mkdir()
        shutil.copy(good / "config.json", copy / "config.json")
        return ["--run", str(copy)]
    shutil.copytree(good, copy)
    config = json.loads((copy / "config.json").read_text())
    if kind == "corrupt":
        data = max((copy / "checkpoints" / "step-3").glob("*.distcp"), key=lambda p: p.stat().st_size)
        blob = bytearray(data.read_bytes())
        blob[len(blob) // 2] ^= 0xFF  # same size: only the CRC32 can tell
        data.write_bytes(bytes(blob))
    elif kind == "teacher-gone":
        config["model"]["path"] = str(tmp / "moved-away")
    elif kind == "wrong-mode":
        config["model"]["generator_mode"] = "full"
    elif kind == "wrong-rank":  # DCP itself fails (shape mismatch): its multi-line wrapper becomes one line
        config["model"]["generator_lora_rank"] = 4
    (copy / "config.json").write_text(json.dumps(config))
    return ["--run", str(copy)]


@pytest.mark.parametrize("kind,needle", [
    ("missing-run", "does not exist"),
    ("no-checkpoint", "no complete checkpoint"),
    ("no-step", "no checkpoint"),
    ("corrupt", "does not match its recorded CRC32"),
    ("teacher-gone", "--model-path"),
    ("wrong-mode", "has no entry 'generator'"),
    ("wrong-rank", "cannot read the generator from"),
])
def test_convert_bad_input_is_one_line(kind, needle, runs, tmp_path, capsys):
    out = tmp_path / "export"
    assert _tool("convert_to_diffusers").main([*_broken(kind, runs, tmp_path), "--out", str(out)]) == 2
    _one_error_line(capsys.readouterr().err, needle)
    assert not out.exists()


def test_convert_script_exit_code_and_refusal_to_overwrite(runs, exports, tmp_path):
    proc = _script("convert_to_diffusers", [*_broken("corrupt", runs, tmp_path), "--out", str(tmp_path / "x")],
                   tmp_path)
    assert proc.returncode == 2
    _one_error_line(proc.stderr, "does not match its recorded CRC32")
    convert = _tool("convert_to_diffusers")
    before = sorted(p.name for p in exports["lora"].iterdir())
    assert convert.main(["--run", str(runs["lora"]), "--out", str(exports["lora"])]) == 2
    assert sorted(p.name for p in exports["lora"].iterdir()) == before
    other = tmp_path / "precious"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    assert convert.main(["--run", str(runs["lora"]), "--out", str(other), "--overwrite"]) == 2
    assert (other / "notes.txt").read_text() == "keep"  # --overwrite replaces earlier exports only


def test_sample_tool_writes_pngs_and_matches_the_exported_pipeline(runs, exports, tmp_path, capsys):
    sample = _tool("sample")
    cfg = export.read_run_config(runs["lora"])
    res = cfg.model.resolution
    a = tmp_path / "a" / "grid.png"
    assert sample.main(["--run", str(runs["lora"]), "--step", "3", "--prompts", *PROMPTS, "--out", str(a),
                        "--seed", "3"]) == 0
    grid = Image.open(a)
    assert grid.size == (3 * (res + 2) + 2, res + 4) and grid.mode == "RGB"  # one row, 2-pixel padding
    singles = [a.with_name(f"grid-{i:03d}.png") for i in range(3)]
    assert all(Image.open(p).size == (res, res) for p in singles)

    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("\n".join(PROMPTS) + "\n\n")
    b = tmp_path / "b" / "grid.png"
    assert sample.main(["--pipeline", str(exports["lora"]), "--prompt-file", str(prompt_file), "--out", str(b),
                        "--seed", "3"]) == 0
    for i in range(3):  # same noise, same sampler: the same pixels from the checkpoint and from the export
        pa = np.asarray(Image.open(singles[i]), dtype=np.int32)
        pb = np.asarray(Image.open(b.with_name(f"grid-{i:03d}.png")), dtype=np.int32)
        assert np.abs(pa - pb).max() <= 1
    capsys.readouterr()
    teacher_folder = cfg.model.path  # a plain diffusers folder, not an export
    assert sample.main(["--pipeline", teacher_folder, "--prompts", "a cat", "--out", str(tmp_path / "c.png")]) == 2
    _one_error_line(capsys.readouterr().err, export.SETTINGS_FILE)
