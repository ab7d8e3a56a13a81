"""FSDP2 for the denoisers (generator and frozen teacher) and the frozen encoders.

Order matters and is fixed here: optional per-block ``torch.compile`` first (the compiled block runs
inside its checkpoint, so the recompute is compiled too and the checkpoint's LoRA-scale context stays
eager), then activation checkpointing wraps the blocks, then ``fully_shard`` on every block and finally
on the root, so each block is one all-gather / reduce-scatter unit and the root holds the rest
(embeddings, final norm). The attention backend is set before any of it (:func:`dmdr.build.apply_attention`).
The same call works on a model built on the meta device (shard first, materialise after; see
:mod:`dmdr.distributed.meta_load`).

Checkpoint-wrapped blocks get a ``_checkpoint_wrapped_module`` level in their parameter names;
torch.distributed.checkpoint's state-dict helpers strip it, so checkpoints do not depend on the AC mode.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

from dmdr.config import ParallelConfig
from dmdr.devices import torch_dtype
from dmdr.distributed.mesh import fsdp_mesh
from dmdr.errors import ConfigError
from dmdr.models.lora import checkpoint_context_fn

log = logging.getLogger("dmdr")

def mixed_precision(parallel: ParallelConfig) -> MixedPrecisionPolicy:
    """bf16 all-gathered params and fp32 gradient reduction by default (``parallel.param_dtype``,
    ``parallel.reduce_dtype``)."""
    return MixedPrecisionPolicy(param_dtype=torch_dtype(parallel.param_dtype),
                                reduce_dtype=torch_dtype(parallel.reduce_dtype))


def _parents(root: nn.Module) -> dict[int, tuple[nn.Module, str]]:
    """``id(child) -> (parent, attribute name)`` for every submodule of ``root``."""
    out: dict[int, tuple[nn.Module, str]] = {}
    for module in root.modules():
        for name, child in module.named_children():
            out.setdefault(id(child), (module, name))
    return out


def apply_activation_checkpointing(root: nn.Module, blocks: list[nn.Module], mode: str,
                                   every: int = 1) -> list[nn.Module]:
    """Wrap blocks of ``root`` in non-reentrant checkpoint wrappers, in place in their parent.

    Args:
        root: the module that (transitively) holds the blocks.
        blocks: the repeated blocks, in forward order (e.g. ``Denoiser.blocks()``).
        mode: ``none``, ``full`` (every block) or ``every_k`` (blocks ``0, k, 2k, ...``).
        every: ``k`` for ``every_k``.

    Returns:
        The block list after wrapping (wrapped blocks replaced by their wrappers).
    """
    if mode not in ("none", "full", "every_k"):
        raise ConfigError(f"--parallel.activation_checkpointing {mode!r} is not one of none, full, every_k")
    if mode == "none" or not blocks:
        return list(blocks)
    if every < 1:
        raise ConfigError(f"--parallel.ac_every {every}: must be >= 1")
    parents = _parents(root)
    out = []
    for i, block in enumerate(blocks):
        if mode == "every_k" and i % every:
            out.append(block)
            continue
        if id(block) not in parents:
            raise ValueError(f"block {i} ({type(block).__name__}) is not inside {type(root).__name__}")
        parent, name = parents[id(block)]
        # context_fn: the recompute in backward must see the LoRA scales of the original forward.
        wrapped = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT,
                                     context_fn=checkpoint_context_fn)
        setattr(parent, name, wrapped)  # ModuleList supports setattr with its index names
        out.append(wrapped)
    return out


def shard_blocks_and_root(root: nn.Module, blocks: list[nn.Module], mesh: DeviceMesh,
                          mp_policy: MixedPrecisionPolicy, offload: OffloadPolicy | None = None) -> nn.Module:
    """``fully_shard`` each block, then the root (which takes every parameter not in a block)."""
    mesh = fsdp_mesh(mesh)
    offload = offload or OffloadPolicy()
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp_policy, offload_policy=offload)
    fully_shard(root, mesh=mesh, mp_policy=mp_policy, offload_policy=offload)
    return root


def parallelize_denoiser(denoiser: nn.Module, mesh: DeviceMesh | None, parallel: ParallelConfig, *,
                         trainable: bool, blocks: list[nn.Module] | None = None) -> nn.Module:
    """Optional per-block compile, activation checkpointing, then FSDP2 (blocks, then root), in place.

    Works on a materialised model or on one built on the meta device. Call it once per network:
    when the generator is the teacher's own network with a generator LoRA, parallelize only the teacher.

    Args:
        denoiser: a :class:`~dmdr.models.base.Denoiser` (anything with ``.blocks()``), LoRA already injected.
        mesh: from :func:`~dmdr.distributed.mesh.build_mesh`; ``None`` (one process) applies only AC/compile.
        parallel: the ``parallel`` config section.
        trainable: ``False`` for the frozen teacher: ``parallel.cpu_offload_teacher`` then applies.
            (Which parameters train is decided by ``requires_grad``: the teacher's critic LoRA trains,
            its base gets neither gradients nor optimizer state.)
        blocks: the repeated blocks; default ``denoiser.blocks()``.

    Returns:
        ``denoiser`` (same object; FSDP2 changes its class in place).
    """
    blocks = list(denoiser.blocks() if blocks is None else blocks)
    if parallel.compile:
        # Inside the checkpoint wrapper, not around it: dynamo accepts a checkpoint ``context_fn`` only
        # when it yields TorchDispatchModes, and ours restores the LoRA scales for the recompute.
        for block in blocks:
            block.compile(backend=parallel.compile_backend)  # in place: parameter names keep no ``_orig_mod``
    blocks = apply_activation_checkpointing(denoiser, blocks, parallel.activation_checkpointing,
                                            parallel.ac_every)
    if mesh is None:
        return denoiser
    offload: OffloadPolicy = OffloadPolicy()
    if not trainable and parallel.cpu_offload_teacher:
        if mesh.device_type == "cpu":
            log.info("parallel.cpu_offload_teacher: the run is on CPU already; nothing to offload")
        else:
            offload = CPUOffloadPolicy(pin_memory=True)
    return shard_blocks_and_root(denoiser, blocks, mesh, mixed_precision(parallel), offload)


def outer_block_lists(module: nn.Module) -> list[nn.ModuleList]:
    """The outermost ``nn.ModuleList`` s of ``module`` (the repeated layers of an encoder)."""
    found: list[nn.ModuleList] = []

    def visit(m: nn.Module) -> None:
        for child in m.children():
            if isinstance(child, nn.ModuleList) and len(child) > 1:
                found.append(child)
            else:
                visit(child)

    visit(module)
    return found


@contextmanager
def _keep_output_capturing(root: nn.Module) -> Iterator[None]:
    """Keep transformers' ``output_hidden_states`` working on models whose class FSDP2 swaps.

    transformers >= 5 records hidden states with hooks chosen from a registry keyed on the model's
    class name; ``fully_shard`` replaces the class with ``FSDP<Name>``, so the lookup would miss and
    ``hidden_states`` come back ``None`` (Z-Image's Qwen3 encoder reads ``hidden_states[-2]``). The
    entries are re-registered under the new classes. Internal API: skipped when it is not there.
    """
    try:
        from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY
    except ImportError:
        yield
        return
    entries = [(m, _CAN_RECORD_REGISTRY.get(m)) for m in root.modules()]
    try:
        yield
    finally:
        for m, entry in entries:
            if entry:
                _CAN_RECORD_REGISTRY[m] = entry


def prepare_frozen(module: nn.Module, mesh: DeviceMesh | None, parallel: ParallelConfig,
                   device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> nn.Module:
    """A never-trained model (text encoder, VAE, reward model): frozen, eval, replicated or sharded.

    ``parallel.frozen_encoders == "shard"`` (T5-XXL-sized encoders) shards every layer of its outermost
    ``ModuleList`` s and then the root with FSDP2; every rank must then call its forward together.
    ``"replicate"`` (or one process) keeps a full copy on every rank on ``device``.
    """
    module.requires_grad_(False)
    module.eval()
    if mesh is not None and parallel.frozen_encoders == "shard":
        blocks = [b for lst in outer_block_lists(module) for b in lst]
        mp = MixedPrecisionPolicy(param_dtype=dtype or torch_dtype(parallel.param_dtype))
        with _keep_output_capturing(module):
            return shard_blocks_and_root(module, blocks, mesh, mp)
    if any(p.is_meta for p in module.parameters()):
        return module  # materialised later by the loader, on ``device``
    return module.to(device=device, dtype=dtype) if dtype is not None else module.to(device)
