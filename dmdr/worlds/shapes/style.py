"""A style for the shapes world, a LoRA that teaches it to the teacher, and the checker that scores it (re-turbo's
benchmark, ``benchmarks/returbo.py``).

The style is a **hue shift**: every colour a prompt names is drawn one step round the palette's hue circle (red ->
yellow -> green -> cyan -> blue -> magenta -> red); shapes, counts and layout are the prompt's. The prompt text is
unchanged, so only a model that learned the style draws it; the teacher draws the named colours.

Two scores, both ShapeEval's exact checks, against the *restyled* prompt (the same words with each colour shifted):

- ``style``: ShapeEval's ``colour`` accuracy against the restyled prompt (every shifted colour present in about the
  right amount and no other): ~0 for the plain teacher, high for a model that draws the style;
- ``style_shapeeval``: ShapeEval's ``overall`` against the restyled prompt: colour, shape, count and position of the
  styled image, the quality a styled few-step student should reach.

:func:`train_style_lora` fine-tunes a LoRA on the frozen teacher with the flow-matching loss on styled renders and
writes it in diffusers' format (what ``model.teacher_adapters`` reads).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from torch import Tensor

from dmdr.worlds.shapes.scene import Group, Scene, parse_prompt, render_batch, sample_scenes
from dmdr.worlds.shapes.shapeeval import evaluate, summarize

log = logging.getLogger("dmdr")

HUE_SHIFT = {"red": "yellow", "yellow": "green", "green": "cyan", "cyan": "blue", "blue": "magenta",
             "magenta": "red"}
"""The style: each named colour one step round the hue circle."""
STYLE_ADAPTER = "style"


def styled_scene(scene: Scene) -> Scene:
    return Scene(tuple(Group(HUE_SHIFT[g.color], g.shape, g.count) for g in scene.groups), scene.relation)


def styled_prompt(prompt: str) -> str:
    """The prompt a styled image of ``prompt`` satisfies (each colour shifted)."""
    return styled_scene(parse_prompt(prompt)).prompt()


def style_scores(images: Tensor, prompts: list[str]) -> dict[str, float]:
    """``style`` (colour accuracy against the restyled prompts) and ``style_shapeeval`` (overall against them)."""
    summary = summarize(evaluate(images, [styled_prompt(p) for p in prompts]))
    return {"style": summary["colour"], "style_shapeeval": summary["overall"], "style_fidelity": summary["fidelity"]}


def train_style_lora(teacher: str | Path, out: str | Path, *, steps: int = 400, rank: int = 8, lr: float = 1e-3,
                     batch_size: int = 32, seed: int = 0) -> Path:
    """A rank-``rank`` LoRA (alpha = rank) on the teacher's attention projections that draws :data:`HUE_SHIFT`:
    AdamW on ``||v(x_t, t, prompt) - (eps - x0_styled)||^2`` with SD3's logit-normal levels, the teacher frozen.
    Saved in diffusers' format as ``out/pytorch_lora_weights.safetensors``; returns the file."""
    from dmdr.export.release import generator_lora, lora_state_dict, write_lora
    from dmdr.models import load_backbone
    from dmdr.models.lora import inject_lora, lora_parameters
    from dmdr.worlds.shapes.pipeline import MAX_SEQUENCE_LENGTH

    g = torch.Generator().manual_seed(seed)
    backbone = load_backbone(teacher, dtype=torch.float32, max_sequence_length=MAX_SEQUENCE_LENGTH)
    net = backbone.teacher.net
    inject_lora(net, STYLE_ADAPTER, rank, float(rank), backbone.lora_targets, seed=seed)
    params = lora_parameters(net, STYLE_ADAPTER)
    for p in params:
        p.requires_grad_(True)
    with torch.no_grad():  # B = 0 would make A's first gradient zero too: start B small, A as drawn
        for p in params[1::2]:
            p.normal_(0.0, 1e-4, generator=g)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    param = backbone.parameterization
    start = time.time()
    for step in range(steps):
        scenes = sample_scenes(batch_size, g)
        with torch.no_grad():
            x0 = backbone.codec.encode(render_batch([styled_scene(s) for s in scenes], g))
            cond = backbone.text_encoder.encode([s.prompt() for s in scenes])
        t = torch.sigmoid(torch.randn(batch_size, generator=g))
        noise = torch.randn(x0.shape, generator=g)
        pred = backbone.teacher(param.renoise(x0, noise, t), t, cond, lora_scales={STYLE_ADAPTER: 1.0})
        loss = (pred - param.target(x0, noise)).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            log.info("style LoRA step %d/%d  loss %.4f  (%.0f s)", step, steps, loss.item(), time.time() - start)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = lora_state_dict(generator_lora(net, STYLE_ADAPTER), "sd3", torch.float32)
    return write_lora(out, state, {"dmdr.style": "hue shift", "dmdr.steps": str(steps), "dmdr.seed": str(seed)})


__all__ = ["HUE_SHIFT", "styled_prompt", "styled_scene", "style_scores", "train_style_lora"]
