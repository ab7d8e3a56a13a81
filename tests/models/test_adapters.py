"""Users' LoRAs (re-turbo): read in diffusers and kohya formats, merged exactly as peft merges (float64 reference), by
row block as a sharded weight merges, and bad files refused in one line naming the file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dmdr.config import TrainConfig
from dmdr.errors import ModelLoadError
from dmdr.export import release
from dmdr.models.adapters import AdapterSpec, delta_block, merge_loras, read_lora, set_adapter
from dmdr.models.families import family_spec
from dmdr.models.lora import inject_lora, lora_layers
from dmdr.models.tiny_lora import denoiser_of, write_random_lora
from dmdr.preflight.core import RunContext
from dmdr.preflight.run_checks import check_adapters
from dmdr.returbo import denoiser_shapes

TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


@pytest.fixture(scope="module")
def sd3_lora(family_paths, tmp_path_factory) -> Path:
    return write_random_lora(family_paths["sd3"], tmp_path_factory.mktemp("lora"), rank=4, alpha=8.0,
                             targets=TARGETS, seed=3)


def _peft_merged(model_path: Path, lora: Path, scale: float) -> dict[str, torch.Tensor]:
    """peft's own merge in float64: the denoiser with the file loaded by diffusers' loader, fused at ``scale``."""
    from peft.tuners.lora import LoraLayer

    net, component = denoiser_of(model_path, dtype=torch.float64)
    net.load_lora_adapter(str(lora.parent), weight_name=lora.name, use_safetensors=True, prefix=component,
                          adapter_name="user")  # reads r and lora_alpha from the metadata
    net.fuse_lora(lora_scale=scale)
    out = {}
    for name, m in net.named_modules():
        if isinstance(m, LoraLayer):
            out[name] = m.get_base_layer().weight.detach().clone()
    return out


def test_merge_equals_peft_merge_float64(family_paths, sd3_lora):
    """Our read (metadata alpha/r = 2) + merge equals peft's fuse on the same float64 weights to 1e-12; a bf16 teacher
    holds that result rounded once."""
    path = family_paths["sd3"]
    shapes = denoiser_shapes(path, family_spec("sd3"))
    delta = read_lora(sd3_lora, shapes, pipeline_class="StableDiffusion3Pipeline")
    reference = _peft_merged(path, sd3_lora, scale=0.7)
    assert set(delta) == set(reference) and len(delta) > 4
    net, _ = denoiser_of(path, dtype=torch.float64)
    before = {n: net.get_submodule(n).weight.detach().clone() for n in delta}
    assert merge_loras(net, [(delta, 0.7)]) == len(delta)
    for name, ref in reference.items():
        torch.testing.assert_close(net.get_submodule(name).weight, ref, atol=1e-12, rtol=0)
        assert (ref - before[name]).abs().max() > 1e-3  # the adapter changes the weight: the match means something
    bf16, _ = denoiser_of(path, dtype=torch.bfloat16)
    merge_loras(bf16, [(delta, 0.7)])
    for name, ref in reference.items():
        base = before[name].to(torch.bfloat16).double()  # the bf16 model's stored base, merged in float64
        exact = (base + (ref - before[name])).to(torch.bfloat16)
        assert torch.equal(bf16.get_submodule(name).weight, exact)


def test_kohya_keys_read_as_the_diffusers_file(family_paths, sd3_lora, tmp_path):
    """The same LoRA in kohya's layout (lora_unet_<module_>.lora_down/lora_up, alpha != rank, unscaled up) reads to
    the same weight change; our kohya writer's file too."""
    shapes = denoiser_shapes(family_paths["sd3"], family_spec("sd3"))
    delta = read_lora(sd3_lora, shapes)
    raw = load_file(sd3_lora)
    kohya = {}
    for key, value in raw.items():
        module = key[len("transformer."):].rsplit(".lora_", 1)[0].replace(".", "_")
        kind = "lora_down" if ".lora_A." in key else "lora_up"
        kohya[f"lora_unet_{module}.{kind}.weight"] = value
        kohya[f"lora_unet_{module}.alpha"] = torch.tensor(8.0)
    save_file(kohya, str(tmp_path / "kohya.safetensors"))
    written = release.kohya_state_dict({n: (a.float(), b.float()) for n, (a, b) in delta.items()}, "sd3",
                                       torch.float32)
    save_file(written, str(tmp_path / "ours.safetensors"))
    for file in ("kohya.safetensors", "ours.safetensors"):
        got = read_lora(tmp_path / file, shapes)
        assert set(got) == set(delta)
        for name, (a, b) in delta.items():
            torch.testing.assert_close(got[name][1] @ got[name][0], b @ a, atol=1e-6, rtol=1e-6)


