"""The SDXL family against the stock StableDiffusionXLPipeline, and Conv2d LoRA against peft."""

import json
import shutil

import pytest
import torch
from torch import nn

from dmdr.errors import ModelLoadError
from dmdr.models import CRITIC, add_critic_lora, load_backbone
from dmdr.models.lora import LoRAConv2d, LoRALinear, LoRAScales, inject_lora, lora_layers, merge_adapter
from dmdr.models.sdxl import LORA_TARGETS, SDXLDenoiser, SDXLTextEncoder
from dmdr.parameterization import EpsilonPrediction
from dmdr.sampling import few_step_sample
from dmdr.schedules import generator_levels


@pytest.fixture(scope="module")
def sdxl(family_paths):
    return load_backbone(family_paths["sdxl"], dtype=torch.float32)


@pytest.fixture(scope="module")
def pipe(family_paths):
    from diffusers import LCMScheduler, StableDiffusionXLPipeline

    p = StableDiffusionXLPipeline.from_pretrained(family_paths["sdxl"], local_files_only=True)
    p.scheduler = LCMScheduler.from_config(p.scheduler.config)  # the authors' few-step inference scheduler
    p.set_progress_bar_config(disable=True)
    return p


def test_backbone_and_text_encoding_equal_the_pipeline(sdxl, pipe, prompts):
    assert isinstance(sdxl.teacher, SDXLDenoiser) and isinstance(sdxl.text_encoder, SDXLTextEncoder)
    assert sdxl.family == "sdxl" and sdxl.latent_channels == 4 and sdxl.vae_scale_factor == 2
    param = sdxl.parameterization
    assert isinstance(param, EpsilonPrediction) and param.discrete
    assert torch.equal(param.alphas_cumprod, pipe.scheduler.alphas_cumprod.double())
    assert len(sdxl.teacher.blocks()) == 5  # 2 down, mid, 2 up
    cond = sdxl.text_encoder.encode(prompts)
    embeds, neg, pooled, neg_pooled = pipe.encode_prompt(prompts, do_classifier_free_guidance=True)
    torch.testing.assert_close(cond["prompt_embeds"], embeds, rtol=0, atol=0)
    torch.testing.assert_close(cond["pooled_prompt_embeds"], pooled, rtol=0, atol=0)
    negative = sdxl.text_encoder.negative()  # force_zeros_for_empty_prompt: the pipeline's zeros
    assert negative["prompt_embeds"].shape == (1, 77, 32) and not negative["prompt_embeds"].any()
    assert not neg[:1].any() and not neg_pooled[:1].any() and not negative["pooled_prompt_embeds"].any()


@pytest.mark.parametrize("timesteps", [(399,), (999, 749, 499, 249)])
def test_few_step_sampler_equals_stock_pipeline_with_lcm_scheduler(sdxl, pipe, timesteps):
    """dmdr's x0-then-renoise sampler (sde mode) on the teacher equals the stock pipeline with LCMScheduler and
    ``timesteps=[...]``: same UNet call (timestep, add_time_ids, pooled embeds), same noise stream."""
    n = len(timesteps)
    levels = generator_levels(n, 1.0, 0.001, timesteps, sdxl.parameterization)
    cond = sdxl.text_encoder.encode(["a red cube"])
    g = torch.Generator().manual_seed(7)
    noise = torch.randn(1, *sdxl.latent_shape(16), generator=g)
    with torch.no_grad():
        ours = few_step_sample(sdxl.teacher, noise, cond, levels, sdxl.parameterization, mode="sde", generator=g)
        ref = pipe("a red cube", num_inference_steps=None, timesteps=list(timesteps), guidance_scale=0.0,
                   height=16, width=16, output_type="latent", generator=torch.Generator().manual_seed(7)).images
    assert (ours - ref).abs().max() <= 1e-4 and ours.abs().max() > 0.1


def test_wrong_family_and_prediction_type_are_one_line(family_paths, tmp_path):
    for folder, family, needle in ((family_paths["sd3"], "sdxl", "StableDiffusion3Pipeline folder, not sdxl"),
                                   (family_paths["sdxl"], "sd3", "StableDiffusionXLPipeline folder, not sd3")):
        with pytest.raises(ModelLoadError) as err:
            load_backbone(folder, family=family)
        assert needle in str(err.value) and "\n" not in str(err.value)
    vpred = shutil.copytree(family_paths["sdxl"], tmp_path / "vpred")
    config = vpred / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "prediction_type": "v_prediction"}))
    with pytest.raises(ModelLoadError, match="prediction_type 'v_prediction'.*epsilon-prediction UNets only"):
        load_backbone(vpred, dtype=torch.float32)


