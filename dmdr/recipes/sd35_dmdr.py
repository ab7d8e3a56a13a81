"""DMDR on Stable Diffusion 3.5 Large (8B) at 1024px: the authors' defaults (ALGORITHM.md).

Launch (one node of 8 GPUs)::

    torchrun --nproc_per_node=8 recipes/sd35_dmdr.py --model.path /models/sd3.5-large \\
        --data.sources '/data/prompts/*.jsonl' --rl.hps_checkpoint /models/HPS_v2.1_compressed.pt \\
        --rl.clip_model /models/DFN5B-CLIP-ViT-H-14-378 --train.output_dir runs/sd35

Any field can be overridden with ``--section.field value`` (see dmdr/config.py).
"""

from dmdr.config import TrainConfig
from dmdr.recipes.base import SD35_LARGE, big_model_recipe


def sd35_dmdr() -> TrainConfig:
    return big_model_recipe("sd3", SD35_LARGE, "runs/sd35-dmdr")  # the paper's SD3.5-Large row, nothing else

