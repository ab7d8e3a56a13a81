"""The paper's reward models on tiny stand-ins: scores, preprocessing, gradients, errors, ReFL."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from dmdr.errors import ConfigError, ModelLoadError, UserError
from dmdr.losses.rl.refl import refl_loss
from dmdr.rewards import MODEL_REWARDS, build_reward
from dmdr.rewards.models import HPS_PREFIX, CLIPReward, HPSReward, PickScoreReward
from dmdr.rewards.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImagePreprocess
from dmdr.rewards.srpo import SemanticRelativeReward

PROMPTS = ["a red fox in the snow", "a bowl of ramen"]


def _images(h=48, w=48, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(2, 3, h, w, generator=g).requires_grad_(requires_grad)


def _by_hand(images, size, mean, std):
    x = F.interpolate(images, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return (x - torch.tensor(mean, dtype=x.dtype).view(1, 3, 1, 1)) / torch.tensor(std, dtype=x.dtype).view(1, 3, 1, 1)


def _cos(a, b):
    return (a / a.norm(dim=-1, keepdim=True) * (b / b.norm(dim=-1, keepdim=True))).sum(-1)


@pytest.fixture(scope="module")
def hps(hps_checkpoint, tiny_arch):
    return HPSReward(hps_checkpoint[0], arch=tiny_arch)


@pytest.fixture(scope="module")
def clip(clip_folder):
    return CLIPReward(clip_folder[0])


@pytest.fixture(scope="module")
def pickscore(pickscore_folder):
    return PickScoreReward(pickscore_folder[0])


# ---- preprocessing -------------------------------------------------------------------------------------------

def test_preprocess_is_bicubic_antialias_resize_then_normalise():
    images = _images(64, 64).double()
    pre = ImagePreprocess(32, (0.1, 0.2, 0.3), (0.5, 0.6, 0.7))
    torch.testing.assert_close(pre(images), _by_hand(images, 32, (0.1, 0.2, 0.3), (0.5, 0.6, 0.7)),
                               rtol=0, atol=1e-12)
    same = _images(32, 32).double()
    torch.testing.assert_close(pre(same), _by_hand(same, 32, (0.1, 0.2, 0.3), (0.5, 0.6, 0.7)), rtol=0, atol=1e-12)
    assert pre(_images(40, 80)).shape == (2, 3, 32, 32)  # short side to 32, centre crop
    x = _images(64, 64, requires_grad=True)
    pre(x).square().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        pre(torch.rand(2, 1, 8, 8))


# ---- scores against an independent recomputation ----------------------------------------------------------

def test_hps_score_is_cosine_of_prefixed_prompt(hps, hps_checkpoint, tiny_arch):
    import open_clip

    reward = copy.deepcopy(hps)
    reward.model.double()
    ref = copy.deepcopy(hps_checkpoint[1]).double().eval()
    images = _images().double()
    tokens = open_clip.get_tokenizer(tiny_arch)([HPS_PREFIX + p for p in PROMPTS])
    with torch.no_grad():
        want = _cos(ref.encode_image(_by_hand(images, 32, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)), ref.encode_text(tokens))
        got = reward(images, PROMPTS)
        unprefixed = _cos(ref.encode_image(_by_hand(images, 32, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)),
                          ref.encode_text(open_clip.get_tokenizer(tiny_arch)(PROMPTS)))
    assert got.shape == (2,) and got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    assert not torch.allclose(got, unprefixed, atol=1e-6)  # the prefix changes the text features


def test_hps_prefix_reaches_tokenizer(hps, monkeypatch):
    seen = []
    tokenizer = hps.tokenizer

    def spy(texts):
        seen.extend(texts)
        return tokenizer(texts)

    monkeypatch.setattr(hps, "tokenizer", spy)
    hps(_images(), PROMPTS)
    assert seen == ["Realistic photo a red fox in the snow", "Realistic photo a bowl of ramen"]


def test_clip_score_uses_folder_preprocess_cfg(clip, clip_folder, tiny_arch):
    import open_clip

    assert (clip.preprocess.size, clip.preprocess.mean, clip.preprocess.std) == (32, (0.5,) * 3, (0.25,) * 3)
    reward = copy.deepcopy(clip)
    reward.model.double()
    ref = copy.deepcopy(clip_folder[1]).double().eval()
    images = _images(70, 70).double()
    with torch.no_grad():
        want = _cos(ref.encode_image(_by_hand(images, 32, (0.5,) * 3, (0.25,) * 3)),
                    ref.encode_text(open_clip.get_tokenizer(tiny_arch)(PROMPTS)))
        got = reward(images, PROMPTS)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


def test_pickscore_is_scaled_logit_scale_times_cosine(pickscore, pickscore_folder):
    _, ref, tok = pickscore_folder
    reward = copy.deepcopy(pickscore)
    reward.model.double()
    ref = copy.deepcopy(ref).double().eval()
    images = _images().double()
    enc = tok(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        img = ref.visual_projection(ref.vision_model(pixel_values=_by_hand(images, 32, (0.4,) * 3, (0.3,) * 3))
                                    .pooler_output)
        txt = ref.text_projection(ref.text_model(input_ids=enc["input_ids"],
                                                 attention_mask=enc["attention_mask"]).pooler_output)
        raw = ref.logit_scale.exp() * _cos(img, txt)
        got = reward(images, PROMPTS)
        reward.scale = 1.0
        got_raw = reward(images, PROMPTS)
    torch.testing.assert_close(got, 0.01 * raw, rtol=0, atol=1e-10)
    torch.testing.assert_close(got_raw, raw, rtol=0, atol=1e-10)


# ---- frozen, differentiable ----------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["hps", "clip", "pickscore"])
def test_frozen_and_gradients_reach_images(which, request):
    reward = request.getfixturevalue(which)
    assert reward.name == which
    assert not reward.model.training
    assert not any(p.requires_grad for p in reward.model.parameters())
    images = _images(40, 40, requires_grad=True)
    scores = reward(images, PROMPTS)
    assert scores.shape == (2,) and torch.isfinite(scores).all()
    scores.sum().backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    assert all(p.grad is None for p in reward.model.parameters())


# ---- registry and ReFL -----------------------------------------------------------------------------------------

def _rl_cfg(hps_checkpoint, clip_folder, pickscore_folder, tiny_arch, **over):
    cfg = dict(hps_checkpoint=str(hps_checkpoint[0]), clip_model=str(clip_folder[0]),
               pickscore_model=str(pickscore_folder[0]), hps_arch=tiny_arch, reward_resolution=224)
    cfg.update(over)
    return SimpleNamespace(**cfg)


def test_build_reward_by_name_and_refl(hps_checkpoint, clip_folder, pickscore_folder, tiny_arch):
    cfg = _rl_cfg(hps_checkpoint, clip_folder, pickscore_folder, tiny_arch)
    rewards = [build_reward(name, cfg, "cpu") for name in MODEL_REWARDS]
    assert [type(r) for r in rewards] == [HPSReward, CLIPReward, PickScoreReward, SemanticRelativeReward]
    images = _images(48, 48, requires_grad=True)
    loss, stats = refl_loss(images, PROMPTS, [(r, 0.3) for r in rewards] + [(build_reward("brightness", cfg), 0.1)],
                            margin=0.7)
    assert torch.isfinite(loss) and loss > 0
    assert {"reward/hps", "reward/clip", "reward/pickscore", "reward/srpo", "reward/brightness"} <= set(stats)
    loss.backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0


def test_build_reward_default_rl_config_names_the_field():
    from dmdr.config import RLConfig

    for name, field in [("hps", "--rl.hps_checkpoint"), ("clip", "--rl.clip_model"),
                        ("pickscore", "--rl.pickscore_model")]:
        with pytest.raises(ConfigError, match=f"^{field}: not set") as info:
            build_reward(name, RLConfig())
        assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="unknown reward 'nope'"):
        build_reward("nope", RLConfig())


# ---- bad paths: one line naming the field and the path --------------------------------------------------------

def _one_line_error(exc_type, fn, field, path):
    with pytest.raises(exc_type) as info:
        fn()
    msg = str(info.value)
    assert isinstance(info.value, UserError) and "\n" not in msg
    assert msg.startswith(f"--{field}: ") and str(path) in msg, msg


def test_hps_bad_paths(tmp_path, tiny_arch, hps_checkpoint):
    missing = tmp_path / "nope.pt"
    _one_line_error(ConfigError, lambda: HPSReward(missing, arch=tiny_arch), "rl.hps_checkpoint", missing)
    _one_line_error(ConfigError, lambda: HPSReward(tmp_path, arch=tiny_arch), "rl.hps_checkpoint", tmp_path)
    garbage = tmp_path / "garbage.pt"
    garbage.write_text("not a checkpoint\nsecond line")
    _one_line_error(ModelLoadError, lambda: HPSReward(garbage, arch=tiny_arch), "rl.hps_checkpoint", garbage)
    not_sd = tmp_path / "list.pt"
    torch.save([1, 2, 3], not_sd)
    _one_line_error(ModelLoadError, lambda: HPSReward(not_sd, arch=tiny_arch), "rl.hps_checkpoint", not_sd)
    partial = tmp_path / "partial.pt"
    state = torch.load(hps_checkpoint[0], weights_only=True)["state_dict"]
    torch.save({k: v for k, v in state.items() if not k.startswith("visual.")}, partial)
    _one_line_error(ModelLoadError, lambda: HPSReward(partial, arch=tiny_arch), "rl.hps_checkpoint", partial)
    wrong_shape = tmp_path / "shape.pt"
    torch.save({**state, "text_projection": torch.zeros(3, 3)}, wrong_shape)
    _one_line_error(ModelLoadError, lambda: HPSReward(wrong_shape, arch=tiny_arch), "rl.hps_checkpoint", wrong_shape)


def test_hps_plain_and_module_prefixed_state_dicts(tmp_path, tiny_arch, hps_checkpoint, hps):
    state = torch.load(hps_checkpoint[0], weights_only=True)["state_dict"]
    torch.save(state, tmp_path / "plain.pt")
    torch.save({"module." + k: v for k, v in state.items()}, tmp_path / "ddp.pt")
    images = _images()
    want = hps(images, PROMPTS)
    for name in ("plain.pt", "ddp.pt"):
        torch.testing.assert_close(HPSReward(tmp_path / name, arch=tiny_arch)(images, PROMPTS), want)


def test_clip_bad_paths(tmp_path, clip_folder):
    missing = tmp_path / "nope"
    _one_line_error(ConfigError, lambda: CLIPReward(missing), "rl.clip_model", missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    _one_line_error(ModelLoadError, lambda: CLIPReward(empty), "rl.clip_model", empty)
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "open_clip_config.json").write_text((clip_folder[0] / "open_clip_config.json").read_text())
    _one_line_error(ModelLoadError, lambda: CLIPReward(no_weights), "rl.clip_model", no_weights)
    bad_json = tmp_path / "bad_json"
    bad_json.mkdir()
    (bad_json / "open_clip_config.json").write_text("{not json")
    (bad_json / "open_clip_pytorch_model.bin").write_bytes(b"junk")
    _one_line_error(ModelLoadError, lambda: CLIPReward(bad_json), "rl.clip_model", bad_json)
    wrong = tmp_path / "wrong_weights"
    wrong.mkdir()
    (wrong / "open_clip_config.json").write_text((clip_folder[0] / "open_clip_config.json").read_text())
    torch.save({"visual.conv1.weight": torch.zeros(1)}, wrong / "open_clip_pytorch_model.bin")
    _one_line_error(ModelLoadError, lambda: CLIPReward(wrong), "rl.clip_model", wrong)


def test_pickscore_bad_paths(tmp_path, clip_folder):
    missing = tmp_path / "nope"
    _one_line_error(ConfigError, lambda: PickScoreReward(missing), "rl.pickscore_model", missing)
    a_file = tmp_path / "file.bin"
    a_file.write_bytes(b"x")
    _one_line_error(ConfigError, lambda: PickScoreReward(a_file), "rl.pickscore_model", a_file)
    # An open_clip folder is not a transformers CLIP folder.
    _one_line_error(ModelLoadError, lambda: PickScoreReward(clip_folder[0]), "rl.pickscore_model", clip_folder[0])