def test_row_block_merge_equals_the_full_merge():
    """A sharded weight merges its own rows (and columns) from the full factors: the block equals the full ``B A``'s."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 10, generator=g), torch.randn(7, 3, generator=g)
    full = b.double() @ a.double()
    for offset, shape in (((0, 0), (4, 10)), ((4, 0), (3, 10)), ((2, 5), (3, 4))):
        block = delta_block(a, b, offset, shape)
        torch.testing.assert_close(block, full[offset[0]:offset[0] + shape[0], offset[1]:offset[1] + shape[1]])
    a4, b4 = torch.randn(3, 5, 3, 3, generator=g), torch.randn(6, 3, 1, 1, generator=g)
    full4 = torch.einsum("or,rikl->oikl", b4[:, :, 0, 0].double(), a4.double())
    torch.testing.assert_close(delta_block(a4, b4, (3, 1, 0, 0), (3, 4, 3, 3)), full4[3:6, 1:5])


def test_init_lora_becomes_the_generator_adapter(family_paths, sd3_lora):
    """``set_adapter``: the adapter's ``alpha/r * B A`` equals the file's weight change; a rank mismatch is refused."""
    shapes = denoiser_shapes(family_paths["sd3"], family_spec("sd3"))
    delta = read_lora(sd3_lora, shapes)
    net, _ = denoiser_of(family_paths["sd3"])
    inject_lora(net, "generator", rank=4, alpha=16.0, targets=TARGETS)
    set_adapter(net, "generator", delta)
    layers = dict(lora_layers(net))
    for name, (a, b) in delta.items():
        torch.testing.assert_close(layers[name].delta_weight("generator").double() * layers[name].lora_scaling[
            "generator"], b @ a, atol=1e-6, rtol=1e-6)
    other, _ = denoiser_of(family_paths["sd3"])
    inject_lora(other, "generator", rank=8, alpha=8.0, targets=TARGETS)
    with pytest.raises(ModelLoadError, match="set --model.generator_lora_rank 4"):
        set_adapter(other, "generator", delta)


def test_adapter_spec_scale():
    assert AdapterSpec.parse("/a/style.safetensors:0.8") == AdapterSpec("/a/style.safetensors", 0.8)
    assert AdapterSpec.parse("/a/b:c/style") == AdapterSpec("/a/b:c/style", 1.0)


# ------------------------------------------------------------------------------------------------ preflight
def _problems(model_path: Path, **model) -> list[str]:
    cfg = TrainConfig()
    cfg.model.path = str(model_path)
    for key, value in model.items():
        setattr(cfg.model, key, value)
    return [str(p) for p in check_adapters(RunContext(cfg))]


def test_preflight_refuses_bad_adapters_in_one_line_each(family_paths, sd3_lora, tmp_path):
    sd3 = family_paths["sd3"]
    zimage_lora = write_random_lora(family_paths["zimage"], tmp_path / "zimage", targets=("to_q",), seed=1)
    raw = load_file(sd3_lora)
    broken = dict(raw)
    key = next(k for k in raw if k.endswith(".lora_B.weight"))
    broken[key] = raw[key][:, :3].contiguous()  # B of rank 3 beside A of rank 4
    save_file(broken, str(tmp_path / "ranks.safetensors"))
    stray = {**raw, "transformer.no_such_block.to_q.lora_A.weight": torch.zeros(4, 32),
             "transformer.no_such_block.to_q.lora_B.weight": torch.zeros(32, 4)}
    save_file(stray, str(tmp_path / "stray.safetensors"))
    wide = {k: torch.zeros(v.shape[0], 2 * v.shape[1]) if ".lora_A." in k else v for k, v in raw.items()}
    save_file(wide, str(tmp_path / "wide.safetensors"))
    cases = {
        str(zimage_lora): "a LoRA for another model family or base",
        str(tmp_path / "ranks.safetensors"): "mismatched ranks",
        str(tmp_path / "stray.safetensors"): "name no layer of this model's denoiser",
        str(tmp_path / "wide.safetensors"): "a LoRA for another model family or size",
    }
    for file, needle in cases.items():
        problems = _problems(sd3, teacher_adapters=(f"{file}:0.5",))
        assert len(problems) == 1 and needle in problems[0] and file in problems[0], problems
        assert problems[0].startswith("--model.teacher_adapters ") and "\n" not in problems[0]
    assert _problems(sd3, teacher_adapters=(str(sd3_lora),)) == []
    # A few-step LoRA of another rank for the LoRA generator; a full model for a LoRA generator.
    (rank,) = _problems(sd3, init_generator=str(sd3_lora), generator_lora_rank=8)
    assert "set --model.generator_lora_rank 4" in rank and str(sd3_lora) in rank
    (full,) = _problems(sd3, init_generator=str(family_paths["sd3"]))
    assert "is a full model, the generator a LoRA" in full
    (family,) = _problems(sd3, init_generator=str(family_paths["zimage"]), generator_mode="full")
    assert "another model family" in family
    assert _problems(sd3, init_generator=str(sd3_lora), generator_lora_rank=4) == []
    assert _problems(sd3, init_generator=str(sd3), generator_mode="full") == []
