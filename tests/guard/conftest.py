"""Fixtures for the guard tests: a tiny LAION aesthetic head and a random LPIPS state dict (the tiny CLIP
checkpoints, ``tiny_arch`` and ``clip_folder``, are session fixtures of ``tests/tiny_models.py``)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def aesthetic_head_file(tmp_path_factory):
    """A tiny LAION-layout head (16-d input: the tiny CLIP's embedding width), saved as its state dict."""
    from dmdr.evaluation.aesthetic import aesthetic_head

    torch.manual_seed(5)
    head = aesthetic_head([16, 32, 8, 8, 4, 1]).eval()
    path = tmp_path_factory.mktemp("aesthetic") / "sac+logos+ava1-tiny-linearMSE.pth"
    torch.save(head.state_dict(), path)
    return path, head


@pytest.fixture(scope="module")
def lpips_file(tmp_path_factory):
    """A random LPIPS-alex (trunk + lin layers) saved as one state dict, the file a user makes once."""
    lpips = pytest.importorskip("lpips", reason="the eval extra (lpips)")
    torch.manual_seed(6)
    model = lpips.LPIPS(pretrained=False, net="alex", pnet_rand=True, verbose=False)
    with torch.no_grad():  # lin layers are zero-initialised without pretrained weights: make them count
        for lin in model.lins:
            lin.model[-1].weight.uniform_(0.0, 1.0)
    path = tmp_path_factory.mktemp("lpips") / "lpips_alex.pth"
    torch.save(model.state_dict(), path)
    return path, model.eval()