def test_fp16_run_keeps_the_force_upcast_vae_in_fp32(family_paths):
    b = load_backbone(family_paths["sdxl"], dtype=torch.float16, load_text_encoder=False)
    assert b.codec.vae.dtype == torch.float32 and b.teacher.net.dtype == torch.float16


def test_critic_lora_wraps_convolutions_and_linears(family_paths):
    b = load_backbone(family_paths["sdxl"], dtype=torch.float32, load_text_encoder=False)
    add_critic_lora(b, rank=4, alpha=4)
    kinds = {type(layer) for _, layer in lora_layers(b.teacher.net)}
    assert kinds == {LoRALinear, LoRAConv2d}
    names = [n for n, layer in lora_layers(b.teacher.net) if isinstance(layer, LoRAConv2d)]
    assert any(n.endswith("downsamplers.0.conv") for n in names) and any(n.endswith("conv_shortcut") for n in names)


def _peft_unet_at(unet: nn.Module, ours: nn.Module, scale: float, rank: int, alpha: float) -> nn.Module:
    """A peft-LoRA copy of ``unet`` with our critic adapter's weights, merged by peft at runtime scale ``scale``."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(unet, LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(LORA_TARGETS)))
    ours_state = {n: layer for n, layer in lora_layers(ours)}
    copied = 0
    with torch.no_grad():
        for name, module in model.base_model.model.named_modules():
            if name in ours_state and hasattr(module, "lora_A"):
                module.lora_A["default"].weight.copy_(ours_state[name].lora_A[CRITIC])
                module.lora_B["default"].weight.copy_(ours_state[name].lora_B[CRITIC])
                module.set_scale("default", scale)  # peft's runtime scale: scaling = scale * alpha / r
                copied += 1
    assert copied == len(ours_state)
    return model.merge_and_unload()


def test_conv2d_lora_runtime_scale_equals_peft_merged_weights(family_paths):
    """Per-sample scales on the UNet's Conv2d and Linear adapters equal peft's merged UNet at each scale, and
    our merge equals peft's merge weight for weight."""
    from diffusers import UNet2DConditionModel

    path = family_paths["sdxl"] / "unet"
    rank, alpha = 4, 8.0
    ours = UNet2DConditionModel.from_pretrained(path, local_files_only=True).eval()
    inject_lora(ours, CRITIC, rank, alpha, LORA_TARGETS, LoRAScales(), seed=3)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, layer in lora_layers(ours):
            layer.lora_B[CRITIC].copy_(torch.randn(layer.lora_B[CRITIC].shape, generator=g) * 0.1)
    scales = (0.5, 2.0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([749.0, 249.0])
    kwargs = {"encoder_hidden_states": torch.randn(2, 77, 32, generator=g),
              "added_cond_kwargs": {"text_embeds": torch.randn(2, 16, generator=g),
                                    "time_ids": torch.tensor([[16.0, 16, 0, 0, 16, 16]] * 2)}}
    scales_obj = next(layer for _, layer in lora_layers(ours)).scales
    scales_obj.set(**{CRITIC: torch.tensor(scales)})
    with torch.no_grad():
        batched = ours(x, t, **kwargs, return_dict=False)[0]
        scales_obj.set(**{CRITIC: 0.0})
        base = ours(x, t, **kwargs, return_dict=False)[0]
    for i, s in enumerate(scales):
        peft_unet = _peft_unet_at(UNet2DConditionModel.from_pretrained(path, local_files_only=True).eval(), ours, s,
                                  rank, alpha)
        with torch.no_grad():
            ref = peft_unet(x[i:i + 1], t[i:i + 1], encoder_hidden_states=kwargs["encoder_hidden_states"][i:i + 1],
                            added_cond_kwargs={k: v[i:i + 1] for k, v in kwargs["added_cond_kwargs"].items()},
                            return_dict=False)[0]
        torch.testing.assert_close(batched[i:i + 1], ref, rtol=1e-4, atol=1e-5)
        assert (ref - base[i:i + 1]).abs().max() > 1e-3  # the adapter does something at this scale
        if s == scales[1]:
            merged = {n: p for n, p in peft_unet.named_parameters()}
            merge_adapter(ours, CRITIC, scale=s)
            for name, layer in lora_layers(ours):
                torch.testing.assert_close(layer.base.weight, merged[f"{name}.weight"], rtol=1e-5, atol=1e-6)
