"""FLUX.1 and FLUX.2 [klein] end to end on tiny random folders: a LoRA run through the real entry point, the merged
export that stock ``FluxPipeline`` / ``Flux2KleinPipeline`` load and that reproduces dmdr's sampler (fp32), the
``--lora`` release that ``pipe.load_lora_weights`` takes and that gives the merged export's latents, the tiny
recipe's family switch, and the preflight's one-line refusal of a folder of another family (both ways)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dmdr import export
from dmdr.launch import run
from dmdr.models.flux import pack_latents
from dmdr.models.flux2 import unpatchify
from tests.e2e.export_checks import few_step_scheduler, load_lora, sample_run
from tests.tiny_helpers import load_recipe, one_error_line, tiny_config, tool

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

TOL = 1e-5
PROMPTS = ["a photo of a cat", "a red car in the rain"]
FAMILIES = ("flux", "flux2")
PIPELINES = {"flux": "FluxPipeline", "flux2": "Flux2KleinPipeline"}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    from dmdr.models.tiny_flux import build_tiny_flux, build_tiny_flux2

    root = tmp_path_factory.mktemp("flux-models")
    return {"flux": build_tiny_flux(root / "tiny-flux"), "flux2": build_tiny_flux2(root / "tiny-flux2")}


@pytest.fixture(scope="module")
def runs(models, tiny_assets, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("flux-runs")
    out = {}
    for family in FAMILIES:
        cfg = tiny_config(tiny_assets, root / family, model__path=str(models[family]), model__family=family,
                          model__max_sequence_length=64 if family == "flux2" else 16, train__max_steps=2,
                          dmd__ratio=1, checkpoint__interval=0, data__batch_size=2, rl__start_step=1,
                          dmd__generator_guidance=3.0, optim__generator_lr=3e-3, optim__rl_generator_lr=3e-3)
        assert run(cfg) == 0
        out[family] = root / family
    return out


def _pipeline_latents(pipe, family: str, noise: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """The stock pipeline's final latents in dmdr's latent convention, from dmdr's initial noise."""
    latents = pack_latents(noise) if family == "flux" else noise
    with torch.no_grad():
        out = pipe(prompt=list(PROMPTS), latents=latents.clone(), output_type="latent", **kwargs).images
    if family == "flux":  # packed, (B, H/2 W/2, 4C)
        from dmdr.models.flux import unpack_latents

        return unpack_latents(out, *noise.shape[2:])
    return out  # flux2: already de-normalised and unpatchified: compare in the VAE's own latent space


