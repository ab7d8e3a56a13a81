"""Rules on the probe's signals: each compares the latest probe with the baseline probe (or the recent trend).

Defaults (``guard.*``, see :class:`~dmdr.config.GuardConfig`), each chosen to catch what the
failure reports describe and measured on the shapes world (``benchmarks/guard_shapes.py``):

================  ==============================================================  =========
rule              trips when                                                      default
================  ==============================================================  =========
saturation        mean HSV saturation - baseline > ``max_saturation_rise``         0.15
colourfulness     colourfulness / baseline - 1 > ``max_colourfulness_rise``        1.0
clipped           clipped-pixel fraction - baseline > ``max_clipped_rise``,         0.1
                  or baseline - clipped-pixel fraction > ``max_clipped_drop``     0.2
diversity         seed diversity / baseline < ``min_diversity_ratio``, for each     0.5
                  measure (pixels, VAE latents; CLIP, LPIPS where configured)
critic_teacher    (critic / teacher loss) / baseline < ``min_critic_teacher_ratio``0.75
critic_lag        critic loss / baseline - 1 > ``max_critic_loss_rise`` (the       0.25
                  student outran the critic that models it)
dmd_grad          DMD gradient scale / baseline > ``max_dmd_grad_rise``            3.0
reward_gap        training-batch reward - probe reward > ``max_reward_gap``        0.25
clip_score        CLIP score / baseline < ``min_clip_score_ratio``                 0.9
aesthetic         baseline aesthetic score - aesthetic > ``max_aesthetic_drop``     0.5
nonfinite         any non-finite probe pixel, or a skipped (non-finite) step since the last probe
trend             saturation or colourfulness rose at each of the last ``trend_window`` probes, by more
                  than half its threshold in all, and is more than half its        3 probes
                  threshold above the baseline (a climb out of a dip is not one:
                  DMDR's saturation on the shapes world wobbles by +-0.05 and
                  once climbed 0.711 -> 0.813 over 3 probes, from a baseline
                  of 0.765; CI size, training seed 1)
================  ==============================================================  =========

A signal absent from either probe (no DMD loss, no RL yet, no CLIP configured) is not judged. The CLIP and
aesthetic thresholds are starting points, not measurements (the shapes world has no CLIP).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

DIVERSITY_SIGNALS = ("probe/diversity", "probe/diversity_latent", "probe/diversity_clip", "probe/diversity_lpips")
"""Seed diversity in pixels, in the VAE's latent space, of CLIP image embeddings, LPIPS (:mod:`dmdr.guard.probe`)."""


@dataclass(frozen=True)
class Trip:
    """A rule that tripped, with the numbers that made it trip."""

    rule: str
    message: str
    evidence: dict[str, float]


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("inf") if a else 1.0


