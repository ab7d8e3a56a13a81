"""The planner's activation and FLOP models against what torch measures (issue 14).

* Activations: autograd's saved tensors (unique storages, parameters and buffers excluded) of one
  generator forward of the tiny SD3 and Z-Image models, full-copy and LoRA generators, within 25% of
  :func:`dmdr.planning.memory.denoiser_activations`.
* FLOPs: one block of the real SD3.5-Large and Z-Image architectures (shipped configs, on the meta
  device, LoRA injected as a run does) at 1024 px under ``torch.utils.flop_counter``, within 5% of
  :mod:`dmdr.planning.flops`.
* The meta-device saved-tensor count used for the VAE decoder and the reward ViTs equals the real
  count on the tiny VAE.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dmdr.build import build_roles
from dmdr.models import load_backbone
from dmdr.models.loading import read_model_index
from dmdr.models.tiny import build_tiny
from dmdr.planning.activations import Tokens, saved_bytes_on_meta
from dmdr.planning.flops import sd3_block_flops, zimage_block_flops
from dmdr.planning.memory import denoiser_activations, tokens_of
from dmdr.planning.specs import build_model_spec
from tests.planning.grounding import count_flops, measured_saved_bytes, plan_config, shipped_block_spec

pytestmark = pytest.mark.usefixtures("one_thread")

LATENT = 32  # 256 image tokens per sample with patch 2: token terms dominate, as in the real models
TEXT = 16


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("plan-acts")
    return {f: build_tiny(f, root / f) for f in ("sd3", "zimage")}


def _cond(family: str, n: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    if family == "sd3":
        return {"prompt_embeds": torch.randn(n, 77 + TEXT, 32, generator=g),
                "pooled_prompt_embeds": torch.randn(n, 32, generator=g)}
    return {"prompt_embeds": torch.randn(n, TEXT, 32, generator=g),
            "prompt_mask": torch.ones(n, TEXT, dtype=torch.bool)}


@pytest.fixture(scope="module")
def specs(folders):
    """One spec per family (it holds both adapters whatever the generator mode)."""
    return {f: build_model_spec(plan_config(folders[f], "lora", TEXT, LATENT * 2)) for f in folders}


@pytest.mark.parametrize("family", ["sd3", "zimage"])
@pytest.mark.parametrize("mode", ["full", "lora"])
def test_activation_estimate_matches_saved_tensors(folders, specs, family, mode):
    cfg = plan_config(folders[family], mode, TEXT, LATENT * 2)
    backbone = load_backbone(cfg.model.path, dtype=torch.float32, load_text_encoder=False,
                             max_sequence_length=TEXT)
    generator, adapter = build_roles(cfg, backbone)
    if adapter is None:
        generator.requires_grad_(True)
    batch = 2
    x = torch.randn(batch, 16, LATENT, LATENT, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.4, 0.9])
    cond = _cond(family, batch)
    scales = {"generator": 1.0, "critic": 0.0} if adapter else None
    exclude = {p.untyped_storage().data_ptr() for m in (generator, backbone.teacher)
               for p in [*m.parameters(), *m.buffers()]}
    measured = measured_saved_bytes(lambda: generator(x, t, cond, lora_scales=scales), exclude)
    spec = specs[family]
    assert tokens_of(spec, cfg) == Tokens(LATENT * LATENT // 4, TEXT + (77 if family == "sd3" else 0))
    planned = denoiser_activations(spec, cfg, batch, "generator")
    assert abs(planned - measured) <= 0.25 * measured, (planned, measured)


def test_sd35_large_block_flops_match_flop_counter():
    spec = shipped_block_spec("sd3.5-large", "sd3")
    block = spec.denoiser.blocks()[1]
    d = block.norm2.normalized_shape[0]
    tokens = Tokens(64 * 64, 77 + 256)  # 1024 px: 128x128 latent, patch 2; CLIP 77 + T5 256
    args = (torch.empty(1, tokens.image, d, device="meta", dtype=torch.bfloat16),
            torch.empty(1, tokens.text, d, device="meta", dtype=torch.bfloat16),
            torch.empty(1, d, device="meta", dtype=torch.bfloat16))
    counted = count_flops(lambda: block(*args))
    planned = sd3_block_flops(block, tokens, ("critic",)).forward
    assert abs(planned - counted) <= 0.05 * counted, (planned, counted)
    assert planned > 5e11  # a real block at 1024 px: ~0.8 TFLOP per sample, not a toy


def test_zimage_block_flops_match_flop_counter():
    spec = shipped_block_spec("z-image-turbo", "zimage")
    net = spec.denoiser.net
    block = net.layers[0]
    n = 64 * 64 + 512
    x = torch.empty(1, n, net.dim, device="meta", dtype=torch.bfloat16)
    mask = torch.ones(1, n, dtype=torch.bool, device="meta")
    freqs = torch.empty(1, n, net.dim // net.n_heads // 2, device="meta", dtype=torch.complex64)
    adaln = torch.empty(1, min(net.dim, 256), device="meta", dtype=torch.bfloat16)
    counted = count_flops(lambda: block(x, mask, freqs, adaln))
    planned = zimage_block_flops(block, n, ("critic",)).forward
    assert abs(planned - counted) <= 0.05 * counted, (planned, counted)


def test_meta_saved_bytes_equal_real_on_the_tiny_vae(folders):

    folder = read_model_index(folders["sd3"])
    real = folder.load("vae", torch.float32)
    real.requires_grad_(False)
    meta = folder.build_config_on_meta("vae", torch.float32)
    z = torch.randn(1, 16, 8, 8, requires_grad=True)
    exclude = {p.untyped_storage().data_ptr() for p in [*real.parameters(), *real.buffers()]}
    measured = measured_saved_bytes(lambda: real.decode(z, return_dict=False)[0], exclude)
    zm = torch.empty(1, 16, 8, 8, device="meta", requires_grad=True)
    on_meta = saved_bytes_on_meta(lambda: meta.decode(zm, return_dict=False)[0])
    assert abs(on_meta - measured) <= 0.10 * measured, (on_meta, measured)