@pytest.mark.parametrize("family", FAMILIES)
def test_stock_pipeline_reproduces_the_training_sampler(family, runs, tmp_path):
    from diffusers import DiffusionPipeline

    folder = tmp_path / "export"
    assert tool("convert_to_diffusers").main(["--run", str(runs[family]), "--out", str(folder)]) == 0
    sampled = sample_run(runs[family], PROMPTS)
    levels, noise, ours, teacher = sampled.levels, sampled.noise, sampled.ours, sampled.teacher
    if family == "flux2":
        mean, std = sampled.backbone.codec._stats(ours)
        ours, teacher = unpatchify(ours * std + mean), unpatchify(teacher * std + mean)

    pipe = DiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
    assert type(pipe).__name__ == PIPELINES[family]
    pipe.set_progress_bar_config(disable=True)
    settings = export.InferenceSettings.read(folder)
    kwargs = settings.pipeline_kwargs(exact=True)
    # FLUX.1: guidance_scale feeds the guidance embedding at the generator's value; FLUX.2: CFG off (<= 1)
    assert kwargs["guidance_scale"] == (3.0 if family == "flux" else 1.0)
    assert pipe.scheduler.config.shift == 1.0 and not pipe.scheduler.config.use_dynamic_shifting
    got = _pipeline_latents(pipe, family, noise, kwargs)
    assert torch.equal(pipe.scheduler.sigmas[:-1], levels)
    torch.testing.assert_close(got, ours, atol=TOL, rtol=0)
    assert (teacher - ours).abs().max() > 50 * TOL  # the trained generator is not the teacher
    card = (folder / "README.md").read_text()
    assert PIPELINES[family] in card and f"guidance_scale={kwargs['guidance_scale']}" in card
    saved = json.loads((folder / export.SETTINGS_FILE).read_text())
    assert saved["guidance_scale"] == kwargs["guidance_scale"]


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_release_loads_in_the_stock_pipeline_and_equals_the_merged_export(family, runs, tmp_path):
    from diffusers import DiffusionPipeline

    merged_dir, lora_dir = tmp_path / "merged", tmp_path / "lora"
    convert = tool("convert_to_diffusers")
    assert convert.main(["--run", str(runs[family]), "--out", str(merged_dir)]) == 0
    assert convert.main(["--run", str(runs[family]), "--out", str(lora_dir), "--lora"]) == 0
    cfg = export.read_run_config(runs[family])
    settings = export.InferenceSettings.read(lora_dir)
    kwargs = settings.pipeline_kwargs(exact=True)

    def latents(pipe) -> torch.Tensor:
        with torch.no_grad():
            return pipe(prompt=list(PROMPTS), generator=torch.Generator().manual_seed(11), output_type="latent",
                        **kwargs).images

    merged = DiffusionPipeline.from_pretrained(str(merged_dir), local_files_only=True)
    merged.set_progress_bar_config(disable=True)
    base = DiffusionPipeline.from_pretrained(cfg.model.path, local_files_only=True)
    few_step_scheduler(base, lora_dir)
    before = latents(base)
    assert load_lora(base, lora_dir) == []  # no unexpected / missing keys, no conversion notices
    after = latents(base)
    torch.testing.assert_close(after, latents(merged), atol=TOL, rtol=0)
    assert (after - before).abs().max() > 10 * TOL
    assert "load_lora_weights" in (lora_dir / "README.md").read_text()


