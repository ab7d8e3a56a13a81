"""The FLUX.1 and FLUX.2 [klein] adapters against the stock pipelines' own code on tiny random folders: text
encoding, packing + position ids + timestep convention (the denoiser equals the transformer called as the
pipeline calls it), the VAE's latent mean/std (FLUX.1's shift/scale, FLUX.2's batch-norm statistics), and the
per-sample LoRA scale on every adapted projection."""

from __future__ import annotations

import pytest
import torch

from dmdr.models import load_backbone
from dmdr.models.lora import inject_lora, lora_layers

PROMPTS = ["a red cube on a blue floor", ""]
MAX_SEQ = {"flux": 12, "flux2": 64}
SHAPE = {"flux": (16, 4, 6), "flux2": (64, 2, 4)}
"""Denoiser latents (channels, rows, cols): non-square, so a row/column mix-up shows."""


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from dmdr.models.tiny_flux import build_tiny_flux, build_tiny_flux2

    root = tmp_path_factory.mktemp("flux")
    return {"flux": build_tiny_flux(root / "flux"), "flux2": build_tiny_flux2(root / "flux2")}


def _pipe(folders, family):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(folders[family]), local_files_only=True, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _load(folders, family):
    return load_backbone(folders[family], dtype=torch.float32, max_sequence_length=MAX_SEQ[family])


@pytest.mark.parametrize("family", ["flux", "flux2"])
def test_text_encoding_equals_the_pipelines(folders, family):
    backbone, pipe = _load(folders, family), _pipe(folders, family)
    ours = backbone.text_encoder.encode(PROMPTS)
    with torch.no_grad():
        if family == "flux":
            embeds, pooled, _ = pipe.encode_prompt(PROMPTS, prompt_2=None, max_sequence_length=MAX_SEQ[family])
            torch.testing.assert_close(ours["pooled_prompt_embeds"], pooled, rtol=0, atol=0)
        else:
            embeds, _ = pipe.encode_prompt(PROMPTS, max_sequence_length=MAX_SEQ[family])
            torch.testing.assert_close(backbone.text_encoder.negative()["prompt_embeds"], embeds[1:], rtol=0, atol=0)
    torch.testing.assert_close(ours["prompt_embeds"], embeds, rtol=0, atol=0)


def _pipeline_call(pipe, family, x, t, cond):
    """The transformer called exactly as the stock pipeline's denoising loop calls it, unpacked to ``x``'s shape."""
    b, c, h, w = x.shape
    timestep = (t * 1000).expand(b).to(x.dtype) / 1000  # the loop's ``timestep / 1000`` of ``t = 1000 sigma``
    if family == "flux":
        vsf = pipe.vae_scale_factor
        out = pipe.transformer(
            hidden_states=pipe._pack_latents(x, b, c, h, w), timestep=timestep,
            guidance=torch.full([1], 3.5, dtype=torch.float32).expand(b),
            pooled_projections=cond["pooled_prompt_embeds"], encoder_hidden_states=cond["prompt_embeds"],
            txt_ids=torch.zeros(cond["prompt_embeds"].shape[1], 3),
            img_ids=pipe._prepare_latent_image_ids(b, h // 2, w // 2, x.device, x.dtype), return_dict=False)[0]
        return pipe._unpack_latents(out, h * vsf, w * vsf, vsf)
    ids = pipe._prepare_latent_ids(x)
    out = pipe.transformer(hidden_states=pipe._pack_latents(x), timestep=timestep, guidance=None,
                           encoder_hidden_states=cond["prompt_embeds"],
                           txt_ids=pipe._prepare_text_ids(cond["prompt_embeds"]), img_ids=ids, return_dict=False)[0]
    return pipe._unpack_latents_with_ids(out, ids, h, w)


@pytest.mark.parametrize("family", ["flux", "flux2"])
def test_denoiser_equals_the_transformer_called_as_the_pipeline_calls_it(folders, family):
    backbone, pipe = _load(folders, family), _pipe(folders, family)
    cond = backbone.text_encoder.encode(PROMPTS)
    x = torch.randn(2, *SHAPE[family], generator=torch.Generator().manual_seed(0))
    t = torch.tensor(0.73)
    with torch.no_grad():
        ours = backbone.teacher(x, t.expand(2), cond)
        theirs = _pipeline_call(pipe, family, x, t, cond)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert backbone.latent_shape(16)[0] == SHAPE[family][0]


@pytest.mark.parametrize("family", ["flux", "flux2"])
def test_vae_latents_follow_the_pipelines_mean_and_std(folders, family):
    backbone, pipe = _load(folders, family), _pipe(folders, family)
    side = backbone.vae_scale_factor * 4
    latents = torch.randn(1, *backbone.latent_shape(side), generator=torch.Generator().manual_seed(1))
    vae = pipe.vae
    with torch.no_grad():
        ours = backbone.codec.decode(latents)
        if family == "flux":
            z = latents / vae.config.scaling_factor + vae.config.shift_factor
        else:
            mean = vae.bn.running_mean.view(1, -1, 1, 1)
            std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
            assert (mean.abs() > 0.05).any() and ((std - 1).abs() > 0.05).any()  # not the identity
            z = pipe._unpatchify_latents(latents * std + mean)
        theirs = (vae.decode(z, return_dict=False)[0] / 2 + 0.5).clamp(0, 1)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
        image = torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(2))
        encoded = backbone.codec.encode(image)
        if family == "flux2":  # the pipeline's own encoder path (posterior mode, patchify, normalise)
            torch.testing.assert_close(encoded, pipe._encode_vae_image(image * 2 - 1, generator=None),
                                       rtol=0, atol=1e-6)
    assert encoded.shape == latents.shape


@pytest.mark.parametrize("family", ["flux", "flux2"])
def test_per_sample_lora_scale_on_every_adapted_projection(folders, family):
    """A (B,) scale gives each sample what a float scale gives it alone: the 3x/2x teacher pass stays one call."""
    backbone = _load(folders, family)
    net = backbone.teacher.net
    inject_lora(net, "critic", 2, 2.0, backbone.lora_targets)
    layers = dict(lora_layers(net))
    assert any(n.startswith("single_transformer_blocks") for n in layers)  # the single-stream blocks are adapted
    with torch.no_grad():
        for name, layer in layers.items():
            layer.lora_B["critic"].copy_(torch.randn(layer.lora_B["critic"].shape,
                                                     generator=torch.Generator().manual_seed(len(name))))
    cond = backbone.text_encoder.encode(PROMPTS)
    x = torch.randn(2, *SHAPE[family], generator=torch.Generator().manual_seed(3))
    t = torch.tensor([0.9, 0.4])
    with torch.no_grad():
        both = backbone.teacher(x, t, cond, lora_scales={"critic": torch.tensor([0.0, 1.5])})
        first = backbone.teacher(x, t, cond, lora_scales={"critic": 0.0})
        second = backbone.teacher(x, t, cond, lora_scales={"critic": 1.5})
    torch.testing.assert_close(both[0], first[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(both[1], second[1], rtol=1e-5, atol=1e-6)
    assert (first[1] - second[1]).abs().max() > 1e-3  # the adapters do change the prediction
