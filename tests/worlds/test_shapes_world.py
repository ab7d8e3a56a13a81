"""The shapes world: prompts, renderer, ShapeEval and the reward agree on ground truth, and fail what is wrong."""

from __future__ import annotations

import pytest
import torch

from dmdr.worlds.shapes.reward import ShapesReward
from dmdr.worlds.shapes.scene import (
    COLORS,
    Group,
    Placed,
    Scene,
    all_scenes,
    is_held_out,
    layout,
    parse_prompt,
    render,
    render_batch,
    sample_scenes,
    split_prompts,
)
from dmdr.worlds.shapes.shapeeval import ATTRIBUTES, detect, evaluate, summarize


def _batch(n: int, seed: int = 0, split: str = "train"):
    g = torch.Generator().manual_seed(seed)
    scenes = sample_scenes(n, g, split=split)
    return scenes, [s.prompt() for s in scenes], render_batch(scenes, g)


def test_prompts_parse_back_and_split_without_overlap():
    scenes = all_scenes()
    assert len({s.prompt() for s in scenes}) == len(scenes) == 1116
    for s in scenes:
        assert parse_prompt(s.prompt()) == s
    train, held = set(split_prompts("train")), set(split_prompts("heldout"))
    assert not train & held and len(train) + len(held) == len(scenes)
    assert 0.1 < len(held) / len(scenes) < 0.2
    assert all(is_held_out(p) for p in held)
    for bad in ("a red", "three red circles", "a red circles", "two red circle", "a red circle near a blue square",
                "a purple circle"):
        with pytest.raises(ValueError, match="not a shapes-world prompt"):
            parse_prompt(bad)


def test_sampled_training_scenes_never_use_held_out_prompts():
    g = torch.Generator().manual_seed(1)
    assert not any(is_held_out(s.prompt()) for s in sample_scenes(500, g, split="train"))
    assert all(is_held_out(s.prompt()) for s in sample_scenes(100, g, split="heldout"))


def test_renders_pass_every_check_and_layouts_satisfy_the_relation():
    scenes, prompts, images = _batch(300, seed=2)
    rows = evaluate(images, prompts)
    summary = summarize(rows)
    assert all(summary[k] == 1.0 for k in (*ATTRIBUTES, "overall", "exact")), summary
    assert summary["fidelity"] == 1.0
    objects, _ = detect(images)
    for scene, objs in zip(scenes, objects):
        assert len(objs) == scene.num_objects
        assert sorted((o.color, o.shape) for o in objs) == sorted(
            (g.color, g.shape) for g in scene.groups for _ in range(g.count))


def test_noise_and_wrong_prompts_score_near_chance():
    _, prompts, images = _batch(200, seed=3)
    noise = summarize(evaluate(torch.rand_like(images), prompts))
    assert noise["overall"] == noise["exact"] == 0.0 and noise["fidelity"] < 0.2
    shuffled = prompts[1:] + prompts[:1]
    wrong = summarize(evaluate(images, shuffled))
    assert wrong["exact"] < 0.1 and wrong["overall"] < 0.3 and wrong["colour"] < 0.5


def _scene_image(placed: list[Placed]) -> torch.Tensor:
    return render(placed).unsqueeze(0)


def test_each_attribute_fails_on_its_own_mistake():
    red = Placed("red", "circle", 4, 3, 9)
    blue = Placed("blue", "square", 4, 20, 8)
    prompt = "a red circle left of a blue square"
    ok = evaluate(_scene_image([red, blue]), [prompt])[0]
    assert all(ok[k] for k in (*ATTRIBUTES, "exact"))
    swapped = evaluate(_scene_image([Placed("red", "circle", 4, 20, 9), Placed("blue", "square", 4, 3, 8)]),
                       [prompt])[0]
    assert not swapped["position"] and swapped["colour"] and swapped["shape"] and not swapped["exact"]
    wrong_shape = evaluate(_scene_image([Placed("red", "triangle", 4, 3, 9), blue]), [prompt])[0]
    assert wrong_shape["colour"] and not wrong_shape["shape"] and not wrong_shape["exact"]
    missing = evaluate(_scene_image([red]), [prompt])[0]
    assert not missing["colour"] and not missing["count"]
    extra = evaluate(_scene_image([red, blue, Placed("green", "square", 20, 10, 8)]), [prompt])[0]
    assert extra["colour"] and extra["shape"] and not extra["count"] and not extra["exact"]
    two = evaluate(_scene_image([red, Placed("red", "circle", 20, 3, 9)]), ["two red circles"])[0]
    assert two["exact"] and two["position"] is None
    one = evaluate(_scene_image([red]), ["two red circles"])[0]
    assert one["shape"] and not one["count"]


