"""The shapes world's differentiable reward (``--rl.rewards shapes``): are the prompt's colours there?

For each colour ``c`` the prompt names, a soft pixel membership ``m_c(p) = exp(-|p - c|^2 / (2 sigma^2))``
gives the fraction of the canvas painted ``c``, ``a_c = mean_p m_c(p)``; the prompt asks for an area of
about ``A_c = count * (mean footprint of the shape)``. The score is

    r = mean_{c in prompt} tanh(gain * a_c / A_c)  -  tanh(a_off / A_1)

where ``a_off`` is the area of palette colours the prompt does not name and ``A_1`` one object's area.
A render scores about ``tanh(gain)`` (0.905 at the default gain 1.5, for an object of average size), a
missing object pulls its colour's term to 0, a stray object of another colour costs up to 1.

It is deliberately **hackable**, like a learned reward model: it is blind to shape, count and position,
and it keeps rising as the named colours grow past their true area (painting the canvas scores ~1.0).
ReFL alone drifts there; the DMD loss holds the generator near the teacher's distribution, which is
what the demo and ``benchmarks/paper_tables.py`` measure.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dmdr.rewards import register_reward
from dmdr.worlds.shapes.scene import COLORS, Scene, ideal_area_fraction, parse_prompt
from dmdr.worlds.shapes.style import styled_prompt


def parse_reward_prompts(prompts: list[str], reward: str) -> list[Scene]:
    """The scenes of a reward's prompts; a prompt from outside the world is one error naming the reward."""
    scenes = []
    for prompt in prompts:
        try:
            scenes.append(parse_prompt(prompt))
        except ValueError:
            raise ValueError(f"reward {reward!r} scores shapes-world prompts only, got {prompt!r}") from None
    return scenes


class ShapesReward:
    """``reward(images, prompts) -> (B,)`` in ``[-1, 1]``, differentiable in ``images``.

    Args:
        sigma: width of the soft colour membership (RGB distance).
        gain: how far past its true area a colour must grow to saturate its term.
    """

    def __init__(self, sigma: float = 0.2, gain: float = 1.5, name: str = "shapes"):
        self.sigma, self.gain, self.name = float(sigma), float(gain), name
        self._palette = torch.tensor(list(COLORS.values()))
        self._one_object = sum(ideal_area_fraction(s) for s in ("circle", "square", "triangle")) / 3

    def _targets(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """Per prompt: the wanted area of each palette colour (0 = not named) and the named mask."""
        names = list(COLORS)
        wanted = torch.zeros(len(prompts), len(names))
        for i, scene in enumerate(parse_reward_prompts(prompts, self.name)):
            for g in scene.groups:
                wanted[i, names.index(g.color)] += g.count * ideal_area_fraction(g.shape)
        return wanted, wanted > 0

    def __call__(self, images: Tensor, prompts: list[str]) -> Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"{self.name} expects RGB images of shape (B, 3, H, W), got {tuple(images.shape)}")
        wanted, named = (t.to(images.device) for t in self._targets(prompts))
        palette = self._palette.to(device=images.device, dtype=images.dtype)
        d2 = ((images.unsqueeze(1) - palette.view(1, -1, 3, 1, 1)) ** 2).sum(2)  # (B, K, H, W)
        area = torch.exp(-d2 / (2 * self.sigma**2)).mean(dim=(2, 3))  # (B, K)
        present = torch.tanh(self.gain * area / wanted.clamp_min(1e-6))
        named_f = named.to(images.dtype)
        score = (present * named_f).sum(1) / named_f.sum(1)
        off = (area * (1 - named_f)).sum(1)
        return score - torch.tanh(off / self._one_object)


class StyledShapesReward(ShapesReward):
    """``--rl.rewards shapes-style``: :class:`ShapesReward` against the *restyled* prompt
    (:func:`dmdr.worlds.shapes.style.styled_prompt`, each colour one step round the hue circle).

    The reward a user of the hue-shift style would train with: the plain ``shapes`` reward asks for the prompt's
    own colours, so next to a styled teacher it pulls the student back to the unstyled colours (re-turbo's
    benchmark measured it: a styled student at style 0.80 fell to 0.28-0.29 in 120 steps of the recipe with it).
    """

    def __call__(self, images: Tensor, prompts: list[str]) -> Tensor:
        return super().__call__(images, [styled_prompt(p) for p in prompts])


register_reward("shapes", lambda rl_cfg, device: ShapesReward())  # --rl.rewards shapes (dmdr.rewards)
register_reward("shapes-style", lambda rl_cfg, device: StyledShapesReward(name="shapes-style"))

__all__ = ["ShapesReward", "StyledShapesReward", "parse_reward_prompts"]
