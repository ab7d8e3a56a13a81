"""Meta-device loading: a tiny diffusers SD3 transformer saved with save_pretrained loads into sharded
parameters (W=2) and into one process with exactly the saved weights and the same outputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import SD3Transformer2DModel
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from dmdr.config import ParallelConfig
from dmdr.distributed import (
    DistEnv,
    SafetensorsIndex,
    build_mesh,
    load_sharded_pretrained,
    meta_params,
    parallelize_denoiser,
    prepare_frozen,
    safetensors_files,
)
from dmdr.errors import ModelLoadError
from dmdr.models.lora import LoRALinear, inject_lora
from dmdr.models.sd3 import SD3Denoiser
from tests.distributed.dist_toy import run_workers

TINY = dict(num_layers=2, attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
            caption_projection_dim=16, pooled_projection_dim=32, out_channels=16, in_channels=16,
            sample_size=8, patch_size=2)
TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0"]


def _inputs() -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 16, 8, 8, generator=g)
    cond = {"prompt_embeds": torch.randn(2, 5, 32, generator=g),
            "pooled_prompt_embeds": torch.randn(2, 32, generator=g)}
    return x, torch.tensor([0.3, 0.8]), cond


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sd3")
    out = {}
    for name, extra in (("persistent", {}), ("computed", {"pos_embed_max_size": None})):
        torch.manual_seed(0)
        model = SD3Transformer2DModel(**TINY, **extra)
        model.save_pretrained(root / name)
        out[name] = root / name
    reloaded = SD3Transformer2DModel.from_pretrained(out["persistent"])
    reloaded.save_pretrained(root / "sharded", max_shard_size="20KB")
    out["sharded"] = root / "sharded"
    return out


def _build(folder: Path):
    config = SD3Transformer2DModel.load_config(folder)
    return lambda: SD3Transformer2DModel.from_config(config)


@pytest.mark.parametrize("name", ["persistent", "computed", "sharded"])
def test_single_process_load_equals_saved(saved, name):
    folder = saved[name]
    if name == "sharded":
        assert len(safetensors_files(folder)) > 1
    want = SD3Transformer2DModel.from_pretrained(folder)
    got = load_sharded_pretrained(_build(folder), folder)
    # Persistent buffers come from the file; the non-persistent pos_embed is recomputed at init.
    assert [n for n, _ in got.named_buffers()] == ["pos_embed.pos_embed"]
    want_sd, got_sd = want.state_dict(), got.state_dict()
    assert want_sd.keys() == got_sd.keys()
    for k in want_sd:
        assert torch.equal(want_sd[k], got_sd[k]), k
    torch.testing.assert_close(got.pos_embed.pos_embed, want.pos_embed.pos_embed, atol=0, rtol=0)
    x, t, cond = _inputs()
    with torch.no_grad():
        a = want(x, cond["prompt_embeds"], cond["pooled_prompt_embeds"], t * 1000).sample
        b = got(x, cond["prompt_embeds"], cond["pooled_prompt_embeds"], t * 1000).sample
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_lora_and_checkpoint_wrappers_map_to_file_names(saved):
    folder = saved["persistent"]

    def prepare(model):
        inject_lora(model.net, "critic", rank=4, alpha=4.0, targets=TARGETS)
        parallel = ParallelConfig(activation_checkpointing="full")
        return parallelize_denoiser(model, None, parallel, trainable=False)

    config = SD3Transformer2DModel.load_config(folder)
    got = load_sharded_pretrained(lambda: SD3Denoiser(SD3Transformer2DModel.from_config(config)), folder,
                                  prepare=prepare, prefix="net.")
    want = SD3Transformer2DModel.from_pretrained(folder).state_dict()
    n_lora = 0
    for name, p in got.named_parameters():
        key = name.removeprefix("net.").replace("_checkpoint_wrapped_module.", "").replace(".base.", ".")
        if "lora_" in name:
            n_lora += 1
            assert torch.isfinite(p).all() and (p.abs().sum() > 0) == ("lora_A" in name), name
        else:
            assert torch.equal(p, want[key]), name
    assert n_lora == 2 * 4 * 2  # (A, B) x 4 targets x 2 blocks
    # The same adapter draws the same init whatever the world size (seeded by name).
    again = load_sharded_pretrained(lambda: SD3Denoiser(SD3Transformer2DModel.from_config(config)),
                                    folder, prepare=prepare, prefix="net.")
    for (n, a), (_, b) in zip(got.named_parameters(), again.named_parameters()):
        assert torch.equal(a, b), n


def test_dtype_conversion_and_column_blocks(saved, tmp_path):
    folder = saved["persistent"]
    want = SD3Transformer2DModel.from_pretrained(folder, torch_dtype=torch.bfloat16).state_dict()
    got = load_sharded_pretrained(_build(folder), folder, dtype=torch.bfloat16).state_dict()
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    # A block that is not whole rows (another sharding than FSDP2's dim 0) reads the rows it spans.
    from safetensors.torch import save_file

    full = torch.arange(5 * 7 * 3, dtype=torch.float32).reshape(5, 7, 3)
    save_file({"w": full}, tmp_path / "w.safetensors")
    index = SafetensorsIndex([tmp_path / "w.safetensors"])
    out = torch.empty(2, 4, 3, dtype=torch.float64)
    index.read("w", out, offset=(1, 3, 0))
    index.close()
    torch.testing.assert_close(out, full[1:3, 3:7].double(), atol=0, rtol=0)


def test_meta_params_keeps_buffers_real():
    with meta_params():
        layer = LoRALinear(nn.Linear(4, 4), scales=None)  # type: ignore[arg-type]
        emb = nn.Embedding(3, 2)
        emb.register_buffer("table", torch.arange(3.0))
    assert layer.base.weight.is_meta and emb.weight.is_meta and not emb.table.is_meta
    assert torch.equal(emb.table, torch.arange(3.0))


def test_clear_errors(saved, tmp_path):
    with pytest.raises(ModelLoadError, match="neither a folder nor a .safetensors file"):
        safetensors_files(tmp_path / "nope")
    with pytest.raises(ModelLoadError, match=r"no .safetensors weights in"):
        safetensors_files(tmp_path)
    # A model of another config: the message names the file and the tensor.
    other = dict(TINY, num_attention_heads=4)
    with pytest.raises(ModelLoadError, match=r"model.safetensors: 'pos_embed.proj.weight' has shape"):
        load_sharded_pretrained(lambda: SD3Transformer2DModel(**other), saved["persistent"])
    # A parameter absent from the file (and not a LoRA adapter) is named.
    def bigger():
        model = SD3Transformer2DModel(**TINY)
        model.extra = nn.Linear(2, 2)
        return model

    with pytest.raises(ModelLoadError, match=r"weights for extra.weight, extra.bias are missing"):
        load_sharded_pretrained(bigger, saved["persistent"])
    # A truncated file.
    cut = tmp_path / "cut.safetensors"
    data = (saved["persistent"] / "diffusion_pytorch_model.safetensors").read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="cut.safetensors is truncated"):
        load_sharded_pretrained(_build(saved["persistent"]), [cut])


def _t5(folder: Path | None = None):
    from transformers import T5Config, T5EncoderModel

    if folder is None:
        torch.manual_seed(0)
        return T5EncoderModel(T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=2))
    return lambda: T5EncoderModel(T5Config.from_pretrained(folder))


@pytest.fixture(scope="module")
def t5_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("t5")
    _t5().save_pretrained(folder)
    return folder


def _check_frozen_encoder(folder: Path, mesh, mode: str) -> None:
    from transformers import T5EncoderModel

    want = T5EncoderModel.from_pretrained(folder).eval()
    parallel = ParallelConfig(frozen_encoders=mode)
    got = load_sharded_pretrained(_t5(folder), folder,
                                  prepare=lambda m: prepare_frozen(m, mesh, parallel, dtype=torch.float32))
    assert not got.training and not any(p.requires_grad for p in got.parameters())
    sharded = mesh is not None and mode == "shard"
    assert all(isinstance(p, DTensor) == sharded for p in got.parameters())
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = got(ids).last_hidden_state, want(ids).last_hidden_state
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_frozen_encoder_with_tied_embeddings_loads_replicated(t5_folder):
    _check_frozen_encoder(t5_folder, None, "replicate")


def _sharded_load(env: DistEnv, folder: str, t5_folder: str) -> None:
    torch.manual_seed(0)
    folder_p = Path(folder)
    mesh = build_mesh(ParallelConfig(), env.world_size)
    parallel = ParallelConfig(param_dtype="fp32", activation_checkpointing="full")

    def prepare(model):
        inject_lora(model.net, "critic", rank=4, alpha=4.0, targets=TARGETS)
        return parallelize_denoiser(model, mesh, parallel, trainable=False)

    config = SD3Transformer2DModel.load_config(folder_p)
    model = load_sharded_pretrained(lambda: SD3Denoiser(SD3Transformer2DModel.from_config(config)),
                                    folder_p, prepare=prepare, prefix="net.")
    want = SD3Transformer2DModel.from_pretrained(folder_p)
    want_sd = want.state_dict()
    local = total = 0
    for name, p in model.named_parameters():
        assert isinstance(p, DTensor), name
        local += p.to_local().numel()
        total += p.numel()
        full = p.full_tensor()
        if "lora_" not in name:
            key = name.removeprefix("net.").replace("_checkpoint_wrapped_module.", "").replace(".base.", ".")
            assert torch.equal(full, want_sd[key]), name
    assert local <= total // 2 + 64  # this rank holds its half (plus rounding of odd rows)
    x, t, cond = _inputs()
    with torch.no_grad():
        ref = want(x, cond["prompt_embeds"], cond["pooled_prompt_embeds"], t * 1000).sample
        out = model(x, t, cond, lora_scales={"critic": 1.0})  # B = 0: the adapter is a no-op
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    if t5_folder:  # a frozen text encoder sharded across the ranks (parallel.frozen_encoders = "shard")
        _check_frozen_encoder(Path(t5_folder), mesh, "shard")


@pytest.mark.parametrize("name", ["sharded", "computed"])
def test_sharded_load_equals_saved_weights(saved, t5_folder, name):
    run_workers(_sharded_load, str(saved[name]), str(t5_folder) if name == "sharded" else "")
