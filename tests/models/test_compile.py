"""Compiled blocks with LoRA: DynaDG's changing real scale neither recompiles nor breaks the graph.

ALGORITHM.md: the LoRA scale is a runtime scalar, and changing it must not recompile. The per-block
``torch.compile`` of ``parallel.compile`` is exercised here with the ``aot_eager`` backend (dynamo's
tracing and guards plus AOTAutograd's backward, without inductor's minute-long CPU codegen; an
inductor run is the same graphs): on bare blocks, and as training builds them — attention backend set,
then ``parallelize_denoiser`` (activation checkpointing, compile, FSDP2 on a one-rank gloo mesh).
"""

import contextlib

import pytest
import torch
import torch._dynamo
import torch.distributed as dist
from torch._dynamo.utils import counters
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from dmdr.config import ParallelConfig
from dmdr.distributed import parallelize_denoiser
from dmdr.distributed.mesh import MESH_DIMS
from dmdr.models import CRITIC, GENERATOR, add_critic_lora, cat_conditioning, make_generator
from dmdr.models.base import repeat_conditioning
from dmdr.models.lora import lora_parameters

pytestmark = pytest.mark.slow


def _step(b, generator, x, t, cond, s_r):
    """The trainer's three call patterns: 3x batch at per-sample scales, the fake score, the generator."""
    batch = cat_conditioning([repeat_conditioning(b.text_encoder.negative(), len(x)), cond, cond])
    scales = torch.tensor([s_r] * 2 * len(x) + [2.0] * len(x))
    with torch.no_grad():
        scores = b.teacher(torch.cat([x, x, x]), torch.cat([t, t, t]), batch,
                           lora_scales={GENERATOR: 0.0, CRITIC: scales})
    fake = b.teacher(x, t, cond, lora_scales={GENERATOR: 0.0, CRITIC: 2.0})
    gen = generator(x, t, cond, lora_scales={GENERATOR: 1.0, CRITIC: 0.0})
    (fake.square().mean() + gen.square().mean()).backward()
    grads = [_local(p.grad).clone() for p in lora_parameters(b.teacher.net, CRITIC)
             + lora_parameters(b.teacher.net, GENERATOR)]
    b.teacher.zero_grad(set_to_none=True)
    return scores, fake.detach(), gen.detach(), grads


def _local(t):
    return t.to_local() if isinstance(t, DTensor) else t  # one rank: the local shard is the whole tensor


def _roles(load, family):
    b = load(family)
    generator, _ = make_generator(b, "lora", rank=4, alpha=8)
    add_critic_lora(b, rank=4, alpha=4)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in lora_parameters(b.teacher.net, GENERATOR) + lora_parameters(b.teacher.net, CRITIC):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    cond = b.text_encoder.encode(["a red cube", "a blue sphere"])
    x = torch.randn(2, 16, 8, 8, generator=g)
    t = torch.tensor([0.3, 0.8])
    return b, generator, x, t, cond


REAL_SCALES = [0.5, 0.41, 0.13, 0.0]


def _compiled_equal_eager(b, generator, x, t, cond, eager, real_scales=REAL_SCALES):
    """Run the steps compiled; no recompile after the first, no graph break, results equal to eager."""
    compiled = []
    for i, s in enumerate(real_scales):
        compiled.append(_step(b, generator, x, t, cond, s))
        if i == 0:
            graphs = counters["stats"]["unique_graphs"]
            assert graphs > 0  # the blocks really were compiled
    assert counters["stats"]["unique_graphs"] == graphs, "a new real scale recompiled a block"
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    for (se, fe, ge, gre), (sc, fc, gc, grc) in zip(eager, compiled):
        for a, c in ((se, sc), (fe, fc), (ge, gc), *zip(gre, grc)):
            torch.testing.assert_close(c, a, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["sd3", "zimage"])
def test_compiled_blocks_reuse_their_graphs_across_real_scales(load, family, one_thread):
    b, generator, x, t, cond = _roles(load, family)
    eager = [_step(b, generator, x, t, cond, s) for s in REAL_SCALES]
    torch._dynamo.reset()
    counters.clear()
    for block in b.teacher.blocks():
        block.compile(backend="aot_eager")
    _compiled_equal_eager(b, generator, x, t, cond, eager)
    torch._dynamo.reset()


@contextlib.contextmanager
def _one_rank_mesh():
    """A one-rank gloo process group (in-process store) and dmdr's 2-D mesh over it."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1, 1), mesh_dim_names=MESH_DIMS)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("family", ["sd3", "zimage"])
def test_compile_with_fsdp2_activation_checkpointing_and_the_attention_backend(load, family, one_thread):
    b, generator, x, t, cond = _roles(load, family)
    b.teacher.set_attention_backend("native")  # as build_models does, before any wrapper
    eager = [_step(b, generator, x, t, cond, s) for s in REAL_SCALES]
    parallel = ParallelConfig(param_dtype="fp32", activation_checkpointing="full", compile=True,
                              compile_backend="aot_eager")
    torch._dynamo.reset()
    counters.clear()
    with _one_rank_mesh() as mesh:
        parallelize_denoiser(b.teacher, mesh, parallel, trainable=False)
        assert all(type(block).__name__ == "FSDPCheckpointWrapper" for block in b.teacher.blocks())
        _compiled_equal_eager(b, generator, x, t, cond, eager)
    torch._dynamo.reset()
