"""The Qwen-Image family against the stock QwenImagePipeline: text encoding (template drop, masks, variable
lengths), the few-step sampler and the 3-D VAE's decode, masking and per-sample LoRA scales, wrong folders."""

import json
import shutil

import pytest
import torch

from dmdr.errors import ModelLoadError
from dmdr.export.settings import InferenceSettings, scheduler_config
from dmdr.models import CRITIC, add_critic_lora, load_backbone
from dmdr.models.base import cat_conditioning
from dmdr.models.lora import lora_layers
from dmdr.models.qwenimage import (
    NEGATIVE_PROMPT,
    QwenImageCodec,
    QwenImageDenoiser,
    QwenImageTextEncoder,
    pack_latents,
    unpack_latents,
)
from dmdr.models.tiny import build_tiny_qwenimage
from dmdr.sampling import few_step_sample
from dmdr.schedules import few_step_timesteps

pytestmark = pytest.mark.usefixtures("one_thread")

MAX_SEQ = 160
"""The byte-level tiny tokenizer leaves ~130 template tokens after the drop; 160 cuts the long prompt."""
PROMPTS = ["a red cube on a blue floor", "", "a photo of a very long prompt " * 8]


@pytest.fixture(scope="module")
def qwen_path(tmp_path_factory):
    return build_tiny_qwenimage(tmp_path_factory.mktemp("qwenimage") / "tiny-qwenimage")


@pytest.fixture(scope="module")
def qwen(qwen_path):
    return load_backbone(qwen_path, dtype=torch.float32, max_sequence_length=MAX_SEQ)


@pytest.fixture(scope="module")
def pipe(qwen_path):
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline

    p = QwenImagePipeline.from_pretrained(qwen_path, local_files_only=True)
    # The export's scheduler: sigmas passed through unshifted (dmdr/export/README.md).
    p.scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config(dict(p.scheduler.config)))
    p.set_progress_bar_config(disable=True)
    return p


def test_backbone_and_text_encoding_equal_the_pipeline(qwen, pipe):
    assert isinstance(qwen.teacher, QwenImageDenoiser) and isinstance(qwen.text_encoder, QwenImageTextEncoder)
    assert isinstance(qwen.codec, QwenImageCodec)
    assert qwen.family == "qwenimage" and qwen.latent_channels == 16 and qwen.vae_scale_factor == 2
    assert len(qwen.teacher.blocks()) == 2
    cond = qwen.text_encoder.encode(PROMPTS)
    embeds, mask = pipe.encode_prompt(PROMPTS, max_sequence_length=MAX_SEQ)
    torch.testing.assert_close(cond["prompt_embeds"], embeds)
    assert mask is not None and torch.equal(cond["prompt_mask"], mask.bool())
    lengths = cond["prompt_mask"].sum(dim=1).tolist()
    assert lengths[2] == MAX_SEQ > lengths[0] > lengths[1] > 0  # the long prompt cut, each its own length
    assert qwen.text_encoder.truncated == 1
    assert not cond["prompt_embeds"][~cond["prompt_mask"]].any()  # zeros after each prompt's tokens
    negative = qwen.text_encoder.negative()
    ref, ref_mask = pipe.encode_prompt(NEGATIVE_PROMPT, max_sequence_length=MAX_SEQ)
    torch.testing.assert_close(negative["prompt_embeds"], ref)
    assert ref_mask is None and negative["prompt_mask"].all()  # one prompt: the pipeline drops the mask


