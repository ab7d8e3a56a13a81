"""The planner's FLUX.1 model against what torch measures, as for SD3 and Z-Image (test_plan_estimates.py):
activations of one generator forward of the tiny FLUX.1 within 25% of autograd's saved tensors (full and LoRA
generators), one real FLUX.1-dev double- and single-stream block's FLOPs within 5% of torch's counter, and the
recipe's plan on 8x H100-80GB."""

from __future__ import annotations

import json

import pytest
import torch

from dmdr.build import build_roles
from dmdr.models import load_backbone
from dmdr.planning.activations import Tokens
from dmdr.planning.flops import flux_block_flops, flux_single_block_flops
from dmdr.planning.memory import denoiser_activations, tokens_of
from dmdr.planning.specs import build_model_spec
from tests.planning.grounding import count_flops, measured_saved_bytes, plan_config, shipped_block_spec

pytestmark = pytest.mark.usefixtures("one_thread")

LATENT = 32  # 256 packed image tokens per sample (2x2 packing): token terms dominate, as in the real model
TEXT = 16


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from dmdr.models.tiny_flux import build_tiny_flux

    return build_tiny_flux(tmp_path_factory.mktemp("plan-flux") / "flux")


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_activation_estimate_matches_saved_tensors(folder, mode):
    cfg = plan_config(folder, mode, TEXT, LATENT * 2)
    backbone = load_backbone(cfg.model.path, dtype=torch.float32, load_text_encoder=False, max_sequence_length=TEXT)
    generator, adapter = build_roles(cfg, backbone)
    if adapter is None:
        generator.requires_grad_(True)
    batch = 2
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 16, LATENT, LATENT, generator=g)
    cond = {"prompt_embeds": torch.randn(batch, TEXT, 32, generator=g),
            "pooled_prompt_embeds": torch.randn(batch, 16, generator=g)}
    scales = {"generator": 1.0, "critic": 0.0} if adapter else None
    exclude = {p.untyped_storage().data_ptr() for m in (generator, backbone.teacher)
               for p in [*m.parameters(), *m.buffers()]}
    measured = measured_saved_bytes(lambda: generator(x, torch.tensor([0.4, 0.9]), cond, lora_scales=scales),
                                    exclude)
    spec = build_model_spec(plan_config(folder, "lora", TEXT, LATENT * 2))
    assert spec.latent_channels == 16 and spec.patch_size == 2
    assert tokens_of(spec, cfg) == Tokens(LATENT * LATENT // 4, TEXT)
    planned = denoiser_activations(spec, cfg, batch, "generator")
    assert abs(planned - measured) <= 0.25 * measured, (planned, measured)


def test_flux_dev_block_flops_match_flop_counter():
    spec = shipped_block_spec("flux.1-dev", "flux")
    net = spec.denoiser.net
    d = net.inner_dim
    tokens = Tokens(64 * 64, 512)  # 1024 px: 128x128 latent packed 2x2; T5 512
    n, m = tokens.image, tokens.text
    img = torch.empty(1, n, d, device="meta", dtype=torch.bfloat16)
    txt = torch.empty(1, m, d, device="meta", dtype=torch.bfloat16)
    temb = torch.empty(1, d, device="meta", dtype=torch.bfloat16)
    rope = (torch.empty(n + m, 128, device="meta"), torch.empty(n + m, 128, device="meta"))
    double, single = net.transformer_blocks[1], net.single_transformer_blocks[1]
    counted = count_flops(lambda: double(img, txt, temb, rope))
    planned = flux_block_flops(double, tokens, ("critic",)).forward
    assert abs(planned - counted) <= 0.05 * counted, (planned, counted)
    counted = count_flops(lambda: single(img, txt, temb, rope))
    planned = flux_single_block_flops(single, tokens, ("critic",)).forward
    assert abs(planned - counted) <= 0.05 * counted, (planned, counted)
    assert planned > 5e11  # a real block at 1024 px, not a toy


@pytest.mark.slow
def test_flux_dev_recipe_plan_on_8_h100(capsys):
    """The question the README answers: FLUX.1-dev DMDR at 1024 px, LoRA generator + shared critic, 8x H100-80GB."""
    from dmdr.cli import plan

    assert plan.main(["--recipe", "flux_dmdr", "--json", "-"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["world_size"] == 8 and data["gpu"] == "h100-80"
    cold, rl = data["stages"]
    assert (cold["batch_per_gpu"], rl["batch_per_gpu"]) == (4, 2)
    assert data["fits"] is True
    assert cold["seconds_per_generator_step"] > 0
