"""Tiny pipeline folders: complete diffusers folders the stock pipelines load and run offline."""

import json

import numpy as np
import torch
from safetensors.torch import load_file


def test_stock_sd3_pipeline_runs(family_paths):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(family_paths["sd3"], local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a red cube", num_inference_steps=2, guidance_scale=3.0, output_type="np",
               max_sequence_length=16, generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 16, 16, 3) and np.isfinite(out).all() and 0 <= out.min() <= out.max() <= 1


def test_stock_zimage_pipeline_runs(family_paths):
    from diffusers import ZImagePipeline

    pipe = ZImagePipeline.from_pretrained(family_paths["zimage"], local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a red cube", height=16, width=16, num_inference_steps=2, guidance_scale=3.0, output_type="np",
               max_sequence_length=64, generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 16, 16, 3) and np.isfinite(out).all()


def test_folders_are_complete_and_seeded(family_paths, tmp_path):
    from dmdr.models.tiny import build_tiny_sd3

    index = json.loads((family_paths["sd3"] / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer",
                 "tokenizer_2", "tokenizer_3", "scheduler"):
        assert (family_paths["sd3"] / name).is_dir(), name
    index = json.loads((family_paths["zimage"] / "model_index.json").read_text())
    assert index["_class_name"] == "ZImagePipeline"
    assert index["text_encoder"] == ["transformers", "Qwen3Model"]
    # Same seed, same weights; another seed, other weights.
    again = build_tiny_sd3(tmp_path / "again")
    other = build_tiny_sd3(tmp_path / "other", seed=1)
    name = "transformer/diffusion_pytorch_model.safetensors"
    a, b, c = (load_file(p / name) for p in (family_paths["sd3"], again, other))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_tokenizers_round_trip(family_paths):
    from transformers import AutoTokenizer

    text = "A cat, 3 dogs & Ünïcode!"
    for sub in ("tokenizer", "tokenizer_2"):
        tok = AutoTokenizer.from_pretrained(family_paths["sd3"] / sub, local_files_only=True)
        ids = tok(text).input_ids
        assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
        assert tok.unk_token_id not in ids[1:-1]
        decoded = tok.decode(ids[1:-1])  # CLIP decodes word ends as spaces
        assert decoded.replace(" ", "") == text.lower().replace(" ", "")
    t5 = AutoTokenizer.from_pretrained(family_paths["sd3"] / "tokenizer_3", local_files_only=True)
    ids = t5("a red cube").input_ids
    assert ids[-1] == t5.eos_token_id and t5.unk_token_id not in ids
    qwen = AutoTokenizer.from_pretrained(family_paths["zimage"] / "tokenizer", local_files_only=True)
    chat = qwen.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                    add_generation_prompt=True, enable_thinking=True)
    assert chat == f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"
    ids = qwen(chat).input_ids
    assert ids[0] == qwen.convert_tokens_to_ids("<|im_start|>") and qwen.decode(ids) == chat
