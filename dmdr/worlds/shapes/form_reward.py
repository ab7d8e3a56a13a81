"""The shapes world's *learned* structure reward (``--rl.rewards shapes-form``): does each named colour hold the
named shape, as many times as the prompt says?

The colour reward (:mod:`dmdr.worlds.shapes.reward`) is blind to shape and count, so it can lift at most the
``colour`` quarter of ShapeEval's ``overall``. This one is the world's stand-in for a learned reward model such as
HPS or PickScore: a small CNN, trained once on renders, reads the soft membership mask of each colour the prompt
names (the same ``m_c(p) = exp(-|p - c|^2 / (2 sigma^2))`` as the colour reward) and predicts (shape, count) out of
the world's six (3 shapes x counts 1, 2). The score is the mean over the prompt's groups of the predicted
probability of the group's own (shape, count), in ``[0, 1]``, differentiable in the image.

It is trained on *renders* (flat colours), made soft by random blur, noise and colour jitter so that it reads the
students' soft edges, and it never sees a generated image. On the teacher's own samples it agrees with ShapeEval
(per image AUC 0.71 for shape, 0.82 for count), but as a training signal it failed (issue 23, session 4: README's
candidates table): its input gradient is not a direction towards cleaner shapes, so it did not raise the student's
structure with the DMD loss, nor even its own score under ReFL alone. It stays so those runs can be reproduced.

The trained weights are committed (``assets/shapes-form-reward.safetensors``, 0.8 MB); ``python -m
dmdr.worlds.shapes.form_reward --out PATH`` retrains them bit for bit (CPU, one thread, seed 0, about 5 minutes).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from torch import Tensor, nn

from dmdr.errors import ConfigError
from dmdr.rewards import register_reward
from dmdr.worlds.shapes.reward import parse_reward_prompts
from dmdr.worlds.shapes.scene import COLORS, SHAPES, layout, render, sample_scenes

REPO = Path(__file__).resolve().parents[3]
WEIGHTS = REPO / "assets" / "shapes-form-reward.safetensors"
COUNTS = (1, 2)
CLASSES = tuple((s, n) for s in SHAPES for n in COUNTS)
"""The classifier's outputs, in order: (shape, count)."""
SIGMA = 0.2
"""Width of the soft colour membership (RGB distance), the colour reward's."""


def colour_masks(images: Tensor, colours: list[str], sigma: float = SIGMA) -> Tensor:
    """``(B, 1, H, W)`` soft membership of ``images[i]`` in palette colour ``colours[i]`` (differentiable)."""
    target = torch.tensor([COLORS[c] for c in colours], device=images.device, dtype=images.dtype)
    d2 = ((images - target.view(-1, 3, 1, 1)) ** 2).sum(1, keepdim=True)
    return torch.exp(-d2 / (2 * sigma**2))


class FormClassifier(nn.Module):
    """(shape, count) logits of a ``(B, 1, 32, 32)`` colour mask: three strided convs, then a linear head that keeps
    where the features are (count needs the layout, not only the texture)."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1), nn.SiLU(),  # 16
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.SiLU(),  # 8
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.SiLU(),  # 4
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(2 * width * 16, 128), nn.SiLU(), nn.Linear(128, len(CLASSES)))

    def forward(self, masks: Tensor) -> Tensor:
        return self.head(self.features(masks))


def soften(images: Tensor, generator: torch.Generator) -> Tensor:
    """Renders made to look generated: per image a Gaussian blur (sigma 0-1.2 px), colour jitter and pixel noise."""
    b = images.shape[0]
    sig = torch.rand(b, generator=generator) * 1.2
    r = torch.arange(-3, 4, dtype=images.dtype)
    kern = torch.exp(-(r.view(1, -1) ** 2) / (2 * sig.clamp_min(1e-3).view(-1, 1) ** 2))
    kern = kern / kern.sum(1, keepdim=True)  # (B, 7)
    x = images.reshape(1, b * 3, *images.shape[2:])
    kh = kern.repeat_interleave(3, 0).view(b * 3, 1, 1, 7)
    x = nn.functional.conv2d(nn.functional.pad(x, (3, 3, 0, 0), mode="replicate"), kh, groups=b * 3)
    x = nn.functional.conv2d(nn.functional.pad(x, (0, 0, 3, 3), mode="replicate"), kh.transpose(2, 3), groups=b * 3)
    x = x.view_as(images)
    x = x * (1 + 0.15 * torch.randn(b, 3, 1, 1, generator=generator))
    x = x + 0.06 * torch.randn(x.shape, generator=generator)
    return x.clamp(0, 1)


def training_batch(n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``n`` softened colour masks of training-split scenes and their class indices."""
    scenes = sample_scenes(n, generator, "train", single_fraction=0.6)
    images = soften(torch.stack([render(layout(s, generator)) for s in scenes]), generator)
    pick = [s.groups[int(torch.randint(len(s.groups), (), generator=generator))] for s in scenes]
    labels = torch.tensor([CLASSES.index((g.shape, g.count)) for g in pick])
    return colour_masks(images, [g.color for g in pick]), labels


