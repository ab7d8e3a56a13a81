"""The RL branches' pieces against float64 references: sde log-probs, GRPO's advantages and clipped loss,
DPO's loss and pair selection, the frozen reference, sampler state, non-finite rewards and bad config."""

from __future__ import annotations

import copy

import pytest
import torch

from dmdr.config import TrainConfig, apply_overrides
from dmdr.errors import ConfigError
from dmdr.losses.rl import GRPO, OnPolicyDPO, PolicyAccess, ReFL, RLBatch, build_rl_method
from dmdr.losses.rl.dpo import dpo_loss
from dmdr.losses.rl.grpo import clipped_policy_loss, group_advantages
from dmdr.losses.rl.reference import FrozenReference
from dmdr.models.base import index_conditioning
from dmdr.parameterization import FlowMatching
from dmdr.sampling import _default_cat, few_step_sample, sde_sample_with_log_probs, sde_step_kl
from dmdr.schedules import few_step_timesteps

PARAM = FlowMatching(t_min=0.001)
TIMESTEPS = few_step_timesteps(4, 3.0, 0.001)


class Linear2D(torch.nn.Module):
    """A tiny velocity model on 2-D points, conditioned on a label vector."""

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = torch.nn.Parameter(torch.randn(2, 2, generator=g) * 0.3)
        self.b = torch.nn.Parameter(torch.randn(2, generator=g) * 0.3)
        self.c = torch.nn.Parameter(torch.randn(3, 2, generator=g) * 0.3)

    def forward(self, x, t, cond):
        return x @ self.w + self.b + t[:, None] * (cond["label"] @ self.c)


class XReward:
    """Score = the first coordinate (optionally non-finite for one sample)."""

    name = "x"

    def __init__(self, poison: bool = False):
        self.poison = poison

    def __call__(self, images, prompts):
        s = images[:, 0].clone()
        if self.poison:
            s[0] = float("nan")
        return s


def _access(model, seed=0, reference=None):
    rng = torch.Generator().manual_seed(seed)
    return PolicyAccess(fn=model, param=PARAM, timesteps=TIMESTEPS, rng=rng,
                        noise=lambda n: torch.randn(n, 2, generator=rng), decode=lambda x: x,
                        select=index_conditioning, cat=_default_cat,
                        reference_fn=reference.wrap(model) if reference is not None else None)


def _batch(n=4):
    labels = torch.nn.functional.one_hot(torch.arange(n) % 3, 3).float()
    return RLBatch(x0=torch.zeros(n, 2), prompts=[f"p{i}" for i in range(n)], cond={"label": labels})


