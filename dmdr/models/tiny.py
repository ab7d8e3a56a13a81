"""Tiny random SD3, Z-Image, SDXL and Qwen-Image pipeline folders, for tests and the demo.

Each builder writes a complete diffusers folder (``model_index.json``, every component's config and
weights, the scheduler and the tokenizers) with :meth:`DiffusionPipeline.save_pretrained`, so the
stock pipeline loads it with ``from_pretrained(path, local_files_only=True)`` and dmdr loads it
through :func:`dmdr.models.load_backbone`, the same code path a real model takes. Nothing is
downloaded: the tokenizers are built in code from a byte-level vocabulary (every byte is a token,
no merges), so any prompt tokenizes without unknown tokens.

Sizes (defaults; a forward runs in milliseconds on one CPU core):

========== =================================================================================
SD3        transformer: 2 joint blocks (block 0 with SD3.5's dual attention ``attn2``), 2 heads x
           16 = width 32, rms qk-norm, patch 2, 16 latent channels, ``sample_size`` 8 (latent
           side), positions up to 32. VAE: 2 blocks (8, 16 channels) -> 2 pixels per latent cell,
           16 latent channels. Text: two CLIP text models (width 16, 2 layers, projection 16,
           77 tokens) and a T5 encoder (width 32, 2 layers). Default images: 16x16 pixels.
Z-Image    transformer: 2 main layers + 1 noise and 1 context refiner, 2 heads x 16 = width 32,
           patch 2, 16 latent channels. VAE as SD3's (Flux scaling/shift). Text: Qwen3 (width 32,
           2 layers) with a Qwen-style chat template. Images: any multiple of 4 pixels
           (pass ``height``/``width`` to the stock pipeline, whose default is 1024).
Qwen-Image transformer: 2 dual-stream blocks, 2 heads x 16 = width 32, RoPE axes (4, 6, 6), patch 2 over
           16 latent channels (64 packed). VAE: the 3-D ``AutoencoderKLQwenImage`` with 2 levels (8, 16
           channels) -> 2 pixels per latent cell, Qwen-Image's per-channel latent mean/std. Text: a
           Qwen2.5-VL (text width 32, 2 layers, mrope; a 1-block vision tower it never uses) with the
           byte-level Qwen tokenizer. Scheduler: Qwen-Image's (dynamic exponential shift, terminal 0.02).
           Images: any multiple of 4 pixels (pass ``height``/``width``; the stock default is 1024).
SDXL       UNet: 2 levels (16, 32 channels, one resnet each; the second with one cross-attention
           transformer, 4 heads), a cross-attention mid block, SDXL's ``text_time`` added
           conditioning, 4 latent channels, ``sample_size`` 8. VAE: 2 blocks (8, 16) -> 2 pixels per
           latent cell, 4 latent channels, SDXL's scaling 0.13025 and ``force_upcast``. Text: a CLIP
           text model and a CLIP with projection (width 16, 2 layers, projection 16). Scheduler: SDXL
           base's ``EulerDiscreteScheduler`` (scaled-linear betas, epsilon). Default images: 16x16.
========== =================================================================================
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

CLIP_MAX_LENGTH = 77

QWEN_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)
"""Qwen3's template reduced to what text-to-image prompting uses (plain messages, generation prompt,
the ``enable_thinking`` switch): same strings as the real one for a single user message."""


def _byte_alphabet() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes (the byte-level pre-tokenizer's alphabet)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    keep += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def clip_tokenizer(pad_token: str = "<|endoftext|>"):
    """A CLIP BPE tokenizer over the byte alphabet (no merges): 514 tokens, 77 positions."""
    from transformers import CLIPTokenizer

    alphabet = _byte_alphabet()
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab.update({c + "</w>": i + 256 for i, c in enumerate(alphabet)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], pad_token=pad_token, model_max_length=CLIP_MAX_LENGTH)


def t5_tokenizer():
    """A T5 unigram tokenizer over printable ASCII (with and without the word-start mark)."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    chars = string.ascii_letters + string.digits + string.punctuation
    pieces += [("▁" + c, -4.0) for c in chars] + [(c, -5.0) for c in chars]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


