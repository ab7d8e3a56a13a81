"""Release forms: the diffusers LoRA on the stock base pipeline, the single-file transformer, the model card.

The tiny runs and their merged exports are the session fixtures ``runs`` / ``exports`` of conftest.py;
the merged export is the reference every other form is held against.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from dmdr import export
from dmdr.distributed.offline import model_tensors
from dmdr.export import release
from tests.e2e.export_checks import few_step_scheduler, load_lora
from tests.tiny_helpers import one_error_line, tool

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

TOL = 1e-4
"""The issue's bound for LoRA-on-base against merged, fp32 (observed: a few ulps)."""
PROMPTS = ["a photo of a cat", "a red car in the rain"]


def _convert(argv: list[str]) -> int:
    return tool("convert_to_diffusers").main(argv)


@pytest.fixture(scope="module")
def releases(runs, tmp_path_factory) -> dict[str, Path]:
    """The other forms: LoRA of the SD3 and Z-Image LoRA runs (and of an earlier checkpoint), a rank-2 SVD LoRA of
    the full fine-tune, single-file transformers (fp16 and bf16 LoRA too)."""
    root = tmp_path_factory.mktemp("releases")
    jobs = {
        "lora": ["--run", str(runs["lora"]), "--lora"],
        "lora-step2": ["--run", str(runs["lora"]), "--lora", "--step", "2"],
        "lora-bf16": ["--run", str(runs["lora"]), "--lora", "--dtype", "bf16"],
        "zimage": ["--run", str(runs["zimage"]), "--lora"],
        "svd": ["--run", str(runs["full"]), "--lora", "--lora-rank", "2"],
        "single": ["--run", str(runs["lora"]), "--single-file", "--dtype", "fp16"],
        "zimage-single": ["--run", str(runs["zimage"]), "--single-file"],
    }
    out = {}
    for name, argv in jobs.items():
        out[name] = root / name
        assert _convert([*argv, "--out", str(out[name])]) == 0, name
    return out


def _latents(pipe, folder: Path) -> torch.Tensor:
    """The exact few-step call of ``folder``'s settings; the pipeline draws the same noise from seed 11 each time."""
    settings = export.InferenceSettings.read(folder)
    with torch.no_grad():
        return pipe(list(PROMPTS), generator=torch.Generator().manual_seed(11), output_type="latent",
                    **settings.pipeline_kwargs(exact=True)).images


@pytest.mark.parametrize("name", ["lora", "zimage"])
def test_lora_on_the_stock_base_pipeline_equals_the_merged_export(name, runs, exports, releases):
    from diffusers import DiffusionPipeline
    from peft.tuners.lora import LoraLayer

    cfg = export.read_run_config(runs[name])
    folder = releases[name]
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", export.SETTINGS_FILE, release.LORA_FILE,
                                                        "scheduler"]
    merged = DiffusionPipeline.from_pretrained(str(exports[name]), local_files_only=True)
    merged.set_progress_bar_config(disable=True)
    base = DiffusionPipeline.from_pretrained(cfg.model.path, local_files_only=True)
    few_step_scheduler(base, folder)
    teacher = _latents(base, folder)  # the base with the few-step schedule, no LoRA yet

    assert load_lora(base, folder) == []  # no unexpected / missing keys, no conversion notices
    wrapped = {n for n, m in base.transformer.named_modules() if isinstance(m, LoraLayer)}
    saved = load_file(folder / release.LORA_FILE)
    assert wrapped == {k[len("transformer."):-len(".lora_A.weight")] for k in saved if k.endswith(".lora_A.weight")}
    layer = base.transformer.get_submodule(sorted(wrapped)[0])
    assert list(layer.scaling.values()) == [1.0]  # alpha/r is folded into lora_B: diffusers loads at scale 1

    ours = _latents(base, folder)
    reference = _latents(merged, exports[name])
    torch.testing.assert_close(ours, reference, atol=TOL, rtol=0)
    assert (ours - teacher).abs().max() > 10 * TOL  # the adapter changes the images: the match means something


def test_lora_keys_are_the_generator_adapter_scaled(runs, releases):
    cfg = export.read_run_config(runs["lora"])
    scale = cfg.model.generator_lora_alpha / cfg.model.generator_lora_rank
    for name, step in (("lora", "step-3"), ("lora-step2", "step-2")):  # a checkpoint of a run in progress too
        saved = load_file(releases[name] / release.LORA_FILE)
        ckpt = model_tensors(runs["lora"] / "checkpoints" / step)
        prefix = "models.model.net."
        modules = sorted(k[len(prefix):-len(".lora_A.generator")] for k in ckpt if k.endswith(".lora_A.generator"))
        expected = {f"transformer.{m}.lora_{ab}.weight" for m in modules for ab in "AB"}
        assert set(saved) == expected and not any("critic" in k for k in saved)
        for m in modules:
            torch.testing.assert_close(saved[f"transformer.{m}.lora_A.weight"], ckpt[f"{prefix}{m}.lora_A.generator"],
                                       atol=0, rtol=0)
            torch.testing.assert_close(saved[f"transformer.{m}.lora_B.weight"],
                                       scale * ckpt[f"{prefix}{m}.lora_B.generator"], atol=1e-7, rtol=1e-6)
        meta = json.loads((releases[name] / export.SETTINGS_FILE).read_text())
        assert meta["source"]["checkpoint"] == step and meta["source"]["form"] == "lora"
    early, final = (load_file(releases[n] / release.LORA_FILE) for n in ("lora-step2", "lora"))
    assert max((early[k] - final[k]).abs().max().item() for k in final) > 1e-6
    bf16 = load_file(releases["lora-bf16"] / release.LORA_FILE)
    assert all(v.dtype == torch.bfloat16 for v in bf16.values())
    assert all(torch.equal(bf16[k], final[k].to(torch.bfloat16)) for k in final)


