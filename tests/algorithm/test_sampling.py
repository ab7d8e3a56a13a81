"""Samplers and the DMDR step functions on analytic predictors (exact answers known)."""

import torch

from dmdr.algorithm import critic_step_loss, dmd_generator_loss, draw_guidance, generator_input
from dmdr.parameterization import EpsilonPrediction, FlowMatching
from dmdr.sampling import few_step_sample, teacher_sample, teacher_timesteps
from dmdr.schedules import few_step_timesteps


def _oracle_flow(target):
    """A perfect velocity predictor for a point mass at ``target``: v = (x_t - target) / t."""
    def fn(x, t, cond):
        return (x - target) / t.view(-1, *([1] * (x.ndim - 1)))
    return fn


def test_ode_sampler_with_exact_velocity_reaches_target():
    p = FlowMatching(t_min=0.001)
    target = torch.tensor([[2.0, -1.0]]).repeat(4, 1).double()
    noise = torch.randn(4, 2, dtype=torch.float64)
    ts = few_step_timesteps(4, 3.0).double()
    out = few_step_sample(_oracle_flow(target), noise, None, ts, p, mode="ode")
    # the clean estimate steps to t_min: x_{t_min} = (1 - t_min) target + t_min noise
    assert torch.allclose(out, p.renoise(target, noise, 0.001), atol=1e-9)


def test_sde_sampler_uses_fresh_noise_and_is_reproducible():
    p = FlowMatching()
    target = torch.zeros(3, 2, dtype=torch.float64)
    calls = []

    def fn(x, t, cond):
        calls.append(x.clone())
        return _oracle_flow(target)(x, t, cond)

    ts = few_step_timesteps(4, 3.0).double()
    noise = torch.randn(3, 2, dtype=torch.float64)
    a = few_step_sample(fn, noise, None, ts, p, mode="sde", generator=torch.Generator().manual_seed(0))
    b = few_step_sample(fn, noise, None, ts, p, mode="sde", generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    assert len(calls) == 8
    # step 2's input is target renoised with FRESH noise at t_1 (not the ODE continuation)
    ode_next = p.step(noise, ts[0].expand(3), ts[1].expand(3), _oracle_flow(target)(noise, ts[0].expand(3), None))
    assert not torch.allclose(calls[1], ode_next)


def test_ddim_sampler_with_exact_eps():
    ab = torch.linspace(0.9999, 0.005, 1000, dtype=torch.float64)
    p = EpsilonPrediction(ab)
    x0 = torch.randn(2, 3, dtype=torch.float64)
    noise = torch.randn(2, 3, dtype=torch.float64)
    # an oracle that knows x0: eps_hat = (x_t - sqrt(ab) x0) / sqrt(1 - ab)
    def fn(x, t, cond):
        a = p.alpha_bar(t, x)
        return (x - a.sqrt() * x0) / (1 - a).sqrt()
    ts = torch.tensor([1.0, 0.6, 0.3, 0.0], dtype=torch.float64)
    start = p.renoise(x0, noise, 1.0)
    out = few_step_sample(fn, start, None, ts, p, mode="ode")
    assert torch.allclose(out, x0, atol=1e-8)


def test_teacher_sampler_cfg_batches_uncond_and_cond():
    p = FlowMatching(t_min=0.0)
    seen = []

    def fn(x, t, cond):
        seen.append(cond.clone())
        # uncond -> point mass at 0, cond -> point mass at 1: CFG w -> w
        tgt = cond.view(-1, 1).double()
        return (x - tgt) / t.view(-1, 1)

    noise = torch.randn(3, 1, dtype=torch.float64)
    out = teacher_sample(fn, noise, torch.ones(3), torch.zeros(3), p, guidance=1.0, num_steps=5, shift=3.0)
    assert torch.allclose(out, torch.ones(3, 1, dtype=torch.float64), atol=1e-9)
    assert torch.equal(seen[0], torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0, 1.0]))
    assert teacher_timesteps(5, 3.0)[-1].item() == 0.0


def test_generator_input_levels_come_from_first_n():
    p = FlowMatching()
    ts = few_step_timesteps(4, 3.0)
    x0 = torch.zeros(512, 2)
    _, t = generator_input(x0, ts, p, torch.Generator().manual_seed(0))
    assert set(t.tolist()) == set(ts[:4].tolist())


def test_guidance_draw_range():
    g = torch.Generator().manual_seed(0)
    ws = [draw_guidance(4.0, 0.5, g) for _ in range(500)]
    assert min(ws) >= 3.5 and max(ws) <= 4.5 and max(ws) - min(ws) > 0.9


def test_dmd_loss_single_batched_call_with_per_sample_scales():
    p = FlowMatching()
    calls = []

    def critic(x, t, cond, scale):
        calls.append((x.shape[0], scale.clone()))
        # real branch (scale .3) predicts v=1, fake branch (scale 2) predicts v=0, uncond = cond
        return torch.where(scale.view(-1, 1) == 2.0, torch.zeros_like(x), torch.ones_like(x))

    x0 = torch.randn(4, 2, requires_grad=True)
    t_d = torch.full((4,), 0.5)
    terms = dmd_generator_loss(x0, torch.ones(4, 1), torch.zeros(4, 1), critic, p, t_d, guidance=3.0,
                               real_scale=0.3, fake_scale=2.0, generator=torch.Generator().manual_seed(0))
    assert len(calls) == 1 and calls[0][0] == 12
    assert torch.allclose(calls[0][1], torch.tensor([0.3] * 8 + [2.0] * 4))
    # x0_real - x0_fake = (t_min - t) * (1 - 0); g = (x0_fake - x0_real) / mean|x0 - x0_real|
    terms.loss.backward()
    assert torch.allclose(x0.grad, terms.grad / terms.grad.numel())


def test_critic_loss_targets_velocity():
    p = FlowMatching()
    x0 = torch.randn(3, 2)

    def perfect(x, t, cond, scale):
        return torch.zeros_like(x)

    loss = critic_step_loss(perfect, x0, None, torch.full((3,), 0.5), p, 2.0, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(x0.shape, generator=g)
    assert torch.allclose(loss, ((noise - x0) ** 2).mean())


def test_generator_input_is_pure_noise_at_the_first_level():
    """The generator's training input at level 0 is what its sampler starts from: the noise itself (SDXL's
    one-step generator sees pure noise at 399); other levels are renoised; flows (t_0 = 1) are unchanged."""
    from dmdr.algorithm import generator_input
    from dmdr.schedules import generator_levels

    ab = torch.linspace(0.9999, 0.005, 1000, dtype=torch.float64)
    p = EpsilonPrediction(ab, discrete=True)
    levels = generator_levels(4, 1.0, 0.0, (999, 749, 499, 249), p)
    x0 = torch.randn(64, 2, 3, generator=torch.Generator().manual_seed(0))
    x_t, t = generator_input(x0, levels, p, torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 4, (64,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    first = idx == 0
    assert 0 < first.sum() < 64 and torch.equal(t, levels[idx])
    assert torch.equal(x_t[first], noise[first])
    assert torch.equal(x_t[~first], p.renoise(x0, noise, t)[~first])
    flow = FlowMatching()
    flow_levels = generator_levels(4, 3.0, 0.001)
    x_t, t = generator_input(x0, flow_levels, flow, torch.Generator().manual_seed(1))
    assert torch.equal(x_t, flow.renoise(x0, noise, t))
