"""Sharded model building (issue 3): at W=2 ``build_models`` builds the teacher and the generator on the
meta device, shards them and reads each rank's rows, and the gathered parameters equal the W=1 plain
path's exactly (base weights and LoRA initialisations, full-copy and LoRA generators, SD3, Z-Image
and SDXL), with the same forwards; each rank keeps only its own rows (peak memory: benchmarks/memory.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, distribute_tensor

from dmdr.build import build_models
from dmdr.config import TrainConfig
from dmdr.distributed import DistEnv, build_mesh
from dmdr.errors import ModelLoadError
from dmdr.models import CRITIC, GENERATOR, load_backbone
from dmdr.models.base import Denoiser
from dmdr.models.loading import load_text_encoders
from dmdr.models.lora import lora_layers
from dmdr.models.tiny import build_tiny_sd3, build_tiny_sdxl, build_tiny_zimage
from tests.distributed.dist_toy import clean_name, full_params, run_workers

# (family, generator mode, model dtype): fp32 cases also compare forwards; the bf16 case checks that
# the fp32 full copy holds the bf16 teacher's values (files are fp32) and that the base stays bf16.
CASES = [("sd3", "full", "fp32"), ("sd3", "lora", "fp32"), ("zimage", "full", "fp32"),
         ("zimage", "lora", "fp32"), ("sd3", "full", "bf16"), ("sdxl", "full", "fp32"), ("sdxl", "lora", "fp32")]
CHANNELS = {"sd3": 16, "zimage": 16, "sdxl": 4}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sharded")
    return {"sd3": build_tiny_sd3(root / "sd3"), "zimage": build_tiny_zimage(root / "zimage"),
            "sdxl": build_tiny_sdxl(root / "sdxl")}


def _cfg(path: Path, mode: str, dtype: str) -> TrainConfig:
    cfg = TrainConfig()
    cfg.model.path = str(path)
    cfg.model.dtype = dtype
    cfg.model.generator_mode = mode
    # Odd ranks: FSDP2 pads the (rank, in) A matrices unevenly across the two ranks.
    cfg.model.generator_lora_rank, cfg.model.generator_lora_alpha = 3, 6.0
    cfg.model.critic_lora_rank, cfg.model.critic_lora_alpha = 5, 5.0
    cfg.model.max_sequence_length = 16
    cfg.parallel.param_dtype = "fp32"
    cfg.train.seed = 1234
    return cfg


def _cond(family: str, n: int = 2) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(5)
    if family == "sd3":
        return {"prompt_embeds": torch.randn(n, 77 + 16, 32, generator=g),
                "pooled_prompt_embeds": torch.randn(n, 32, generator=g)}
    if family == "sdxl":
        return {"prompt_embeds": torch.randn(n, 77, 32, generator=g),
                "pooled_prompt_embeds": torch.randn(n, 16, generator=g)}
    mask = torch.arange(16)[None, :] < torch.tensor([9, 16][:n])[:, None]
    return {"prompt_embeds": torch.randn(n, 16, 32, generator=g) * mask[..., None], "prompt_mask": mask}


@torch.no_grad()
def _set_lora_b(net: nn.Module) -> None:
    """Non-zero ``lora_B`` (a function of the name) so the adapters change the forwards."""
    for name, layer in lora_layers(net):
        for adapter, p in layer.lora_B.items():
            g = torch.Generator().manual_seed(len(name) * 31 + len(adapter))
            full = torch.randn(p.shape, generator=g) * 0.1
            if isinstance(p, DTensor):
                p.to_local().copy_(distribute_tensor(full, p.device_mesh, p.placements).to_local())
            else:
                p.copy_(full)


def _forwards(family: str, teacher: Denoiser, generator: Denoiser, adapter: str | None) -> list[Tensor]:
    _set_lora_b(teacher.net)
    x = torch.randn(2, CHANNELS[family], 8, 8, generator=torch.Generator().manual_seed(3))
    t, cond = torch.tensor([0.3, 0.8]), _cond(family)
    others = {GENERATOR: 0.0} if adapter else {}
    with torch.no_grad():
        out = [teacher(x, t, cond, lora_scales={CRITIC: torch.tensor([0.5, 2.0]), **others})]
        scales = {GENERATOR: 1.0, CRITIC: 0.0} if adapter else None
        out.append(generator(x, t, cond, lora_scales=scales))
    return out


def _check_case(env: DistEnv, mesh, path: str, family: str, mode: str, dtype: str) -> None:
    cfg = _cfg(Path(path), mode, dtype)
    cpu = torch.device("cpu")
    plain_b, plain_g, plain_a = build_models(cfg, cpu, None, load_text_encoder=False)
    shard_b, shard_g, shard_a = build_models(cfg, cpu, mesh, load_text_encoder=False)
    assert plain_a == shard_a == (GENERATOR if mode == "lora" else None)
    base_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    nets = [("teacher", plain_b.teacher, shard_b.teacher)]
    if mode == "full":
        nets.append(("generator", plain_g, shard_g))
    for role, plain, sharded in nets:
        want = full_params(plain)
        flags = {clean_name(n): p.requires_grad for n, p in plain.named_parameters()}
        local = most = 0
        got_flags = {}
        for name, p in sharded.named_parameters():
            assert isinstance(p, DTensor), (role, name)  # every parameter sharded, none replicated
            local += p.to_local().numel()
            most += -(-p.shape[0] // env.world_size) * (p.numel() // max(p.shape[0], 1))  # ceil(rows / W)
            got_flags[clean_name(name)] = p.requires_grad
        got = full_params(sharded)  # collective: every rank gathers every parameter
        assert got.keys() == want.keys(), (role, set(got) ^ set(want))
        n_lora = 0
        for name, w in want.items():
            g = got[name]
            assert g.dtype == w.dtype and torch.equal(g, w), (family, mode, dtype, role, name)
            if "lora_" in name:
                n_lora += 1
                assert w.dtype == torch.float32
                assert (w.abs().sum() > 0) == (".lora_A." in name), name  # A drawn, B zero
            elif role == "teacher":
                assert w.dtype == base_dtype, name
            else:
                assert w.dtype == torch.float32, name  # fp32 master weights of the full copy
        assert n_lora == (0 if role == "generator" else 2 * len(list(lora_layers(plain.net))) * (
            2 if mode == "lora" else 1))
        assert got_flags == flags, role
        want_bufs = {clean_name(n): b for n, b in plain.named_buffers()}
        got_bufs = {clean_name(n): b for n, b in sharded.named_buffers()}
        assert got_bufs.keys() == want_bufs.keys(), role
        for name, w in want_bufs.items():
            assert got_bufs[name].dtype == w.dtype and torch.equal(got_bufs[name], w), (role, name)
        assert local <= most, (role, local, most)  # this rank holds its rows only (1/W, rounded up)
    if dtype == "fp32":
        for a, b in zip(_forwards(family, plain_b.teacher, plain_g, plain_a),
                        _forwards(family, shard_b.teacher, shard_g, shard_a)):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def _workers(env: DistEnv, paths: dict[str, str]) -> None:
    mesh = build_mesh(TrainConfig().parallel, env.world_size)
    for family, mode, dtype in CASES:
        _check_case(env, mesh, paths[family], family, mode, dtype)
    # Both ranks past their last gather before either tears the gloo group down (an early teardown
    # aborted the other rank now and then).
    torch.distributed.barrier()


def test_sharded_build_equals_single_process(folders):
    run_workers(_workers, {k: str(v) for k, v in folders.items()})


def test_deferred_backbone_holds_no_weights(folders):
    """``defer_denoiser``: the transformer's parameters are on meta, its buffers real; the rest loads."""
    for path in folders.values():
        b = load_backbone(path, dtype=torch.bfloat16, load_text_encoder=False, defer_denoiser=True)
        params = list(b.teacher.parameters())
        assert params and all(p.is_meta and p.dtype == torch.bfloat16 for p in params)
        assert all(not buf.is_meta for buf in b.teacher.buffers())
        assert b.extras["denoiser_weights"] == Path(path) / ("unet" if b.family == "sdxl" else "transformer")
        assert not any(p.is_meta for p in b.codec.vae.parameters())


def test_text_encoders_alone_equal_the_backbones(folders, tmp_path):
    """``load_text_encoders`` reads no transformer or VAE weights and encodes as the backbone's encoder."""
    for path in folders.values():
        full = load_backbone(path, dtype=torch.float32, max_sequence_length=16).text_encoder
        alone = load_text_encoders(path, dtype=torch.float32, max_sequence_length=16)
        a, b = full.encode(["a red cube"]), alone.encode(["a red cube"])
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # No denoiser or VAE weights needed: a folder whose transformer weights are gone still works...
    import shutil

    copy = shutil.copytree(folders["sd3"], tmp_path / "sd3")
    for f in (copy / "transformer").glob("*.safetensors"):
        f.unlink()
    load_text_encoders(copy, dtype=torch.float32, max_sequence_length=16)
    # ... while the deferred loader fails at once, naming the folder (it reads safetensors only).
    (copy / "transformer" / "diffusion_pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ModelLoadError, match=r"no .safetensors weights in .*transformer"):
        load_backbone(copy, dtype=torch.float32, load_text_encoder=False, defer_denoiser=True)
    for f in (copy / "vae").glob("*.safetensors"):
        f.unlink()
    load_text_encoders(copy, dtype=torch.float32, max_sequence_length=16)
