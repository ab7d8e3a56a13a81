"""The data-parallel device mesh: ``dp_replicate x dp_shard`` (HSDP across nodes, FSDP within one).

``dp_shard`` is the group a parameter is sharded over (put it inside a node, where the all-gathers
are fast); ``dp_replicate`` copies of that sharded model exchange gradients with an all-reduce.
``dp_replicate = 1`` is plain FSDP over all ranks.
"""

from __future__ import annotations

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from dmdr.config import ParallelConfig
from dmdr.errors import ConfigError

MESH_DIMS = ("dp_replicate", "dp_shard")


def resolve_dp(parallel: ParallelConfig, world_size: int) -> tuple[int, int]:
    """``(dp_replicate, dp_shard)`` with ``dp_shard = -1`` resolved; checks the product is the world size."""
    rep = parallel.dp_replicate
    if rep < 1:
        raise ConfigError(f"--parallel.dp_replicate {rep}: must be >= 1")
    shard = parallel.dp_shard
    if shard == -1:
        if world_size % rep:
            raise ConfigError(f"--parallel.dp_replicate {rep} does not divide the world size {world_size}; "
                              f"use a divisor of {world_size}")
        shard = world_size // rep
    if shard < 1 or rep * shard != world_size:
        raise ConfigError(f"--parallel.dp_replicate x --parallel.dp_shard = {rep} x {shard} = {rep * shard} "
                          f"!= world size {world_size}; set --parallel.dp_shard -1 to fill the world")
    return rep, shard


def build_mesh(parallel: ParallelConfig, world_size: int, device_type: str = "cpu") -> DeviceMesh | None:
    """The 2-D mesh ``("dp_replicate", "dp_shard")``, or ``None`` for a single process.

    Needs the default process group to be initialised when ``world_size > 1``.
    """
    rep, shard = resolve_dp(parallel, world_size)
    if world_size == 1:
        return None
    return init_device_mesh(device_type, (rep, shard), mesh_dim_names=MESH_DIMS)


def fsdp_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The mesh to hand ``fully_shard``: 2-D (HSDP) when there are replicas, else the 1-D shard mesh."""
    if mesh.mesh_dim_names == MESH_DIMS and mesh["dp_replicate"].size() == 1:
        return mesh["dp_shard"]
    return mesh