def qwen_tokenizer():
    """A Qwen2 byte-level BPE tokenizer (no merges) with Qwen's special tokens and chat template."""
    from transformers import Qwen2Tokenizer

    vocab = {c: i for i, c in enumerate(_byte_alphabet())}
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
    for s in specials:
        vocab[s] = len(vocab)
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], pad_token="<|endoftext|>", eos_token="<|im_end|>",
                         additional_special_tokens=specials[1:], model_max_length=32768)
    tok.chat_template = QWEN_CHAT_TEMPLATE
    return tok


def _vae(shift_factor: float, scaling_factor: float):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8, sample_size=16, use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=shift_factor, scaling_factor=scaling_factor,
    )


def _clip_text_model(vocab_size: int, bos: int, eos: int, pad: int, projection: bool = True):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=CLIP_MAX_LENGTH, projection_dim=16,
                         hidden_act="gelu", bos_token_id=bos, eos_token_id=eos, pad_token_id=pad)
    return CLIPTextModelWithProjection(cfg) if projection else CLIPTextModel(cfg)


def build_tiny_sd3(path: str | Path, seed: int = 0, sample_size: int = 8) -> Path:
    """Write a tiny random ``StableDiffusion3Pipeline`` folder to ``path`` and return it.

    Args:
        path: destination folder (created; existing files are overwritten).
        seed: torch seed of the random weights (same seed, same weights).
        sample_size: the transformer's default latent side (the stock pipeline's default image is
            ``2 * sample_size`` pixels); any latent side up to 32 works.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import T5Config, T5EncoderModel

    path = Path(path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tok1, tok2, tok3 = clip_tokenizer(), clip_tokenizer(pad_token="!"), t5_tokenizer()
        enc1 = _clip_text_model(len(tok1), tok1.bos_token_id, tok1.eos_token_id, tok1.pad_token_id)
        enc2 = _clip_text_model(len(tok2), tok2.bos_token_id, tok2.eos_token_id, tok2.pad_token_id)
        enc3 = T5EncoderModel(T5Config(vocab_size=len(tok3), d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                       num_heads=4, relative_attention_num_buckets=8, dropout_rate=0.0,
                                       pad_token_id=tok3.pad_token_id, eos_token_id=tok3.eos_token_id))
        transformer = SD3Transformer2DModel(
            sample_size=sample_size, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
            attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=32,
            pooled_projection_dim=32, pos_embed_max_size=32, dual_attention_layers=(0,), qk_norm="rms_norm",
        )
        vae = _vae(shift_factor=0.0609, scaling_factor=1.5305)  # SD3's VAE constants
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=enc1, tokenizer=tok1, text_encoder_2=enc2, tokenizer_2=tok2,
        text_encoder_3=enc3, tokenizer_3=tok3,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def build_tiny_zimage(path: str | Path, seed: int = 0) -> Path:
    """Write a tiny random ``ZImagePipeline`` folder to ``path`` and return it.

    Args:
        path: destination folder (created; existing files are overwritten).
        seed: torch seed of the random weights (same seed, same weights).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    path = Path(path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tok = qwen_tokenizer()
        encoder = Qwen3Model(Qwen3Config(
            vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8,
            max_position_embeddings=1024, tie_word_embeddings=False,
            pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        ))
        transformer = ZImageTransformer2DModel(
            all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32, n_layers=2,
            n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=32,
            axes_dims=[4, 6, 6], axes_lens=[1024, 64, 64],
        )
        # A random init leaves the pad tokens at zero; give them values so masking bugs show.
        with torch.no_grad():
            transformer.x_pad_token.normal_()
            transformer.cap_pad_token.normal_()
        vae = _vae(shift_factor=0.1159, scaling_factor=0.3611)  # Z-Image's (Flux) VAE constants
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0,
                                                use_dynamic_shifting=False)
    pipe = ZImagePipeline(scheduler=scheduler, vae=vae, text_encoder=encoder, tokenizer=tok,
                          transformer=transformer)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


QWENIMAGE_SCHEDULER = {"base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 8192, "max_shift": 0.9,
                       "num_train_timesteps": 1000, "shift": 1.0, "shift_terminal": 0.02,
                       "time_shift_type": "exponential", "use_dynamic_shifting": True}
"""Qwen-Image's ``scheduler_config.json`` settings (a ``FlowMatchEulerDiscreteScheduler``)."""


