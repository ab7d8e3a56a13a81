"""The shapes world's teacher as a real ``StableDiffusion3Pipeline`` folder.

Components (all stock diffusers / transformers classes, so ``DiffusionPipeline.from_pretrained`` and
:func:`dmdr.models.load_backbone` load the folder exactly like SD3-Medium):

* word-level tokenizers (``PreTrainedTokenizerFast`` over the world's closed vocabulary, lower-cased):
  two CLIP-style ones (``<bos> words <eos>``, padded to :data:`TOKENS`) for two small
  ``CLIPTextModelWithProjection`` encoders, and a T5-style one (``words </s>``, padded to
  :data:`MAX_SEQUENCE_LENGTH`, the pipeline's ``max_sequence_length``) for a small ``T5EncoderModel``;
  all three encoders are trained jointly with the transformer;
* an ``AutoencoderKL`` with 2 pixels per latent cell and 4 latent channels (32x32 RGB <-> 4x16x16,
  widths 32, no attention), trained first;
* an ``SD3Transformer2DModel`` of 4 joint blocks, width 128 (4 heads x 32), patch 2 (64 image tokens).

``world.json`` at the folder's top level names the world and its version: :func:`check_teacher_folder`
refuses a folder of another world (or a plain SD3 model) with one line.
"""

from __future__ import annotations

import json
from pathlib import Path

from dmdr.errors import ModelLoadError
from dmdr.worlds.shapes.scene import IMAGE_SIZE, VOCAB

WORLD_NAME = "dmdr-shapes"
WORLD_VERSION = 1
TOKENS = 12
"""CLIP positions: ``<bos>`` + up to 8 words + ``<eos>``, padded."""
MAX_SEQUENCE_LENGTH = 10
"""T5 tokens (the SD3 pipeline's ``max_sequence_length``): up to 8 words + ``</s>``, padded."""


def _word_level(template: str, specials: list[str], pad: str, eos: str, bos: str | None, max_length: int):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    # Specials last: CLIPTextModel takes the pooled token at argmax(ids) when eos has id 2 (a legacy
    # rule), so eos must not be 2; with eos the largest id either rule finds the same token.
    vocab = {pad: 0, "<unk>": 1}
    for w in (*VOCAB, *specials):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single=template,
                                                       special_tokens=[(s, vocab[s]) for s in specials])
    extra = {"bos_token": bos} if bos else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token=pad, unk_token="<unk>",
                                   model_max_length=max_length, **extra)


def tokenizer():
    """The world's CLIP-style word-level tokenizer: ``<bos> words <eos>``."""
    return _word_level("<bos> $A <eos>", ["<bos>", "<eos>"], "<pad>", "<eos>", "<bos>", TOKENS)


def t5_tokenizer():
    """The world's T5-style word-level tokenizer: ``words </s>``, ``<pad>`` = 0."""
    return _word_level("$A </s>", ["</s>"], "<pad>", "</s>", None, MAX_SEQUENCE_LENGTH)


def text_encoder(vocab_size: int, bos: int, eos: int, pad: int):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=TOKENS, projection_dim=32,
                         hidden_act="gelu", bos_token_id=bos, eos_token_id=eos, pad_token_id=pad)
    return CLIPTextModelWithProjection(cfg)


def t5_encoder(vocab_size: int, eos: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=vocab_size, d_model=128, d_kv=32, d_ff=256, num_layers=2, num_heads=4,
                                   relative_attention_num_buckets=8, dropout_rate=0.0, pad_token_id=0,
                                   eos_token_id=eos))


def autoencoder(scaling_factor: float = 1.0, shift_factor: float = 0.0):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8, sample_size=IMAGE_SIZE, use_quant_conv=False, use_post_quant_conv=False,
        mid_block_add_attention=False,  # flat shapes need no attention; it was 4x the cost of the rest
        scaling_factor=scaling_factor, shift_factor=shift_factor,
    )


def transformer():
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=IMAGE_SIZE // 2, patch_size=2, in_channels=4, out_channels=4, num_layers=4,
        attention_head_dim=32, num_attention_heads=4, joint_attention_dim=128, caption_projection_dim=128,
        pooled_projection_dim=64, pos_embed_max_size=IMAGE_SIZE // 2, qk_norm="rms_norm",
    )


def build_components(seed: int = 0) -> dict:
    """Freshly initialised components of the pipeline (what pretraining starts from)."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tok1, tok2, tok3 = tokenizer(), tokenizer(), t5_tokenizer()
        ids = dict(vocab_size=len(tok1), bos=tok1.bos_token_id, eos=tok1.eos_token_id, pad=tok1.pad_token_id)
        return {"tokenizer": tok1, "tokenizer_2": tok2, "tokenizer_3": tok3, "text_encoder": text_encoder(**ids),
                "text_encoder_2": text_encoder(**ids), "text_encoder_3": t5_encoder(len(tok3), tok3.eos_token_id),
                "vae": autoencoder(), "transformer": transformer()}


def save_pipeline(components: dict, path: str | Path, provenance: dict | None = None) -> Path:
    """Write the components as a ``StableDiffusion3Pipeline`` folder, plus ``world.json``."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    path = Path(path)
    pipe = StableDiffusion3Pipeline(
        transformer=components["transformer"], scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0),
        vae=components["vae"], text_encoder=components["text_encoder"], tokenizer=components["tokenizer"],
        text_encoder_2=components["text_encoder_2"], tokenizer_2=components["tokenizer_2"],
        text_encoder_3=components["text_encoder_3"], tokenizer_3=components["tokenizer_3"],
    )
    pipe.save_pretrained(path, safe_serialization=True)
    info = {"world": WORLD_NAME, "version": WORLD_VERSION, "image_size": IMAGE_SIZE,
            "max_sequence_length": MAX_SEQUENCE_LENGTH, **(provenance or {})}
    (path / "world.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return path


def check_teacher_folder(path: str | Path) -> dict:
    """``world.json`` of a shapes-world teacher folder; one :class:`ModelLoadError` line if it is not one."""
    path = Path(path)
    if not (path / "model_index.json").is_file():
        raise ModelLoadError(f"{path}: not a diffusers pipeline folder (no model_index.json); run "
                             "tools/pretrain_teacher.py or use the committed assets/shapes-teacher")
    file = path / "world.json"
    try:
        info = json.loads(file.read_text())
    except (OSError, ValueError):
        raise ModelLoadError(f"{path}: no readable world.json, so not a shapes-world teacher (a model of another "
                             "world cannot be evaluated by ShapeEval)") from None
    if info.get("world") != WORLD_NAME or info.get("version") != WORLD_VERSION:
        raise ModelLoadError(f"{path}: world.json names world {info.get('world')!r} version {info.get('version')!r}, "
                             f"expected {WORLD_NAME!r} version {WORLD_VERSION}")
    return info


__all__ = ["WORLD_NAME", "WORLD_VERSION", "TOKENS", "MAX_SEQUENCE_LENGTH", "tokenizer", "text_encoder",
           "t5_tokenizer", "t5_encoder", "autoencoder", "transformer", "build_components", "save_pipeline",
           "check_teacher_folder"]
