"""Fused kernels (installed as ``dmdr.kernels``) with a plain-torch reference for each; see ``README.md``.

Run from the repo root (``python -c``, ``python -m pytest``), the root is on ``sys.path`` and this folder
is found as a top-level ``kernels``: the name of the Hugging Face package transformers imports. Then
this module hands that name to the installed package (or fails as a missing one would) instead of
posing as it; as ``dmdr.kernels`` it exports the dispatcher.
"""

if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _elsewhere = [p for p in sys.path if os.path.abspath(p or os.curdir) != _repo_root]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _elsewhere)
    if _spec is None:
        raise ModuleNotFoundError("No module named 'kernels' (this repo's kernels/ folder is dmdr.kernels)",
                                  name="kernels")
    _installed = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _installed  # the import system returns what sys.modules holds after this runs
    _spec.loader.exec_module(_installed)
else:
    from .dispatch import (
        backend,
        dmd_loss_fused,
        dmd_loss_fused_eps,
        dmd_loss_fused_eps_reference,
        dmd_loss_fused_reference,
        dmd_score_difference,
        dmd_score_difference_eps,
        dmd_score_difference_eps_reference,
        dmd_score_difference_reference,
        lora_linear,
        lora_linear_reference,
        renoise,
        renoise_reference,
        triton_available,
        use_triton,
    )

    __all__ = [
        "backend", "use_triton", "triton_available",
        "renoise", "dmd_score_difference", "dmd_score_difference_eps", "dmd_loss_fused", "dmd_loss_fused_eps",
        "lora_linear",
        "renoise_reference", "dmd_score_difference_reference", "dmd_score_difference_eps_reference",
        "dmd_loss_fused_reference", "dmd_loss_fused_eps_reference", "lora_linear_reference",
    ]
