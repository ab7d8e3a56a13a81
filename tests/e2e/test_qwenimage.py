"""Qwen-Image end to end on the tiny model: training, the stock QwenImagePipeline reproducing the trained sampler
from the exported folder, the LoRA release in the stock base pipeline, the single-file transformer (diffusers' key
names, which are ComfyUI's Qwen-Image layout too) loaded by ``from_single_file`` into the base pipeline, training
from an embedding cache with the text encoder never loaded, and a folder of another family refused by the
preflight in one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from dmdr import export
from dmdr.models.qwenimage import pack_latents, unpack_latents
from dmdr.recipes import run as run_recipe
from tests.e2e.export_checks import sample_run
from tests.tiny_helpers import load_recipe, tiny_config, tool

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

TOL = 1e-5
PROMPTS = ["a photo of a cat", "a red car in the rain, at night"]
QUICK = {"model__family": "qwenimage", "model__max_sequence_length": 192, "data__batch_size": 2,
         "train__max_steps": 3, "dmd__ratio": 1, "checkpoint__interval": 2, "rl__start_step": 2,
         "dynamic__decay_steps": 2}


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, str]:
    from dmdr.models.tiny import build_tiny_qwenimage

    root = tmp_path_factory.mktemp("qwen-assets")
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(load_recipe("tiny_dmdr").DEMO_PROMPTS) + "\n")
    return {"model": str(build_tiny_qwenimage(root / "tiny-qwenimage")), "prompts": str(prompts),
            "root": str(root)}


@pytest.fixture(scope="module")
def trained(assets) -> Path:
    from dmdr.launch import run

    out = Path(assets["root"]) / "run"
    assert run(tiny_config(assets, out, **QUICK)) == 0
    return out


def _metrics(out: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def test_stock_pipeline_reproduces_the_trained_sampler(trained, tmp_path):
    from diffusers import DiffusionPipeline

    out = tmp_path / "export"
    assert tool("convert_to_diffusers").main(["--run", str(trained), "--out", str(out)]) == 0
    sampled = sample_run(trained, PROMPTS)
    cfg, backbone, levels, noise = sampled.cfg, sampled.backbone, sampled.levels, sampled.noise
    ours, teacher = sampled.ours, sampled.teacher
    pipe = DiffusionPipeline.from_pretrained(str(out), local_files_only=True)
    assert type(pipe).__name__ == "QwenImagePipeline"
    pipe.set_progress_bar_config(disable=True)
    settings = export.InferenceSettings.read(out)
    side = cfg.model.resolution // backbone.vae_scale_factor
    with torch.no_grad():
        got = pipe(list(PROMPTS), latents=pack_latents(noise), output_type="latent",
                   **settings.pipeline_kwargs(exact=True)).images
    assert torch.equal(pipe.scheduler.sigmas[:-1], levels)
    torch.testing.assert_close(unpack_latents(got, side, side), ours, atol=TOL, rtol=0)
    assert (teacher - ours).abs().max() > 50 * TOL  # trained: the match above is the generator's, not the teacher's
    card = (out / "README.md").read_text()
    assert "QwenImagePipeline" in card and f"num_inference_steps={cfg.dmd.num_steps}" in card


def test_lora_release_loads_in_the_stock_base_pipeline(trained, tmp_path):
    from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler

    merged_dir, lora_dir = tmp_path / "merged", tmp_path / "lora"
    convert = tool("convert_to_diffusers").main
    assert convert(["--run", str(trained), "--out", str(merged_dir)]) == 0
    assert convert(["--run", str(trained), "--lora", "--out", str(lora_dir)]) == 0
    cfg = export.read_run_config(trained)
    settings = export.InferenceSettings.read(lora_dir)

    def latents(pipe):
        pipe.set_progress_bar_config(disable=True)
        with torch.no_grad():
            return pipe(list(PROMPTS), generator=torch.Generator().manual_seed(11), output_type="latent",
                        **settings.pipeline_kwargs(exact=True)).images

    base = DiffusionPipeline.from_pretrained(cfg.model.path, local_files_only=True)
    base.scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(str(lora_dir), subfolder="scheduler")
    before = latents(base)
    base.load_lora_weights(str(lora_dir))
    after = latents(base)
    merged = latents(DiffusionPipeline.from_pretrained(str(merged_dir), local_files_only=True))
    torch.testing.assert_close(after, merged, atol=TOL, rtol=0)
    assert (after - before).abs().max() > 20 * TOL  # three small steps, but the adapter is there


def test_single_file_in_the_base_pipeline_equals_the_merged_export(trained, tmp_path):
    """``--single-file``: one safetensors file keyed as the merged export's transformer, which ComfyUI's diffusion-
    model loader detects as Qwen-Image (``txt_norm.weight``, ``img_in.weight``, ``transformer_blocks.<i>.``, no
    prefix) and diffusers 0.42 loads without conversion (``QwenImageTransformer2DModel``'s single-file mapping is
    the identity); ``from_single_file(config=base)`` into the base pipeline (the card's call) gives the merged
    export's latents."""
    from diffusers import DiffusionPipeline
    from safetensors.torch import load_file

    convert = tool("convert_to_diffusers").main
    merged_dir, single_dir = tmp_path / "merged", tmp_path / "single"
    assert convert(["--run", str(trained), "--out", str(merged_dir)]) == 0
    assert convert(["--run", str(trained), "--single-file", "--out", str(single_dir)]) == 0
    files = json.loads((single_dir / export.SETTINGS_FILE).read_text())["source"]["files"]
    single = load_file(single_dir / files["single_file"])
    merged = load_file(merged_dir / "transformer" / "diffusion_pytorch_model.safetensors")
    assert single.keys() == merged.keys() and all(torch.equal(single[k], merged[k]) for k in merged)
    assert {"txt_norm.weight", "img_in.weight", "transformer_blocks.0.attn.to_q.weight"} <= single.keys()
    assert "QwenImageTransformer2DModel.from_single_file" in (single_dir / "README.md").read_text()
    settings = export.InferenceSettings.read(single_dir)

    def latents(pipe) -> torch.Tensor:
        pipe.set_progress_bar_config(disable=True)
        with torch.no_grad():
            return pipe(list(PROMPTS), generator=torch.Generator().manual_seed(11), output_type="latent",
                        **settings.pipeline_kwargs(exact=True)).images

    pipe = export.load_release(single_dir)
    assert type(pipe.transformer).__name__ == "QwenImageTransformer2DModel"
    reference = DiffusionPipeline.from_pretrained(str(merged_dir), local_files_only=True)
    torch.testing.assert_close(latents(pipe), latents(reference), atol=1e-6, rtol=0)


def test_training_from_the_cache_never_loads_the_text_encoder(assets, trained, tmp_path, monkeypatch):
    """The cache written by the tool serves the run; the Qwen2.5-VL is never built, and the steps equal the run
    that encoded every batch itself (embeddings equal up to batch-dependent float rounding)."""
    import transformers

    from dmdr.launch import run

    cache = tmp_path / "cache"
    assert tool("cache_text_embeddings").main([
        "--model.path", assets["model"], "--model.dtype", "fp32", "--model.max_sequence_length", "192",
        "--data.sources", assets["prompts"], "--data.embedding_cache", str(cache), "--batch-size", "5",
        "--device", "cpu"]) == 0

    def forbidden(*args, **kwargs):
        raise AssertionError("the text encoder was loaded")

    monkeypatch.setattr(transformers.Qwen2_5_VLForConditionalGeneration, "from_pretrained", forbidden)
    monkeypatch.setattr("dmdr.models.qwenimage.load_text_encoder", forbidden)
    out = tmp_path / "cached"
    cfg = tiny_config(assets, out, **QUICK, data__embedding_cache=str(cache))
    assert run(cfg) == 0
    a, b = _metrics(trained), _metrics(out)
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for step in (1, 2, 3):
        for key in ("loss/fake", "loss/dmd", "grad_norm/generator"):
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-4, abs=1e-7), (step, key)


@pytest.mark.parametrize("other", ["StableDiffusion3Pipeline", "FluxPipeline"])
def test_a_folder_of_another_family_is_refused_by_the_preflight(other, assets, tmp_path, capsys):
    folder = shutil.copytree(assets["model"], tmp_path / "other")
    index = folder / "model_index.json"
    index.write_text(json.dumps({**json.loads(index.read_text()), "_class_name": other}))
    argv = ["--model.family", "qwenimage", "--model.path", str(folder), "--data.sources", assets["prompts"],
            "--train.output_dir", str(tmp_path / "out")]
    assert run_recipe("tiny_dmdr", argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and other in errors[0], errors
    assert not (tmp_path / "out" / "config.json").exists()
