"""Each adapter against its stock diffusers pipeline: text encoding, the velocity convention, the VAE."""

import pytest
import torch

from dmdr.models import cat_conditioning, repeat_conditioning

PIPELINES = {"sd3": "StableDiffusion3Pipeline", "zimage": "ZImagePipeline"}


@pytest.fixture(scope="module")
def pipeline(backbone):
    import diffusers

    cls = getattr(diffusers, PIPELINES[backbone.family])
    pipe = cls.from_pretrained(backbone.path, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def _pipeline_encode(pipe, family, prompts, max_len):
    if family == "sd3":
        out = pipe.encode_prompt(list(prompts), None, None, do_classifier_free_guidance=False,
                                 max_sequence_length=max_len)
        embeds, pooled = out[0], out[2]
        return embeds, pooled
    embeds, _ = pipe.encode_prompt(list(prompts), do_classifier_free_guidance=False,
                                   max_sequence_length=max_len)
    return embeds, None


def test_encode_equals_pipeline(backbone, pipeline, prompts):
    enc = backbone.text_encoder
    cond = enc.encode(prompts)
    ref, pooled = _pipeline_encode(pipeline, backbone.family, prompts, enc.max_sequence_length)
    assert all(v.shape[0] == len(prompts) for v in cond.values())
    if backbone.family == "sd3":
        torch.testing.assert_close(cond["prompt_embeds"], ref, rtol=0, atol=1e-6)
        torch.testing.assert_close(cond["pooled_prompt_embeds"], pooled, rtol=0, atol=1e-6)
    else:
        mask = cond["prompt_mask"]
        assert mask.dtype == torch.bool and mask.shape == cond["prompt_embeds"].shape[:2]
        for i, features in enumerate(ref):  # per-sample, unpadded in the pipeline
            n = int(mask[i].sum())
            assert n == features.shape[0] and mask[i, :n].all()
            torch.testing.assert_close(cond["prompt_embeds"][i, :n], features, rtol=0, atol=1e-6)
            assert not cond["prompt_embeds"][i, n:].any()
        assert mask[2].all()  # the long prompt fills (and is truncated to) max_sequence_length
    assert enc.truncated >= 1


def test_negative_is_the_empty_prompt_once(backbone, prompts):
    enc = backbone.text_encoder
    neg = enc.negative()
    assert enc.negative() is neg and all(v.shape[0] == 1 for v in neg.values())
    empty = enc.encode([""])
    for k in neg:
        torch.testing.assert_close(neg[k], empty[k], rtol=0, atol=0)
    # Conditionings of different prompts concatenate along the batch (Z-Image pads to a fixed length).
    batch = cat_conditioning([enc.encode(prompts[:1]), repeat_conditioning(neg, 2)])
    assert all(v.shape[0] == 3 for v in batch.values())


def _pipeline_trajectory(pipe, family, prompt, latents, steps, max_len):
    """The pipeline's latents after each step (no CFG) and the sigmas it used."""
    seen = []

    def grab(_pipe, _i, _t, kwargs):
        seen.append(kwargs["latents"].clone())
        return {}

    kwargs = dict(num_inference_steps=steps, latents=latents.clone(), output_type="latent",
                  max_sequence_length=max_len, callback_on_step_end=grab)
    side = latents.shape[-1] * 2
    if family == "sd3":
        pipe(prompt, guidance_scale=1.0, height=side, width=side, **kwargs)
    else:
        pipe(prompt, guidance_scale=0.0, height=side, width=side, **kwargs)
    return seen, pipe.scheduler.sigmas.clone()


def test_velocity_convention_matches_pipeline_steps(backbone, pipeline):
    """Euler steps of our FlowMatching with ``predict`` retrace the pipeline's scheduler steps."""
    latents = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(3))
    max_len = backbone.text_encoder.max_sequence_length
    seen, sigmas = _pipeline_trajectory(pipeline, backbone.family, "a red cube", latents, 3, max_len)
    assert len(seen) == 3 and sigmas[0] > sigmas[1] > sigmas[2] > 0
    cond = backbone.text_encoder.encode(["a red cube"])
    param = backbone.parameterization
    x = latents
    with torch.no_grad():
        for i, expected in enumerate(seen):
            t, t_next = sigmas[i].reshape(1), sigmas[i + 1].reshape(1)
            x = param.step(x, t, t_next, backbone.teacher(x, t, cond))
            torch.testing.assert_close(x, expected, rtol=1e-5, atol=1e-5)
    # Not vacuous: the opposite sign or a reversed time would leave the trajectory.
    t = sigmas[0].reshape(1)
    with torch.no_grad():
        v = backbone.teacher(latents, t, cond)
        assert (param.step(latents, t, sigmas[1].reshape(1), -v) - seen[0]).abs().max() > 1e-3
        v_rev = backbone.teacher(latents, 1 - t, cond)
        assert (param.step(latents, t, sigmas[1].reshape(1), v_rev) - seen[0]).abs().max() > 1e-3


def test_decode_matches_pipeline_and_encode_inverts_it(backbone, pipeline):
    latents = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(4))
    codec = backbone.codec
    with torch.no_grad():
        vae = pipeline.vae
        raw = vae.decode(latents / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)).sample
        expected = pipeline.image_processor.postprocess(raw, output_type="pt")
        torch.testing.assert_close(codec.decode(latents), expected, rtol=0, atol=1e-6)
        z = codec.vae.encode(expected * 2 - 1).latent_dist.mode()
        expected_latents = (z - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor
        torch.testing.assert_close(codec.encode(expected), expected_latents, rtol=0, atol=1e-6)
    x = latents.clone().requires_grad_(True)
    codec.decode(x).square().mean().backward()  # ReFL differentiates through the decoder
    assert x.grad is not None and x.grad.abs().sum() > 0
