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


def sdxl_dmdr() -> TrainConfig:
    cfg = TrainConfig()
    cfg.model.family = "sdxl"
    cfg.model.resolution = 1024
    cfg.model.dtype = "bf16"
    cfg.model.generator_mode = "full"
    cfg.model.critic_lora_rank, cfg.model.critic_lora_alpha = 32, 32.0
    cfg.model.max_sequence_length = 77  # CLIP's fixed length; SDXL has no T5
    cfg.dmd.num_steps = 4
    cfg.dmd.timesteps = FEW_STEP_TIMESTEPS[4]
    cfg.dmd.t_min = 0.02
    cfg.dmd.backward_simulation = cfg.dmd.sampler = "sde"
    cfg.dmd.guidance, cfg.dmd.ratio = 7.0, 5
    cfg.dynamic.dynadg, cfg.dynamic.dynars = False, False
    cfg.dynamic.decay_steps = 3000
    cfg.rl.start_step = 3000
    cfg.rl.rewards, cfg.rl.weights = ("hps", "clip"), (0.3, 0.3)
    cfg.optim.generator_lr, cfg.optim.critic_lr = 5e-7, 5e-7
    cfg.optim.rl_generator_lr, cfg.optim.rl_critic_lr = 5e-7, 5e-7
    cfg.data.batch_size, cfg.data.rl_batch_size = 4, 2  # per GPU: cold start, RL stage (halved, as the paper)
    cfg.parallel.activation_checkpointing = "full"
    cfg.train.max_steps = 4000
    cfg.train.output_dir = "runs/sdxl-dmdr"
    return cfg