@pytest.mark.parametrize("family", FAMILIES)
def test_kohya_lora_release_names_bfl_modules_and_carries_the_generator(family, runs, tmp_path):
    """``--lora --lora-format kohya``: BFL's module names, each fused linear's ``up @ down`` the diffusers release's
    parts stacked (module doc of ``dmdr.models.flux_bfl``); FLUX.2's loads in the stock pipeline with
    ``load_lora_weights`` and gives the merged export's latents (FLUX.1's single blocks need FLUX.1-dev's widths in
    diffusers' converter: checked at those widths in tests/export/test_flux_kohya_lora.py)."""
    from diffusers import DiffusionPipeline
    from safetensors.torch import load_file

    from dmdr.models.flux_bfl import DOUBLE, FLUX2_DOUBLE, FLUX2_SINGLE, SINGLE

    convert = tool("convert_to_diffusers")
    lora_dir, kohya_dir = tmp_path / "lora", tmp_path / "kohya"
    assert convert.main(["--run", str(runs[family]), "--out", str(lora_dir), "--lora"]) == 0
    assert convert.main(["--run", str(runs[family]), "--out", str(kohya_dir), "--lora", "--lora-format", "kohya"]) == 0
    diffusers_file = load_file(lora_dir / "pytorch_lora_weights.safetensors")
    kohya = load_file(kohya_dir / "kohya.safetensors")
    assert all(k.startswith(("lora_unet_double_blocks_", "lora_unet_single_blocks_")) for k in kohya)
    tables = {"double_blocks": (DOUBLE, FLUX2_DOUBLE), "single_blocks": (SINGLE, FLUX2_SINGLE)}
    for key in (k for k in kohya if k.endswith(".lora_down.weight")):
        module = key[len("lora_unet_"):-len(".lora_down.weight")]
        kind, index, bfl = module.split("_", 3)[0] + "_blocks", module.split("_")[2], module.split("_", 3)[3]
        table = tables[kind][family == "flux2"]
        parts = next(v for k, v in table.items() if k.replace(".", "_") == bfl)
        prefix = f"transformer.{'transformer_blocks' if kind == 'double_blocks' else 'single_transformer_blocks'}"
        rows = []
        for part in parts:
            name = f"{prefix}.{index}.{part}"
            if f"{name}.lora_A.weight" in diffusers_file:
                a, b = diffusers_file[f"{name}.lora_A.weight"], diffusers_file[f"{name}.lora_B.weight"]
                rows.append(b.double() @ a.double())
            else:  # FLUX.1's proj_mlp (no adapter): zero rows, 4x the width
                rows.append(torch.zeros(4 * rows[0].shape[1], rows[0].shape[1], dtype=torch.float64))
        fused = kohya[key.replace(".lora_down.", ".lora_up.")].double() @ kohya[key].double()
        torch.testing.assert_close(fused, torch.cat(rows), atol=1e-7, rtol=0)
        assert kohya[key.replace(".lora_down.weight", ".alpha")].item() == kohya[key].shape[0]
    assert "BFL" in (kohya_dir / "README.md").read_text()
    if family == "flux":
        return
    cfg = export.read_run_config(runs[family])
    settings = export.InferenceSettings.read(kohya_dir)

    def latents(pipe) -> torch.Tensor:
        with torch.no_grad():
            return pipe(prompt=list(PROMPTS), generator=torch.Generator().manual_seed(11), output_type="latent",
                        **settings.pipeline_kwargs(exact=True)).images

    base = DiffusionPipeline.from_pretrained(cfg.model.path, local_files_only=True)
    few_step_scheduler(base, kohya_dir)
    base.load_lora_weights(str(kohya_dir), weight_name="kohya.safetensors")
    merged_dir = tmp_path / "merged"
    assert convert.main(["--run", str(runs[family]), "--out", str(merged_dir)]) == 0
    merged = DiffusionPipeline.from_pretrained(str(merged_dir), local_files_only=True)
    merged.set_progress_bar_config(disable=True)
    torch.testing.assert_close(latents(base), latents(merged), atol=TOL, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_recipe_builds_the_matching_tiny_pipeline(family, tmp_path):
    from dmdr.config import apply_overrides
    from dmdr.models.loading import detect_family, read_model_index

    recipe = load_recipe("tiny_dmdr")
    cfg = apply_overrides(recipe.tiny_dmdr(), ["--model.family", family, "--train.output_dir", str(tmp_path)])
    recipe.prepare_assets(cfg)
    assert detect_family(read_model_index(cfg.model.path), family).name == family
    assert Path(cfg.model.path).name == f"tiny-{family}"


@pytest.mark.parametrize("requested,folder,needle", [
    ("sd3", "flux", "is a FluxPipeline folder, i.e. flux; set it to flux or auto"),
    ("flux", "sd3", "is a StableDiffusion3Pipeline folder, i.e. sd3; set it to sd3 or auto"),
    ("flux", "flux2", "is a Flux2KleinPipeline folder, i.e. flux2; set it to flux2 or auto"),
    ("flux2", "flux", "is a FluxPipeline folder, i.e. flux; set it to flux or auto"),
])
def test_preflight_refuses_another_familys_folder_in_one_line(requested, folder, needle, models, tiny_assets,
                                                              tmp_path, capsys):
    from dmdr.launch import main

    path = tiny_assets["model"] if folder == "sd3" else models[folder]
    argv = ["--model.path", str(path), "--model.family", requested, "--data.sources", tiny_assets["prompts"],
            "--rl.method", "none", "--data.num_workers", "0", "--train.output_dir", str(tmp_path / "out"),
            "--train.device", "cpu"]
    capsys.readouterr()
    assert main(load_recipe("tiny_dmdr").tiny_dmdr, argv) == 2
    one_error_line(capsys.readouterr().err, needle)
    assert not (tmp_path / "out" / "checkpoints").exists()
