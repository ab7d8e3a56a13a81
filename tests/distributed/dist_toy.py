"""Test support for tests/distributed: a tiny transformer-ish Denoiser and a 2-process gloo launcher."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dmdr.distributed import DistEnv, collect_released_objects, init_distributed
from dmdr.models.base import Denoiser
from dmdr.models.lora import inject_lora, lora_parameters
from dmdr.parameterization import FlowMatching

CHANNELS = 6


class ToyBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_out = nn.Linear(dim, dim)
        self.ff = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.norm(x) + emb
        x = x + self.to_out(F.silu(self.to_q(h)) * self.to_v(h))
        return x + self.ff(x)


class ToyNet(nn.Module):
    def __init__(self, dim: int = 32, depth: int = 3, channels: int = CHANNELS):
        super().__init__()
        self.proj_in = nn.Linear(channels, dim)
        self.time = nn.Linear(1, dim)
        self.cond = nn.Linear(8, dim)
        self.blocks = nn.ModuleList(ToyBlock(dim) for _ in range(depth))
        self.proj_out = nn.Linear(dim, channels)

    def forward(self, x: Tensor, t: Tensor, c: Tensor) -> Tensor:
        h = self.proj_in(x)
        emb = self.time(t[:, None]) + self.cond(c)
        for block in self.blocks:
            h = block(h, emb)
        return self.proj_out(h)


class ToyDenoiser(Denoiser):
    def __init__(self, dim: int = 32, depth: int = 3):
        super().__init__(ToyNet(dim, depth), FlowMatching())

    def predict(self, x_t: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        return self.net(x_t, t, cond["emb"])

    def blocks(self) -> list[nn.Module]:
        return list(self.net.blocks)


def toy_model(lora: bool, seed: int = 0, dim: int = 32, depth: int = 3) -> ToyDenoiser:
    """A toy denoiser; with ``lora`` the base is frozen and a ``critic`` LoRA (non-zero B) trains."""
    torch.manual_seed(seed)
    model = ToyDenoiser(dim, depth)
    if lora:
        model.requires_grad_(False)
        inject_lora(model.net, "critic", rank=4, alpha=4.0, targets=["to_q", "to_v", "to_out"])
        for p in lora_parameters(model.net, "critic"):
            p.requires_grad_(True)
            nn.init.normal_(p, std=0.2)
        model.lora_scales.set(critic=1.0)
    return model


def toy_batch(step: int, n: int = 8) -> tuple[Tensor, Tensor, dict[str, Tensor], Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(n, CHANNELS, generator=g)
    t = torch.rand(n, generator=g)
    cond = {"emb": torch.randn(n, 8, generator=g)}
    target = torch.randn(n, CHANNELS, generator=g)
    return x, t, cond, target


def clean_name(name: str) -> str:
    return name.replace("_checkpoint_wrapped_module.", "")


def full_params(model: nn.Module) -> dict[str, Tensor]:
    """Every parameter as a full tensor (gathers DTensors; collective under FSDP2)."""
    out = {}
    for name, p in model.named_parameters():
        t = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[clean_name(name)] = t.detach().clone()
    return out


# ------------------------------------------------------------------------------------------------ #
# Launcher
# ------------------------------------------------------------------------------------------------ #

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn: Callable[..., Any], world: int, port: int, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    env: DistEnv = init_distributed(device="cpu")
    try:
        fn(env, *args)
        env.barrier()  # no rank tears its gloo pairs down while another still uses them
    finally:
        env.destroy()
    collect_released_objects()


def run_workers(fn: Callable[..., Any], *args: Any, world_size: int = 2) -> None:
    """Run ``fn(env, *args)`` on ``world_size`` gloo ranks; a failure on any rank fails the caller."""
    torch.multiprocessing.spawn(_entry, args=(fn, world_size, free_port(), args), nprocs=world_size,
                                join=True)
