"""hostdev behaves as CUDA does where device bugs hide, and dmdr's random draws respect it.

The device is what makes the rest of tests/devices mean something: if it silently accepted a CPU tensor or a
CPU generator, a training run on it would prove nothing. So these pin the refusals first, then the draws.
"""

from __future__ import annotations

import pytest
import torch

DEV = "hostdev"


def test_mixing_devices_raises_like_cuda(hostdev):
    x = torch.ones(3, device=DEV)
    with pytest.raises(RuntimeError, match="same device"):
        x + torch.ones(3)
    with pytest.raises(RuntimeError, match="same device"):
        torch.nn.functional.linear(x, torch.ones(2, 3))
    # A 0-dim CPU tensor is a scalar to CUDA kernels, and so it is here.
    assert torch.equal((x + torch.tensor(2.0)).cpu(), torch.full((3,), 3.0))


def test_generators_must_live_where_the_op_runs(hostdev):
    g_dev = torch.Generator(device=DEV).manual_seed(0)
    g_cpu = torch.Generator().manual_seed(0)
    assert g_dev.device.type == DEV
    with pytest.raises(RuntimeError, match="same device"):  # a host op with a device generator (the beta_levels bug)
        torch._standard_gamma(torch.full((4,), 2.0, dtype=torch.float64), generator=g_dev)
    with pytest.raises(RuntimeError, match="same device"):
        torch.randn(4, generator=g_dev)
    with pytest.raises(RuntimeError, match="generator"):  # a device op with a host generator
        torch.randn(4, generator=g_cpu, device=DEV)


def test_device_generator_draws_the_host_stream_and_restores_its_state(hostdev):
    g_dev = torch.Generator(device=DEV).manual_seed(7)
    g_cpu = torch.Generator().manual_seed(7)
    a = torch.randn(5, generator=g_dev, device=DEV)
    assert a.device.type == DEV
    assert torch.equal(a.cpu(), torch.randn(5, generator=g_cpu))  # same seed, same numbers: runs compare to CPU runs
    state = g_dev.get_state()
    first = torch.rand(3, generator=g_dev, device=DEV).cpu()
    g_dev.set_state(state)
    assert torch.equal(torch.rand(3, generator=g_dev, device=DEV).cpu(), first)


def test_views_alias_and_autograd_runs_on_the_device(hostdev):
    x = torch.zeros(4, 4, device=DEV)
    x[1].add_(1)
    x.view(16)[0] = 5
    assert x.sum().item() == 9.0
    before = hostdev.fallback_calls()
    layer = torch.nn.Linear(3, 2).to(DEV)
    loss = layer(torch.randn(4, 3, device=DEV)).pow(2).mean()
    loss.backward()
    torch.optim.AdamW(layer.parameters(), lr=0.1).step()
    assert layer.weight.grad.device.type == DEV and layer.weight.device.type == DEV
    assert hostdev.fallback_calls() > before  # the ops ran through the device's kernels, not on CPU tensors


def test_beta_levels_draw_with_a_device_generator(hostdev):
    """The crash every CUDA run hit at its first critic step: Beta levels drawn with the trainer's device generator."""
    from dmdr.schedules import DynaRSSampler, beta_levels

    g_dev = torch.Generator(device=DEV).manual_seed(3)
    g_cpu = torch.Generator().manual_seed(3)
    t = beta_levels(4.0, 1.5, 64, g_dev, 0.001, DEV)
    assert t.device.type == DEV and t.dtype == torch.float32
    assert torch.equal(t.cpu(), beta_levels(4.0, 1.5, 64, g_cpu, 0.001, "cpu"))
    sampler = DynaRSSampler(alpha=4.0, beta=1.5, decay_steps=10)
    assert sampler.sample(2, 8, g_dev, device=DEV).device.type == DEV
    # Without a generator the draw happens on the target device.
    assert beta_levels(2.0, 2.0, 4, None, 0.001, DEV).device.type == DEV


def test_every_generator_draw_of_one_training_iteration_uses_the_device(hostdev):
    """The step functions of dmdr/algorithm.py with a device generator: guidance, levels, renoise noise."""
    from dmdr.algorithm import draw_guidance, generator_input
    from dmdr.parameterization import FlowMatching
    from dmdr.schedules import few_step_timesteps

    g = torch.Generator(device=DEV).manual_seed(0)
    w = draw_guidance(4.0, 0.5, g)
    assert 3.5 <= w <= 4.5
    x0 = torch.randn(3, 4, 8, 8, generator=g, device=DEV)
    x_t, t = generator_input(x0, few_step_timesteps(4, 3.0), FlowMatching(t_min=0.001), g)
    assert x_t.device.type == DEV and t.device.type == DEV


def test_train_device_takes_the_registered_backend_and_names_it_when_refusing(hostdev, monkeypatch):
    from dmdr.distributed.env import init_distributed
    from dmdr.errors import ConfigError

    monkeypatch.setenv("WORLD_SIZE", "1")
    assert init_distributed(device=DEV).device == torch.device(DEV, 0)
    with pytest.raises(ConfigError, match="not one of auto, cpu, cuda, hostdev"):
        init_distributed(device="tpu")
