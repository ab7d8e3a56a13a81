"""DMDR on Stable Diffusion 3 Medium (2B) at 512px: the authors' defaults (ALGORITHM.md).

Launch: ``torchrun --nproc_per_node=8 recipes/sd3m_dmdr.py --model.path /models/sd3-medium ...``
"""

from dmdr.config import TrainConfig


def sd3m_dmdr() -> TrainConfig:
    cfg = TrainConfig()
    cfg.model.family = "sd3"
    cfg.model.resolution = 512
    cfg.model.dtype = "bf16"
    cfg.model.generator_mode = "lora"
    cfg.dmd.num_steps, cfg.dmd.shift, cfg.dmd.guidance = 4, 3.0, 7.0
    cfg.dynamic.decay_steps = 2000
    cfg.rl.start_step = 2000
    cfg.rl.rewards, cfg.rl.weights = ("hps", "clip"), (0.3, 0.3)
    cfg.optim.generator_lr, cfg.optim.critic_lr = 1e-6, 5e-7
    cfg.optim.rl_generator_lr, cfg.optim.rl_critic_lr = 5e-7, 2e-7
    cfg.data.batch_size, cfg.data.rl_batch_size = 8, 4  # per GPU: cold start, RL stage
    cfg.parallel.activation_checkpointing = "full"
    cfg.train.max_steps = 4000
    cfg.train.output_dir = "runs/sd3m-dmdr"
    return cfg

