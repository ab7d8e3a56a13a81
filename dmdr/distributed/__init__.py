"""The distributed layer: device mesh, FSDP2 + activation checkpointing + mixed precision,
meta-device sharded loading, DCP checkpoints, preemption and non-finite-step agreement.

Modules: :mod:`~dmdr.distributed.env` (ranks, process group), :mod:`~dmdr.distributed.mesh`,
:mod:`~dmdr.distributed.parallelize`, :mod:`~dmdr.distributed.meta_load`,
:mod:`~dmdr.distributed.state` (Stateful adapters), :mod:`~dmdr.distributed.checkpoint`,
:mod:`~dmdr.distributed.faults`.
"""

from dmdr.distributed.checkpoint import CheckpointManager, read_marker, verify_checkpoint
from dmdr.distributed.env import DistEnv, collect_released_objects, init_distributed
from dmdr.distributed.faults import PreemptionHandler, all_finite
from dmdr.distributed.mesh import build_mesh, fsdp_mesh, resolve_dp
from dmdr.distributed.meta_load import (
    SafetensorsIndex,
    default_init_missing,
    load_sharded_pretrained,
    materialize_from_safetensors,
    meta_params,
    safetensors_files,
)
from dmdr.distributed.parallelize import (
    apply_activation_checkpointing,
    mixed_precision,
    parallelize_denoiser,
    prepare_frozen,
    torch_dtype,
)
from dmdr.distributed.state import DataLoaderState, ModelOptimizerState, PerRank, RankLocal, RNGState

__all__ = [
    "DistEnv", "init_distributed", "collect_released_objects", "build_mesh", "fsdp_mesh", "resolve_dp",
    "parallelize_denoiser", "apply_activation_checkpointing", "prepare_frozen", "mixed_precision",
    "torch_dtype",
    "meta_params", "safetensors_files", "SafetensorsIndex", "materialize_from_safetensors",
    "load_sharded_pretrained", "default_init_missing",
    "ModelOptimizerState", "RNGState", "DataLoaderState", "PerRank", "RankLocal",
    "CheckpointManager", "verify_checkpoint", "read_marker",
    "PreemptionHandler", "all_finite",
]
