"""Parity with the reference implementations: HPSv2.1 = the hpsv2 package's score, CLIP score = torchmetrics'."""

from __future__ import annotations

import gzip
import importlib.util
import os

import numpy as np
import pytest
import torch
from PIL import Image

from dmdr.evaluation import METRICS

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["a red fox in the snow", "a bowl of ramen", "an astronaut riding a horse on the moon"]


def _uint8_images(n: int, side: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, side, side, 3), dtype=np.uint8)


def _as_float(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255


@pytest.fixture()
def hpsv2_score(monkeypatch, tiny_arch, tiny_cfg):
    """``hpsv2.img_score.score`` on the tiny architecture, with nothing downloaded.

    hpsv2 1.2.0 builds ViT-H-14 with the ``laion2B-s32B-b79K`` weights (a download) before loading the
    checkpoint over them, and its wheel lacks the BPE vocabulary its tokenizer reads at import (open_clip
    ships the same file). The patches swap only the architecture name (no pretrained tag) and that path;
    the scoring code (its own vendored open_clip, preprocessing, checkpoint load, features) is hpsv2's.
    """
    if importlib.util.find_spec("hpsv2") is None or importlib.util.find_spec("clint") is None:
        pytest.skip("hpsv2 is not installed (the hps extra + pip install --no-deps hpsv2, as the Makefile does)")
    import open_clip

    vocab = os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz")
    real_open = gzip.open

    def open_vocab(path, *args, **kwargs):
        missing = str(path).endswith("bpe_simple_vocab_16e6.txt.gz") and not os.path.exists(path)
        return real_open(vocab if missing else path, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(gzip, "open", open_vocab)
        import hpsv2.img_score as scr
        from hpsv2.src.open_clip import factory as hps_factory

    monkeypatch.setitem(hps_factory._MODEL_CONFIGS, tiny_arch, tiny_cfg)
    create, tokenizer = scr.create_model_and_transforms, scr.get_tokenizer
    monkeypatch.setattr(scr, "create_model_and_transforms",
                        lambda name, pretrained, **kw: create(tiny_arch, None, **{**kw, "precision": "fp32"}))
    monkeypatch.setattr(scr, "get_tokenizer", lambda name: tokenizer(tiny_arch))
    monkeypatch.setattr(scr, "device", "cpu")
    monkeypatch.setattr(scr, "model_dict", {})
    return scr.score


@pytest.mark.parametrize("side", [32, 48])  # the model's own size, and a bicubic antialiased resize to it
def test_hps_equals_hpsv2_package(hpsv2_score, hps_checkpoint, tiny_arch, side):
    scorer = METRICS["hps"].load({"hps_checkpoint": str(hps_checkpoint[0]), "hps_arch": tiny_arch},
                                 torch.device("cpu"))
    arr = _uint8_images(len(PROMPTS), side, seed=side)
    ours = scorer(_as_float(arr), PROMPTS)
    theirs = [hpsv2_score(Image.fromarray(a), p, cp=str(hps_checkpoint[0]), hps_version="v2.1")[0]
              for a, p in zip(arr, PROMPTS)]
    theirs = torch.tensor(np.array(theirs, dtype=np.float32))
    assert ours.shape == (len(PROMPTS),) and ours.abs().min() > 1e-3  # not a degenerate zero score
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    # the benchmark's scoring has no "Realistic photo " prefix: the training reward's score differs
    from dmdr.rewards.models import HPSReward

    prefixed = HPSReward(hps_checkpoint[0], arch=tiny_arch)(_as_float(arr), PROMPTS)
    assert (prefixed - theirs).abs().max() > 1e-4


def test_clip_score_equals_torchmetrics(pickscore_folder):
    tm = pytest.importorskip("torchmetrics.multimodal.clip_score", reason="the eval extra (torchmetrics)")
    folder = pickscore_folder[0]
    arr = _uint8_images(len(PROMPTS), 32, seed=3)  # the tiny CLIP's input size: the HF processor does no resize
    scorer = METRICS["clip"].load({"clip_model": str(folder)}, torch.device("cpu"))
    ours = scorer(_as_float(arr), PROMPTS)
    from transformers import CLIPModel, CLIPProcessor

    class TensorFeaturesCLIP(CLIPModel):
        """transformers < 5's contract, which torchmetrics 1.9 expects: get_*_features return the projected
        features as a tensor (transformers 5 returns an output object holding them as ``pooler_output``)."""

        def get_image_features(self, *args, **kwargs):
            out = super().get_image_features(*args, **kwargs)
            return out if isinstance(out, torch.Tensor) else out.pooler_output

        def get_text_features(self, *args, **kwargs):
            out = super().get_text_features(*args, **kwargs)
            return out if isinstance(out, torch.Tensor) else out.pooler_output

    # torchmetrics' loading of an "openai/..." name, on the local folder (its documented callable form)
    metric = tm.CLIPScore(model_name_or_path=lambda: (TensorFeaturesCLIP.from_pretrained(str(folder)),
                                                      CLIPProcessor.from_pretrained(str(folder))))
    per_image = [float(metric(torch.from_numpy(a).permute(2, 0, 1), p)) for a, p in zip(arr, PROMPTS)]
    torch.testing.assert_close(ours, torch.tensor(per_image), rtol=0, atol=1e-4)  # 100 x cosine: 1e-6 in cosine
    assert (ours == 0).any() and (ours > 0).any()  # this random CLIP gives a negative cosine: the clamp is tested
    # Over a batch torchmetrics clamps the mean, max(mean(100 cos), 0); the paper's tables (and our report)
    # average the per-image 100 max(cos, 0). Equal for real models (cos > 0); here: same cosines underneath.
    from dmdr.evaluation.clip_score import cosine, load_clip_encoder

    cos = cosine(load_clip_encoder(str(folder), "--clip-model", torch.device("cpu")), _as_float(arr), PROMPTS)
    metric.reset()
    metric.update(list(torch.from_numpy(arr).permute(0, 3, 1, 2)), PROMPTS)
    torch.testing.assert_close((100 * cos.mean()).clamp(min=0), metric.compute(), rtol=0, atol=1e-4)
