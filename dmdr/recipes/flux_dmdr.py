"""DMDR on FLUX.1-dev (12B, guidance-distilled) at 1024px, generator LoRA + shared critic LoRA.

Launch (one node of 8 GPUs; ``--nnodes N`` with ``--parallel.dp_replicate N --parallel.dp_shard 8`` for more)::

    torchrun --nproc_per_node=8 recipes/flux_dmdr.py --model.path /models/FLUX.1-dev \\
        --data.sources '/data/prompts/*.jsonl' --rl.hps_checkpoint /models/HPS_v2.1_compressed.pt \\
        --rl.clip_model /models/DFN5B-CLIP-ViT-H-14-378 --train.output_dir runs/flux

The DMDR paper has no FLUX row. Where each default comes from:

* guidance: FLUX.1-dev has no true CFG (docs/guidance.md). The real score runs at embedding
  ``w ~ U[3.0, 4.0]`` (``dmd.guidance`` 3.5: ``FluxPipeline``'s default, and NVlabs/FastGen's FLUX DMD2
  ``net.guidance_scale``; the +-0.5 jitter is DMDR's), the generator and fake score at 3.5 (FastGen).
* ``dmd.shift`` 3.16 = ``exp(1.15)``: FLUX.1-dev's scheduler shifts 1024px (4096 packed tokens) by ``mu =
  max_shift = 1.15`` with exponential time shifting, which is the SD3 shift ``s = exp(mu)``.
* 4 steps: the DMDR default (FastGen's FLUX DMD2 ``student_sample_steps`` 4 too).
* learning rates, batch, LoRA ranks, DynaDG/DynaRS, the 2000-step cold start and the rewards: the DMDR
  authors' SD3.5-Large setup (ALGORITHM.md; the closest model in size and resolution). FastGen trains the
  full FLUX network at 1e-5 with a GAN term, which DMDR does not have.
* ``max_sequence_length`` 512: ``FluxPipeline``'s default (the export records it).
* activation checkpointing ``full``: ``tools/plan.py --recipe flux_dmdr`` (the 12B teacher's activations at
  1024px do not fit 80 GB otherwise at batch 4).
"""

from dmdr.config import TrainConfig


def flux_dmdr() -> TrainConfig:
    cfg = TrainConfig()
    cfg.model.family = "flux"
    cfg.model.resolution = 1024
    cfg.model.dtype = "bf16"
    cfg.model.generator_mode = "lora"
    cfg.model.generator_lora_rank, cfg.model.generator_lora_alpha = 64, 128.0
    cfg.model.critic_lora_rank, cfg.model.critic_lora_alpha = 32, 32.0
    cfg.model.max_sequence_length = 512
    cfg.dmd.num_steps, cfg.dmd.shift = 4, 3.16
    cfg.dmd.guidance, cfg.dmd.guidance_jitter, cfg.dmd.generator_guidance = 3.5, 0.5, 3.5
    cfg.dynamic.decay_steps = 2000
    cfg.rl.start_step = 2000
    cfg.rl.rewards, cfg.rl.weights = ("hps", "clip"), (0.1, 0.1)
    cfg.optim.generator_lr, cfg.optim.critic_lr = 1e-6, 2e-8
    cfg.optim.rl_generator_lr, cfg.optim.rl_critic_lr = 1e-7, 5e-9
    cfg.data.batch_size, cfg.data.rl_batch_size = 4, 2  # per GPU: cold start, RL stage
    cfg.parallel.activation_checkpointing = "full"
    cfg.train.max_steps = 4000
    cfg.train.output_dir = "runs/flux-dmdr"
    return cfg
