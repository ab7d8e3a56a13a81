"""Issue 23's critic probe: how well does the critic fit the student, and what does DMD push?

    python benchmarks/probe_critic.py RUN STEP

On 128 held-out prompts x 1 noise: the student's ode samples x, the teacher's 25-step CFG-1 samples z.
Per renoise level t: the critic's (fake score, scale s_f) denoising loss on x, the teacher's (scale 0) on x,
the teacher's on its own z (what a matched model achieves); and the DMD gradient's parts at w0:
DM = x0_fake - x0_cond and CA = (w - 1)(x0_uncond - x0_cond), their sizes (normalised as the loss does)
and cosine.
"""
import sys
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

from dmdr.export import _dcp_read, load_generator, read_run_config, resolve_checkpoint
from dmdr.models.base import repeat_conditioning
from dmdr.sampling import few_step_sample, teacher_sample
from dmdr.schedules import few_step_timesteps
from dmdr.worlds.shapes.evaluation import heldout_prompts, noise_for

torch.set_num_threads(1)

run, step = Path(sys.argv[1]), int(sys.argv[2])
cfg = read_run_config(run)
ckpt = resolve_checkpoint(run, step)
L = load_generator(cfg, ckpt, device="cpu", dtype=torch.float32, weights="trained")
bb, roles, p = L.backbone, L.roles, L.backbone.parameterization
state = get_model_state_dict(roles.teacher, options=StateDictOptions(ignore_frozen_params=True))
_dcp_read({"critic": {"model": state}}, ckpt, "the critic")
set_model_state_dict(roles.teacher, state, options=StateDictOptions(strict=False))
prompts = heldout_prompts(128)
cond = bb.text_encoder.encode(prompts)
unc = repeat_conditioning(bb.text_encoder.negative(), len(prompts))
noise = noise_for(0, len(prompts), bb.latent_shape(cfg.model.resolution))
sf, w = cfg.dmd.fake_scale, cfg.dmd.guidance
with torch.no_grad():
    x = few_step_sample(roles.generator_fn, noise, cond, few_step_timesteps(cfg.dmd.num_steps, cfg.dmd.shift,
                                                                            cfg.dmd.t_min), p, mode="ode")
    z = teacher_sample(lambda a, b, c: roles.critic_fn(a, b, c, 0.0), noise, cond, unc, p, 1.0, num_steps=25)
    g = torch.Generator().manual_seed(7)
    print(f"{run.name} step {step}  t: critic(x) teacher(x) teacher(z) | |DM| |CA| cos(DM,CA) |g|")
    for t in (0.05, 0.15, 0.3, 0.5, 0.7, 0.85, 0.95):
        tt = torch.full((len(prompts),), t)
        e = torch.randn(x.shape, generator=g)
        xt, zt = p.renoise(x, e, tt), p.renoise(z, e, tt)
        lc = ((roles.critic_fn(xt, tt, cond, sf) - p.target(x, e)) ** 2).mean().item()
        lt = ((roles.critic_fn(xt, tt, cond, 0.0) - p.target(x, e)) ** 2).mean().item()
        lz = ((roles.critic_fn(zt, tt, cond, 0.0) - p.target(z, e)) ** 2).mean().item()
        vu, vc, vf = (roles.critic_fn(xt, tt, c, s) for c, s in ((unc, 0.0), (cond, 0.0), (cond, sf)))
        xu, xc, xf = (p.to_x0(xt, tt, v) for v in (vu, vc, vf))
        xr = p.to_x0(xt, tt, vu + w * (vc - vu))
        n = (x - xr).abs().mean(dim=(1, 2, 3), keepdim=True)
        dm, ca = (xf - xc) / n, (w - 1) * (xu - xc) / n
        cos = torch.nn.functional.cosine_similarity(dm.flatten(1), ca.flatten(1)).mean().item()
        print(f"{t:.2f}: {lc:.3f} {lt:.3f} {lz:.3f} | {dm.abs().mean():.3f} {ca.abs().mean():.3f} {cos:+.2f} "
              f"{(dm + ca).abs().mean():.3f}")
