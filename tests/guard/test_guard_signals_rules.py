"""The guard's image signals against float64 references written out pixel by pixel, and its rules: each trips on
its own evidence and only then, trends need a monotone rise, absent signals are not judged."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from dmdr.config import GuardConfig
from dmdr.guard.rules import evaluate
from dmdr.guard.signals import clipped_fraction, colourfulness, image_signals, saturation, seed_diversity


@pytest.fixture
def images() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 5, 6, generator=g)
    x[0, :, 0, 0] = 0.0  # a black pixel: saturation 0 by definition
    x[1, 0, :2] = 1.0  # clipped channel values
    return x


def test_saturation_and_clipped_match_a_per_pixel_float64_reference(images):
    x = images.double()
    sats, clipped, n = [], 0, 0
    for b, i, j in itertools.product(range(x.shape[0]), range(x.shape[2]), range(x.shape[3])):
        rgb = [float(x[b, c, i, j]) for c in range(3)]
        hi, lo = max(rgb), min(rgb)
        sats.append(0.0 if hi == 0 else (hi - lo) / hi)
        clipped += sum(v <= 1 / 255 or v >= 254 / 255 for v in rgb)
        n += 3
    assert saturation(images) == pytest.approx(sum(sats) / len(sats), abs=1e-6)
    assert clipped_fraction(images) == pytest.approx(clipped / n, abs=1e-9)


def _mean(v: list[float]) -> float:
    return sum(v) / len(v)


def _std(v: list[float]) -> float:
    return math.sqrt(_mean([(a - _mean(v)) ** 2 for a in v]))


def test_colourfulness_matches_hasler_suesstrunk_in_float64(images):
    x = images.double()
    values = []
    mean, std = _mean, _std
    for img in x:
        rg = (img[0] - img[1]).flatten().tolist()
        yb = (0.5 * (img[0] + img[1]) - img[2]).flatten().tolist()
        values.append(math.sqrt(std(rg) ** 2 + std(yb) ** 2) + 0.3 * math.sqrt(mean(rg) ** 2 + mean(yb) ** 2))
    assert colourfulness(images) == pytest.approx(sum(values) / len(values), abs=1e-6)
    grey = images.mean(dim=1, keepdim=True).expand(-1, 3, -1, -1)
    assert colourfulness(grey) == pytest.approx(0.0, abs=1e-7)


def test_seed_diversity_is_the_mean_pairwise_rms_distance_per_prompt():
    g = torch.Generator().manual_seed(1)
    seeds, prompts = 3, 2
    x = torch.rand(seeds * prompts, 3, 4, 4, generator=g)
    ref, pairs = 0.0, 0
    for a, b in itertools.combinations(range(seeds), 2):
        for p in range(prompts):
            d = (x[a * prompts + p].double() - x[b * prompts + p].double()).pow(2).mean().sqrt().item()
            ref += d / prompts
        pairs += 1
    assert seed_diversity(x, seeds) == pytest.approx(ref / pairs, abs=1e-6)
    same = x[:prompts].repeat(seeds, 1, 1, 1)  # collapsed: every seed gives the same image
    assert seed_diversity(same, seeds) == 0.0
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    assert image_signals(bad, seeds)["probe/nonfinite"] == 1.0


BASE = {"probe/saturation": 0.4, "probe/colourfulness": 0.3, "probe/clipped": 0.02, "probe/diversity": 0.2,
        "probe/diversity_latent": 1.0, "probe/diversity_clip": 0.3, "probe/diversity_lpips": 0.5,
        "probe/clip_score": 30.0, "probe/aesthetic": 5.0, "probe/critic_teacher_ratio": 1.0, "probe/critic_loss": 0.4,
        "train/dmd_grad": 0.1,
        "probe/nonfinite": 0.0}


@pytest.mark.parametrize(("change", "rule"), [
    ({"probe/saturation": 0.56}, "saturation"),
    ({"probe/colourfulness": 0.61}, "colourfulness"),
    ({"probe/clipped": 0.13}, "clipped"),
    ({"probe/diversity": 0.09}, "diversity"),
    ({"probe/diversity_latent": 0.4}, "diversity"),
    ({"probe/diversity_clip": 0.14}, "diversity"),
    ({"probe/diversity_lpips": 0.2}, "diversity"),
    ({"probe/clip_score": 26.0}, "clip_score"),
    ({"probe/aesthetic": 4.4}, "aesthetic"),
    ({"probe/critic_teacher_ratio": 0.7}, "critic_teacher"),
    ({"probe/critic_loss": 0.52}, "critic_lag"),
    ({"train/dmd_grad": 0.31}, "dmd_grad"),
    ({"probe/reward_gap": 0.3}, "reward_gap"),
    ({"probe/nonfinite": 2.0}, "nonfinite"),
    ({"train/skipped_since_probe": 1.0}, "nonfinite"),
])
def test_each_rule_trips_on_its_own_evidence_and_not_just_below(change, rule):
    cfg = GuardConfig(trend_window=0)
    latest = {**BASE, **change}
    trips = evaluate(latest, BASE, [BASE, latest], cfg)
    key, value = next(iter(change.items()))
    assert [t.rule for t in trips] == [rule] and "\n" not in trips[0].message
    assert trips[0].evidence[key] == value  # the evidence names the signal that tripped
    # Just inside the limit (half way from the baseline): nothing.
    inside = {**BASE, key: (BASE.get(key, 0.0) + value) / 2} if key not in ("probe/nonfinite",
                                                                            "train/skipped_since_probe") else BASE
    if key == "probe/reward_gap":
        inside = {**BASE, key: 0.2}
    assert evaluate(inside, BASE, [BASE, inside], cfg) == []


def test_clipped_trips_on_a_drop_too_where_the_baseline_has_clipped_pixels():
    """The shapes world's ReFL hacking: its black backgrounds take a haze (clipped 0.70 -> 0.45)."""
    cfg = GuardConfig(trend_window=0)
    base = {**BASE, "probe/clipped": 0.70}
    hazy = {**base, "probe/clipped": 0.45}
    trips = evaluate(hazy, base, [base, hazy], cfg)
    assert [t.rule for t in trips] == ["clipped"] and "drop > 0.2" in trips[0].message
    assert trips[0].evidence == {"probe/clipped": 0.45, "baseline probe/clipped": 0.70}
    inside = {**base, "probe/clipped": 0.55}  # DMDR fell 0.15 at most
    assert evaluate(inside, base, [base, inside], cfg) == []
    # where almost nothing is clipped (most real images) a drop cannot reach the limit
    assert evaluate({**BASE, "probe/clipped": 0.0}, BASE, [BASE, {**BASE, "probe/clipped": 0.0}], cfg) == []


def test_trend_needs_a_rise_at_every_probe_of_the_window():
    cfg = GuardConfig(trend_window=3)
    steps = [0.40, 0.43, 0.46, 0.49]  # +0.09 in all: under the 0.15 limit, over half of it
    history = [{**BASE, "probe/saturation": s} for s in steps]
    trips = evaluate(history[-1], BASE, history, cfg)
    assert [t.rule for t in trips] == ["trend"] and "probe/saturation rose at each of the last 3" in trips[0].message
    wobble = [{**BASE, "probe/saturation": s} for s in (0.40, 0.45, 0.44, 0.49)]
    assert evaluate(wobble[-1], BASE, wobble, cfg) == []
    # a climb out of a dip back to about the baseline (DMDR's saturation on the shapes world): not a trend
    dip = [{**BASE, "probe/saturation": s} for s in (0.31, 0.34, 0.38, 0.41)]
    assert evaluate(dip[-1], BASE, dip, cfg) == []


def test_signals_missing_from_either_probe_are_not_judged():
    cfg = GuardConfig()
    latest = {"probe/saturation": 0.41}  # no DMD gradient (dmd.weight 0), no critic ratio
    assert evaluate(latest, BASE, [BASE, latest], cfg) == []