def evaluate(latest: dict[str, float], baseline: dict[str, float], history: list[dict[str, float]],
             cfg: Any) -> list[Trip]:
    """Every rule the ``latest`` probe breaks.

    Args:
        latest: this probe's signals (``probe/...`` and the training signals it carries).
        baseline: the baseline probe's.
        history: the probes since the baseline, oldest first, ending with ``latest``.
        cfg: the :class:`~dmdr.config.GuardConfig`.
    """
    trips: list[Trip] = []

    def have(key: str) -> bool:
        return key in latest and key in baseline

    def trip(rule: str, key: str, text: str) -> None:
        trips.append(Trip(rule, f"{rule}: {text}", {key: latest[key], f"baseline {key}": baseline[key]}))

    if have("probe/saturation") and latest["probe/saturation"] - baseline["probe/saturation"] > cfg.max_saturation_rise:
        trip("saturation", "probe/saturation", f"saturation {baseline['probe/saturation']:.3f} -> "
             f"{latest['probe/saturation']:.3f} (rise > {cfg.max_saturation_rise})")
    if have("probe/colourfulness"):
        rise = _ratio(latest["probe/colourfulness"], baseline["probe/colourfulness"]) - 1
        if rise > cfg.max_colourfulness_rise:
            trip("colourfulness", "probe/colourfulness", f"colourfulness +{rise:.0%} (> "
                 f"{cfg.max_colourfulness_rise:.0%})")
    if have("probe/clipped") and latest["probe/clipped"] - baseline["probe/clipped"] > cfg.max_clipped_rise:
        trip("clipped", "probe/clipped", f"clipped pixels {baseline['probe/clipped']:.3f} -> "
             f"{latest['probe/clipped']:.3f} (rise > {cfg.max_clipped_rise})")
    if have("probe/clipped") and baseline["probe/clipped"] - latest["probe/clipped"] > cfg.max_clipped_drop:
        trip("clipped", "probe/clipped", f"clipped pixels {baseline['probe/clipped']:.3f} -> "
             f"{latest['probe/clipped']:.3f} (drop > {cfg.max_clipped_drop}: flat black or white areas took a tint)")
    for key in filter(have, DIVERSITY_SIGNALS):
        ratio = _ratio(latest[key], baseline[key])
        if ratio < cfg.min_diversity_ratio:
            trip("diversity", key, f"{key} at {ratio:.2f} of baseline (< {cfg.min_diversity_ratio}): the seeds of "
                 f"a prompt look alike")
    if have("probe/clip_score"):
        ratio = _ratio(latest["probe/clip_score"], baseline["probe/clip_score"])
        if ratio < cfg.min_clip_score_ratio:
            trip("clip_score", "probe/clip_score", f"CLIP score {baseline['probe/clip_score']:.2f} -> "
                 f"{latest['probe/clip_score']:.2f} ({ratio:.2f} of baseline < {cfg.min_clip_score_ratio})")
    if have("probe/aesthetic") and baseline["probe/aesthetic"] - latest["probe/aesthetic"] > cfg.max_aesthetic_drop:
        trip("aesthetic", "probe/aesthetic", f"aesthetic score {baseline['probe/aesthetic']:.2f} -> "
             f"{latest['probe/aesthetic']:.2f} (drop > {cfg.max_aesthetic_drop})")
    if have("probe/critic_teacher_ratio"):
        ratio = _ratio(latest["probe/critic_teacher_ratio"], baseline["probe/critic_teacher_ratio"])
        if ratio < cfg.min_critic_teacher_ratio:
            trip("critic_teacher", "probe/critic_teacher_ratio", f"critic/teacher loss at {ratio:.2f} of "
                 f"baseline (< {cfg.min_critic_teacher_ratio}): the samples left the teacher's distribution")
    if have("probe/critic_loss"):
        rise = _ratio(latest["probe/critic_loss"], baseline["probe/critic_loss"]) - 1
        if rise > cfg.max_critic_loss_rise:
            trip("critic_lag", "probe/critic_loss", f"critic loss on the probe +{rise:.0%} of baseline (> "
                 f"{cfg.max_critic_loss_rise:.0%}): the samples move faster than the critic can follow")
    if have("train/dmd_grad"):
        ratio = _ratio(latest["train/dmd_grad"], baseline["train/dmd_grad"])
        if ratio > cfg.max_dmd_grad_rise:
            trip("dmd_grad", "train/dmd_grad", f"DMD gradient scale x{ratio:.2f} of baseline (> "
                 f"{cfg.max_dmd_grad_rise})")
    if "probe/reward_gap" in latest and latest["probe/reward_gap"] > cfg.max_reward_gap:
        trips.append(Trip("reward_gap", f"reward_gap: training batch reward exceeds the probe's by "
                          f"{latest['probe/reward_gap']:.3f} (> {cfg.max_reward_gap})",
                          {"probe/reward_gap": latest["probe/reward_gap"]}))
    bad_steps = latest.get("train/skipped_since_probe", 0.0)
    if latest.get("probe/nonfinite", 0.0) > 0 or bad_steps > 0:
        trips.append(Trip("nonfinite", f"nonfinite: {latest.get('probe/nonfinite', 0):.0f} non-finite probe values, "
                          f"{bad_steps:.0f} skipped steps since the last probe",
                          {"probe/nonfinite": latest.get("probe/nonfinite", 0.0),
                           "train/skipped_since_probe": bad_steps}))
    trips += _trends(history, baseline, cfg)
    return trips


def _trends(history: list[dict[str, float]], baseline: dict[str, float], cfg: Any) -> list[Trip]:
    w = cfg.trend_window
    if w <= 0 or len(history) < w + 1:
        return []
    out = []
    limits = {"probe/saturation": cfg.max_saturation_rise,
              "probe/colourfulness": cfg.max_colourfulness_rise * baseline.get("probe/colourfulness", 0.0)}
    for key, limit in limits.items():
        values = [h.get(key) for h in history[-(w + 1):]]
        if any(v is None for v in values) or limit <= 0:
            continue
        rising = all(b > a for a, b in zip(values, values[1:]))
        base = baseline.get(key, values[0])
        if rising and values[-1] - values[0] > limit / 2 and values[-1] - base > limit / 2:
            out.append(Trip("trend", f"trend: {key} rose at each of the last {w} probes, {values[0]:.3f} -> "
                            f"{values[-1]:.3f} (> half the {limit:.3f} limit, and {base:.3f} at the baseline)",
                            {key: values[-1], f"{key} {w} probes ago": values[0], f"baseline {key}": base}))
    return out