def tiny_qwen25vl(tok):
    """A tiny random ``Qwen2_5_VLForConditionalGeneration`` for ``tok`` (text width 32; the 1-block vision
    tower is there because the class has one: text-to-image encoding never calls it)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    special = tok.convert_tokens_to_ids("<|im_start|>")  # image/video ids: any in-vocabulary token
    config = Qwen2_5_VLConfig(
        text_config={"vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 2048,
                     "rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 2]}, "tie_word_embeddings": False,
                     "pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id,
                     "bos_token_id": tok.pad_token_id},
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2, "out_hidden_size": 32,
                       "fullatt_block_indexes": [0], "patch_size": 2, "spatial_merge_size": 1,
                       "temporal_patch_size": 1, "window_size": 4},
        image_token_id=special, video_token_id=special, vision_start_token_id=special,
        vision_end_token_id=special, bos_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, tie_word_embeddings=False,
    )
    return Qwen2_5_VLForConditionalGeneration(config)


def build_tiny_qwenimage(path: str | Path, seed: int = 0) -> Path:
    """Write a tiny random ``QwenImagePipeline`` folder to ``path`` and return it.

    Args:
        path: destination folder (created; existing files are overwritten).
        seed: torch seed of the random weights (same seed, same weights).
    """
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )

    path = Path(path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tok = qwen_tokenizer()
        encoder = tiny_qwen25vl(tok)
        transformer = QwenImageTransformer2DModel(
            patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 6, 6),
        )
        vae = AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 2], num_res_blocks=1, attn_scales=[],
                                     temperal_downsample=[False])
    pipe = QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(**QWENIMAGE_SCHEDULER), vae=vae,
                             text_encoder=encoder, tokenizer=tok, transformer=transformer)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


SDXL_SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                  "num_train_timesteps": 1000, "prediction_type": "epsilon", "steps_offset": 1,
                  "timestep_spacing": "leading", "interpolation_type": "linear", "use_karras_sigmas": False}
"""SDXL base's scheduler settings (its ``scheduler_config.json``)."""


def build_tiny_sdxl(path: str | Path, seed: int = 0, sample_size: int = 8) -> Path:
    """Write a tiny random ``StableDiffusionXLPipeline`` folder to ``path`` and return it.

    Args:
        path: destination folder (created; existing files are overwritten).
        seed: torch seed of the random weights (same seed, same weights).
        sample_size: the UNet's default latent side (the stock pipeline's default image is
            ``2 * sample_size`` pixels); any even latent side works.
    """
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    path = Path(path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tok1, tok2 = clip_tokenizer(), clip_tokenizer(pad_token="!")
        enc1 = _clip_text_model(len(tok1), tok1.bos_token_id, tok1.eos_token_id, tok1.pad_token_id,
                                projection=False)
        enc2 = _clip_text_model(len(tok2), tok2.bos_token_id, tok2.eos_token_id, tok2.pad_token_id)
        unet = UNet2DConditionModel(
            sample_size=sample_size, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), mid_block_type="UNetMidBlock2DCrossAttn",
            norm_num_groups=8, cross_attention_dim=32, attention_head_dim=(2, 4), transformer_layers_per_block=1,
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 16,
        )
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            norm_num_groups=8, sample_size=16, scaling_factor=0.13025, force_upcast=True,
        )
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=enc1, text_encoder_2=enc2, tokenizer=tok1, tokenizer_2=tok2, unet=unet,
        scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER), force_zeros_for_empty_prompt=True,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return path


TINY_BUILDERS: dict = {}
"""Tiny builders that live in modules building on this one's tokenizers (:mod:`dmdr.models.tiny_flux`), by family;
those modules add themselves (``dmdr.models`` imports them)."""


def build_tiny(family: str, path: str | Path, seed: int = 0) -> Path:
    """Write the tiny random pipeline folder of ``family`` (``sd3``, ``zimage``, ``sdxl``, ``qwenimage``, ``flux``,
    ``flux2``) to ``path``."""
    builders = {"sd3": build_tiny_sd3, "zimage": build_tiny_zimage, "sdxl": build_tiny_sdxl,
                "qwenimage": build_tiny_qwenimage, **TINY_BUILDERS}
    if family not in builders:
        raise ValueError(f"no tiny builder for family {family!r} (have: {', '.join(builders)})")
    return builders[family](path, seed=seed)


__all__ = [
    "build_tiny", "build_tiny_sd3", "build_tiny_sdxl", "build_tiny_zimage", "clip_tokenizer", "t5_tokenizer",
    "qwen_tokenizer", "build_tiny_qwenimage",
]
