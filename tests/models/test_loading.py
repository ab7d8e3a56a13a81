"""load_backbone: family detection, what a Backbone holds, and one clear ModelLoadError per bad folder."""

import json
import shutil

import pytest
import torch

from dmdr.errors import ModelLoadError, UserError
from dmdr.models import load_backbone
from dmdr.models.sd3 import SD3Denoiser, SD3TextEncoder
from dmdr.models.zimage import ZImageDenoiser, ZImageTextEncoder


def test_backbone_contents(backbone):
    expected = {"sd3": (SD3Denoiser, SD3TextEncoder, "attn.to_q"),
                "zimage": (ZImageDenoiser, ZImageTextEncoder, "attention.to_q")}[backbone.family]
    assert isinstance(backbone.teacher, expected[0]) and isinstance(backbone.text_encoder, expected[1])
    assert expected[2] in backbone.lora_targets
    assert backbone.latent_channels == 16 and backbone.vae_scale_factor == 2
    assert backbone.latent_shape(32) == (16, 16, 16)
    assert backbone.parameterization.t_min == 0.001
    assert backbone.extras["scheduler_config"]["shift"] == 3.0
    assert len(backbone.teacher.blocks()) >= 2
    modules = [backbone.teacher, backbone.codec.vae, *backbone.text_encoder.modules()]
    assert not any(p.requires_grad for m in modules for p in m.parameters())
    assert not any(m.training for m in modules[1:])


@pytest.mark.parametrize("family", ["sd3", "zimage"])
def test_options(load, family):
    b = load(family, load_text_encoder=False, t_min=0.01)
    assert b.text_encoder is None and b.parameterization.t_min == 0.01
    b = load_backbone(b.path, family=family, max_sequence_length=64)  # bf16 by default
    assert next(b.teacher.parameters()).dtype == torch.bfloat16
    assert next(b.codec.vae.parameters()).dtype == torch.bfloat16
    x = torch.randn(2, 16, 8, 8)
    cond = b.text_encoder.encode(["a", "b"])
    out = b.teacher(x, torch.tensor([0.3, 0.7]), cond)
    assert out.dtype == torch.float32 and out.shape == x.shape and torch.isfinite(out).all()


@pytest.fixture
def broken(family_paths, tmp_path):
    """``broken(family)``: a private copy of a tiny folder to damage."""

    def _copy(family):
        dst = tmp_path / f"copy-{family}"
        shutil.copytree(family_paths[family], dst)
        return dst

    return _copy


def _error(path, **kwargs) -> str:
    with pytest.raises(ModelLoadError) as info:
        load_backbone(path, dtype=torch.float32, **kwargs)
    message = str(info.value)
    assert "\n" not in message and isinstance(info.value, UserError)
    return message


def test_missing_folder(tmp_path):
    assert "does not exist" in _error(tmp_path / "nope")
    assert "no model folder" in _error("")


def test_random_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    assert "no model_index.json" in _error(tmp_path)
    (tmp_path / "model_index.json").write_text("{not json")
    assert "not valid JSON" in _error(tmp_path)
    assert "is a file" in _error(tmp_path / "notes.txt")


def test_other_family(family_paths, tmp_path):
    message = _error(family_paths["zimage"], family="sd3")
    assert "is a ZImagePipeline folder, not sd3" in message and "zimage" in message
    assert "is a StableDiffusion3Pipeline folder, not zimage" in _error(family_paths["sd3"], family="zimage")
    assert "unknown model family 'sd4'" in _error(family_paths["sd3"], family="sd4")
    assert "is a StableDiffusion3Pipeline folder, not flux" in _error(family_paths["sd3"], family="flux")
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "HunyuanDiTPipeline"}))
    message = _error(tmp_path)
    assert all(name in message for name in ("HunyuanDiTPipeline", "StableDiffusion3Pipeline", "FluxPipeline",
                                            "QwenImagePipeline"))


@pytest.mark.parametrize("family,component", [
    ("sd3", "vae"), ("sd3", "text_encoder_3"), ("sd3", "tokenizer_2"), ("zimage", "text_encoder"),
    ("zimage", "transformer"),
])
def test_missing_component(broken, family, component):
    path = broken(family)
    shutil.rmtree(path / component)
    message = _error(path)
    assert f"{component}/" in message and "missing" in message


def test_missing_text_encoder_is_fine_with_a_cache(broken):
    path = broken("zimage")
    shutil.rmtree(path / "text_encoder")
    assert load_backbone(path, dtype=torch.float32, load_text_encoder=False).text_encoder is None


def test_missing_or_corrupt_weights(broken):
    path = broken("sd3")
    weights = path / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    message = _error(path)
    assert f"{path}/transformer: cannot load SD3Transformer2DModel" in message
    weights.unlink()
    assert "no weights" in _error(path) and "transformer/" in _error(path)
    (path / "transformer" / "config.json").unlink()
    assert "config.json is missing" in _error(path)


def test_undeclared_component(broken):
    path = broken("sd3")
    index = json.loads((path / "model_index.json").read_text())
    del index["vae"]
    (path / "model_index.json").write_text(json.dumps(index))
    assert "lists no 'vae' component" in _error(path)
    index["vae"] = ["diffusers", "AutoencoderKL"]
    index["tokenizer_3"] = [None, None]  # T5 is optional, but only as a pair
    (path / "model_index.json").write_text(json.dumps(index))
    assert "'text_encoder_3' without 'tokenizer_3'" in _error(path)


def test_sd3_without_t5(broken):
    path = broken("sd3")
    index = json.loads((path / "model_index.json").read_text())
    index["text_encoder_3"] = index["tokenizer_3"] = [None, None]
    (path / "model_index.json").write_text(json.dumps(index))
    shutil.rmtree(path / "text_encoder_3")
    b = load_backbone(path, dtype=torch.float32, max_sequence_length=8)
    cond = b.text_encoder.encode(["a red cube"])
    assert cond["prompt_embeds"].shape == (1, 77 + 8, 32) and not cond["prompt_embeds"][:, 77:].any()
    assert torch.isfinite(b.teacher(torch.randn(1, 16, 8, 8), torch.tensor([0.5]), cond)).all()
