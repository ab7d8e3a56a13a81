"""DMDR on Stable Diffusion XL base 1.0 (2.6B UNet, epsilon prediction) at 1024px.

Where the values come from: the authors released no SDXL training script (their repository holds the SD3
scripts and ``demo/sdxl_Base.py``, the 1-step inference demo: ``LCMScheduler``, ``timesteps=[399]``,
``guidance_scale=0``); the paper's SDXL row follows DMD2 (whose main model is SDXL). So this recipe takes:

* from the issue / the authors: full fine-tune of the generator, DynaDG and DynaRS off (``--dynamic.dynars
  true`` / ``--dynamic.dynadg true`` switch them on; their decay then ends at the RL start), a cold start
  of 3000 generator steps then ReFL (HPSv2.1 + DFN-CLIP, ALGORITHM.md's SD3-Medium weights), guidance
  w0 = 7 (ALGORITHM.md; SDXL's pipeline guides as ``uncond + w (cond - uncond)``, so w is its
  ``guidance_scale``), 1024 px;
* from DMD2's SDXL setup: the fixed integer timesteps ``999, 749, 499, 249`` of the 4-step generator
  (``399``, on pure noise, for the 1-step one: ``--dmd.num_steps 1 --dmd.timesteps 399``), x0-then-renoise
  with fresh noise between steps (``dmd.backward_simulation`` and ``dmd.sampler`` ``sde``; the exported
  ``LCMScheduler`` pipeline runs that sampler), critic levels in ``[0.02, 1)`` (DMD2's ``min_step_percent``), learning
  rates 5e-7 for both networks, 5 critic steps per generator step. The RL stage keeps the cold-start
  learning rates (nothing pins lower ones for SDXL).

fp16: the SDXL VAE overflows in fp16; with ``--model.dtype fp16`` it is kept in fp32 (its config's
``force_upcast``), or put the fp16-fix VAE (``madebyollin/sdxl-vae-fp16-fix``) in the folder's ``vae/``.

Launch: ``torchrun --nproc_per_node=8 recipes/sdxl_dmdr.py --model.path /models/sdxl-base-1.0 ...``
"""

from dmdr.config import TrainConfig
from dmdr.models.sdxl import FEW_STEP_TIMESTEPS
from dmdr.recipes.base import SD3_MEDIUM, ModelRow, big_model_recipe, set_cold_start

SDXL = ModelRow(
    resolution=1024,  # SDXL's native resolution (the issue)
    lr=(5e-7, 5e-7), rl_lr=(5e-7, 5e-7),  # DMD2's SDXL rate for both networks, kept for RL (nothing pins lower)
    batch_size=4, rl_batch_size=2,  # halved for RL, as the paper
    guidance=7.0,  # ALGORITHM.md: w0 = 7 for SDXL (SDXL's pipeline guides as uncond + w (cond - uncond))
    shift=3.0,  # TrainConfig's default; unused: dmd.timesteps fixes the generator's levels
    reward_weights=SD3_MEDIUM.reward_weights,  # ALGORITHM.md's SD3-Medium ReFL weights
)


def sdxl_dmdr() -> TrainConfig:
    cfg = big_model_recipe("sdxl", SDXL, "runs/sdxl-dmdr")
    cfg.model.generator_mode = "full"  # the issue / the authors: a full fine-tune of the generator
    cfg.model.max_sequence_length = 77  # CLIP's fixed length; SDXL has no T5
    cfg.dmd.timesteps = FEW_STEP_TIMESTEPS[4]  # DMD2's fixed integer timesteps of the 4-step generator
    cfg.dmd.t_min = 0.02  # DMD2's min_step_percent: critic levels in [0.02, 1)
    cfg.dmd.backward_simulation = cfg.dmd.sampler = "sde"  # DMD2: x0-then-renoise with fresh noise between steps
    cfg.dmd.ratio = 5  # DMD2: 5 critic steps per generator step
    cfg.dynamic.dynadg, cfg.dynamic.dynars = False, False  # the issue / the authors: both off for SDXL
    set_cold_start(cfg, 3000)  # the issue / the authors: a cold start of 3000 generator steps
    return cfg

