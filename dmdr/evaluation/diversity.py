"""Diversity (Table 6 of the paper): mean pairwise LPIPS between the images of one prompt's seeds.

Per prompt, the mean of ``LPIPS(x_i, x_j)`` over all seed pairs ``i < j`` (so ``--seeds`` >= 2); the report
averages it over prompts. The network is the ``lpips`` package's (``net`` ``alex`` by default,
``--metric-option lpips_net=vgg|squeeze``), built without any download (``pretrained=False,
pnet_rand=True``) and then loaded, strictly, from ONE local state-dict file ``--lpips-weights`` holding both
the ImageNet trunk and the LPIPS linear layers. Make that file once, where torchvision's ImageNet weights
can be fetched::

    python -c "import lpips, torch; torch.save(lpips.LPIPS(net='alex').state_dict(), 'lpips_alex.pth')"

Images go in as ``[0, 1]`` (``normalize=True`` maps them to LPIPS's ``[-1, 1]``) at their own resolution.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import torch
from torch import Tensor

from dmdr.errors import ModelLoadError
from dmdr.evaluation.registry import Metric, Options, Scorer, need_module, need_path, register_metric
from dmdr.rewards.models import error_line, load_state_dict_file

NETS = ("alex", "vgg", "squeeze")


def load_lpips(path: str | Path, net: str = "alex", flag: str = "--lpips-weights") -> torch.nn.Module:
    """``lpips.LPIPS(net)`` with every weight from the local file ``path`` (no download); one-line errors."""
    import lpips

    if net not in NETS:
        raise ModelLoadError(f"lpips_net {net!r}: choose one of {', '.join(NETS)}")
    state = load_state_dict_file(Path(path).expanduser(), flag.lstrip("-"))
    # lpips builds torchvision's trunk with the deprecated `pretrained=False` and prints; keep the output clean
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model = lpips.LPIPS(pretrained=False, net=net, pnet_rand=True, verbose=False)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ModelLoadError(f"{flag}: {path} is not an LPIPS-{net} state dict (trunk + lin layers): "
                             f"{error_line(e)}") from None
    return model.eval().requires_grad_(False)


def mean_pairwise(model: torch.nn.Module, images: Tensor) -> Tensor:
    """Mean LPIPS over all pairs ``i < j`` of ``images`` ``(S, 3, H, W)`` in ``[0, 1]``; shape ``(1,)``."""
    i, j = torch.triu_indices(images.shape[0], images.shape[0], offset=1)
    if i.numel() == 0:
        raise ValueError("diversity needs at least 2 images of the prompt")
    d = model(images[i], images[j], normalize=True)
    return d.reshape(-1).float().mean().reshape(1)


def load(options: Options, device: torch.device) -> Scorer:
    model = load_lpips(options["lpips_weights"], options.get("lpips_net") or "alex").to(device)

    @torch.no_grad()
    def score(images: Tensor, prompts: list[str]) -> Tensor:
        return mean_pairwise(model, images.to(device).float())

    return score


def _check(options: Options) -> str | None:
    return need_module("lpips", "pip install lpips, or the eval extra") or need_path(
        options, "lpips_weights", "one state dict of lpips.LPIPS, see dmdr/evaluation/diversity.py", "file")


DIVERSITY = register_metric(Metric("diversity", load=load, check=_check, per="prompt", min_seeds=2))
