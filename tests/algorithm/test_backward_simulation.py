"""The *sde* backward simulation (DMD2's): the generator input at a level is the state its chain visits there."""

import torch

from dmdr.algorithm import backward_simulate, chain_input, simulate_chain
from dmdr.parameterization import FlowMatching
from dmdr.schedules import few_step_timesteps

T_MIN = 0.001


def _velocity(x, t, cond):
    """A deterministic, non-trivial velocity field (not an oracle: the chain's estimates differ per level)."""
    tt = t.view(-1, *([1] * (x.ndim - 1)))
    return 0.7 * x + 0.3 * tt * x.flip(-1) + 0.1


def _reference_chain(noise, timesteps, g):
    """Hand-written float64 sde chain: x_{t_0} = noise, x0^(i) = x + (t_min - t_i) v (the project's clean estimate
    steps to t_min), x_{t_{i+1}} = (1 - t') x0^(i) + t' eps_i."""
    states, clean, x = [], [], noise
    n = len(timesteps) - 1
    for i in range(n):
        t = float(timesteps[i])
        v = _velocity(x, torch.full((x.shape[0],), t, dtype=x.dtype), None)
        x0 = x + (T_MIN - t) * v
        states.append(x)
        clean.append(x0)
        if i < n - 1:
            t_next = float(timesteps[i + 1])
            eps = torch.randn(x.shape, generator=g, dtype=torch.float32).double()
            x = (1 - t_next) * x0 + t_next * eps
    return states, clean


def test_chain_input_is_the_visited_state_paired_with_its_clean_estimate():
    p = FlowMatching(t_min=T_MIN)
    timesteps = few_step_timesteps(4, 3.0).double()
    noise = torch.randn(64, 2, 3, dtype=torch.float64)
    chain = simulate_chain(_velocity, noise, None, timesteps, p, generator=torch.Generator().manual_seed(5))
    level = chain_input(chain, timesteps, torch.Generator().manual_seed(9))

    g = torch.Generator().manual_seed(5)
    states, clean = _reference_chain(noise, timesteps, g)
    idx = torch.randint(0, 4, (64,), generator=torch.Generator().manual_seed(9))
    assert set(idx.tolist()) == {0, 1, 2, 3}
    for b, i in enumerate(idx.tolist()):
        assert float(level.t[b]) == float(timesteps[i])
        torch.testing.assert_close(level.x_t[b], states[i][b], rtol=0, atol=1e-12)
        torch.testing.assert_close(level.clean[b], clean[i][b], rtol=0, atol=1e-12)
    # the pair is (input, the generator's own estimate from it): what the DMD loss then differentiates
    own = level.x_t + (T_MIN - level.t.view(-1, 1, 1)) * _velocity(level.x_t, level.t, None)
    torch.testing.assert_close(level.clean, own)
    # level 0 is the simulation's own noise; a later level renoises the PREVIOUS level's estimate (the states
    # above), which at N = 4 is far from the final sample renoised (the old 'sde')
    torch.testing.assert_close(level.x_t[idx == 0], noise[idx == 0])
    assert not torch.allclose(clean[0], chain.sample, atol=0.1)


def test_chain_sample_is_the_sde_sampler_sample():
    p = FlowMatching(t_min=T_MIN)
    timesteps = few_step_timesteps(3, 1.0)
    noise = torch.randn(5, 4)
    chain = simulate_chain(_velocity, noise, None, timesteps, p, generator=torch.Generator().manual_seed(1))
    old = backward_simulate(_velocity, noise, None, timesteps, p, mode="sde",
                            generator=torch.Generator().manual_seed(1))
    assert torch.equal(chain.sample, old) and torch.equal(chain.clean[-1], old)
    assert len(chain.states) == len(chain.clean) == 3
