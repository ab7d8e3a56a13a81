"""DMDR on the shapes world: the committed 2.4M-parameter SD3 teacher distilled into a few-step student.

The teacher (``assets/shapes-teacher``, made by ``tools/pretrain_teacher.py``) is a complete
``StableDiffusion3Pipeline`` folder, loaded through the same code path as SD3-Medium; the reward is the
world's colour reward (``--rl.rewards shapes``). ``tools/demo.py`` (``make demo``) runs this recipe under
torchrun for the cold start, then DMDR, DMD alone and ReFL alone from the same checkpoint, and
evaluates them with ShapeEval.

    torchrun --standalone --nproc_per_node=2 recipes/shapes_dmdr.py --train.output_dir runs/shapes

On first use it writes the training-split prompts to ``<output_dir>/assets/prompts.txt``.
"""

import os
from pathlib import Path

from dmdr.config import TrainConfig
from dmdr.recipes.base import set_cold_start
from dmdr.worlds.shapes.evaluation import heldout_prompts
from dmdr.worlds.shapes.pipeline import MAX_SEQUENCE_LENGTH, check_teacher_folder
from dmdr.worlds.shapes.scene import IMAGE_SIZE, split_prompts

REPO = Path(__file__).resolve().parents[2]  # the assets are in the checkout, not installed
TEACHER = REPO / "assets" / "shapes-teacher"
COLD_START = 60
"""Generator steps of the cold start (DynaDG and DynaRS decay to zero exactly here, then RL starts)."""
RL_STEPS = 60


def shapes_dmdr() -> TrainConfig:
    cfg = TrainConfig()
    cfg.model.path = str(TEACHER)
    cfg.model.family = "sd3"
    cfg.model.dtype = "fp32"
    cfg.model.resolution = IMAGE_SIZE
    cfg.model.max_sequence_length = MAX_SEQUENCE_LENGTH
    cfg.model.generator_mode = "full"
    cfg.model.critic_lora_rank, cfg.model.critic_lora_alpha = 16, 16.0
    # N = 4: at N = 2 DMD alone levels off near 0.26-0.29 ShapeEval; at N = 4 it reaches 0.32 in 120 steps against
    # the 25-step teacher's 0.36 (the teacher's own 4-step sampler: 0.16; README, issue 23)
    cfg.dmd.num_steps, cfg.dmd.shift, cfg.dmd.ratio = 4, 1.0, 5
    cfg.dmd.guidance, cfg.dmd.guidance_jitter = 3.0, 0.5
    set_cold_start(cfg, COLD_START)
    # DynaRS decays to Beta(4, 1.5), not to uniform levels: below t ~ 0.3 the critic LoRA fits the student's
    # samples at ~2x a matched model's loss and the DMD gradient there is mostly its error; with uniform levels
    # (half the samples) DMD alone drifts away from the teacher after the cold start (README, issue 23).
    cfg.dynamic.end_alpha, cfg.dynamic.end_beta = 4.0, 1.5
    # ReFL weight 0.2: at 1.0 the colour reward swamps the DMD term at N = 4 (DMDR 0.309 < DMD alone 0.319: colour
    # 0.97 but count 0.05); at 0.2 DMDR keeps the student's structure and adds colour (0.330; issue 23)
    cfg.rl.rewards, cfg.rl.weights, cfg.rl.margin = ("shapes",), (0.2,), 1.0
    cfg.optim.generator_lr, cfg.optim.critic_lr = 5e-5, 2e-4
    cfg.optim.rl_generator_lr, cfg.optim.rl_critic_lr = 5e-5, 2e-4
    cfg.data.batch_size, cfg.data.rl_batch_size = 16, 8  # per rank; the RL stage halves it, as the paper
    cfg.data.num_workers, cfg.data.shuffle_buffer = 0, 1024
    cfg.parallel.param_dtype = "fp32"
    cfg.parallel.activation_checkpointing = "none"
    cfg.checkpoint.interval = COLD_START
    cfg.checkpoint.keep_last = 2
    cfg.log.interval, cfg.log.sample_interval = 10, COLD_START
    cfg.log.sample_prompts = tuple(heldout_prompts(8))
    cfg.guard.action, cfg.guard.interval = "warn", 10  # guard-rails on (dmdr.guard): probe, rules, warn
    cfg.train.max_steps = COLD_START + RL_STEPS
    cfg.train.device = "cpu"
    cfg.train.output_dir = "runs/shapes"
    return cfg


def prepare_assets(cfg: TrainConfig) -> None:
    """Check the teacher folder (one line if it is not a shapes-world teacher); write the prompt file once."""
    check_teacher_folder(cfg.model.path)
    if not cfg.data.sources:
        prompts = Path(cfg.train.output_dir) / "assets" / "prompts.txt"
        if not prompts.exists():
            prompts.parent.mkdir(parents=True, exist_ok=True)
            tmp = prompts.with_name(f".prompts.{os.getpid()}")  # every rank runs this: rename into place
            tmp.write_text("\n".join(split_prompts("train")) + "\n")
            os.replace(tmp, prompts)
        cfg.data.sources = (str(prompts),)

