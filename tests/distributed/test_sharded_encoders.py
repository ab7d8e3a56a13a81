"""Frozen text encoders sharded with FSDP2 (``parallel.frozen_encoders=shard``) encode exactly as replicated ones."""

from __future__ import annotations

import pytest
import torch

from dmdr.config import TrainConfig
from tests.distributed.dist_toy import run_workers

pytestmark = pytest.mark.slow


def _check(env, model_path: str) -> None:
    from torch.distributed.tensor import DTensor

    from dmdr.build import prepare_text_encoders
    from dmdr.distributed import build_mesh
    from dmdr.models import load_backbone

    cfg = TrainConfig()
    cfg.model.dtype = "fp32"
    cfg.parallel.frozen_encoders = "shard"
    prompts = [f"rank {env.rank} prompt {i}" for i in range(3)]
    backbone = load_backbone(model_path, dtype=torch.float32, load_text_encoder=True, max_sequence_length=16)
    replicated = backbone.text_encoder.encode(prompts)
    prepare_text_encoders(cfg, backbone, build_mesh(cfg.parallel, env.world_size), env.device)
    params = [p for m in backbone.text_encoder.modules() for p in m.parameters()]
    assert params and all(isinstance(p, DTensor) for p in params)
    sharded = backbone.text_encoder.encode(prompts)  # ranks encode different prompts in lockstep
    assert replicated.keys() == sharded.keys()
    for k in replicated:
        torch.testing.assert_close(sharded[k], replicated[k], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["sd3", "zimage"])
def test_sharded_text_encoders_equal_replicated(family, tmp_path):
    from dmdr.models.tiny import build_tiny

    path = build_tiny(family, tmp_path / family)
    run_workers(_check, str(path))
