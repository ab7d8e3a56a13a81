"""The semantic-relative (SRPO-style) reward on a tiny HPS stand-in: the formula, the control words, ReFL."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from dmdr.losses.rl.refl import refl_loss
from dmdr.rewards import build_reward
from dmdr.rewards.srpo import NEGATIVE_WORDS, POSITIVE_WORDS, SemanticRelativeReward

PROMPTS = ["a red fox in the snow", "a bowl of ramen"]


@pytest.fixture(scope="module")
def srpo(hps_checkpoint, tiny_arch):
    return SemanticRelativeReward(hps_checkpoint[0], arch=tiny_arch, k=0.25)


def test_score_is_one_plus_k_cos_positive_minus_cos_negative(srpo, hps_checkpoint, tiny_arch):
    import open_clip

    model = hps_checkpoint[1].double().eval()  # the saved weights, independently of the reward's loading
    tok = open_clip.get_tokenizer(tiny_arch)
    images = torch.rand(2, 3, 40, 40, generator=torch.Generator().manual_seed(0))
    pos, neg = SemanticRelativeReward.control_words(PROMPTS)
    assert pos in POSITIVE_WORDS and neg in NEGATIVE_WORDS
    pixels = F.interpolate(images.double(), size=(32, 32), mode="bicubic", antialias=True, align_corners=False)
    mean = torch.tensor(srpo.preprocess.mean, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(srpo.preprocess.std, dtype=torch.float64).view(1, 3, 1, 1)
    with torch.no_grad():
        f = F.normalize(model.encode_image((pixels - mean) / std), dim=-1)
        fp = F.normalize(model.encode_text(tok([f"{pos}. {p}" for p in PROMPTS])), dim=-1)
        fn = F.normalize(model.encode_text(tok([f"{neg}. {p}" for p in PROMPTS])), dim=-1)
    want = 1.25 * (f * fp).sum(-1) - (f * fn).sum(-1)
    torch.testing.assert_close(srpo(images, PROMPTS).double(), want, rtol=1e-4, atol=1e-5)


def test_control_words_depend_on_the_batch_only():
    picks = {SemanticRelativeReward.control_words([f"prompt {i}"]) for i in range(60)}
    assert len(picks) > 3  # different steps see different words
    assert SemanticRelativeReward.control_words(PROMPTS) == SemanticRelativeReward.control_words(list(PROMPTS))


def test_srpo_by_name_in_refl_reaches_the_images(hps_checkpoint, tiny_arch):
    cfg = SimpleNamespace(hps_checkpoint=str(hps_checkpoint[0]), hps_arch=tiny_arch, reward_resolution=224, srpo_k=0.1)
    reward = build_reward("srpo", cfg)
    assert isinstance(reward, SemanticRelativeReward) and reward.k == 0.1
    images = torch.rand(2, 3, 48, 48, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    loss, stats = refl_loss(images, PROMPTS, [(reward, 5.0)], margin=0.7)
    loss.backward()
    assert "reward/srpo" in stats and torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