def test_sde_sampler_log_probs_are_the_gaussian_steps_density():
    model = Linear2D()
    cond = _batch(5).cond
    noise = torch.randn(5, 2, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        traj = sde_sample_with_log_probs(model, noise, cond, TIMESTEPS, PARAM,
                                         generator=torch.Generator().manual_seed(2))
        plain = few_step_sample(model, noise, cond, TIMESTEPS, PARAM, mode="sde",
                                generator=torch.Generator().manual_seed(2))
    assert torch.equal(traj.sample, plain)  # the same draws as the sde backward simulation
    assert len(traj.states) == 4 and traj.log_probs.shape == (5, 3)
    for i in range(3):  # x_{i+1} ~ N((1 - t') x0_hat(x_i, t_i), t'^2 I), per-dimension mean of the log-density
        x = traj.states[i].double()
        t, t_next = TIMESTEPS[i].double(), TIMESTEPS[i + 1].double()
        with torch.no_grad():
            v = model(traj.states[i], TIMESTEPS[i].expand(5), cond).double()
        x0_hat = x + (0.001 - t) * v
        ref = torch.distributions.Normal((1 - t_next) * x0_hat, t_next).log_prob(traj.states[i + 1].double()).mean(1)
        torch.testing.assert_close(traj.log_probs[:, i].double(), ref, rtol=1e-5, atol=1e-5)


def test_group_advantages_and_clipped_loss_match_float64():
    scores = torch.tensor([1.0, 2.0, 4.0, 0.0, 0.0, 3.0])
    adv = group_advantages(scores, 3)
    for g in range(2):
        s = scores[3 * g:3 * g + 3].double()
        torch.testing.assert_close(adv[3 * g:3 * g + 3].double(), (s - s.mean()) / (s.std(unbiased=False) + 1e-4))
    logp = torch.tensor([[0.1, -0.2], [0.0, 0.3], [0.002, -0.0005]], dtype=torch.float64)
    old = torch.zeros_like(logp)
    a = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    eps = 0.01
    want = 0.0
    for b in range(3):
        for s in range(2):
            rho = float(torch.exp(logp[b, s] - old[b, s]))
            want += min(rho * float(a[b]), min(max(rho, 1 - eps), 1 + eps) * float(a[b]))
    assert clipped_policy_loss(logp, old, a, eps).item() == pytest.approx(-want / 6, rel=1e-12)


def test_dpo_loss_matches_float64():
    e = [torch.rand(5, dtype=torch.float64, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    beta = 7.0
    want = torch.log1p(torch.exp(beta * ((e[0] - e[1]) - (e[2] - e[3])))).mean()  # -log sigmoid(-z) = log(1 + e^z)
    torch.testing.assert_close(dpo_loss(*e, beta=beta), want)


def test_dpo_pairs_best_and_worst_and_pulls_toward_the_winner():
    model = Linear2D()
    reference = FrozenReference(list(model.parameters()))
    reference.take()
    dpo = OnPolicyDPO(k=4, beta=5.0)
    loss, stats = dpo.loss(_batch(3), _access(model, reference=reference), [(XReward(), 1.0)])
    # At the reference, e_theta == e_ref: the loss is log 2, and the gradient is not zero.
    assert loss.item() == pytest.approx(torch.log(torch.tensor(2.0)).item(), abs=1e-6)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert stats["rl/dpo_reward_gap"] > 0 and "reward/x" in stats


def test_sde_step_kl_is_the_gaussian_kl_per_dimension():
    g = torch.Generator().manual_seed(4)
    x0, x0_ref = torch.randn(3, 2, 5, generator=g), torch.randn(3, 2, 5, generator=g)
    t_next = torch.tensor([0.9, 0.5, 0.1])
    s = t_next.double()[:, None, None]  # the flow's sde step: N((1 - t') x0, t'^2 I)
    want = torch.distributions.kl_divergence(torch.distributions.Normal((1 - s) * x0.double(), s),
                                             torch.distributions.Normal((1 - s) * x0_ref.double(), s))
    torch.testing.assert_close(sde_step_kl(PARAM, x0, x0_ref, t_next).double(), want.mean(dim=(1, 2)),
                               rtol=1e-5, atol=1e-7)
    assert torch.equal(sde_step_kl(PARAM, x0, x0, t_next), torch.zeros(3))


def test_grpo_kl_term_is_zero_at_the_reference_and_adds_beta_kl_away_from_it():
    def loss_of(kl_weight, shift):
        model = Linear2D()
        reference = FrozenReference(list(model.parameters()))
        reference.take()
        with torch.no_grad():
            model.b.add_(shift)  # the policy moved away from its reference by ``shift``
        grpo = GRPO(group_size=2, clip=0.05, kl_weight=kl_weight)
        assert grpo.needs_reference == (kl_weight > 0)
        access = _access(model, seed=3, reference=reference if kl_weight > 0 else None)
        loss, stats = grpo.loss(_batch(4), access, [(XReward(), 1.0)])
        return loss, stats, model

    plain, _, _ = loss_of(0.0, 0.0)
    at_ref, stats, _ = loss_of(0.5, 0.0)
    assert stats["rl/grpo_kl"] == 0.0 and torch.equal(at_ref, plain)
    moved_plain, _, _ = loss_of(0.0, 0.3)
    moved, stats, model = loss_of(0.5, 0.3)
    # the stochastic steps' means differ by (1 - t') * (-t) * 0.3 per coordinate: KL = that^2 / (2 t'^2)
    steps = TIMESTEPS.numel() - 2
    want = sum(((1 - TIMESTEPS[i + 1].double()) * (0.001 - TIMESTEPS[i].double()) * 0.3) ** 2
               / (2 * TIMESTEPS[i + 1].double() ** 2) for i in range(steps)) / steps
    assert stats["rl/grpo_kl"] == pytest.approx(float(want), rel=1e-4)
    assert moved.item() == pytest.approx(moved_plain.item() + 0.5 * float(want), rel=1e-5)
    moved.backward()
    assert model.b.grad is not None and model.b.grad.abs().sum() > 0


def test_frozen_reference_runs_the_snapshot_and_restores_the_weights_bit_for_bit():
    model = Linear2D()
    reference = FrozenReference(list(model.parameters()))
    reference.take()
    snapshot = copy.deepcopy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)
    after = [p.detach().clone() for p in model.parameters()]
    x, t, cond = torch.randn(4, 2), torch.full((4,), 0.5), _batch(4).cond
    out = model(x, t, cond)  # a graph that saved the current weights, as the DMD forward does
    ref = reference.wrap(model)(x, t, cond)
    assert torch.equal(ref, snapshot(x, t, cond)) and not ref.requires_grad
    assert all(torch.equal(p, a) for p, a in zip(model.parameters(), after))
    out.sum().backward()  # still valid: the swap did not bump the parameters' autograd versions
    with pytest.raises(RuntimeError, match="never taken"):
        FrozenReference(list(model.parameters())).wrap(model)(x, t, cond)


def test_grpo_reuses_its_group_for_inner_updates_and_resumes_from_its_state():
    model = Linear2D()
    grpo = GRPO(group_size=2, clip=0.05, inner_updates=2)
    access = _access(model, seed=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    loss1, stats1 = grpo.loss(_batch(4), access, [(XReward(), 1.0)])
    assert stats1["rl/grpo_ratio_dev"] < 1e-5  # first update: the policy is the sampling policy
    loss1.backward()
    opt.step()
    opt.zero_grad()
    saved = copy.deepcopy(grpo.state_dict())
    rng_state = access.rng.get_state()
    loss2, stats2 = grpo.loss(_batch(4), access, [(XReward(), 1.0)])
    assert stats2["rl/grpo_ratio_dev"] > 1e-4 and grpo.group["uses_left"] == 0  # same group, moved policy
    # a fresh GRPO loaded from the state continues identically
    again = GRPO(group_size=2, clip=0.05, inner_updates=2)
    again.load_state_dict(saved)
    access2 = _access(model, seed=99)
    access2.rng.set_state(rng_state)
    loss3, _ = again.loss(_batch(4), access2, [(XReward(), 1.0)])
    assert torch.equal(loss2, loss3)


@pytest.mark.parametrize("make", [lambda: OnPolicyDPO(k=2), lambda: GRPO(group_size=2)], ids=["dpo", "grpo"])
def test_non_finite_reward_makes_the_loss_nan_for_the_skip_path(make):
    model = Linear2D()
    reference = FrozenReference(list(model.parameters()))
    reference.take()
    loss, _ = make().loss(_batch(4), _access(model, reference=reference), [(XReward(poison=True), 1.0)])
    assert torch.isnan(loss)


def test_refl_method_is_refl_loss_on_the_decoded_estimate():
    x0 = torch.randn(4, 2, requires_grad=True)
    loss, stats = ReFL(margin=0.5).loss(RLBatch(x0=x0, prompts=["a"] * 4, cond=None), _access(Linear2D()),
                                        [(XReward(), 2.0)])
    torch.testing.assert_close(loss, 2.0 * torch.relu(0.5 - x0[:, 0]).mean())
    assert stats["reward/x"] == pytest.approx(x0[:, 0].mean().item())


def test_build_rl_method_by_name():
    cfg = TrainConfig()
    assert isinstance(build_rl_method(cfg.rl), ReFL)
    for name, cls in (("dpo", OnPolicyDPO), ("grpo", GRPO)):
        cfg.rl.method = name
        assert isinstance(build_rl_method(cfg.rl), cls)
    cfg.rl.method = "none"
    assert build_rl_method(cfg.rl) is None


@pytest.mark.parametrize("argv,needle", [
    (["--rl.method", "grpo", "--rl.grpo_group_size", "1"], "--rl.grpo_group_size: GRPO needs groups of >= 2"),
    (["--rl.method", "grpo", "--rl.grpo_group_size", "3", "--data.batch_size", "4"],
     "--rl.grpo_group_size: 3 does not divide the per-rank RL batch 4"),
    (["--rl.method", "grpo", "--rl.grpo_group_size", "2", "--data.batch_size", "4", "--data.rl_batch_size", "3"],
     "does not divide the per-rank RL batch 3"),
    (["--rl.method", "grpo", "--dmd.num_steps", "1"], "--dmd.num_steps: GRPO needs >= 2 sampler steps"),
    (["--rl.method", "dpo", "--rl.dpo_k", "1"], "--rl.dpo_k: DPO needs K >= 2"),
    (["--rl.method", "grpo", "--rl.grpo_kl_weight", "-1"], "--rl.grpo_kl_weight: must be >= 0"),
    (["--rl.method", "ppo"], "--rl.method: 'ppo' is not one of none, refl, dpo, grpo"),
])
def test_bad_rl_config_is_one_line(argv, needle):
    with pytest.raises(ConfigError) as err:
        apply_overrides(TrainConfig(), argv)
    assert needle in str(err.value) and "\n" not in str(err.value)


class PromptLog(XReward):
    """XReward that records the prompts each call is scored against (one per image)."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[int, list[str]]] = []

    def __call__(self, images, prompts):
        self.calls.append((images.shape[0], list(prompts)))
        return super().__call__(images, prompts)


@pytest.mark.parametrize("make, want", [
    (lambda: GRPO(group_size=2), ["p0", "p0", "p1", "p1"]),  # a batch of 4 makes 2 groups of the first 2 prompts
    (lambda: OnPolicyDPO(k=2), ["p0", "p0", "p1", "p1", "p2", "p2", "p3", "p3"]),  # K samples of every prompt
], ids=["grpo", "dpo"])
def test_rewards_score_each_sample_against_its_own_prompt(make, want):
    log, model = PromptLog(), Linear2D()
    reference = FrozenReference(list(model.parameters()))
    reference.take()
    make().loss(_batch(4), _access(model, reference=reference), [(log, 1.0)])
    assert log.calls[0] == (len(want), want)
