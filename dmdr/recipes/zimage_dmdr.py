"""DMDR on Z-Image (6B, single-stream DiT, Qwen3 text encoder) at 1024px.

ALGORITHM.md pins no Z-Image row; this recipe uses the SD3.5-Large row (the closest model in size
and resolution) with Z-Image's own scheduler shift. Tune ``--dmd.guidance`` to the teacher's CFG
(our ``w`` is the pipeline's ``guidance_scale + 1``).
Launch: ``torchrun --nproc_per_node=8 recipes/zimage_dmdr.py --model.path /models/z-image ...``
"""

from dmdr.config import TrainConfig


def zimage_dmdr() -> TrainConfig:
    cfg = TrainConfig()
    cfg.model.family = "zimage"
    cfg.model.resolution = 1024
    cfg.model.dtype = "bf16"
    cfg.model.generator_mode = "lora"
    cfg.model.max_sequence_length = 512
    # Z-Image's pipeline guides as pos + g (pos - neg): our w = 1 + g; w0 = 5 is the pipeline's g = 4.
    cfg.dmd.num_steps, cfg.dmd.shift, cfg.dmd.guidance = 4, 3.0, 5.0
    cfg.dynamic.decay_steps = 2000
    cfg.rl.start_step = 2000
    cfg.rl.rewards, cfg.rl.weights = ("hps", "clip"), (0.1, 0.1)
    cfg.optim.generator_lr, cfg.optim.critic_lr = 1e-6, 2e-8
    cfg.optim.rl_generator_lr, cfg.optim.rl_critic_lr = 1e-7, 5e-9
    cfg.data.batch_size, cfg.data.rl_batch_size = 4, 2  # per GPU: cold start, RL stage
    cfg.parallel.activation_checkpointing = "full"
    cfg.train.max_steps = 4000
    cfg.train.output_dir = "runs/zimage-dmdr"
    return cfg

