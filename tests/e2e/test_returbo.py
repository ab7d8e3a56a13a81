"""Re-turbo end to end on the tiny SD3: a run whose teacher is base + a user's LoRA, its releases as the user loads
them (the stock base pipeline with its OWN scheduler, the user's LoRA and ours: ``load_lora_weights`` the only extra
line; kohya keys), a second run started from the first run's few-step LoRA (init exact, resumed run equal to the
uninterrupted one, exported), a full generator started from a merged export, and the record that refuses a resume
against other adapters."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dmdr import export
from dmdr.build import build_models
from dmdr.distributed.offline import model_tensors
from dmdr.errors import CheckpointError
from dmdr.export import release
from dmdr.export.generator import check_export_source
from dmdr.export.settings import StopAfterSteps
from dmdr.models import GENERATOR
from dmdr.models.adapters import clean_name, read_lora
from dmdr.models.families import family_spec
from dmdr.models.lora import lora_layers
from dmdr.models.tiny_lora import write_random_lora
from dmdr.returbo import denoiser_shapes
from tests.tiny_helpers import tiny_config, tool

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

TOL = 1e-4
PROMPTS = ["a photo of a cat", "a red car in the rain"]
QUICK = {"train__max_steps": 3, "dmd__ratio": 1, "checkpoint__interval": 1, "model__generator_mode": "lora"}


def _convert(argv: list[str]) -> int:
    return tool("convert_to_diffusers").main(argv)


@pytest.fixture(scope="module")
def world(tiny_assets, tmp_path_factory) -> dict[str, Path]:
    """The user's LoRA, a run against base + it (scale 0.8), its three releases, and a run initialised from its
    few-step LoRA (uninterrupted and split 2 + 1 steps)."""
    from dmdr.launch import run

    root = tmp_path_factory.mktemp("returbo")
    out = {"user": write_random_lora(tiny_assets["model"], root / "user", rank=2, alpha=4.0,
                                     targets=("to_q", "to_k", "to_v", "to_out.0"), seed=5, std=0.1)}
    adapters = f"{out['user']}:0.8"
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out["run"] = root / "run"
        assert run(tiny_config(tiny_assets, out["run"], **QUICK, model__teacher_adapters=adapters)) == 0
        for name, extra in (("merged", []), ("lora", ["--lora"]), ("kohya", ["--lora", "--lora-format", "kohya"])):
            out[name] = root / name
            assert _convert(["--run", str(out["run"]), "--out", str(out[name]), *extra]) == 0, name
        init = {"model__teacher_adapters": adapters, "model__init_generator": str(out["lora"])}
        out["again"] = root / "again"
        assert run(tiny_config(tiny_assets, out["again"], **QUICK, **init)) == 0
        out["split"] = root / "split"
        assert run(tiny_config(tiny_assets, out["split"], **{**QUICK, "train__max_steps": 2}, **init)) == 0
        assert run(tiny_config(tiny_assets, out["split"], **QUICK, **init)) == 0
    finally:
        torch.set_num_threads(previous)
    return out


def _pipe(path: str | Path):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(path), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _latents(pipe, settings: export.InferenceSettings, **kwargs) -> torch.Tensor:
    call = {**settings.pipeline_kwargs(exact=True), **kwargs}
    with torch.no_grad():
        return pipe(list(PROMPTS), generator=torch.Generator().manual_seed(11), output_type="latent", **call).images


def test_base_pipeline_with_its_own_scheduler_and_both_loras_reproduces_the_sampler(tiny_assets, world):
    """The user's recipe: base pipeline as it ships (its scheduler shifts by 3), their LoRA at 0.8, our LoRA, the
    base-scheduler sigmas of dmdr_inference.json: equal (fp32) to the merged export run with its own scheduler, which
    tests/e2e/test_export.py holds equal to dmdr's sampler."""
    settings = export.InferenceSettings.read(world["lora"])
    meta = json.loads((world["lora"] / export.SETTINGS_FILE).read_text())
    base_call = meta["base_scheduler"]
    assert base_call["shift"] == 3.0 and base_call["exact"]["stop_after_steps"] == settings.num_inference_steps
    reference = _latents(_pipe(world["merged"]), export.InferenceSettings.read(world["merged"]))

    pipe = _pipe(tiny_assets["model"])
    assert pipe.scheduler.config.shift == 3.0  # the base's own scheduler, not swapped
    plain = _latents(pipe, settings, sigmas=base_call["exact"]["sigmas"],
                     callback_on_step_end=StopAfterSteps(settings.num_inference_steps))
    assert torch.allclose(pipe.scheduler.sigmas[:-1], torch.tensor(settings.levels), atol=1e-6, rtol=0)
    pipe.load_lora_weights(str(world["user"].parent), adapter_name="user")
    pipe.load_lora_weights(str(world["lora"]), adapter_name="few_step")
    pipe.set_adapters(["user", "few_step"], adapter_weights=[0.8, 1.0])
    ours = _latents(pipe, settings, sigmas=base_call["exact"]["sigmas"],
                    callback_on_step_end=StopAfterSteps(settings.num_inference_steps))
    torch.testing.assert_close(ours, reference, atol=TOL, rtol=0)
    assert (ours - plain).abs().max() > 10 * TOL  # the adapters change the images: the match means something
    card = (world["lora"] / "README.md").read_text()
    assert 'sigmas=settings["base_scheduler"]["sigmas"]' in card and "model.teacher_adapters" in card
    assert f'pipe.load_lora_weights("{world["user"]}", adapter_name="user0")' in card


