"""Session fixtures of tiny models, built in the tests (no downloads), for every test area (tests/conftest.py).

* ``tiny_assets``: one tiny SD3 pipeline folder and one prompt file (the runs of tests/e2e, tests/evaluation);
* ``tiny_arch``, ``hps_checkpoint``, ``clip_folder``, ``pickscore_folder``, ``tiny_cfg``: tiny reward models saved in
  the layouts the real ones ship in (tests/rewards; tests/evaluation scores its metrics on the same files);
* ``aesthetic_head_file``, ``lpips_file``: a LAION aesthetic head and an LPIPS state dict, as files a user makes once
  (the evaluation metrics and the guard's probe scorers read the same ones).
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from tests.tiny_helpers import load_recipe

TINY_ARCH = "dmdr-test-tiny-clip"
TINY_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory) -> dict[str, str]:
    from dmdr.models.tiny import build_tiny_sd3

    root = tmp_path_factory.mktemp("tiny-assets")
    model = build_tiny_sd3(root / "tiny-sd3", seed=0)
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(load_recipe("tiny_dmdr").DEMO_PROMPTS) + "\n")
    return {"model": str(model), "prompts": str(prompts)}


@pytest.fixture(scope="session")
def tiny_cfg() -> dict:
    """The tiny open_clip architecture's config (what ``tiny_arch`` registers in open_clip)."""
    return json.loads(json.dumps(TINY_CFG))


@pytest.fixture(scope="session")
def tiny_arch() -> str:
    import open_clip
    from open_clip import factory

    factory._MODEL_CONFIGS[TINY_ARCH] = json.loads(json.dumps(TINY_CFG))
    assert TINY_ARCH in open_clip.list_models()
    return TINY_ARCH


def _tiny_open_clip(arch: str, seed: int):
    import open_clip

    torch.manual_seed(seed)
    model = open_clip.create_model(arch, pretrained=None)
    with torch.no_grad():  # make logit_scale distinct from the init so a wrong load would show
        model.logit_scale.fill_(3.0)
    return model


@pytest.fixture(scope="session")
def hps_checkpoint(tmp_path_factory, tiny_arch):
    """A tiny open_clip model saved like HPS_v2.1_compressed.pt: {"state_dict": ...}."""
    model = _tiny_open_clip(tiny_arch, seed=1)
    path = tmp_path_factory.mktemp("hps") / "HPS_v2.1_tiny.pt"
    torch.save({"state_dict": model.state_dict()}, path)
    return path, model


@pytest.fixture(scope="session")
def clip_folder(tmp_path_factory, tiny_arch):
    """A tiny open_clip model in the hub layout: open_clip_config.json + open_clip_pytorch_model.bin."""
    model = _tiny_open_clip(tiny_arch, seed=2)
    folder = tmp_path_factory.mktemp("dfn-clip")
    cfg = {"model_cfg": TINY_CFG, "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25],
                                                     "interpolation": "bicubic", "resize_mode": "squash"}}
    (folder / "open_clip_config.json").write_text(json.dumps(cfg))
    torch.save(model.state_dict(), folder / "open_clip_pytorch_model.bin")
    return folder, model


@pytest.fixture(scope="session")
def pickscore_folder(tmp_path_factory):
    """A tiny transformers CLIPModel + byte-level CLIP tokenizer + image processor, save_pretrained."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from dmdr.models.tiny import clip_tokenizer

    tok = clip_tokenizer()
    torch.manual_seed(3)
    config = CLIPConfig(
        text_config={"vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "max_position_embeddings": 77,
                     "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
                     "pad_token_id": tok.pad_token_id},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    model = CLIPModel(config).eval()
    folder = tmp_path_factory.mktemp("pickscore")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                       image_mean=[0.4, 0.4, 0.4], image_std=[0.3, 0.3, 0.3]).save_pretrained(folder)
    return folder, model, tok


class LaionMLP(nn.Module):
    """LAION's improved-aesthetic-predictor head, as its training script defines it (``self.layers``): written here,
    not taken from :mod:`dmdr.evaluation.aesthetic`, so that the tests check dmdr's loader against LAION's layout."""

    def __init__(self, widths):
        super().__init__()
        a, b, c, d, e, f = widths
        self.layers = nn.Sequential(nn.Linear(a, b), nn.Dropout(0.2), nn.Linear(b, c), nn.Dropout(0.2),
                                    nn.Linear(c, d), nn.Dropout(0.1), nn.Linear(d, e), nn.Linear(e, f))

    def forward(self, x):
        return self.layers(x)


@pytest.fixture(scope="session")
def aesthetic_head_file(tmp_path_factory):
    """A tiny LAION-layout head (16-d input: the tiny CLIP's embedding width), saved as its state dict."""
    torch.manual_seed(5)
    head = LaionMLP([16, 32, 8, 8, 4, 1]).eval()
    path = tmp_path_factory.mktemp("aesthetic") / "sac+logos+ava1-tiny-linearMSE.pth"
    torch.save(head.state_dict(), path)
    return path, head


@pytest.fixture(scope="session")
def lpips_file(tmp_path_factory):
    """A random LPIPS-alex (trunk + lin layers) saved as one state dict, the file a user makes once."""
    lpips = pytest.importorskip("lpips", reason="the eval extra (lpips)")
    torch.manual_seed(6)
    model = lpips.LPIPS(pretrained=False, net="alex", pnet_rand=True, verbose=False)
    with torch.no_grad():  # lin layers are zero-initialised without pretrained weights: make them count
        for lin in model.lins:
            lin.model[-1].weight.uniform_(0.0, 1.0)
    path = tmp_path_factory.mktemp("lpips") / "lpips_alex.pth"
    torch.save(model.state_dict(), path)
    return path, model.eval()
