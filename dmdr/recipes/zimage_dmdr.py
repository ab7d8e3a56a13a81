"""DMDR on Z-Image (6B, single-stream DiT, Qwen3 text encoder) at 1024px.

ALGORITHM.md pins no Z-Image row; this recipe uses the SD3.5-Large row (the closest model in size
and resolution) with Z-Image's own scheduler shift. Tune ``--dmd.guidance`` to the teacher's CFG
(our ``w`` is the pipeline's ``guidance_scale + 1``).
Launch: ``torchrun --nproc_per_node=8 recipes/zimage_dmdr.py --model.path /models/z-image ...``
"""

from dmdr.config import TrainConfig
from dmdr.recipes.base import SD35_LARGE, big_model_recipe


def zimage_dmdr() -> TrainConfig:
    # ALGORITHM.md pins no Z-Image row: SD3.5-Large's, the closest model in size and resolution
    cfg = big_model_recipe("zimage", SD35_LARGE, "runs/zimage-dmdr")
    cfg.model.max_sequence_length = 512  # Z-Image's pipeline encodes prompts to 512 Qwen3 tokens
    cfg.dmd.shift = 3.0  # Z-Image's own scheduler shift
    # Z-Image's pipeline guides as pos + g (pos - neg): our w = 1 + g; w0 = 5 is the pipeline's g = 4.
    cfg.dmd.guidance = 5.0
    return cfg

