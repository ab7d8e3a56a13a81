"""DMDR on FLUX.2 [klein] base (4B / 9B, Qwen3 text encoder) at 1024px, generator LoRA + shared critic LoRA.

Launch (one node of 8 GPUs; ``--nnodes N`` with ``--parallel.dp_replicate N --parallel.dp_shard 8`` for more)::

    torchrun --nproc_per_node=8 recipes/flux2_dmdr.py --model.path /models/FLUX.2-klein-base-9B \\
        --data.sources '/data/prompts/*.jsonl' --rl.hps_checkpoint /models/HPS_v2.1_compressed.pt \\
        --rl.clip_model /models/DFN5B-CLIP-ViT-H-14-378 --train.output_dir runs/flux2

Distil the *base* model (``is_distilled: false`` in model_index.json): it is a true-CFG teacher with the
negative prompt ``""`` (docs/guidance.md). The DMDR paper has no FLUX.2 row. Where each default comes from:

* ``dmd.guidance`` 4.0: ``Flux2KleinPipeline``'s default ``guidance_scale`` for the base models (its CFG is
  ``neg + w (cond - neg)``, ALGORITHM.md's ``w`` as is); the +-0.5 jitter is DMDR's.
* ``dmd.shift`` 9.89 = ``exp(mu)``, ``mu = compute_empirical_mu(4096 tokens, 4 steps)`` = 2.291: the shift
  ``Flux2KleinPipeline`` itself applies to a 4-step call at 1024px (exponential time shifting is the SD3
  shift ``exp(mu)``).
* 4 steps, learning rates, batch, LoRA ranks, DynaDG/DynaRS, the 2000-step cold start and the rewards: the DMDR
  authors' SD3.5-Large setup (ALGORITHM.md; the closest published DMDR setup in size and resolution).
* ``max_sequence_length`` 512: the pipeline's default; its transformer attends to the padded positions too, so
  the value must match the pipeline call's (the export records it).
"""

from dmdr.config import TrainConfig


def flux2_dmdr() -> TrainConfig:
    cfg = TrainConfig()
    cfg.model.family = "flux2"
    cfg.model.resolution = 1024
    cfg.model.dtype = "bf16"
    cfg.model.generator_mode = "lora"
    cfg.model.generator_lora_rank, cfg.model.generator_lora_alpha = 64, 128.0
    cfg.model.critic_lora_rank, cfg.model.critic_lora_alpha = 32, 32.0
    cfg.model.max_sequence_length = 512
    cfg.dmd.num_steps, cfg.dmd.shift, cfg.dmd.guidance = 4, 9.89, 4.0
    cfg.dynamic.decay_steps = 2000
    cfg.rl.start_step = 2000
    cfg.rl.rewards, cfg.rl.weights = ("hps", "clip"), (0.1, 0.1)
    cfg.optim.generator_lr, cfg.optim.critic_lr = 1e-6, 2e-8
    cfg.optim.rl_generator_lr, cfg.optim.rl_critic_lr = 1e-7, 5e-9
    cfg.data.batch_size, cfg.data.rl_batch_size = 4, 2  # per GPU: cold start, RL stage
    cfg.parallel.activation_checkpointing = "full"
    cfg.train.max_steps = 4000
    cfg.train.output_dir = "runs/flux2-dmdr"
    return cfg
