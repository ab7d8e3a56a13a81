"""SDXL end to end: tiny runs (LoRA 4-step, full 1-step), export to a stock StableDiffusionXLPipeline that
reproduces dmdr's sampler, and the recipes' one-line refusal of another family's folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dmdr import export
from dmdr.launch import run
from dmdr.models.lora import lora_layers
from dmdr.sampling import few_step_sample
from dmdr.schedules import generator_levels
from tests.e2e.test_export import PROMPTS, _tool
from tests.tiny_helpers import tiny_config

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

TOL = 1e-4
SPECS = {
    "lora-4step": {"model__generator_mode": "lora", "dmd__num_steps": 4, "dmd__timesteps": "999,749,499,249"},
    "full-1step": {"model__generator_mode": "full", "dmd__num_steps": 1, "dmd__timesteps": "399"},
}


@pytest.fixture(scope="module")
def sdxl_model(tmp_path_factory) -> Path:
    from dmdr.models.tiny import build_tiny_sdxl

    return build_tiny_sdxl(tmp_path_factory.mktemp("sdxl") / "tiny-sdxl")


@pytest.fixture(scope="module")
def runs(sdxl_model, tiny_assets, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sdxl-runs")
    out = {}
    for name, spec in SPECS.items():
        cfg = tiny_config(tiny_assets, root / name, model__path=str(sdxl_model), model__family="sdxl",
                          dmd__sampler="sde", dmd__backward_simulation="sde", train__max_steps=2, dmd__ratio=1,
                          checkpoint__interval=0, data__batch_size=2, rl__start_step=1, **spec)
        assert run(cfg) == 0
        out[name] = root / name
    return out


@pytest.mark.parametrize("name", list(SPECS))
def test_stock_sdxl_pipeline_reproduces_the_training_sampler(name, runs, tmp_path):
    from diffusers import LCMScheduler, StableDiffusionXLPipeline

    folder = tmp_path / "export"
    assert _tool("convert_to_diffusers").main(["--run", str(runs[name]), "--out", str(folder)]) == 0
    cfg = export.read_run_config(runs[name])
    backbone, roles, _ = export.load_generator(cfg, export.resolve_checkpoint(runs[name]))
    if roles.shared_base:  # the LoRA generator trained adapters on convolutions too, and they moved
        convs = [layer for _, layer in lora_layers(roles.generator.net) if type(layer).__name__ == "LoRAConv2d"]
        assert convs and any(layer.lora_B["generator"].abs().max() > 0 for layer in convs)
    levels = generator_levels(cfg.dmd.num_steps, cfg.dmd.shift, cfg.dmd.t_min, cfg.dmd.timesteps,
                              backbone.parameterization)
    g = torch.Generator().manual_seed(7)
    noise = torch.randn(len(PROMPTS), *backbone.latent_shape(cfg.model.resolution), generator=g)
    with torch.no_grad():
        cond = backbone.text_encoder.encode(PROMPTS)
        ours = few_step_sample(roles.generator_fn, noise, cond, levels, backbone.parameterization, mode="sde",
                               generator=g)
        teacher = few_step_sample(lambda x, t, c: roles.critic_fn(x, t, c, 0.0), noise, cond, levels,
                                  backbone.parameterization, mode="sde", generator=torch.Generator().manual_seed(8))

    pipe = StableDiffusionXLPipeline.from_pretrained(str(folder), local_files_only=True)
    assert isinstance(pipe.scheduler, LCMScheduler) and (folder / "unet").is_dir()
    assert not (folder / "transformer").exists()
    pipe.set_progress_bar_config(disable=True)
    settings = export.InferenceSettings.read(folder)
    kwargs = settings.pipeline_kwargs()
    assert kwargs["timesteps"] == [int(t) for t in cfg.dmd.timesteps] and kwargs["guidance_scale"] == 0.0
    readme = (folder / "README.md").read_text()
    assert f"timesteps={kwargs['timesteps']}" in readme and "guidance_scale=0.0" in readme
    with torch.no_grad():  # the pipeline draws the initial latents, then each step's noise, from its generator
        got = pipe(list(PROMPTS), output_type="latent", generator=torch.Generator().manual_seed(7), **kwargs).images
    assert pipe.scheduler.timesteps.tolist() == kwargs["timesteps"]
    torch.testing.assert_close(got, ours, atol=TOL, rtol=0)
    assert (ours - teacher).abs().max() > 100 * TOL  # not vacuous: the trained generator is not the teacher
    saved = json.loads((folder / export.SETTINGS_FILE).read_text())
    assert saved["scheduler"]["class"] == "LCMScheduler" and saved["source"]["generator_mode"] in ("lora", "full")
    if name == "lora-4step":  # tools/sample.py knows the family: checkpoint and export give the same pixels
        sample = _tool("sample")
        a, b = tmp_path / "a" / "grid.png", tmp_path / "b" / "grid.png"
        assert sample.main(["--run", str(runs[name]), "--prompts", *PROMPTS, "--out", str(a), "--seed", "3"]) == 0
        assert sample.main(["--pipeline", str(folder), "--prompts", *PROMPTS, "--out", str(b), "--seed", "3"]) == 0
        for i in range(len(PROMPTS)):
            pa = np.asarray(Image.open(a.with_name(f"grid-{i:03d}.png")), dtype=np.int32)
            pb = np.asarray(Image.open(b.with_name(f"grid-{i:03d}.png")), dtype=np.int32)
            assert np.abs(pa - pb).max() <= 1


@pytest.mark.parametrize("recipe,folder,needle", [
    ("sdxl_dmdr", "sd3", "is a StableDiffusion3Pipeline folder, i.e. sd3; set it to sd3 or auto"),
    ("sd3m_dmdr", "sdxl", "is a StableDiffusionXLPipeline folder, i.e. sdxl; set it to sdxl or auto"),
])
def test_recipe_refuses_another_familys_folder_in_one_line(recipe, folder, needle, sdxl_model, tiny_assets, tmp_path,
                                                           capsys):
    from dmdr.launch import main
    from tests.tiny_helpers import load_recipe

    path = sdxl_model if folder == "sdxl" else tiny_assets["model"]
    argv = ["--model.path", str(path), "--data.sources", tiny_assets["prompts"], "--rl.method", "none",
            "--data.num_workers", "0", "--train.output_dir", str(tmp_path / "out"), "--train.device", "cpu"]
    capsys.readouterr()
    assert main(getattr(load_recipe(recipe), recipe), argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], err[-2000:]
    assert "Traceback" not in err and not (tmp_path / "out" / "checkpoints").exists()


@pytest.mark.parametrize("family", ["sdxl", "zimage"])
def test_tiny_recipe_builds_the_matching_tiny_pipeline(family, tmp_path):
    from dmdr.config import apply_overrides
    from dmdr.models.loading import detect_family, read_model_index
    from tests.tiny_helpers import load_recipe

    recipe = load_recipe("tiny_dmdr")
    cfg = apply_overrides(recipe.tiny_dmdr(), ["--model.family", family, "--train.output_dir", str(tmp_path)])
    recipe.prepare_assets(cfg)
    assert detect_family(read_model_index(cfg.model.path), family).name == family
    assert Path(cfg.model.path).name == f"tiny-{family}"
    if family == "sdxl":
        assert cfg.dmd.timesteps == (999, 749, 499, 249) and cfg.dmd.sampler == "sde"
    else:
        assert cfg.dmd.timesteps == () and cfg.model.max_sequence_length == 64
