"""``--train.grad_accum`` under FSDP2 on 2 gloo ranks: K micro-batches (one reduce-scatter each, the sharded
gradients accumulating) take the update of one batch per rank, for the DMD loss with ReFL and with GRPO (fp64
networks, fp32 losses: 1e-7, as tests/algorithm/test_grad_accum.py)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from dmdr.distributed import DistEnv
from dmdr.engine import Roles, StepEngine
from dmdr.models.lora import lora_parameters
from dmdr.rewards.analytic import RegionReward
from dmdr.worlds import GaussianMixtureWorld, ToyDMDRConfig
from dmdr.worlds.gaussians import MLPDenoiser
from dmdr.worlds.toy_dmdr import toy_engine
from tests.distributed.dist_toy import full_params, run_workers

pytestmark = pytest.mark.slow

BATCH = 8
REWARD = RegionReward(direction=(1.0, 0.0), offset=0.0, temperature=1.0)
BASE = ToyDMDRConfig(num_steps=2, shift=3.0, ratio=2, batch_size=BATCH, generator_lr=1e-2, critic_lr=1e-2,
                     critic_rank=4, critic_alpha=4.0, reward=REWARD, rl_method="refl")


def _sharded_run(env: DistEnv, cfg: ToyDMDRConfig, accum: int) -> dict[str, torch.Tensor]:
    world = GaussianMixtureWorld.ring(num_modes=4, num_classes=2, radius=3.0, std=0.2)
    torch.manual_seed(0)
    teacher = MLPDenoiser(world.dim, world.num_classes, hidden=16, depth=1).requires_grad_(False)
    rng = torch.Generator().manual_seed(100 + env.rank)  # each rank its own draws, as the trainer
    toy = toy_engine(teacher, world, cfg, rng)
    generator, critic = toy.roles.generator, toy.roles.teacher
    mesh = init_device_mesh("cpu", (env.world_size,))
    fully_shard(generator.net, mesh=mesh)
    fully_shard(critic.net, mesh=mesh)
    roles = Roles(generator=generator, teacher=critic, generator_params=list(generator.parameters()),
                  critic_params=lora_parameters(critic.net, "critic"), shared_base=False)
    toy.cfg.train.grad_accum = accum
    engine = StepEngine(toy.cfg, roles, toy.param, toy.rewards, rng=rng, noise=toy.noise, decode=toy.decode,
                        device=torch.device("cpu"), dist=env)
    labels = (torch.arange(BATCH) + env.rank) % world.num_classes
    for _ in range(4):
        engine.iteration(world.cond(labels), world.uncond(BATCH), [f"class {c}" for c in labels.tolist()])
    assert engine.step == 2
    return {**full_params(generator), **{f"critic.{k}": v for k, v in full_params(critic).items()}}


def _compare(env: DistEnv) -> None:
    torch.set_default_dtype(torch.float64)
    for cfg in (BASE, dataclasses.replace(BASE, rl_method="grpo", grpo_group_size=2)):
        whole = _sharded_run(env, cfg, 1)
        parts = _sharded_run(env, cfg, 2)
        assert whole.keys() == parts.keys()
        for name, value in whole.items():
            torch.testing.assert_close(parts[name], value, atol=1e-7, rtol=1e-7, msg=name)


def test_grad_accum_equals_one_batch_under_fsdp2_at_w2():
    run_workers(_compare)