def test_few_step_sampler_and_decode_equal_the_stock_pipeline(qwen, pipe):
    """dmdr's ode sampler on the teacher and the codec's decode equal the stock pipeline called as the export's
    card says, on a batch of prompts of different lengths (the mask is live)."""
    prompts = PROMPTS[:2]
    settings = InferenceSettings("QwenImagePipeline", 4, 3.0, 0.001, 16, MAX_SEQ)
    levels = few_step_timesteps(4, 3.0, 0.001)
    noise = torch.randn(2, *qwen.latent_shape(16), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        cond = qwen.text_encoder.encode(prompts)
        ours = few_step_sample(qwen.teacher, noise, cond, levels, qwen.parameterization, mode="ode")
        image = qwen.codec.decode(ours)
        ref = pipe(prompts, latents=pack_latents(noise), output_type="latent", **settings.pipeline_kwargs()).images
        ref_image = pipe(prompts, latents=pack_latents(noise), output_type="pt", **settings.pipeline_kwargs()).images
    assert torch.equal(pipe.scheduler.sigmas[:-1], levels)
    torch.testing.assert_close(unpack_latents(ref, 8, 8), ours, atol=1e-5, rtol=0)
    assert ours.abs().max() > 0.1
    assert image.shape == ref_image.shape == (2, 3, 16, 16)
    torch.testing.assert_close(image, ref_image, atol=1e-5, rtol=0)
    # encode is decode's inverse in expectation: the posterior mean of a decoded image has the latent's scale
    assert qwen.codec.encode(image).shape == ours.shape


def test_pack_unpack_are_inverse_and_match_the_pipeline():
    from diffusers import QwenImagePipeline

    x = torch.randn(2, 16, 6, 4)
    packed = pack_latents(x)
    assert torch.equal(packed, QwenImagePipeline._pack_latents(x, 2, 16, 6, 4))
    assert torch.equal(unpack_latents(packed, 6, 4), x)
    assert torch.equal(QwenImagePipeline._unpack_latents(packed, 12, 8, 2)[:, :, 0], x)


def test_masking_and_padding_change_nothing(qwen):
    """A prompt batched with a longer one, or with extra (non-zero!) padding, predicts what it predicts alone."""
    cond = qwen.text_encoder.encode(PROMPTS[:2])
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.7, 0.3])
    with torch.no_grad():
        batched = qwen.teacher(x, t, cond)
        for i in range(2):
            alone = qwen.text_encoder.encode([PROMPTS[i]])
            torch.testing.assert_close(batched[i:i + 1], qwen.teacher(x[i:i + 1], t[i:i + 1], alone),
                                       atol=1e-5, rtol=1e-5)
        garbage = {"prompt_embeds": torch.randn(2, 7, cond["prompt_embeds"].shape[-1]),
                   "prompt_mask": torch.zeros(2, 7, dtype=torch.bool)}
        padded = {k: torch.cat([cond[k], garbage[k]], dim=1) for k in cond}
        torch.testing.assert_close(qwen.teacher(x, t, padded), batched, atol=1e-5, rtol=1e-5)
        # the uncond batch of the trainer: the negative (its own length) concatenated with the prompts
        both = cat_conditioning([cond, qwen.text_encoder.negative()])
        assert both["prompt_embeds"].shape[1] == cond["prompt_embeds"].shape[1]
        torch.testing.assert_close(qwen.teacher(torch.cat([x, x[:1]]), torch.cat([t, t[:1]]), both)[:2], batched,
                                   atol=1e-5, rtol=1e-5)


def test_per_sample_critic_scales_equal_one_scale_at_a_time(qwen_path):
    b = load_backbone(qwen_path, dtype=torch.float32, max_sequence_length=MAX_SEQ)
    add_critic_lora(b, rank=4, alpha=4.0)
    layers = list(lora_layers(b.teacher.net))
    assert {n.split(".attn.")[1] for n, _ in layers} == {"to_q", "to_k", "to_v", "to_out.0", "add_q_proj",
                                                          "add_k_proj", "add_v_proj", "to_add_out"}
    assert len(layers) == 2 * 8  # every projection of both blocks
    with torch.no_grad():
        for _, layer in layers:
            layer.lora_B[CRITIC].normal_(std=0.1)  # non-zero, so the scale matters
    cond = b.text_encoder.encode(PROMPTS[:2])
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([0.5, 0.5])
    with torch.no_grad():
        batched = b.teacher(x, t, cond, lora_scales={CRITIC: torch.tensor([0.5, 2.0])})
        one = [b.teacher(x, t, cond, lora_scales={CRITIC: s})[i] for i, s in enumerate((0.5, 2.0))]
        base = b.teacher(x, t, cond, lora_scales={CRITIC: 0.0})
    torch.testing.assert_close(batched, torch.stack(one), atol=1e-5, rtol=1e-5)
    assert (batched - base).abs().max() > 1e-3


def test_a_folder_of_another_family_is_refused_in_one_line(qwen_path, tmp_path):
    other = shutil.copytree(qwen_path, tmp_path / "flux", ignore=shutil.ignore_patterns("*.safetensors"))
    index = other / "model_index.json"
    index.write_text(json.dumps({**json.loads(index.read_text()), "_class_name": "FluxPipeline"}))
    with pytest.raises(ModelLoadError) as err:
        load_backbone(other, family="qwenimage")
    assert "is a FluxPipeline folder, not qwenimage (set model.family to flux" in str(err.value)
    assert "\n" not in str(err.value)
    index.write_text(json.dumps({**json.loads(index.read_text()), "_class_name": "StableDiffusion3Pipeline"}))
    with pytest.raises(ModelLoadError, match="StableDiffusion3Pipeline folder, not qwenimage"):
        load_backbone(other, family="qwenimage")
