"""The learned shape-and-count reward (``shapes-form``): the committed classifier reads held-out renders, ranks the
right (shape, count) above wrong ones, is differentiable, retrains deterministically, and refuses a bad file."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from dmdr.errors import ConfigError
from dmdr.rewards import build_reward
from dmdr.worlds.shapes.form_reward import (
    CLASSES,
    WEIGHTS,
    FormReward,
    accuracy,
    load_classifier,
    soften,
    train_classifier,
)
from dmdr.worlds.shapes.scene import SHAPES, Group, Scene, render_batch, sample_scenes


@pytest.fixture(scope="module")
def reward() -> FormReward:
    return FormReward(load_classifier())


def test_committed_classifier_reads_softened_renders_of_another_seed():
    assert accuracy(load_classifier(), n=512, seed=7) >= 0.95


def test_reward_prefers_the_prompts_own_shape_and_count(reward):
    g = torch.Generator().manual_seed(3)
    scenes = sample_scenes(96, g, "heldout")
    images = soften(render_batch(scenes, g), g)
    right = reward(images, [s.prompt() for s in scenes])

    def wrong(s: Scene) -> str:  # the same colours, every group's shape changed
        return Scene(tuple(Group(x.color, SHAPES[(SHAPES.index(x.shape) + 1) % 3], x.count) for x in s.groups),
                     s.relation).prompt()

    mistaken = reward(images, [wrong(s) for s in scenes])
    assert right.mean() > 0.85 and mistaken.mean() < 0.15
    assert (right > mistaken).float().mean() > 0.9
    # Count: a single circle where the prompt asks for two scores low.
    one = render_batch([Scene((Group("red", "circle", 1),))] * 8, g)
    assert reward(one, ["two red circles"] * 8).mean() < 0.2 < reward(one, ["a red circle"] * 8).mean()


def test_reward_is_differentiable_and_in_range(reward):
    images = torch.rand(4, 3, 32, 32, requires_grad=True)
    r = reward(images, ["a red circle", "two blue squares", "a green triangle above a cyan square",
                        "a yellow circle left of a magenta triangle"])
    assert r.shape == (4,) and bool(((r >= 0) & (r <= 1)).all())
    r.sum().backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="shapes-world prompts only"):
        reward(images[:1].detach(), ["a photo of a cat"])


def test_training_is_deterministic_and_learns():
    a, b = (train_classifier(steps=60, batch=32, seed=5, log_every=0) for _ in range(2))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert accuracy(a, n=256) > 1.5 / len(CLASSES)  # well above chance (1/6) after 60 small steps (measured 0.35)


def test_registered_by_name_and_a_bad_weights_file_is_one_line(tmp_path):
    built = build_reward("shapes-form", None, "cpu")
    assert isinstance(built, FormReward) and WEIGHTS.is_file()
    with pytest.raises(ConfigError, match="not found"):
        load_classifier(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    save_file({"w": torch.zeros(2)}, str(bad))
    with pytest.raises(ConfigError, match="not this classifier's weights"):
        load_classifier(bad)
