"""Release helpers on toy modules: the generator LoRA's diffusers keys, SVD extraction, the model card's inputs."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from dmdr.errors import ConfigError
from dmdr.export import card as model_card
from dmdr.export import release
from dmdr.models.lora import inject_lora


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.ModuleDict({"to_q": nn.Linear(5, 5), "norm": nn.LayerNorm(5)}) for _ in range(2))
        self.proj_out = nn.Linear(5, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b["norm"](b["to_q"](x))
        return self.proj_out(x)


def test_generator_lora_folds_alpha_over_rank_and_drops_the_critic():
    torch.manual_seed(0)
    net = Toy()
    scales = inject_lora(net, "generator", rank=3, alpha=12.0, targets=["to_q"])
    inject_lora(net, "critic", rank=2, alpha=2.0, targets=["to_q", "proj_out"], scales=scales)
    for p in net.parameters():
        if p.requires_grad:
            nn.init.normal_(p)
    x = torch.randn(7, 5)
    scales.set(generator=1.0, critic=0.0)
    with torch.no_grad():
        want = net(x).double()
    state = release.lora_state_dict(release.generator_lora(net, "generator"), "sd3", torch.float32)
    assert sorted(state) == [f"transformer.blocks.{i}.to_q.lora_{ab}.weight" for i in (0, 1) for ab in "AB"]
    # an independent forward: plain weights + B A at scale 1, as diffusers' peft layers run it
    plain = Toy()
    plain.load_state_dict(release.base_parameters(net))
    with torch.no_grad():
        for i in (0, 1):
            lin = plain.blocks[i]["to_q"]
            a, b = (state[f"transformer.blocks.{i}.to_q.lora_{ab}.weight"].double() for ab in "AB")
            lin.weight.copy_((lin.weight.double() + b @ a).float())
        got = plain(x).double()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    with pytest.raises(ConfigError, match="no diffusers LoRA key format for model family 'sdxl'"):
        release.lora_state_dict({}, "sdxl", torch.float32)


def test_extract_lora_is_the_truncated_svd_and_reports_what_it_leaves_out():
    torch.manual_seed(1)
    base, tuned = Toy(), Toy()
    tuned.load_state_dict(base.state_dict())
    with torch.no_grad():
        tuned.blocks[0]["to_q"].weight.add_(0.1 * torch.randn(5, 5))
        tuned.proj_out.weight.add_(0.1 * torch.randn(4, 5))
        tuned.blocks[1]["norm"].bias.add_(0.01)
    ref = {k: v.clone() for k, v in base.state_dict().items()}
    got = release.extract_lora(tuned, ref, rank=2)
    assert sorted(got.layers) == ["blocks.0.to_q", "proj_out"]  # block 1's linear did not change
    err2 = total2 = 0.0
    for name in got.layers:
        delta = tuned.get_submodule(name).weight.double() - ref[f"{name}.weight"].double()
        s = torch.linalg.svdvals(delta)
        a, b = got.layers[name]
        err2 += (delta - b.double() @ a.double()).pow(2).sum().item()
        total2 += s.pow(2).sum().item()
        assert (delta - b.double() @ a.double()).pow(2).sum().item() == pytest.approx(s[2:].pow(2).sum().item(),
                                                                                      rel=1e-4)
    assert got.relative_error == pytest.approx((err2 / total2) ** 0.5, rel=1e-4)
    assert got.left_out == ["blocks.1.norm.bias"]
    full = release.extract_lora(tuned, ref, rank=5)  # full rank: exact
    assert full.relative_error == 0.0
    with pytest.raises(ConfigError, match="nothing to extract"):
        release.extract_lora(base, ref, rank=2)


def test_read_eval_accepts_the_documented_schemas(tmp_path):
    (tmp_path / "eval").mkdir()
    file = tmp_path / "eval" / "results.json"
    assert model_card.read_eval(tmp_path / "nowhere") == []
    for data in ({"metrics": {"hps": {"mean": 0.3, "std": 0.01, "n": 10}, "clip": 0.2}},
                 {"hps": {"mean": 0.3, "std": 0.01, "n": 10}, "clip": 0.2, "note": "x"},
                 [{"name": "hps", "mean": 0.3, "std": 0.01, "n": 10}, {"metric": "clip", "mean": 0.2}]):
        file.write_text(json.dumps(data))
        assert model_card.read_eval(tmp_path) == [{"name": "hps", "mean": 0.3, "std": 0.01, "n": 10},
                                                  {"name": "clip", "mean": 0.2}]
    file.write_text(json.dumps({"metrics": ["hps"], "models": [
        {"name": "release", "metrics": {"hps": {"mean": 0.3, "std": 0.01, "ci95": [0.2, 0.4], "n": 10}}}]}))
    assert model_card.read_eval(tmp_path) == [{"name": "hps", "mean": 0.3, "std": 0.01, "n": 10}]
    for bad in ("{oops", "[1, 2]", '"text"', '{"metrics": {"hps": {"std": 1}}}'):
        file.write_text(bad)
        assert model_card.read_eval(tmp_path) == []


def test_base_card_licence_and_hub_id(tmp_path):
    (tmp_path / "README.md").write_text("---\nlicense: other\nlicense_name: x-community\n---\n# body\n")
    assert model_card.base_card(tmp_path) == {"license": "other", "license_name": "x-community"}
    (tmp_path / "README.md").write_text("no front matter\n")
    assert model_card.base_card(tmp_path) == {}
    (tmp_path / "README.md").write_text("---\nlicense: [unclosed\n---\n")
    assert model_card.base_card(tmp_path) == {}
    snap = tmp_path / "models--stabilityai--stable-diffusion-3.5-large" / "snapshots" / "abc"
    snap.mkdir(parents=True)
    assert model_card.base_model_id(snap) == "stabilityai/stable-diffusion-3.5-large"
    assert model_card.base_model_id(tmp_path) == ""
