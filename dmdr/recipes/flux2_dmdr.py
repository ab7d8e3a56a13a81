"""DMDR on FLUX.2 [klein] base (4B / 9B, Qwen3 text encoder) at 1024px, generator LoRA + shared critic LoRA.

Launch (one node of 8 GPUs; ``--nnodes N`` with ``--parallel.dp_replicate N --parallel.dp_shard 8`` for more)::

    torchrun --nproc_per_node=8 recipes/flux2_dmdr.py --model.path /models/FLUX.2-klein-base-9B \\
        --data.sources '/data/prompts/*.jsonl' --rl.hps_checkpoint /models/HPS_v2.1_compressed.pt \\
        --rl.clip_model /models/DFN5B-CLIP-ViT-H-14-378 --train.output_dir runs/flux2

Distil the *base* model (``is_distilled: false`` in model_index.json): a true-CFG teacher with the negative
prompt ``""``, ALGORITHM.md's rule as is (docs/guidance.md). ``tools/plan.py --recipe flux2_dmdr``: the 9B base fits
8x H100-80GB at batch 4 / 2 with full activation checkpointing (``--model flux.2-klein-base-4b``: the 4B; README).
"""

from dmdr.config import TrainConfig
from dmdr.recipes.base import SD35_LARGE, big_model_recipe


def flux2_dmdr() -> TrainConfig:
    # ALGORITHM.md pins no FLUX.2 row: SD3.5-Large's (learning rates, batches, LoRA ranks, cold start, rewards), the
    # closest published DMDR setup in size and resolution
    cfg = big_model_recipe("flux2", SD35_LARGE, "runs/flux2-dmdr")
    # the pipeline's Qwen3 length; its transformer attends to the padded positions, so exports record it
    cfg.model.max_sequence_length = 512
    # exp(mu), mu = compute_empirical_mu(4096 tokens, 4 steps) = 2.291: the shift Flux2KleinPipeline itself gives a
    # 4-step call at 1024 px (exponential time shifting is the SD3 shift s = exp(mu))
    cfg.dmd.shift = 9.89
    # Flux2KleinPipeline's default guidance_scale for the base models; its CFG is neg + w (cond - neg), our w as is
    cfg.dmd.guidance = 4.0
    return cfg
