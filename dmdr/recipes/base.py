"""What the multi-GPU recipes share: ALGORITHM.md's per-model rows and one base config built from a row.

A big-model recipe is ``big_model_recipe(family, row, output_dir)`` followed by only the lines where that model
differs, each with a comment naming where its value comes from (the paper, the authors' code, DMD2, the
model's own pipeline). A field that neither the base nor the recipe sets keeps :class:`~dmdr.config.TrainConfig`'s
default. ``tests/recipes/test_recipe_configs.py`` pins every recipe's full config, so a change here that moves a
recipe's value fails there.

Adding a model (Flux, Qwen-Image, ...): pick the row of the closest model in size and resolution (or write the
model's own :class:`ModelRow` when its paper pins one), then override what the model's pipeline needs::

    def flux_dmdr() -> TrainConfig:
        # ALGORITHM.md pins no Flux row: SD3.5-Large's, the closest in size and resolution
        cfg = big_model_recipe("flux", SD35_LARGE, "runs/flux-dmdr")
        cfg.model.max_sequence_length = 512  # the pipeline's T5 length
        return cfg
"""

from __future__ import annotations

from dataclasses import dataclass

from dmdr.config import TrainConfig

COLD_START_STEPS = 2000
"""ALGORITHM.md: "Cold start 2000 generator steps (DynaDG and DynaRS fully decayed exactly when RL starts)"."""
MAX_STEPS = 4000
"""ALGORITHM.md: "then RL to ~3000-4000"."""
REWARDS = ("hps", "clip")
"""ALGORITHM.md's RL branch: ReFL on HPSv2.1 and DFN-CLIP (their weights are per model: :class:`ModelRow`)."""


@dataclass(frozen=True)
class ModelRow:
    """One row of ALGORITHM.md's table "Two-stage schedule and hyperparameters", plus the per-model ReFL weights
    of its RL branch. Learning rates and batch sizes are (generator, critic) and per GPU."""

    resolution: int
    lr: tuple[float, float]
    """Cold start: generator, critic."""
    batch_size: int
    """Cold start, per GPU."""
    rl_lr: tuple[float, float]
    """RL stage: generator, critic."""
    rl_batch_size: int
    """RL stage, per GPU (half the cold start's, as the paper)."""
    guidance: float
    """w0, the centre of the jittered real-score guidance."""
    shift: float
    """The few-step schedule's shift s."""
    reward_weights: tuple[float, float]
    """HPSv2.1, DFN-CLIP."""


SD3_MEDIUM = ModelRow(resolution=512, lr=(1e-6, 5e-7), batch_size=8, rl_lr=(5e-7, 2e-7), rl_batch_size=4,
                      guidance=7.0, shift=3.0, reward_weights=(0.3, 0.3))
"""ALGORITHM.md's SD3-Medium row (2B, 512 px)."""
SD35_LARGE = ModelRow(resolution=1024, lr=(1e-6, 2e-8), batch_size=4, rl_lr=(1e-7, 5e-9), rl_batch_size=2,
                      guidance=4.0, shift=5.0, reward_weights=(0.1, 0.1))
"""ALGORITHM.md's SD3.5-Large row (8B, 1024 px)."""


def set_cold_start(cfg: TrainConfig, steps: int) -> None:
    """Start RL after ``steps`` generator steps, with DynaDG and DynaRS fully decayed exactly then (ALGORITHM.md)."""
    cfg.dynamic.decay_steps = steps
    cfg.rl.start_step = steps


def big_model_recipe(family: str, row: ModelRow, output_dir: str) -> TrainConfig:
    """The config every multi-GPU recipe starts from: ``family`` trained with ``row``'s settings into ``output_dir``."""
    cfg = TrainConfig()
    cfg.model.family = family
    cfg.model.resolution = row.resolution
    cfg.model.dtype = "bf16"  # H100 tensor cores' full-rate dtype, half fp32's memory
    # ALGORITHM.md "Three networks": generator LoRA r=64, alpha=128 (SD3.5-L); critic LoRA r=32, alpha=r
    cfg.model.generator_mode = "lora"
    cfg.model.generator_lora_rank, cfg.model.generator_lora_alpha = 64, 128.0
    cfg.model.critic_lora_rank, cfg.model.critic_lora_alpha = 32, 32.0
    cfg.dmd.num_steps = 4  # ALGORITHM.md "Backward simulation": N = 4 by default
    cfg.dmd.shift, cfg.dmd.guidance = row.shift, row.guidance
    set_cold_start(cfg, COLD_START_STEPS)
    cfg.rl.rewards, cfg.rl.weights = REWARDS, row.reward_weights
    cfg.optim.generator_lr, cfg.optim.critic_lr = row.lr
    cfg.optim.rl_generator_lr, cfg.optim.rl_critic_lr = row.rl_lr
    cfg.data.batch_size, cfg.data.rl_batch_size = row.batch_size, row.rl_batch_size
    cfg.parallel.activation_checkpointing = "full"  # 2B-8B models at 512-1024 px: activations dominate memory
    cfg.train.max_steps = MAX_STEPS
    cfg.train.output_dir = output_dir
    return cfg