def test_kohya_release_converts_to_the_diffusers_one(tiny_assets, world):
    """``--lora-format kohya``: lora_unet_<module_> keys, alpha = rank; read back (dmdr's converter: diffusers has none
    for SD3) it is the diffusers release, and diffusers' own loader takes the converted dict without key warnings."""
    file = world["kohya"] / f"{world['kohya'].name}.safetensors"
    saved = load_file(file)
    assert saved and all(k.startswith("lora_unet_") for k in saved)
    diffusers_form = load_file(world["lora"] / release.LORA_FILE)
    shapes = denoiser_shapes(tiny_assets["model"], family_spec("sd3"))
    layers = {n: (a.float(), b.float()) for n, (a, b) in read_lora(file, shapes).items()}
    converted = release.lora_state_dict(layers, "sd3", torch.float32)
    assert converted.keys() == diffusers_form.keys()
    for key, value in diffusers_form.items():
        torch.testing.assert_close(converted[key], value, atol=1e-7, rtol=1e-6)
    pipe = _pipe(tiny_assets["model"])
    pipe.load_lora_weights(converted)
    assert "kohya" in (world["kohya"] / "README.md").read_text()


def test_zimage_kohya_release_loads_with_diffusers_own_converter(runs, tmp_path):
    """Z-Image: diffusers reads kohya keys itself (``load_lora_weights(folder, weight_name=...)``); the adapters it
    builds hold the diffusers release's weights."""
    from peft.tuners.lora import LoraLayer

    kohya, plain = tmp_path / "zimage-kohya", tmp_path / "zimage-lora"
    assert _convert(["--run", str(runs["zimage"]), "--out", str(kohya), "--lora", "--lora-format", "kohya"]) == 0
    assert _convert(["--run", str(runs["zimage"]), "--out", str(plain), "--lora"]) == 0
    cfg = export.read_run_config(runs["zimage"])
    pipe = _pipe(cfg.model.path)
    pipe.load_lora_weights(str(kohya), weight_name=f"{kohya.name}.safetensors")
    reference = load_file(plain / release.LORA_FILE)
    layers = {n: m for n, m in pipe.transformer.named_modules() if isinstance(m, LoraLayer)}
    assert {f"transformer.{n}.lora_A.weight" for n in layers} == {k for k in reference if ".lora_A." in k}
    for name, layer in layers.items():
        delta = layer.lora_B["default_0"].weight @ layer.lora_A["default_0"].weight * layer.scaling["default_0"]
        want = reference[f"transformer.{name}.lora_B.weight"] @ reference[f"transformer.{name}.lora_A.weight"]
        torch.testing.assert_close(delta, want, atol=1e-6, rtol=1e-5)


def test_init_from_the_student_resumes_exactly_and_exports(world, tmp_path):
    """The second run's generator adapter starts as the first run's few-step LoRA; its 2 + 1 step run ends bit for bit
    as the uninterrupted 3-step one; it exports."""
    cfg = export.read_run_config(world["again"])
    backbone, _, adapter = build_models(cfg, torch.device("cpu"), None, load_text_encoder=False)
    first = model_tensors(world["run"] / "checkpoints" / "step-3")
    layers = {clean_name(n): layer for n, layer in lora_layers(backbone.teacher.net)}
    checked = 0
    for key, value in first.items():
        if key.startswith("models.model.net.") and key.endswith(f".{GENERATOR}"):
            module, kind = key[len("models.model.net."):].rsplit(".", 2)[:2]
            torch.testing.assert_close(getattr(layers[module], kind)[adapter], value, atol=1e-6, rtol=1e-6)
            checked += 1
    assert checked > 0
    whole = model_tensors(world["again"] / "checkpoints" / "step-3")
    split = model_tensors(world["split"] / "checkpoints" / "step-3")
    assert whole.keys() == split.keys()
    for key in whole:
        assert torch.equal(whole[key], split[key]), key
    assert _convert(["--run", str(world["again"]), "--out", str(tmp_path / "again")]) == 0
    source = json.loads((tmp_path / "again" / export.SETTINGS_FILE).read_text())["source"]
    assert source["init_generator"] == str(world["lora"]) and source["teacher_adapters"]


def test_full_generator_starts_from_a_merged_export(tiny_assets, world, tmp_path):
    """``generator_mode full`` + a merged export: the generator holds the export's transformer weights exactly."""
    cfg = tiny_config(tiny_assets, tmp_path / "full", model__generator_mode="full",
                      model__init_generator=str(world["merged"]))
    _, generator, _ = build_models(cfg, torch.device("cpu"), None, load_text_encoder=False)
    saved = load_file(world["merged"] / "transformer" / "diffusion_pytorch_model.safetensors")
    params = {n.replace("_checkpoint_wrapped_module.", "")[len("net."):]: p for n, p in generator.named_parameters()}
    assert params and set(params) <= set(saved)  # the file also holds persistent buffers (pos_embed)
    assert all(torch.equal(params[k].detach(), saved[k]) for k in params)
    teacher = load_file(Path(tiny_assets["model"]) / "transformer" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(teacher[k], saved[k]) for k in params)  # the student is not the teacher


def test_resume_or_export_against_other_adapters_is_refused(world):
    cfg = export.read_run_config(world["run"])
    cfg.model.teacher_adapters = ()
    with pytest.raises(CheckpointError, match="teacher_adapters"):
        check_export_source(cfg, world["run"] / "checkpoints" / "step-3")
