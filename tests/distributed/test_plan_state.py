"""The planner's parameter / gradient / AdamW bytes per rank against a measured run (issue 14).

``dmdr.build.build_models`` builds the tiny SD3 run (teacher, LoRA or full-copy generator, critic LoRA,
text encoders, VAE) at W=1 and sharded at W=2 (gloo); one generator backward and one critic backward
fill both roles' gradients, one AdamW step each their moments. What each rank holds (local shards of
DTensors, as benchmarks/memory.py measures it) must be within 10% of
:func:`dmdr.planning.memory.state_bytes` for that layout.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

from dmdr.build import build_models, collect_roles
from dmdr.config import TrainConfig
from dmdr.distributed import build_mesh
from dmdr.models.tiny import build_tiny_sd3
from dmdr.planning.memory import Layout, state_bytes
from dmdr.planning.specs import build_model_spec
from tests.distributed.dist_toy import run_workers

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return build_tiny_sd3(tmp_path_factory.mktemp("plan-state") / "sd3")


def _cfg(path: Path, mode: str) -> TrainConfig:
    cfg = TrainConfig()
    cfg.model.path = str(path)
    cfg.model.dtype = "bf16"  # base weights bf16, adapters / full copy fp32: the byte counts must tell them apart
    cfg.model.generator_mode = mode
    cfg.model.generator_lora_rank, cfg.model.generator_lora_alpha = 5, 10.0  # odd: FSDP2 pads the shards
    cfg.model.critic_lora_rank, cfg.model.critic_lora_alpha = 3, 3.0
    cfg.model.max_sequence_length = 16
    cfg.model.resolution = 16
    cfg.parallel.param_dtype = "fp32"
    cfg.rl.method = "none"
    return cfg


def _local(t: Tensor) -> Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _nbytes(t: Tensor) -> int:
    t = _local(t)
    return t.numel() * t.element_size()


def measure(cfg: TrainConfig, mesh) -> dict[str, int]:
    """Build the run, fill both roles' gradients and optimizer states, and count what this rank holds."""
    from dmdr.models import CRITIC

    backbone, generator, adapter = build_models(cfg, torch.device("cpu"), mesh)
    roles = collect_roles(generator, backbone.teacher, adapter)
    opts = [torch.optim.AdamW(roles.generator_params, lr=1e-6), torch.optim.AdamW(roles.critic_params, lr=1e-6)]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 8, 8, generator=g)
    t = torch.tensor([0.3, 0.7])
    cond = {"prompt_embeds": torch.randn(2, 77 + 16, 32, generator=g),
            "pooled_prompt_embeds": torch.randn(2, 32, generator=g)}
    roles.generator_fn(x, t, cond).pow(2).mean().backward()
    roles.critic_fn(x, t, cond, 1.0).pow(2).mean().backward()
    for opt in opts:
        opt.step()  # grads kept: both roles' gradients at once
    nets = {id(p): p for net in {id(backbone.teacher): backbone.teacher, id(generator): generator}.values()
            for p in net.parameters()}
    frozen = [m for m in backbone.text_encoder.modules()] + [backbone.codec.vae]
    # AdamW's ``step`` counters are host scalars on GPUs too: not device memory.
    moments = [v for opt in opts for s in opt.state.values() for k, v in s.items() if k != "step"]
    del CRITIC
    return {"params": sum(_nbytes(p) for p in nets.values()),
            "grads": sum(_nbytes(p.grad) for p in nets.values() if p.grad is not None),
            "optimizer": sum(_nbytes(v) for v in moments),
            "frozen": sum(_nbytes(p) for m in frozen for p in m.parameters())}


def _planned(cfg: TrainConfig, world: int) -> dict[str, int]:
    st = state_bytes(build_model_spec(cfg), cfg, Layout.of(cfg, world))
    return {"params": st.params, "grads": st.grads, "optimizer": st.optimizer, "frozen": st.frozen}


def _check(measured: dict[str, int], planned: dict[str, int]) -> None:
    for key, value in measured.items():
        assert value > 0, key
        assert abs(planned[key] - value) <= 0.10 * value, (key, planned[key], value)


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_state_bytes_match_measured_w1(folder, mode):
    cfg = _cfg(folder, mode)
    _check(measure(cfg, None), _planned(cfg, 1))


def _rank(env, path: str, mode: str, out: str) -> None:
    cfg = _cfg(Path(path), mode)
    mesh = build_mesh(cfg.parallel, env.world_size)
    Path(out, f"{mode}-{env.rank}.json").write_text(json.dumps(measure(cfg, mesh)))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["lora", "full"])
def test_state_bytes_match_measured_w2(folder, tmp_path, mode):
    run_workers(_rank, str(folder), mode, str(tmp_path))
    ranks = [json.loads((tmp_path / f"{mode}-{r}.json").read_text()) for r in range(2)]
    measured = {k: max(r[k] for r in ranks) for k in ranks[0]}  # the planner counts the largest shard (rank 0)
    planned = _planned(_cfg(folder, mode), 2)
    _check(measured, planned)
    one = _planned(_cfg(folder, mode), 1)
    assert planned["optimizer"] < 0.6 * one["optimizer"]  # sharded, not replicated
