"""``--train.grad_accum K``: K micro-batches make the update of one big batch (the step engine on the 2-D world).

Stated tolerance: with fp64 networks the parameters agree to 1e-7 (relative to their scale) after 3 generator and
6 critic AdamW steps, for the DMD loss alone and every RL branch: the DMD and critic losses are computed in fp32,
as in training, and their rounding is what differs (measured <= 3.4e-8; GRPO alone, fp64 throughout, 6e-17). In
fp32 to 1e-5. The step's randomness is drawn for the whole batch, so K = 1 is the engine's one-batch step itself.
Dropping the critic's share weighting (K times its gradient) fails the check (tried by hand).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dmdr.config import TrainConfig, validate
from dmdr.errors import ConfigError
from dmdr.micro_batches import chunked, merge_stats, micro_slices
from dmdr.rewards.analytic import RegionReward
from dmdr.worlds import GaussianMixtureWorld, ToyDMDRConfig
from dmdr.worlds.gaussians import MLPDenoiser
from dmdr.worlds.toy_dmdr import toy_engine

pytestmark = pytest.mark.usefixtures("one_thread")

REWARD = RegionReward(direction=(1.0, 0.0), offset=0.0, temperature=1.0)
BATCH = 8
BASE = ToyDMDRConfig(num_steps=2, shift=3.0, ratio=2, batch_size=BATCH, generator_lr=1e-2, critic_lr=1e-2,
                     critic_rank=4, critic_alpha=4.0, dynars=True, dynadg=True, decay_steps=10)
CASES = {
    "dmd": BASE,
    "dmd+refl": dataclasses.replace(BASE, reward=REWARD, rl_method="refl"),
    "dmd+dpo": dataclasses.replace(BASE, reward=REWARD, rl_method="dpo", dpo_k=3, rl_weight=0.5),
    "dmd+grpo": dataclasses.replace(BASE, reward=REWARD, rl_method="grpo", grpo_group_size=2),
    "grpo alone, KL, 2 inner updates": dataclasses.replace(BASE, dmd=False, reward=REWARD, rl_method="grpo",
                                                           grpo_group_size=2, grpo_kl_weight=0.1,
                                                           grpo_inner_updates=2),
    "dmd sde": dataclasses.replace(BASE, backward_simulation="sde"),
}


@pytest.fixture
def float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def _run(cfg: ToyDMDRConfig, accum: int, iterations: int = 6, decoupled: bool = False):
    world = GaussianMixtureWorld.ring(num_modes=4, num_classes=2, radius=3.0, std=0.2)
    torch.manual_seed(0)
    teacher = MLPDenoiser(world.dim, world.num_classes, hidden=16, depth=1).requires_grad_(False)
    engine = toy_engine(teacher, world, cfg, torch.Generator().manual_seed(0))
    engine.cfg.train.grad_accum = accum
    if decoupled:
        engine.cfg.dmd.decoupled, engine.cfg.dmd.ca_levels, engine.cfg.dmd.ca_weight = True, "beta", 0.7
    grad_batches: list[int] = []
    fn = engine.roles.generator.predict

    def counted(x, t, cond):
        if torch.is_grad_enabled():
            grad_batches.append(x.shape[0])
        return fn(x, t, cond)

    engine.roles.generator.predict = counted
    labels = torch.arange(BATCH) % world.num_classes
    metrics = []
    for _ in range(iterations):
        out = engine.iteration(world.cond(labels), world.uncond(BATCH), [f"class {c}" for c in labels.tolist()])
        if out is not None:
            metrics.append(out)
    params = [p.detach().clone() for p in [*engine.roles.generator_params, *engine.roles.critic_params]]
    return params, metrics, grad_batches


def _assert_close(a, b, tol):
    for x, y in zip(a, b):
        scale = max(x.abs().max().item(), 1.0)
        assert (x - y).abs().max().item() <= tol * scale


@pytest.mark.parametrize("case", list(CASES))
def test_micro_batches_give_the_big_batch_update_in_fp64(float64, case):
    cfg = CASES[case]
    whole, m1, batches1 = _run(cfg, 1)
    for accum in (2, 4):
        if cfg.rl_method == "grpo" and cfg.reward is not None and (BATCH // accum) % cfg.grpo_group_size:
            continue
        parts, mk, batches = _run(cfg, accum)
        _assert_close(whole, parts, 1e-7)
        assert max(batches) * accum <= max(batches1)  # every forward with grad saw one slice
        for a, b in zip(m1, mk):
            assert a.keys() == b.keys()
            for key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-9), key


def test_decoupled_dmd_with_its_own_levels_accumulates_exactly(float64):
    whole, _, _ = _run(BASE, 1, decoupled=True)
    parts, _, _ = _run(BASE, 2, decoupled=True)
    _assert_close(whole, parts, 1e-7)


def test_fp32_within_1e_5():
    whole, _, _ = _run(CASES["dmd+refl"], 1)
    parts, _, _ = _run(CASES["dmd+refl"], 4)
    _assert_close(whole, parts, 1e-5)


def test_the_comparison_is_not_vacuous(float64):
    """The runs move every network far beyond the tolerance."""
    world = GaussianMixtureWorld.ring(num_modes=4, num_classes=2, radius=3.0, std=0.2)
    torch.manual_seed(0)
    teacher = MLPDenoiser(world.dim, world.num_classes, hidden=16, depth=1).requires_grad_(False)
    init = toy_engine(teacher, world, CASES["dmd+refl"], torch.Generator().manual_seed(0))
    start = [p.detach().clone() for p in [*init.roles.generator_params, *init.roles.critic_params]]
    after, _, _ = _run(CASES["dmd+refl"], 2)
    assert min((a - b).abs().max().item() for a, b in zip(start, after)) > 1e-4


def test_helpers():
    assert micro_slices(8, 4) == [slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 8)]
    assert micro_slices(5, 2) == [slice(0, 2), slice(2, 5)]
    calls = []

    def fn(x, t, cond, scale):
        calls.append(x.shape[0])
        return x * t[:, None] + cond["c"] * scale

    x, t, cond = torch.randn(6, 3), torch.rand(6), {"c": torch.randn(6, 3)}
    with torch.no_grad():
        assert torch.equal(chunked(fn, 3)(x, t, cond, 2.0), fn(x, t, cond, 2.0))
    assert calls == [2, 2, 2, 6]
    # pooled population std of two halves = the whole batch's
    a, b = torch.tensor([1.0, 2.0, 4.0]), torch.tensor([0.0, 7.0, 8.0])
    stats = [(0.5, {"r": v.mean().item(), "r_std": v.std(unbiased=False).item()}) for v in (a, b)]
    merged = merge_stats(stats)
    whole = torch.cat([a, b])
    assert merged["r"] == pytest.approx(whole.mean().item())
    assert merged["r_std"] == pytest.approx(whole.std(unbiased=False).item())


def test_the_batch_must_divide_into_micro_batches_in_one_line():
    cfg = TrainConfig()
    cfg.data.batch_size, cfg.data.rl_batch_size, cfg.train.grad_accum = 4, 2, 4
    with pytest.raises(ConfigError, match=r"--train.grad_accum: 4 micro-batches do not divide data.rl_batch_size 2"):
        validate(cfg)
    cfg.train.grad_accum, cfg.rl.method, cfg.rl.grpo_group_size = 2, "grpo", 2
    cfg.data.batch_size = cfg.data.rl_batch_size = 4
    validate(cfg)
    cfg.rl.grpo_group_size = 4
    with pytest.raises(ConfigError, match="in one micro-batch"):
        validate(cfg)
