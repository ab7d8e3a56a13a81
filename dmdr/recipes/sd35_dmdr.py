"""DMDR on Stable Diffusion 3.5 Large (8B) at 1024px: the authors' defaults (ALGORITHM.md).

Launch (one node of 8 GPUs)::

    torchrun --nproc_per_node=8 recipes/sd35_dmdr.py --model.path /models/sd3.5-large \\
        --data.sources '/data/prompts/*.jsonl' --rl.hps_checkpoint /models/HPS_v2.1_compressed.pt \\
        --rl.clip_model /models/DFN5B-CLIP-ViT-H-14-378 --train.output_dir runs/sd35

Any field can be overridden with ``--section.field value`` (see dmdr/config.py).
"""

from dmdr.config import TrainConfig


def sd35_dmdr() -> TrainConfig:
    cfg = TrainConfig()
    cfg.model.family = "sd3"
    cfg.model.resolution = 1024
    cfg.model.dtype = "bf16"
    cfg.model.generator_mode = "lora"
    cfg.model.generator_lora_rank, cfg.model.generator_lora_alpha = 64, 128.0
    cfg.model.critic_lora_rank, cfg.model.critic_lora_alpha = 32, 32.0
    cfg.dmd.num_steps, cfg.dmd.shift, cfg.dmd.guidance = 4, 5.0, 4.0
    cfg.dynamic.decay_steps = 2000
    cfg.rl.start_step = 2000
    cfg.rl.rewards, cfg.rl.weights = ("hps", "clip"), (0.1, 0.1)
    cfg.optim.generator_lr, cfg.optim.critic_lr = 1e-6, 2e-8
    cfg.optim.rl_generator_lr, cfg.optim.rl_critic_lr = 1e-7, 5e-9
    cfg.data.batch_size, cfg.data.rl_batch_size = 4, 2  # per GPU: cold start, RL stage
    cfg.parallel.activation_checkpointing = "full"
    cfg.train.max_steps = 4000
    cfg.train.output_dir = "runs/sd35-dmdr"
    return cfg

