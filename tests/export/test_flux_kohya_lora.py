"""FLUX.1's and FLUX.2's ``--lora-format kohya``: BFL's module names with the fused q/k/v (kohya's sd-scripts /
ComfyUI layout).

* the file's ``up @ down`` on each fused BFL linear is each diffusers part's ``B A`` in its rows (BFL's row order,
  zeros for the MLP rows of a single block's ``linear1``), checked in float64 on FLUX.1-dev's real widths;
* diffusers' own kohya-FLUX converter (``_convert_kohya_flux_lora_to_diffusers``, what ``FluxPipeline.
  load_lora_weights`` runs on such a file) gives back every module's weight change, on FLUX.1-dev's real widths;
* a tiny ``FluxPipeline`` loads the kohya file with ``load_lora_weights`` and its transformer equals the same
  pipeline with our diffusers-format file, and the base with ``B A`` merged by hand (fp32). The tiny LoRA covers the
  double-stream block only: diffusers 0.42's converter splits a single block's ``linear1`` at FLUX.1-dev's widths,
  written into it (``dims=[3072, 3072, 3072, 12288]``, asserted to sum to the file's rows), so no correct file of a
  narrower model's single blocks can pass it; the single blocks are checked by the converter at the real widths;
* FLUX.2 and Qwen-Image: the tiny ``Flux2KleinPipeline`` / ``QwenImagePipeline`` load the kohya file of a LoRA on
  every default target (FLUX.2's double and single blocks: diffusers' FLUX.2 converter has no fixed widths) and
  equal the diffusers-format file and the hand merge.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from dmdr.errors import ConfigError
from dmdr.export import release

pytestmark = pytest.mark.usefixtures("one_thread")

DOUBLE_PARTS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")
SINGLE_PARTS = ("attn.to_q", "attn.to_k", "attn.to_v")


def _layers(width: int, rank: int, single: bool = True, seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Random ``(A, B)`` on block 0's adapted projections (dmdr's default FLUX.1 targets), ``width`` wide."""
    g = torch.Generator().manual_seed(seed)
    names = [f"transformer_blocks.0.{p}" for p in DOUBLE_PARTS]
    names += [f"single_transformer_blocks.0.{p}" for p in SINGLE_PARTS] if single else []
    return {n: (torch.randn(rank, width, generator=g) / width ** 0.5, torch.randn(width, rank, generator=g))
            for n in names}


def _delta(pair) -> torch.Tensor:
    a, b = pair
    return b.double() @ a.double()


def test_fused_bfl_linears_carry_each_parts_weight_change():
    width, rank = 3072, 4  # FLUX.1-dev: 24 heads x 128; single-block MLP 4 x 3072
    layers = _layers(width, rank)
    state = release.kohya_state_dict(layers, "flux", torch.float32)
    modules = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in state}
    assert modules == {"lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_double_blocks_0_img_attn_proj",
                       "lora_unet_double_blocks_0_txt_attn_qkv", "lora_unet_double_blocks_0_txt_attn_proj",
                       "lora_unet_single_blocks_0_linear1"}

    def fused(key: str) -> torch.Tensor:
        down, up = state[f"{key}.lora_down.weight"], state[f"{key}.lora_up.weight"]
        assert state[f"{key}.alpha"].item() == down.shape[0]  # alpha = rank: every loader's scale is 1
        return up.double() @ down.double()

    def stacked(prefix: str, parts, extra_rows: int = 0) -> torch.Tensor:
        rows = [_delta(layers[f"{prefix}.{p}"]) for p in parts]
        return torch.cat(rows + [torch.zeros(extra_rows, width, dtype=torch.float64)])

    double, single = "transformer_blocks.0", "single_transformer_blocks.0"
    torch.testing.assert_close(fused("lora_unet_double_blocks_0_img_attn_qkv"), stacked(double, DOUBLE_PARTS[:3]))
    torch.testing.assert_close(fused("lora_unet_double_blocks_0_txt_attn_qkv"), stacked(double, DOUBLE_PARTS[4:7]))
    torch.testing.assert_close(fused("lora_unet_double_blocks_0_img_attn_proj"),
                               _delta(layers[f"{double}.attn.to_out.0"]))
    torch.testing.assert_close(fused("lora_unet_double_blocks_0_txt_attn_proj"),
                               _delta(layers[f"{double}.attn.to_add_out"]))
    torch.testing.assert_close(fused("lora_unet_single_blocks_0_linear1"), stacked(single, SINGLE_PARTS, 4 * width))


