"""Tiny random FLUX.1 (``FluxPipeline``) and FLUX.2 [klein] (``Flux2KleinPipeline``) folders, for tests and the
tiny recipe (``recipes/tiny_dmdr.py --model.family flux|flux2``); built like :mod:`dmdr.models.tiny`'s.

========== =================================================================================
FLUX.1     transformer: 1 double- and 1 single-stream block, 2 heads x 16 = width 32, rope axes
           (4, 6, 6), ``guidance_embeds`` (FLUX.1-dev's guidance embedding), 64 packed input
           channels (16 latent channels x 2x2). VAE as SD3's tiny one with FLUX's scaling/shift
           (2 pixels per latent cell). Text: a CLIP text model (width 16, pooled output) and a
           T5 encoder (width 32). Scheduler: FLUX.1-dev's (dynamic shifting). Images: any
           multiple of 4 pixels (default 16).
FLUX.2     transformer: 1 double- and 1 single-stream block, 2 heads x 16, rope axes (4, 4, 4, 4),
klein      no guidance embedding (klein), 64 input channels. VAE: ``AutoencoderKLFlux2`` (2 blocks,
           16 latent channels, 2x2 patchified to 64 with a batch norm whose running statistics are
           random, so a latent mean/std bug shows): 4 pixels per denoiser latent cell. Text: Qwen3
           (causal LM, width 16, 27 layers: the pipeline reads hidden states 9, 18 and 27) with the
           Qwen chat template. ``is_distilled`` false (the base model: true CFG). Images: any
           multiple of 4 pixels (default 16).
========== =================================================================================
"""

from __future__ import annotations

from pathlib import Path

import torch

from dmdr.models.tiny import TINY_BUILDERS, _clip_text_model, _vae, clip_tokenizer, qwen_tokenizer, t5_tokenizer

FLUX_SCHEDULER = {"base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
                  "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True}
"""FLUX.1-dev's ``scheduler_config.json``."""


def build_tiny_flux(path: str | Path, seed: int = 0) -> Path:
    """Write a tiny random FLUX.1-dev-style ``FluxPipeline`` folder to ``path`` and return it."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    path = Path(path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tok1, tok2 = clip_tokenizer(), t5_tokenizer()
        enc1 = _clip_text_model(len(tok1), tok1.bos_token_id, tok1.eos_token_id, tok1.pad_token_id,
                                projection=False)
        enc2 = T5EncoderModel(T5Config(vocab_size=len(tok2), d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                       num_heads=4, relative_attention_num_buckets=8, dropout_rate=0.0,
                                       pad_token_id=tok2.pad_token_id, eos_token_id=tok2.eos_token_id))
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=True,
            axes_dims_rope=(4, 6, 6),
        )
        vae = _vae(shift_factor=0.1159, scaling_factor=0.3611)  # FLUX.1's VAE constants
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER), vae=vae, text_encoder=enc1,
                        tokenizer=tok1, text_encoder_2=enc2, tokenizer_2=tok2, transformer=transformer)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


FLUX2_SCHEDULER = {"base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
                   "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True,
                   "time_shift_type": "exponential"}


def build_tiny_flux2(path: str | Path, seed: int = 0) -> Path:
    """Write a tiny random FLUX.2 [klein] base ``Flux2KleinPipeline`` folder to ``path`` and return it."""
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2KleinPipeline,
        Flux2Transformer2DModel,
    )
    from transformers import Qwen3Config, Qwen3ForCausalLM

    path = Path(path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tok = qwen_tokenizer()
        encoder = Qwen3ForCausalLM(Qwen3Config(
            vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=27,
            num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=1024,
            tie_word_embeddings=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        ))
        transformer = Flux2Transformer2DModel(
            patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=3 * 16, timestep_guidance_channels=32, mlp_ratio=3.0,
            axes_dims_rope=(4, 4, 4, 4), rope_theta=2000, guidance_embeds=False,
        )
        vae = AutoencoderKLFlux2(
            in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 16), layers_per_block=1,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            norm_num_groups=8, sample_size=16,
        )
        with torch.no_grad():  # the latent mean/std: random, so that a wrong normalisation shows
            vae.bn.running_mean.normal_(0.0, 0.5)
            vae.bn.running_var.uniform_(0.5, 2.0)
    pipe = Flux2KleinPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**FLUX2_SCHEDULER), vae=vae,
                              text_encoder=encoder, tokenizer=tok, transformer=transformer, is_distilled=False)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


TINY_BUILDERS.update(flux=build_tiny_flux, flux2=build_tiny_flux2)

__all__ = ["build_tiny_flux", "build_tiny_flux2"]
