"""Re-turbo at W=2: teacher adapters merged into the FSDP2-sharded, meta-built teacher (each rank its own rows) and a
few-step LoRA as the generator adapter's init (or a full student folder as a full generator's) give exactly the W=1
parameters; the merged teacher differs from the plain one, so the match means something."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dmdr.build import build_models
from dmdr.config import TrainConfig
from dmdr.distributed import DistEnv, build_mesh
from dmdr.models.tiny import build_tiny_sd3
from dmdr.models.tiny_lora import write_random_lora
from tests.distributed.dist_toy import full_params, run_workers

pytestmark = pytest.mark.slow


def _cfg(path: str, mode: str, adapters: tuple[str, ...], init: str) -> TrainConfig:
    cfg = TrainConfig()
    cfg.model.path = path
    cfg.model.dtype = "bf16"
    cfg.model.generator_mode = mode
    cfg.model.generator_lora_rank, cfg.model.generator_lora_alpha = 3, 6.0
    cfg.model.critic_lora_rank, cfg.model.critic_lora_alpha = 5, 5.0
    cfg.model.max_sequence_length = 16
    cfg.model.teacher_adapters = adapters
    cfg.model.init_generator = init
    cfg.parallel.param_dtype = "fp32"
    return cfg


def _workers(env: DistEnv, path: str, style: str, turbo: str, student: str) -> None:
    mesh = build_mesh(TrainConfig().parallel, env.world_size)
    cpu = torch.device("cpu")
    weights = load_file(Path(path) / "transformer" / "diffusion_pytorch_model.safetensors")
    for mode, init in (("lora", turbo), ("full", student)):
        cfg = _cfg(path, mode, (f"{style}:0.6",), init)
        plain_b, plain_g, _ = build_models(cfg, cpu, None, load_text_encoder=False)
        shard_b, shard_g, _ = build_models(cfg, cpu, mesh, load_text_encoder=False)
        nets = [(plain_b.teacher, shard_b.teacher)] + ([(plain_g, shard_g)] if mode == "full" else [])
        for plain, sharded in nets:
            want, got = full_params(plain), full_params(sharded)
            assert want.keys() == got.keys()
            for name, w in want.items():
                assert torch.equal(got[name], w), (mode, name)
        after = full_params(plain_b.teacher)
        changed = [n for n, w in after.items() if ".lora_" not in n and not torch.equal(
            w, weights[n.removeprefix("net.").replace(".base.", ".")].to(w.dtype))]
        assert changed and all("attn" in n for n in changed), changed  # only the adapted projections moved
        if mode == "lora":
            inits = [n for n in after if n.endswith(".lora_B.generator") and after[n].abs().sum() > 0]
            assert inits  # the generator adapter starts at the few-step LoRA, not at B = 0
    torch.distributed.barrier()


def test_sharded_merge_equals_single_process(tmp_path: Path):
    model = build_tiny_sd3(tmp_path / "sd3")
    style = write_random_lora(model, tmp_path / "style", rank=2, alpha=2.0, targets=("to_q", "to_v"), seed=1)
    turbo = write_random_lora(model, tmp_path / "turbo", rank=3, alpha=6.0,
                              targets=("attn.to_q", "attn.to_k"), seed=2)
    student = build_tiny_sd3(tmp_path / "student", seed=1)  # another model of the same architecture
    run_workers(_workers, str(model), str(style), str(turbo), str(student))