def test_diffusers_kohya_flux_converter_reads_back_every_module():
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    layers = _layers(3072, 4)
    converted = _convert_kohya_flux_lora_to_diffusers(dict(release.kohya_state_dict(layers, "flux", torch.float32)))
    got = {k[len("transformer."):-len(".lora_A.weight")]: (v, converted[k.replace(".lora_A.", ".lora_B.")])
           for k, v in converted.items() if ".lora_A." in k}
    for name, pair in layers.items():
        torch.testing.assert_close(_delta(got.pop(name)), _delta(pair), atol=1e-9, rtol=1e-9)
    # linear1's MLP rows: the converter gives proj_mlp the shared down and the zero rows of up
    assert set(got) <= {"single_transformer_blocks.0.proj_mlp"}
    assert all(not torch.any(_delta(pair)) for pair in got.values())


def test_a_module_without_a_bfl_name_is_one_line():
    with pytest.raises(ConfigError, match=r"'time_text_embed\.linear' has no BFL name"):
        release.kohya_state_dict({"time_text_embed.linear": (torch.ones(1, 2), torch.ones(2, 1))}, "flux",
                                 torch.float32)


@pytest.fixture(scope="module")
def tiny_flux(tmp_path_factory):
    from dmdr.models.tiny_flux import build_tiny_flux

    return build_tiny_flux(tmp_path_factory.mktemp("kohya-flux") / "flux")


def test_tiny_flux_pipeline_loads_the_kohya_file_as_the_diffusers_file(tiny_flux, tmp_path):
    from diffusers import FluxPipeline

    layers = _layers(32, 2, single=False)  # the tiny model: 2 heads x 16 (module doc: why double blocks only)
    release.write_lora(tmp_path, release.lora_state_dict(layers, "flux", torch.float32), {})
    kohya = release.write_lora(tmp_path, release.kohya_state_dict(layers, "flux", torch.float32), {},
                               name="kohya.safetensors")
    assert all(k.startswith("lora_unet_double_blocks_0_") for k in load_file(kohya))

    g = torch.Generator().manual_seed(3)
    inputs = {"hidden_states": torch.randn(2, 16, 64, generator=g),
              "encoder_hidden_states": torch.randn(2, 8, 32, generator=g),
              "pooled_projections": torch.randn(2, 16, generator=g), "timestep": torch.tensor([0.3, 0.8]),
              "guidance": torch.tensor([3.5, 3.5]), "img_ids": torch.rand(16, 3, generator=g) * 4,
              "txt_ids": torch.zeros(8, 3), "return_dict": False}

    def output(weight_name: str | None) -> torch.Tensor:
        pipe = FluxPipeline.from_pretrained(str(tiny_flux), local_files_only=True)
        if weight_name is not None:
            pipe.load_lora_weights(str(tmp_path), weight_name=weight_name)
        with torch.no_grad():
            return pipe.transformer(**inputs)[0]

    base, ours, theirs = output(None), output(release.LORA_FILE), output("kohya.safetensors")
    reference = FluxPipeline.from_pretrained(str(tiny_flux), local_files_only=True).transformer
    with torch.no_grad():
        for name, pair in layers.items():
            weight = reference.get_submodule(name).weight
            weight.copy_((weight.double() + _delta(pair)).float())
        merged = reference(**inputs)[0]
    torch.testing.assert_close(theirs, ours, atol=1e-6, rtol=0)
    torch.testing.assert_close(theirs, merged, atol=1e-5, rtol=0)
    assert (theirs - base).abs().max() > 1e-2  # the adapter changes the output: the match means something


