"""DMDR on Stable Diffusion 3 Medium (2B) at 512px: the authors' defaults (ALGORITHM.md).

Launch: ``torchrun --nproc_per_node=8 recipes/sd3m_dmdr.py --model.path /models/sd3-medium ...``
"""

from dmdr.config import TrainConfig
from dmdr.recipes.base import SD3_MEDIUM, big_model_recipe


def sd3m_dmdr() -> TrainConfig:
    return big_model_recipe("sd3", SD3_MEDIUM, "runs/sd3m-dmdr")  # the paper's SD3-Medium row, nothing else

