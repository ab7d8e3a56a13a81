"""Each metric on tiny random checkpoints, loaded through the registry as real ones are; skips and errors."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dmdr.errors import ConfigError, ModelLoadError, UserError
from dmdr.evaluation import METRICS, Metric, register_metric, select_metrics
from dmdr.evaluation.stats import bootstrap_ci, summarize
from dmdr.rewards.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from tests.tiny_models import LaionMLP

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")
PROMPTS = ["a red fox in the snow", "a bowl of ramen", "a lighthouse at dusk"]


def _images(n=3, side=40, seed=0):
    return torch.rand(n, 3, side, side, generator=torch.Generator().manual_seed(seed))


def _pre(images, size, mean, std):
    x = F.interpolate(images.double(), size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    m = torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1)
    return (x - m) / torch.tensor(std, dtype=torch.float64).view(1, 3, 1, 1)


def _cos(a, b):
    return F.cosine_similarity(a, b, dim=-1)


def _one_line(exc_type, fn, *needles):
    with pytest.raises(exc_type) as info:
        fn()
    msg = str(info.value)
    assert isinstance(info.value, UserError) and "\n" not in msg, msg
    for needle in needles:
        assert str(needle) in msg, msg
    return msg


# ---- scores against independent recomputations -----------------------------------------------------------

def test_clip_score_open_clip_folder(clip_folder, tiny_arch):
    import open_clip

    folder, ref = clip_folder
    images = _images()
    got = METRICS["clip"].load({"clip_model": str(folder)}, CPU)(images, PROMPTS)
    ref = copy.deepcopy(ref).double().eval()
    with torch.no_grad():
        cos = _cos(ref.encode_image(_pre(images, 32, (0.5,) * 3, (0.25,) * 3)),
                   ref.encode_text(open_clip.get_tokenizer(tiny_arch)(PROMPTS)))
    torch.testing.assert_close(got.double(), 100 * cos.clamp(min=0), rtol=0, atol=1e-4)


def test_clip_score_transformers_folder_and_pickscore(pickscore_folder):
    folder, ref, tok = pickscore_folder
    images = _images(seed=1)
    ref = copy.deepcopy(ref).double().eval()
    enc = tok(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        img = ref.visual_projection(ref.vision_model(pixel_values=_pre(images, 32, (0.4,) * 3, (0.3,) * 3))
                                    .pooler_output)
        txt = ref.text_projection(ref.text_model(input_ids=enc["input_ids"],
                                                 attention_mask=enc["attention_mask"]).pooler_output)
        cos = _cos(img, txt)
    clip = METRICS["clip"].load({"clip_model": str(folder)}, CPU)(images, PROMPTS)
    pick = METRICS["pickscore"].load({"pickscore_model": str(folder)}, CPU)(images, PROMPTS)
    torch.testing.assert_close(clip.double(), 100 * cos.clamp(min=0), rtol=0, atol=1e-4)
    torch.testing.assert_close(pick.double(), ref.logit_scale.exp() * cos, rtol=0, atol=1e-4)  # raw, not / 100


def test_hps_metric_scores_the_prompt_unprefixed(hps_checkpoint, tiny_arch):
    import open_clip

    path, ref = hps_checkpoint
    images = _images(seed=2)
    got = METRICS["hps"].load({"hps_checkpoint": str(path), "hps_arch": tiny_arch}, CPU)(images, PROMPTS)
    ref = copy.deepcopy(ref).double().eval()
    with torch.no_grad():
        want = _cos(ref.encode_image(_pre(images, 32, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)),
                    ref.encode_text(open_clip.get_tokenizer(tiny_arch)(PROMPTS)))
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)


def test_aesthetic_is_laion_head_on_normalised_clip_embeddings(clip_folder, pickscore_folder, aesthetic_head_file):
    folder, ref = clip_folder
    head_path, head = aesthetic_head_file
    images = _images(seed=3)
    got = METRICS["aesthetic"].load({"clip_model": str(folder), "aesthetic_head": str(head_path)}, CPU)(images, PROMPTS)
    ref = copy.deepcopy(ref).double().eval()
    with torch.no_grad():
        emb = ref.encode_image(_pre(images, 32, (0.5,) * 3, (0.25,) * 3))
        want = copy.deepcopy(head).double()(emb / emb.norm(dim=-1, keepdim=True)).squeeze(-1)
    assert got.shape == (3,)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)
    # --aesthetic-clip, when given, is the CLIP under the head (here a transformers CLIP of the same width)
    other = {"clip_model": str(folder), "aesthetic_clip": str(pickscore_folder[0]), "aesthetic_head": str(head_path)}
    assert METRICS["aesthetic"].check(other) is None
    assert (METRICS["aesthetic"].load(other, CPU)(images, PROMPTS) - got).abs().max() > 1e-4


def test_diversity_is_mean_pairwise_lpips(lpips_file):
    path, ref = lpips_file
    images = _images(n=3, side=64, seed=4)
    got = METRICS["diversity"].load({"lpips_weights": str(path)}, CPU)(images, ["p"] * 3)
    with torch.no_grad():
        pairs = [ref(images[i:i + 1], images[j:j + 1], normalize=True).item() for i, j in [(0, 1), (0, 2), (1, 2)]]
        same = METRICS["diversity"].load({"lpips_weights": str(path)}, CPU)(images[:1].repeat(2, 1, 1, 1), ["p"] * 2)
    assert got.shape == (1,) and min(pairs) > 0
    torch.testing.assert_close(got.double(), torch.tensor([np.mean(pairs)], dtype=torch.float64), rtol=1e-5, atol=1e-6)
    assert same.abs().item() < 1e-6  # one image twice: no diversity
    assert METRICS["diversity"].per == "prompt" and METRICS["diversity"].min_seeds == 2


# ---- wrong checkpoints: one line each -------------------------------------------------------------------------

def test_wrong_architecture_checkpoints_are_one_line(hps_checkpoint, tiny_arch, clip_folder, aesthetic_head_file,
                                                     lpips_file, tmp_path):
    hps_path = hps_checkpoint[0]
    clip = str(clip_folder[0])
    wide = tmp_path / "head-768.pth"
    torch.save(LaionMLP([768, 1024, 128, 64, 16, 1]).state_dict(), wide)
    _one_line(ModelLoadError, lambda: METRICS["aesthetic"].load({"clip_model": clip, "aesthetic_head": str(wide)},
                                                                CPU), "768", "16", "--aesthetic-head")
    _one_line(ModelLoadError, lambda: METRICS["aesthetic"].load({"clip_model": clip, "aesthetic_head": str(hps_path)},
                                                                CPU), "not a LAION aesthetic head", hps_path)
    _one_line(ModelLoadError, lambda: METRICS["diversity"].load({"lpips_weights": str(hps_path)}, CPU),
              "--lpips-weights", "not an LPIPS-alex state dict", hps_path)
    _one_line(ModelLoadError, lambda: METRICS["diversity"].load(
        {"lpips_weights": str(lpips_file[0]), "lpips_net": "squeeze"}, CPU), "not an LPIPS-squeeze state dict")
    _one_line(ModelLoadError, lambda: METRICS["hps"].load({"hps_checkpoint": str(aesthetic_head_file[0]),
                                                           "hps_arch": tiny_arch}, CPU), "--hps-checkpoint")
    _one_line(ModelLoadError, lambda: METRICS["pickscore"].load({"pickscore_model": clip}, CPU), "--pickscore-model")
    _one_line(ModelLoadError, lambda: METRICS["clip"].load({"clip_model": str(tmp_path)}, CPU), "--clip-model")


# ---- registry --------------------------------------------------------------------------------------------------

def test_missing_checkpoints_give_skip_notes(tmp_path):
    builtin = ["aesthetic", "clip", "diversity", "hps", "pickscore"]
    assert set(builtin) <= set(METRICS)
    notes = {name: METRICS[name].check({}) for name in builtin}
    assert all(isinstance(n, str) and "\n" not in n and n.startswith("no --") for n in notes.values()), notes
    assert "--hps-checkpoint" in notes["hps"] and "--lpips-weights" in notes["diversity"]
    gone = tmp_path / "gone.pt"
    assert METRICS["hps"].check({"hps_checkpoint": str(gone)}) == (
        f"--hps-checkpoint {gone} does not exist (the HPSv2.1 checkpoint file, e.g. HPS_v2.1_compressed.pt)")
    a_file = tmp_path / "x.txt"
    a_file.write_text("x")
    assert METRICS["clip"].check({"clip_model": str(a_file)}).startswith(f"--clip-model {a_file} is not a folder")
    assert METRICS["aesthetic"].check({"aesthetic_head": str(a_file)}).startswith("no --clip-model given")
    with pytest.raises(ConfigError, match=r"^--metrics: unknown metric 'fid' \(known: "):
        select_metrics(["clip", "fid"])
    assert [m.name for m in select_metrics(["hps", "clip", "hps"])] == ["hps", "clip"]


def test_register_metric_plugs_in(monkeypatch):
    monkeypatch.setattr("dmdr.evaluation.registry.METRICS", dict(METRICS))
    from dmdr.evaluation import registry

    def load(options, device):
        return lambda images, prompts: images.mean(dim=(1, 2, 3)) * float(options.get("gain", "1"))

    registry.register_metric(Metric("brightness_x", load=load, check=lambda options: None))
    (metric,) = registry.select_metrics(["brightness_x"])
    images = _images()
    torch.testing.assert_close(metric.load({"gain": "2"}, CPU)(images, PROMPTS), 2 * images.mean(dim=(1, 2, 3)))
    with pytest.raises(ValueError, match="per must be"):
        register_metric(Metric("bad", load=load, check=lambda o: None, per="batch"))


# ---- statistics -------------------------------------------------------------------------------------------------

def test_summary_statistics():
    x = np.random.default_rng(0).normal(3.0, 2.0, 4000)
    s = summarize(x.tolist())
    assert s["n"] == 4000 and s["mean"] == pytest.approx(x.mean(), abs=1e-12)
    assert s["std"] == pytest.approx(x.std(ddof=1), abs=1e-12)
    lo, hi = s["ci95"]
    half = 1.96 * x.std(ddof=1) / np.sqrt(x.size)  # the normal approximation the bootstrap must agree with
    assert lo < s["mean"] < hi and abs((hi - lo) / 2 - half) < 0.1 * half
    assert bootstrap_ci(x) == bootstrap_ci(x)  # deterministic
    assert summarize([1.5]) == {"mean": 1.5, "std": 0.0, "ci95": [1.5, 1.5], "n": 1}


def test_shapeeval_metric_is_the_worlds_checker_and_opt_in():
    from dmdr.worlds.shapes.scene import parse_prompt, render_batch, split_prompts
    from dmdr.worlds.shapes.shapeeval import evaluate

    prompts = split_prompts("heldout")[:6]
    images = render_batch([parse_prompt(p) for p in prompts], torch.Generator().manual_seed(0))
    scorer = METRICS["shapeeval"].load({}, CPU)
    assert scorer(images, prompts).tolist() == [1.0] * 6  # renders pass every check
    swapped = prompts[1:] + prompts[:1]  # each image scored against another prompt
    want = [float(bool(r["exact"])) for r in evaluate(images, swapped)]
    assert scorer(images, swapped).tolist() == want and sum(want) < 6
    _one_line(UserError, lambda: scorer(images[:1], ["a photo of a cat"]), "shapeeval: ", "a photo of a cat")
    assert "shapeeval" not in [m.name for m in select_metrics(None)]  # shapes prompts only: asked for by name
    assert [m.name for m in select_metrics(["shapeeval"])] == ["shapeeval"]
