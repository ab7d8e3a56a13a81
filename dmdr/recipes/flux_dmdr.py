"""DMDR on FLUX.1-dev (12B, guidance-distilled; CLIP-L + T5-XXL) at 1024px, generator LoRA + shared critic LoRA.

Launch (one node of 8 GPUs; ``--nnodes N`` with ``--parallel.dp_replicate N --parallel.dp_shard 8`` for more)::

    torchrun --nproc_per_node=8 recipes/flux_dmdr.py --model.path /models/FLUX.1-dev \\
        --data.sources '/data/prompts/*.jsonl' --rl.hps_checkpoint /models/HPS_v2.1_compressed.pt \\
        --rl.clip_model /models/DFN5B-CLIP-ViT-H-14-378 --train.output_dir runs/flux

FLUX.1-dev has no true CFG: the real score runs at the guidance embedding ``w``, the generator and the fake
score at ``dmd.generator_guidance`` (docs/guidance.md). ``tools/plan.py --recipe flux_dmdr``: fits 8x H100-80GB
with full activation checkpointing at these batches (README, FLUX section).
"""

from dmdr.config import TrainConfig
from dmdr.recipes.base import SD35_LARGE, big_model_recipe


def flux_dmdr() -> TrainConfig:
    # ALGORITHM.md pins no FLUX row: SD3.5-Large's (learning rates, batches, LoRA ranks, cold start, rewards), the
    # closest published DMDR setup in size and resolution. NVlabs/FastGen's FLUX DMD2 trains the full network at
    # 1e-5 with a GAN term, which DMDR does not have.
    cfg = big_model_recipe("flux", SD35_LARGE, "runs/flux-dmdr")
    cfg.model.max_sequence_length = 512  # FluxPipeline's T5 length (the export records it)
    # exp(mu), mu = 1.15: FLUX.1-dev's scheduler shifts 1024 px (4096 packed tokens) by its max_shift with
    # exponential time shifting, which is the SD3 shift s = exp(mu)
    cfg.dmd.shift = 3.16
    # the real score's embedding w ~ U[3, 4] (DMDR's +-0.5 jitter around FluxPipeline's default 3.5); the generator
    # and the fake score at 3.5, as NVlabs/FastGen's FLUX DMD2 runs everything (net.guidance_scale 3.5)
    cfg.dmd.guidance, cfg.dmd.generator_guidance = 3.5, 3.5
    return cfg