def test_svd_lora_of_a_full_fine_tune(tiny_assets, runs, releases):
    """The extracted factors are the float64 truncated SVD of the weight change; the error is the discarded energy."""
    from diffusers import DiffusionPipeline

    folder = releases["svd"]
    saved = load_file(folder / release.LORA_FILE)
    teacher = load_file(Path(tiny_assets["model"]) / "transformer" / "diffusion_pytorch_model.safetensors")
    tuned = {k[len("generator.model.net."):]: v for k, v in model_tensors(runs["full"] / "checkpoints" /
                                                                          "step-3").items()
             if k.startswith("generator.model.net.")}
    modules = sorted(k[len("transformer."):-len(".lora_A.weight")] for k in saved if k.endswith(".lora_A.weight"))
    assert len(modules) > 0
    err2 = total2 = 0.0
    for m in modules:
        delta = tuned[f"{m}.weight"].double() - teacher[f"{m}.weight"].double()
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        best = (u[:, :2] * s[:2]) @ vh[:2]
        got = saved[f"transformer.{m}.lora_B.weight"].double() @ saved[f"transformer.{m}.lora_A.weight"].double()
        assert saved[f"transformer.{m}.lora_A.weight"].shape[0] == 2
        torch.testing.assert_close(got, best, atol=1e-6, rtol=0)
        err2 += (delta - best).pow(2).sum().item()
        total2 += delta.pow(2).sum().item()
    report = json.loads((folder / export.SETTINGS_FILE).read_text())["source"]["lora_extraction"]
    assert report["rank"] == 2 and report["layers"] == len(modules)
    assert report["relative_error"] == pytest.approx((err2 / total2) ** 0.5, rel=1e-6)
    assert 0 < report["relative_error"] < 1 and report["left_out"] > 0  # biases and norms changed too
    assert "relative Frobenius error" in (folder / "README.md").read_text()
    base = DiffusionPipeline.from_pretrained(tiny_assets["model"], local_files_only=True)
    assert load_lora(base, folder) == []


def test_single_file_loads_with_from_single_file(runs, exports, releases):
    from diffusers import SD3Transformer2DModel

    cfg = export.read_run_config(runs["lora"])
    meta = json.loads((releases["single"] / export.SETTINGS_FILE).read_text())
    file = releases["single"] / meta["source"]["files"]["single_file"]
    merged = load_file(exports["lora"] / "transformer" / "diffusion_pytorch_model.safetensors")
    single = load_file(file)
    assert single.keys() == merged.keys() and all(v.dtype == torch.float16 for v in single.values())
    assert all(torch.equal(single[k], merged[k].half()) for k in merged)
    with safe_open(str(file), "pt") as f:
        assert f.metadata()["dmdr.checkpoint"] == "step-3"
    model = SD3Transformer2DModel.from_single_file(str(file), config=cfg.model.path, subfolder="transformer",
                                                   dtype=torch.float16, local_files_only=True)
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], single[k]) for k in single)


def test_single_file_in_the_base_pipeline_equals_the_merged_export(exports, releases):
    """Z-Image: ``from_single_file(config=base)`` into the base pipeline (the card's call), same images."""
    from diffusers import DiffusionPipeline

    pipe = export.load_release(releases["zimage-single"])
    assert type(pipe.transformer).__name__ == "ZImageTransformer2DModel"
    pipe.set_progress_bar_config(disable=True)
    merged = DiffusionPipeline.from_pretrained(str(exports["zimage"]), local_files_only=True)
    merged.set_progress_bar_config(disable=True)
    torch.testing.assert_close(_latents(pipe, releases["zimage-single"]), _latents(merged, exports["zimage"]),
                               atol=1e-6, rtol=0)