def test_specks_and_blur_lower_fidelity_but_not_the_objects():
    image = _scene_image([Placed("green", "square", 5, 5, 9)])
    specked = image.clone()
    specked[0, :, 25, 25] = torch.tensor(COLORS["red"])  # a one-pixel speck: not an object
    specked[0, :, 28, 5] = 0.5  # an off-palette pixel
    row = evaluate(specked, ["a green square"])[0]
    assert row["exact"] and row["fidelity"] == pytest.approx(1 - 2 / 1024)
    blurred = evaluate(torch.nn.functional.avg_pool2d(image, 5, 1, 2), ["a green square"])[0]
    assert blurred["exact"] and blurred["fidelity"] < 0.96  # the soft edge is neither green nor black


def test_layout_refuses_an_impossible_scene():
    scene = Scene((Group("red", "square", 2), Group("blue", "circle")), "left of")
    with pytest.raises(RuntimeError, match="could not lay out"):
        layout(scene, torch.Generator().manual_seed(0), size=12, tries=5)


def test_reward_ranks_renders_above_mistakes_and_is_hackable():
    reward = ShapesReward()
    scenes, prompts, images = _batch(64, seed=4)
    r = reward(images, prompts)
    assert r.shape == (64,) and bool((r > 0.6).all())
    assert bool((reward(torch.zeros_like(images), prompts).abs() < 1e-3).all())  # nothing there
    # a missing object costs its colour's share; a stray object of another colour costs more
    single = [i for i, s in enumerate(scenes) if len(s.groups) == 1]
    i = single[0]
    other = next(c for c in COLORS if c != scenes[i].groups[0].color)
    stray = images[i:i + 1].clone()
    stray[0, :, 0:1, :] = torch.tensor(COLORS[other]).view(3, 1, 1)  # a line of another colour
    assert reward(stray, [prompts[i]]) < r[i] - 0.3
    # hackable: painting the canvas in the prompt's colours beats the true render
    hack = torch.stack([torch.tensor(COLORS[s.groups[0].color]).view(3, 1, 1).expand(3, 32, 32) for s in scenes])
    for j, s in enumerate(scenes):
        if len(s.groups) > 1:
            hack[j, :, :, 16:] = torch.tensor(COLORS[s.groups[1].color]).view(3, 1, 1)
    assert reward(hack, prompts).mean() > r.mean() + 0.05
    # differentiable where pixels are not exactly on a palette colour
    x = torch.nn.functional.avg_pool2d(images, 3, 1, 1).requires_grad_(True)
    reward(x, prompts).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="shapes-world prompts only"):
        reward(images[:1], ["a photo of a cat"])


def test_reward_is_registered_by_name():
    from dmdr.config import RLConfig
    from dmdr.rewards import build_reward

    assert isinstance(build_reward("shapes", RLConfig()), ShapesReward)


def test_styled_reward_scores_the_restyled_colours():
    """``shapes-style`` equals ``shapes`` on the restyled prompts: a styled render scores like a plain render
    under ``shapes``, and the plain render (the colours the style moved away from) scores low."""
    from dmdr.config import RLConfig
    from dmdr.rewards import build_reward
    from dmdr.worlds.shapes.reward import StyledShapesReward
    from dmdr.worlds.shapes.style import styled_prompt, styled_scene

    styled = build_reward("shapes-style", RLConfig())
    assert isinstance(styled, StyledShapesReward)
    scenes, prompts, images = _batch(32, seed=7)
    styled_images = render_batch([styled_scene(s) for s in scenes], torch.Generator().manual_seed(7))
    expected = ShapesReward()(styled_images, [styled_prompt(p) for p in prompts])
    assert torch.equal(styled(styled_images, prompts), expected)
    assert bool((expected > 0.6).all())
    assert styled(images, prompts).mean() < expected.mean() - 0.5  # the unstyled colours are off-palette for it
