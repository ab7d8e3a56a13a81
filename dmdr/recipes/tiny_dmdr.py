"""DMDR end to end on a tiny random SD3 (or Z-Image, SDXL, Qwen-Image, FLUX.1, FLUX.2) pipeline, on CPU, in under
two minutes.

Everything the real recipes do happens here at toy size: the model folder is loaded through the
same ``from_pretrained(local_files_only=True)`` path, the critic LoRA serves as real and fake score
with DynaDG, renoise levels follow DynaRS, ReFL switches on at ``rl.start_step`` (with an analytic
brightness reward standing in for HPS/CLIP), metrics, samples and DCP checkpoints are written, and
a second run with the same output folder resumes.

On first use it writes its own assets into ``<output_dir>/assets``: a tiny pipeline folder of
``--model.family`` (``sd3``, the default, ``zimage``, ``sdxl``, ``qwenimage``, ``flux`` or ``flux2``) and a
prompt file. Pass ``--model.path`` / ``--data.sources`` to use your own. For ``sdxl`` the generator runs at
SDXL's fixed integer timesteps (``999, 749, 499, 249``; ``399`` with ``--dmd.num_steps 1``) unless
``--dmd.timesteps`` says otherwise.

    python recipes/tiny_dmdr.py --train.output_dir runs/tiny-demo
    python recipes/tiny_dmdr.py --model.family sdxl --train.output_dir runs/tiny-sdxl
"""

import os
import shutil
from pathlib import Path

from dmdr.config import TrainConfig
from dmdr.models.sdxl import FEW_STEP_TIMESTEPS
from dmdr.models.tiny import build_tiny
from dmdr.recipes.base import set_cold_start

DEMO_PROMPTS = [
    "a photo of a cat", "a red car in the rain", "an astronaut riding a horse", "a bowl of fruit",
    "a lighthouse at dusk", "a watercolor of a fox", "a city skyline at night", "a snowy mountain",
    "a cup of coffee on a table", "a robot reading a book", "a field of sunflowers", "a sailing boat",
]


def tiny_dmdr() -> TrainConfig:
    cfg = TrainConfig()
    cfg.model.family = "sd3"
    cfg.model.dtype = "fp32"
    cfg.model.resolution = 16  # latent 8x8 with the tiny VAE (2 pixels per latent cell)
    cfg.model.generator_mode = "lora"
    cfg.model.generator_lora_rank, cfg.model.generator_lora_alpha = 8, 16.0
    cfg.model.critic_lora_rank, cfg.model.critic_lora_alpha = 4, 4.0
    cfg.model.max_sequence_length = 16
    cfg.dmd.num_steps, cfg.dmd.shift, cfg.dmd.guidance, cfg.dmd.ratio = 4, 3.0, 4.0, 5
    set_cold_start(cfg, 30)
    cfg.rl.rewards, cfg.rl.weights, cfg.rl.margin = ("brightness",), (0.5,), 0.7
    cfg.optim.generator_lr, cfg.optim.critic_lr = 1e-4, 1e-4
    cfg.optim.rl_generator_lr, cfg.optim.rl_critic_lr = 5e-5, 5e-5
    cfg.data.batch_size, cfg.data.rl_batch_size = 4, 2  # per rank: cold start, RL stage (halved, as the paper)
    cfg.data.num_workers, cfg.data.shuffle_buffer = 0, 64
    cfg.parallel.param_dtype = "fp32"
    cfg.parallel.activation_checkpointing = "none"
    cfg.checkpoint.interval = 20
    cfg.log.interval, cfg.log.sample_interval = 5, 20
    cfg.log.sample_prompts = tuple(DEMO_PROMPTS[:4])
    cfg.train.max_steps = 60
    cfg.train.device = "cpu"
    cfg.train.output_dir = "runs/tiny-demo"
    return cfg


def prepare_assets(cfg: TrainConfig) -> None:
    """Create the tiny model folder and the prompt file on first use (kept for later resumes).

    Every rank of a torchrun job runs this before the process group exists, so each writes into a
    private temporary name and renames it into place: the first rename wins, the others discard.
    """
    assets = Path(cfg.train.output_dir) / "assets"
    assets.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}"
    family = "sd3" if cfg.model.family == "auto" else cfg.model.family
    if not cfg.model.path:
        model_dir = assets / f"tiny-{family}"
        if not (model_dir / "model_index.json").exists():
            tmp = assets / f".tiny-{family}.{tag}"
            build_tiny(family, tmp, seed=cfg.train.seed)
            try:
                os.rename(tmp, model_dir)
            except OSError:  # another rank got there first
                shutil.rmtree(tmp, ignore_errors=True)
        cfg.model.path = str(model_dir)
    if family == "sdxl" and not cfg.dmd.timesteps:
        cfg.dmd.timesteps = FEW_STEP_TIMESTEPS.get(cfg.dmd.num_steps, ())
        cfg.dmd.sampler = "sde"  # what the exported LCMScheduler pipeline runs (sdxl_dmdr.py)
    if family in ("zimage", "flux2"):  # the chat template alone takes ~30 of the byte-level tiny tokenizer's tokens
        cfg.model.max_sequence_length = max(cfg.model.max_sequence_length, 64)
    if family == "qwenimage":  # Qwen-Image's system-prompt template keeps ~130 byte-level tokens after its drop
        cfg.model.max_sequence_length = max(cfg.model.max_sequence_length, 192)
    if not cfg.data.sources:
        prompts = assets / "prompts.txt"
        if not prompts.exists():
            tmp = assets / f".prompts.{tag}"
            tmp.write_text("\n".join(DEMO_PROMPTS) + "\n")
            os.replace(tmp, prompts)
        cfg.data.sources = (str(prompts),)

