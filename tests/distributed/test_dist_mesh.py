"""Mesh shapes and FSDP2/HSDP placements for 8 ranks, with the fake process group (one process)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import Replicate, Shard
from torch.testing._internal.distributed.fake_pg import FakeStore

from dmdr.config import ParallelConfig
from dmdr.distributed import DistEnv, build_mesh, init_distributed, parallelize_denoiser, resolve_dp
from dmdr.errors import ConfigError
from tests.distributed.dist_toy import toy_model


@pytest.fixture
def fake_world():
    """Rank 3 of a fake 8-rank world (collectives are no-ops)."""
    dist.init_process_group("fake", store=FakeStore(), rank=3, world_size=8)
    yield
    dist.destroy_process_group()


def test_resolve_dp_and_errors():
    assert resolve_dp(ParallelConfig(dp_replicate=2, dp_shard=-1), 8) == (2, 4)
    assert resolve_dp(ParallelConfig(), 8) == (1, 8)
    assert resolve_dp(ParallelConfig(), 1) == (1, 1)
    with pytest.raises(ConfigError, match=r"2 x 3 = 6 != world size 8"):
        resolve_dp(ParallelConfig(dp_replicate=2, dp_shard=3), 8)
    with pytest.raises(ConfigError, match="dp_replicate 3 does not divide the world size 8"):
        resolve_dp(ParallelConfig(dp_replicate=3), 8)


def test_single_process_has_no_mesh_and_no_group(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    env = init_distributed(device="cpu")
    assert (env.rank, env.world_size, env.is_main, env.is_distributed) == (0, 1, True, False)
    assert build_mesh(ParallelConfig(), env.world_size) is None
    assert env.any_rank(True) and not env.any_rank(False) and env.broadcast_object({"a": 1}) == {"a": 1}
    env.barrier()
    env.destroy()
    assert not dist.is_initialized()


@pytest.mark.parametrize(("rep", "shard"), [(2, 4), (4, 2), (1, 8)])
def test_hsdp_mesh_and_placements(fake_world, rep, shard):
    mesh = build_mesh(ParallelConfig(dp_replicate=rep, dp_shard=-1), 8)
    assert mesh.mesh_dim_names == ("dp_replicate", "dp_shard")
    assert tuple(mesh.shape) == (rep, shard)
    # Rank 3: row 3 // shard of the replicas, column 3 % shard of the shard group.
    assert tuple(mesh.get_coordinate()) == (3 // shard, 3 % shard)
    assert mesh["dp_shard"].size() == shard and mesh["dp_replicate"].size() == rep
    model = toy_model(lora=True, dim=64, depth=2)
    parallelize_denoiser(model, mesh, ParallelConfig(dp_replicate=rep), trainable=False)
    want = (Replicate(), Shard(0)) if rep > 1 else (Shard(0),)
    for name, p in model.named_parameters():
        assert tuple(p.placements) == want, name
        assert p.device_mesh.ndim == len(want)
        rows = p.shape[0]
        chunk = -(-rows // shard)  # torch.chunk sizes: ceil, the last shards may be short or empty
        start = (3 % shard) * chunk
        assert p.to_local().shape[0] == max(0, min(chunk, rows - start)), name
    # DistEnv sees the fake world through the default group.
    env = DistEnv(rank=3, world_size=8)
    assert env.is_distributed and env.any_rank(True)


def test_mesh_rejects_a_bad_product(fake_world):
    with pytest.raises(ConfigError, match="!= world size 8"):
        build_mesh(ParallelConfig(dp_replicate=2, dp_shard=2), 8)


def test_bf16_model_shards_in_its_storage_dtype(fake_world):
    mesh = build_mesh(ParallelConfig(), 8)
    model = toy_model(lora=False).to(torch.bfloat16)
    parallelize_denoiser(model, mesh, ParallelConfig(activation_checkpointing="none"), trainable=True)
    assert all(p.dtype == torch.bfloat16 and p.to_local().dtype == torch.bfloat16 for p in model.parameters())


def test_compile_is_per_block_and_keeps_names(fake_world):
    mesh = build_mesh(ParallelConfig(), 8)
    model = toy_model(lora=True)
    names = [n for n, _ in model.named_parameters()]
    parallelize_denoiser(model, mesh, ParallelConfig(compile=True, activation_checkpointing="none"),
                         trainable=False)
    assert all(block._compiled_call_impl is not None for block in model.net.blocks)
    assert model._compiled_call_impl is None  # the root stays eager
    assert [n for n, _ in model.named_parameters()] == names  # no _orig_mod level in checkpoints