def train_classifier(steps: int = 1500, batch: int = 128, seed: int = 0, log_every: int = 250) -> FormClassifier:
    """Train :class:`FormClassifier` on fresh softened renders every step (AdamW 2e-3, cosine to 0)."""
    with torch.random.fork_rng():  # the initial weights from ``seed`` without touching the caller's global RNG
        torch.manual_seed(seed)
        model = FormClassifier()
    generator = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = 2e-3 * 0.5 * (1 + math.cos(math.pi * step / steps))
        masks, labels = training_batch(batch, generator)
        loss = nn.functional.cross_entropy(model(masks), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if log_every and (step + 1) % log_every == 0:
            print(f"step {step + 1}: loss {loss.item():.4f}", flush=True)
    return model.eval()


def accuracy(model: FormClassifier, n: int = 1024, seed: int = 1) -> float:
    """Accuracy on ``n`` fresh softened renders drawn from another seed."""
    masks, labels = training_batch(n, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return float((model(masks).argmax(1) == labels).float().mean())


def load_classifier(path: Path | str = WEIGHTS) -> FormClassifier:
    """The committed classifier; a missing or mismatched file stops with one line naming it."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--rl.rewards shapes-form: classifier weights {path} not found "
                          f"(retrain: python -m dmdr.worlds.shapes.form_reward --out {path})")
    model = FormClassifier()
    try:
        model.load_state_dict(load_file(str(path)))
    except (RuntimeError, OSError, ValueError) as err:
        raise ConfigError(f"--rl.rewards shapes-form: {path} is not this classifier's weights ({err})") from None
    return model.eval().requires_grad_(False)


class FormReward:
    """``reward(images, prompts) -> (B,)`` in ``[0, 1]``: the mean over the prompt's groups of the classifier's
    probability of the group's (shape, count) in the group's colour mask."""

    def __init__(self, model: FormClassifier | None = None, name: str = "shapes-form"):
        self.model = model if model is not None else load_classifier()
        self.name = name

    def __call__(self, images: Tensor, prompts: list[str]) -> Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"{self.name} expects RGB images of shape (B, 3, H, W), got {tuple(images.shape)}")
        owner, colours, wanted = [], [], []
        for i, scene in enumerate(parse_reward_prompts(prompts, self.name)):
            for g in scene.groups:
                owner.append(i)
                colours.append(g.color)
                wanted.append(CLASSES.index((g.shape, g.count)))
        model = self.model.to(images.device)
        masks = colour_masks(images[owner].float(), colours)
        prob = model(masks).softmax(1)[torch.arange(len(owner)), torch.tensor(wanted, device=images.device)]
        index = torch.tensor(owner, device=images.device)
        total = torch.zeros(len(prompts), device=images.device).index_add(0, index, prob)
        groups = torch.zeros(len(prompts), device=images.device).index_add(0, index, torch.ones_like(prob))
        return (total / groups).to(images.dtype)


register_reward("shapes-form", lambda rl_cfg, device: FormReward())

__all__ = ["CLASSES", "FormClassifier", "FormReward", "colour_masks", "load_classifier", "soften", "train_classifier"]


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="train the shapes-form reward's classifier (CPU, deterministic)")
    p.add_argument("--out", default=str(WEIGHTS))
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    torch.set_num_threads(1)
    net = train_classifier(a.steps, seed=a.seed)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, a.out)
    print(f"held-out accuracy {accuracy(net):.3f}; wrote {a.out}")
