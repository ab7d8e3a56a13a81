"""dmdr: Distribution Matching Distillation meets Reinforcement Learning, on PyTorch FSDP2.

Public modules: :mod:`dmdr.config`, :mod:`dmdr.parameterization`, :mod:`dmdr.schedules`,
:mod:`dmdr.sampling`, :mod:`dmdr.algorithm`, :mod:`dmdr.losses`, :mod:`dmdr.models`,
:mod:`dmdr.rewards`, :mod:`dmdr.data`, :mod:`dmdr.distributed`, :mod:`dmdr.kernels`.
"""

__version__ = "0.1.0"
