"""DMDR on Qwen-Image (20B dual-stream MMDiT, Qwen2.5-VL-7B text encoder, its own 3-D VAE) at 1024px.

Where the values come from (ALGORITHM.md pins no Qwen-Image row):

* the SD3.5-Large row (:data:`~dmdr.recipes.base.SD35_LARGE`, the largest model and the same 1024 px): learning
  rates, batch sizes (4 / 2 per GPU: ``tools/plan.py --recipe qwenimage_dmdr`` fits them on 8x H100-80GB with the
  text encoder cached, see the README's Qwen-Image section), ReFL weights, LoRA ranks, cold start and length;
* guidance ``w0 = 4``: NVlabs/FastGen's Qwen-Image DMD2 config (``guidance_scale = 4.0``, plain CFG on the
  teacher's clean estimate); the SD3.5-Large row has the same value. Qwen-Image's pipeline guides as
  ``neg + s (cond - neg)`` (so ``w`` is its ``true_cfg_scale``) and then rescales to the conditional norm; dmdr's
  real score does not rescale (ALGORITHM.md's CFG; :mod:`dmdr.models.qwenimage`), nor does FastGen;
* shift 2.0: Qwen-Image's own schedule at 1024 px (its scheduler's exponential time shift with
  ``mu = 0.5 + (0.9 - 0.5) (4096 - 256) / (8192 - 256) = 0.694`` for 4096 image tokens, ``exp(mu) = 2.0``);
* 512 text tokens: ``QwenImagePipeline``'s default ``max_sequence_length`` (FastGen's too);
* 4 generator steps: ALGORITHM.md's default and FastGen's ``student_sample_steps``.

Text encoder: Qwen2.5-VL-7B (15.4 GiB in bf16 with its unused vision tower) fits beside the 20B teacher only
sharded; cache the prompts first and it is never loaded::

    torchrun --nproc_per_node=8 tools/cache_text_embeddings.py --model.path /models/qwen-image \\
        --data.sources '/data/prompts/*.jsonl' --data.embedding_cache /data/cache/qwen-image
    torchrun --nproc_per_node=8 recipes/qwenimage_dmdr.py --model.path /models/qwen-image \\
        --data.sources '/data/prompts/*.jsonl' --data.embedding_cache /data/cache/qwen-image \\
        --rl.hps_checkpoint /models/HPS_v2.1_compressed.pt --rl.clip_model /models/DFN5B-CLIP-ViT-H-14-378

Without a cache (or with ``--data.cache_miss encode``) the recipe shards the encoder with FSDP2
(``parallel.frozen_encoders shard``).
"""

from dmdr.config import TrainConfig
from dmdr.recipes.base import SD35_LARGE, big_model_recipe


def qwenimage_dmdr() -> TrainConfig:
    # ALGORITHM.md pins no Qwen-Image row: SD3.5-Large's, the largest model at the same resolution
    cfg = big_model_recipe("qwenimage", SD35_LARGE, "runs/qwenimage-dmdr")
    cfg.model.max_sequence_length = 512  # QwenImagePipeline's default (and FastGen's Qwen-Image encoder)
    cfg.dmd.shift = 2.0  # Qwen-Image's scheduler at 1024 px: exp(mu), mu = 0.694 for 4096 image tokens
    cfg.dmd.guidance = 4.0  # FastGen's Qwen-Image DMD2 guidance_scale (= the SD3.5-Large row's w0)
    # Qwen2.5-VL-7B beside a 20B teacher: sharded over the ranks when it must be loaded at all (no cache)
    cfg.parallel.frozen_encoders = "shard"
    return cfg
