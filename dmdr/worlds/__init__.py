"""Toy worlds: small synthetic problems that run DMDR end to end in seconds (tests, demos)."""

from dmdr.worlds.gaussians import (
    GaussianMixtureWorld,
    MLPDenoiser,
    class_sliced_wasserstein,
    sliced_wasserstein,
    train_teacher,
)
from dmdr.worlds.toy_dmdr import ToyDMDRConfig, ToyHistory, run_toy_dmdr

__all__ = [
    "GaussianMixtureWorld", "MLPDenoiser", "train_teacher", "sliced_wasserstein", "class_sliced_wasserstein",
    "ToyDMDRConfig", "ToyHistory", "run_toy_dmdr",
]
