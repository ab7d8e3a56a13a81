"""The planner's Qwen-Image model: activations against autograd's saved tensors of the tiny model (as for SD3 and
Z-Image, within 25%), one real block's FLOPs against torch's counter (within 5%), and the question users ask:
Qwen-Image DMDR at 1024 px with a generator LoRA and the shared critic on 8x H100-80GB."""

from __future__ import annotations

import pytest
import torch

from dmdr.build import build_roles
from dmdr.models import load_backbone
from dmdr.models.tiny import build_tiny_qwenimage
from dmdr.planning.activations import Tokens
from dmdr.planning.flops import qwenimage_block_flops
from dmdr.planning.memory import denoiser_activations, tokens_of
from dmdr.planning.specs import build_model_spec
from tests.planning.grounding import count_flops, measured_saved_bytes, plan_config, shipped_block_spec

pytestmark = pytest.mark.usefixtures("one_thread")

LATENT = 32  # 256 image tokens per sample with patch 2: token terms dominate, as in the real model
TEXT = 16


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_tiny_qwenimage(tmp_path_factory.mktemp("plan-qwen") / "tiny-qwenimage")


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_activation_estimate_matches_saved_tensors(folder, mode):
    cfg = plan_config(folder, mode, TEXT, LATENT * 2)
    backbone = load_backbone(folder, dtype=torch.float32, load_text_encoder=False, max_sequence_length=TEXT)
    generator, adapter = build_roles(cfg, backbone)
    if adapter is None:
        generator.requires_grad_(True)
    x = torch.randn(2, 16, LATENT, LATENT, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.4, 0.9])
    cond = {"prompt_embeds": torch.randn(2, TEXT, 32, generator=torch.Generator().manual_seed(1)),
            "prompt_mask": torch.ones(2, TEXT, dtype=torch.bool)}
    scales = {"generator": 1.0, "critic": 0.0} if adapter else None
    exclude = {p.untyped_storage().data_ptr() for m in (generator, backbone.teacher)
               for p in [*m.parameters(), *m.buffers()]}
    measured = measured_saved_bytes(lambda: generator(x, t, cond, lora_scales=scales), exclude)
    spec = build_model_spec(plan_config(folder, "lora", TEXT, LATENT * 2))
    assert tokens_of(spec, cfg) == Tokens(LATENT * LATENT // 4, TEXT)
    planned = denoiser_activations(spec, cfg, 2, "generator")
    assert abs(planned - measured) <= 0.25 * measured, (planned, measured)


def test_real_block_flops_match_flop_counter():
    spec = shipped_block_spec("qwen-image", "qwenimage")
    net = spec.denoiser.net
    block = net.transformer_blocks[1]
    tokens = Tokens(64 * 64, 512)  # 1024 px: 128x128 latent, patch 2; 512 text tokens
    d = block.dim
    head = d // block.attn.heads
    freqs = (torch.empty(tokens.image, head // 2, device="meta", dtype=torch.complex64),
             torch.empty(tokens.text, head // 2, device="meta", dtype=torch.complex64))
    args = (torch.empty(1, tokens.image, d, device="meta", dtype=torch.bfloat16),
            torch.empty(1, tokens.text, d, device="meta", dtype=torch.bfloat16), None,
            torch.empty(1, d, device="meta", dtype=torch.bfloat16), freqs)
    counted = count_flops(lambda: block(*args))
    planned = qwenimage_block_flops(block, tokens, ("critic",)).forward
    assert abs(planned - counted) <= 0.05 * counted, (planned, counted)
    assert planned > 1e12  # a real 20B-model block at 1024 px: ~1.6 TFLOP per sample


@pytest.mark.slow
def test_qwenimage_1024_lora_generator_shared_critic_on_8x_h100():
    """The recipe (generator LoRA, one critic LoRA serving both scores, AC full, batch 4 / 2, sharded Qwen2.5-VL)
    fits 8x H100-80GB; without activation checkpointing it does not, and the advice makes it fit."""
    from dmdr.config import apply_overrides
    from dmdr.gpus import get_gpu
    from dmdr.planning import make_plan
    from dmdr.recipes import get_recipe

    cfg = get_recipe("qwenimage_dmdr").config()
    result = make_plan(cfg, "h100-80", get_gpu("h100-80"), 8, recipe="qwenimage_dmdr")
    spec, p = result.spec, result.plan
    assert spec.name == "qwen-image" and spec.latent_channels == 16 and spec.vae_scale_factor == 8 and spec.vae_frames
    assert 19e9 < spec.denoiser.base.numel < 21e9  # the 20B transformer
    assert 8.0e9 < sum(c.params.numel for c in spec.text_encoders) < 8.6e9  # Qwen2.5-VL-7B with its vision tower
    assert p.fits and len(p.stages) == 2
    assert max(s.peak for s in p.stages) < p.usable
    none = apply_overrides(cfg, ["--parallel.activation_checkpointing", "none"])
    refused = make_plan(none, "h100-80", get_gpu("h100-80"), 8, recipe="qwenimage_dmdr")
    assert not refused.plan.fits and refused.advice.fits and refused.advice.overrides
