"""The LAION aesthetic predictor: an MLP head on L2-normalised CLIP ViT-L/14 image embeddings, per image.

The head (LAION's improved-aesthetic-predictor, ``sac+logos+ava1-l14-linearMSE.pth``) is
``Linear(768, 1024) Dropout(0.2) Linear(1024, 128) Dropout(0.2) Linear(128, 64) Dropout(0.1) Linear(64, 16)
Linear(16, 1)``, state-dict keys ``layers.{0,2,4,6,7}.{weight,bias}``; its widths are read from the file
and its input width must equal the CLIP's embedding width. Scores are about 1-10.

``--aesthetic-head`` is the state-dict file; ``--aesthetic-clip`` the CLIP ViT-L/14 folder (open_clip or
transformers, as ``--clip-model``; the OpenAI ViT-L/14 the head was trained on), defaulting to
``--clip-model``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dmdr.errors import ModelLoadError
from dmdr.evaluation.clip_score import WHAT as CLIP_WHAT
from dmdr.evaluation.clip_score import load_clip_encoder
from dmdr.evaluation.registry import Metric, Options, Scorer, need_path, register_metric
from dmdr.rewards.models import error_line, load_state_dict_file

LINEAR_LAYERS = (0, 2, 4, 6, 7)
"""Indices of the head's ``nn.Linear`` layers in its ``nn.Sequential`` (dropouts in between)."""
DROPOUTS = {1: 0.2, 3: 0.2, 5: 0.1}


def aesthetic_head(widths: list[int]) -> nn.Sequential:
    """LAION's head for ``widths = [in, 1024, 128, 64, 16, 1]`` (any widths of that depth)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if 2 * i + 1 in DROPOUTS:
            layers.append(nn.Dropout(DROPOUTS[2 * i + 1]))
    return nn.Sequential(*layers)


def load_head(path: str | Path, flag: str = "--aesthetic-head") -> nn.Sequential:
    """The head from its state-dict file (keys ``layers.N.*`` or ``N.*``); wrong layout -> one line."""
    state = load_state_dict_file(Path(path).expanduser(), flag.lstrip("-"))
    state = {k[len("layers."):] if k.startswith("layers.") else k: v for k, v in state.items()}
    want = {f"{i}.{p}" for i in LINEAR_LAYERS for p in ("weight", "bias")}
    if set(state) != want or any(state[f"{i}.weight"].ndim != 2 for i in LINEAR_LAYERS):
        raise ModelLoadError(f"{flag}: {path} is not a LAION aesthetic head (expected the 5 linear layers "
                             f"layers.{{0,2,4,6,7}}.weight/bias, got keys {sorted(state)[:4]}...)")
    widths = [state["0.weight"].shape[1]] + [state[f"{i}.weight"].shape[0] for i in LINEAR_LAYERS]
    head = aesthetic_head(widths)
    try:
        head.load_state_dict(state)
    except RuntimeError as e:
        raise ModelLoadError(f"{flag}: {path} is not a LAION aesthetic head: {error_line(e)}") from None
    if widths[-1] != 1:
        raise ModelLoadError(f"{flag}: {path} outputs {widths[-1]} values, an aesthetic head outputs 1")
    return head.eval().requires_grad_(False)


def load(options: Options, device: torch.device) -> Scorer:
    clip_flag = "--aesthetic-clip" if options.get("aesthetic_clip") else "--clip-model"
    encoder = load_clip_encoder(options.get("aesthetic_clip") or options["clip_model"], clip_flag, device)
    head = load_head(options["aesthetic_head"]).to(device)
    size = encoder.preprocess.size
    with torch.no_grad():
        width = encoder.image_features(torch.zeros(1, 3, size, size)).shape[-1]
    if width != head[0].in_features:
        raise ModelLoadError(f"--aesthetic-head {options['aesthetic_head']}: the head takes {head[0].in_features}-d "
                             f"embeddings but the CLIP of {clip_flag} gives {width}-d ones (use CLIP ViT-L/14)")

    @torch.no_grad()
    def score(images: Tensor, prompts: list[str]) -> Tensor:
        embedding = F.normalize(encoder.image_features(images).float(), dim=-1)
        return head(embedding).squeeze(-1)

    return score


def _check(options: Options) -> str | None:
    note = need_path(options, "aesthetic_head", "LAION's sac+logos+ava1-l14-linearMSE.pth", "file")
    if note:
        return note
    if options.get("aesthetic_clip"):
        return need_path(options, "aesthetic_clip", CLIP_WHAT + " of CLIP ViT-L/14", "dir")
    return need_path(options, "clip_model", "--aesthetic-clip not given either; " + CLIP_WHAT, "dir")


AESTHETIC = register_metric(Metric("aesthetic", load=load, check=_check))