KOHYA_MODULES = {
    "flux2": {"lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_double_blocks_0_img_attn_proj",
              "lora_unet_double_blocks_0_txt_attn_qkv", "lora_unet_double_blocks_0_txt_attn_proj",
              "lora_unet_single_blocks_0_linear1", "lora_unet_single_blocks_0_linear2"},
    "qwenimage": {f"lora_unet_transformer_blocks_{i}_attn_{m}" for i in (0, 1) for m in (
        "to_q", "to_k", "to_v", "to_out_0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")},
}
"""The kohya file's modules for the tiny models (FLUX.2: one double and one single block; Qwen-Image: two blocks):
FLUX.2's in BFL's names, Qwen-Image's in diffusers' (ComfyUI's Qwen-Image uses diffusers' names; diffusers' Qwen
converter reads them back)."""


@pytest.mark.parametrize("family", ["flux2", "qwenimage"])
def test_tiny_pipeline_loads_the_kohya_file_as_the_diffusers_file(family, tmp_path):
    """A LoRA on every default target of the tiny model (FLUX.2: double and single blocks; diffusers' FLUX.2
    converter has no fixed widths) read by ``load_lora_weights`` from the kohya file equals the diffusers file and the
    hand merge, through the family's denoiser."""
    from diffusers import DiffusionPipeline

    from dmdr.models.families import family_spec
    from dmdr.models.tiny import build_tiny

    fam = family_spec(family)
    folder = build_tiny(family, tmp_path / family)
    net = DiffusionPipeline.from_pretrained(str(folder), local_files_only=True).transformer
    g = torch.Generator().manual_seed(5)
    layers = {name: (torch.randn(2, m.in_features, generator=g) / m.in_features ** 0.5,
                     torch.randn(m.out_features, 2, generator=g))
              for name, m in net.named_modules()
              if isinstance(m, torch.nn.Linear) and name.endswith(tuple(f".{t}" for t in fam.lora_targets))}
    lora_dir = tmp_path / "lora"
    lora_dir.mkdir()
    release.write_lora(lora_dir, release.lora_state_dict(layers, family, torch.float32), {})
    kohya = release.write_lora(lora_dir, release.kohya_state_dict(layers, family, torch.float32), {},
                               name="kohya.safetensors")
    assert {k.split(".")[0] for k in load_file(kohya)} == KOHYA_MODULES[family]

    text = torch.randn(2, 8, net.config.joint_attention_dim, generator=g)
    cond = {"prompt_embeds": text, "prompt_mask": torch.ones(2, 8, dtype=torch.bool)}
    x, t = torch.randn(2, 64 if family == "flux2" else 16, 4, 4, generator=g), torch.tensor([0.3, 0.8])

    def output(transformer) -> torch.Tensor:
        with torch.no_grad():
            return fam.denoiser_class(transformer)(x, t, cond)

    def loaded(weight_name: str | None) -> torch.Tensor:
        pipe = DiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
        if weight_name is not None:
            pipe.load_lora_weights(str(lora_dir), weight_name=weight_name)
        return output(pipe.transformer)

    base, ours, theirs = loaded(None), loaded(release.LORA_FILE), loaded("kohya.safetensors")
    with torch.no_grad():
        for name, pair in layers.items():
            weight = net.get_submodule(name).weight
            weight.copy_((weight.double() + _delta(pair)).float())
    torch.testing.assert_close(theirs, ours, atol=1e-6, rtol=0)
    torch.testing.assert_close(theirs, output(net), atol=1e-5, rtol=0)
    assert (theirs - base).abs().max() > 1e-2