def test_model_card_licence_calls_training_and_eval(tiny_assets, runs, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(tiny_assets["model"], base)
    (base / "README.md").write_text("---\nlicense: other\nlicense_name: tiny-community\nlicense_link: LICENSE.md\n"
                                    "tags:\n- text-to-image\n---\n# tiny base\n")
    (base / "LICENSE.md").write_text("tiny licence terms\n")
    run = tmp_path / "run"
    shutil.copytree(runs["lora"], run)
    (run / "eval").mkdir()
    (run / "eval" / "results.json").write_text(json.dumps(
        {"checkpoint": "step-3", "metrics": {"hps": {"mean": 0.2875, "std": 0.0123, "n": 64}, "clip": 0.31}}))
    out = tmp_path / "card"
    assert _convert(["--run", str(run), "--model-path", str(base), "--lora", "--out", str(out),
                     "--base-id", "org/tiny-base"]) == 0
    card = (out / "README.md").read_text()
    front = re.match(r"---\n(.*?)\n---\n", card, flags=re.S).group(1)
    assert "license: other" in front and "license_name: tiny-community" in front
    assert "base_model: org/tiny-base" in front and "- lora" in front
    assert (out / "LICENSE.md").read_text() == "tiny licence terms\n"
    cfg = export.read_run_config(run)
    settings = export.InferenceSettings.read(out)
    assert str(settings.sigmas) in card and str(settings.levels) in card
    assert 'StableDiffusion3Pipeline.from_pretrained("org/tiny-base", dtype=torch.float32)' in card
    assert 'pipe.load_lora_weights("path/to/this/folder")' in card
    assert 'from_pretrained("path/to/merged/folder", dtype=torch.float32)' in card  # the merged form's call
    assert f"{cfg.rl.start_step} generator steps of DMD before RL" in card
    assert "brightness (weight 0.5)" in card and "step-3 of train.max_steps = 3" in card
    assert "| hps | 0.2875 | 0.0123 | 64 |" in card and "| clip | 0.31 |" in card

    # the card's LoRA snippet runs as written, with the folders filled in
    code = re.search(r"```python\n(.*?)```", card.split("## Training")[0], flags=re.S).group(1)
    code = code.replace("path/to/this/folder", str(out)).replace("org/tiny-base", str(base))
    namespace: dict = {}
    exec(compile(code, "model-card", "exec"), namespace)  # noqa: S102 - our own generated snippet
    assert namespace["image"].size == (settings.resolution, settings.resolution)

    # malformed eval results: no evaluation section, the export still succeeds
    (run / "eval" / "results.json").write_text("{not json")
    assert _convert(["--run", str(run), "--model-path", str(base), "--lora", "--out", str(out), "--overwrite"]) == 0
    assert "## Evaluation" not in (out / "README.md").read_text()


@pytest.mark.parametrize("kind,needle", [
    ("full-run", "is a full fine-tune"),
    ("rank-without-lora", "--lora-rank goes with --lora"),
    ("rank-on-lora-run", "trained a LoRA"),
    ("no-checkpoint", "no complete checkpoint"),
    ("not-empty", "exists and is not empty; pass --overwrite"),
])
def test_release_bad_input_is_one_line(kind, needle, runs, tmp_path, capsys):
    out = tmp_path / "out"
    argv = {"full-run": ["--run", str(runs["full"]), "--lora"],
            "rank-without-lora": ["--run", str(runs["full"]), "--lora-rank", "2"],
            "rank-on-lora-run": ["--run", str(runs["lora"]), "--lora", "--lora-rank", "2"],
            "no-checkpoint": ["--run", str(tmp_path / "run"), "--lora"],
            "not-empty": ["--run", str(runs["lora"]), "--lora"]}[kind]
    if kind == "no-checkpoint":
        (tmp_path / "run").mkdir()
        shutil.copy(runs["lora"] / "config.json", tmp_path / "run" / "config.json")
    if kind == "not-empty":
        out.mkdir()
        (out / "notes.txt").write_text("keep")
    assert _convert([*argv, "--out", str(out)]) == 2
    one_error_line(capsys.readouterr().err, needle)
    if kind == "not-empty":
        assert [p.name for p in out.iterdir()] == ["notes.txt"]
    else:
        assert not out.exists()


def test_sample_tool_on_the_lora_release_matches_the_merged_export(runs, exports, releases, tmp_path, capsys):
    import numpy as np
    from PIL import Image

    sample = tool("sample")
    grids = {}
    for name, folder in (("lora", releases["lora"]), ("merged", exports["lora"])):
        grids[name] = tmp_path / name / "grid.png"
        assert sample.main(["--pipeline", str(folder), "--prompts", *PROMPTS, "--out", str(grids[name]),
                            "--seed", "5"]) == 0
    for i in range(len(PROMPTS)):
        a, b = (np.asarray(Image.open(grids[n].with_name(f"grid-{i:03d}.png")), dtype=np.int32) for n in grids)
        assert np.abs(a - b).max() <= 1
    capsys.readouterr()
    assert sample.main(["--pipeline", str(releases["lora"]), "--model-path", str(tmp_path / "gone"),
                        "--prompts", "a cat", "--out", str(tmp_path / "x.png")]) == 2
    one_error_line(capsys.readouterr().err, "pass the base folder (--model-path)")
