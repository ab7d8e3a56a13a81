"""A 2-D toy world: a class-conditional mixture of Gaussians and a small MLP flow-matching teacher.

It exists so that DMDR's algorithm can be checked end to end in seconds on a CPU (tests/e2e): the
teacher is a :class:`~dmdr.models.base.Denoiser` in the :class:`~dmdr.parameterization.FlowMatching`
parameterization (velocity ``eps - x0``, called with ``t`` in ``[0, 1]``), conditioned on one-hot
class labels (``{"label": (B, K)}``; the all-zero label is the empty prompt, so CFG is meaningful),
and trained with label dropout. :func:`sliced_wasserstein` measures how far two point clouds are.

The DMDR loop over this world is :func:`dmdr.worlds.toy_dmdr.run_toy_dmdr`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from dmdr.models.base import Conditioning, Denoiser
from dmdr.parameterization import FlowMatching
from dmdr.sampling import randn_like


class GaussianMixtureWorld:
    """A mixture of isotropic 2-D Gaussians whose modes belong to classes.

    A sample draws its class uniformly, then one of that class's modes uniformly, then a point.

    Args:
        means: ``(M, 2)`` mode centres.
        std: the modes' common standard deviation.
        mode_labels: ``(M,)`` class of each mode, values in ``[0, num_classes)``; every class needs a mode.
    """

    def __init__(self, means: Tensor, std: float, mode_labels: Tensor):
        self.means = torch.as_tensor(means, dtype=torch.float32)
        self.std = float(std)
        self.mode_labels = torch.as_tensor(mode_labels, dtype=torch.long)
        if self.means.ndim != 2 or self.mode_labels.shape != self.means.shape[:1]:
            raise ValueError("means must be (M, D) and mode_labels (M,)")
        self.num_classes = int(self.mode_labels.max()) + 1
        counts = torch.bincount(self.mode_labels, minlength=self.num_classes)
        if (counts == 0).any():
            raise ValueError(f"every class needs at least one mode, counts per class: {counts.tolist()}")
        self._modes_of = [torch.nonzero(self.mode_labels == c).flatten() for c in range(self.num_classes)]

    @classmethod
    def ring(cls, num_modes: int = 8, num_classes: int = 4, radius: float = 3.0,
             std: float = 0.2) -> GaussianMixtureWorld:
        """``num_modes`` modes evenly on a circle; mode ``j`` belongs to class ``j % num_classes``.

        With 8 modes and 4 classes each class owns two opposite modes, so a class's mean is the
        origin: a mean-collapsed (one-step teacher) sample is far from every mode.
        """
        angles = torch.arange(num_modes, dtype=torch.float64) * (2 * math.pi / num_modes)
        means = radius * torch.stack([angles.cos(), angles.sin()], dim=1)
        return cls(means.float(), std, torch.arange(num_modes) % num_classes)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def sample_labels(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` class labels drawn uniformly."""
        return torch.randint(0, self.num_classes, (n,), generator=generator)

    def balanced_labels(self, n: int) -> Tensor:
        """``n`` labels cycling through the classes (equal counts when ``K`` divides ``n``)."""
        return torch.arange(n) % self.num_classes

    def sample(self, labels: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """One data point per label."""
        x = torch.empty(labels.shape[0], self.dim)
        for c in range(self.num_classes):
            idx = torch.nonzero(labels == c).flatten()
            if idx.numel() == 0:
                continue
            modes = self._modes_of[c]
            pick = modes[torch.randint(0, modes.numel(), (idx.numel(),), generator=generator)]
            x[idx] = self.means[pick] + self.std * randn_like(x[idx], generator)
        return x

    def cond(self, labels: Tensor) -> Conditioning:
        """The conditioning of a batch of labels: ``{"label": one_hot (B, K)}``."""
        return {"label": nn.functional.one_hot(labels, self.num_classes).float()}

    def uncond(self, batch_size: int) -> Conditioning:
        """The empty-prompt conditioning: an all-zero label."""
        return {"label": torch.zeros(batch_size, self.num_classes)}


class MLP(nn.Module):
    """``[x, time features, label] -> velocity``: an input layer, ``depth`` hidden layers, an output layer.

    The linears are named ``inp``, ``hidden.<i>``, ``out`` (the LoRA targets of the toy critic).
    """

    def __init__(self, dim: int, num_classes: int, hidden: int = 128, depth: int = 3, time_freqs: int = 8):
        super().__init__()
        self.register_buffer("freqs", math.pi * 2.0 ** torch.arange(time_freqs, dtype=torch.float32) / 2,
                             persistent=False)
        self.inp = nn.Linear(dim + 1 + 2 * time_freqs + num_classes, hidden)
        self.hidden = nn.ModuleList([nn.Linear(hidden, hidden) for _ in range(depth)])
        self.out = nn.Linear(hidden, dim)
        self.act = nn.SiLU()

    def forward(self, x: Tensor, t: Tensor, label: Tensor) -> Tensor:
        angles = t[:, None].to(x.dtype) * self.freqs
        h = self.act(self.inp(torch.cat([x, t[:, None].to(x.dtype), angles.sin(), angles.cos(), label], dim=1)))
        for layer in self.hidden:
            h = self.act(layer(h))
        return self.out(h)


class MLPDenoiser(Denoiser):
    """The toy teacher / generator / critic network behind the :class:`Denoiser` call.

    ``predict(x_t, t, cond)`` takes ``t`` in ``[0, 1]`` per sample and ``cond`` as ``{"label": (B, K)}``
    or a plain ``(B, K)`` tensor; it returns the flow-matching velocity.
    """

    def __init__(self, dim: int, num_classes: int, hidden: int = 128, depth: int = 3,
                 parameterization: FlowMatching | None = None):
        super().__init__(MLP(dim, num_classes, hidden, depth), parameterization or FlowMatching())

    def predict(self, x_t: Tensor, t: Tensor, cond: Conditioning | Tensor) -> Tensor:
        label = cond["label"] if isinstance(cond, dict) else cond
        return self.net(x_t, t, label)


def train_teacher(world: GaussianMixtureWorld, steps: int = 2000, seed: int = 0, batch_size: int = 512,
                  lr: float = 2e-3, hidden: int = 128, depth: int = 3, label_dropout: float = 0.15) -> MLPDenoiser:
    """Train the toy teacher with the flow-matching loss (uniform ``t``, label dropout for CFG).

    Returns the teacher in eval mode with gradients off.
    """
    rng = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        teacher = MLPDenoiser(world.dim, world.num_classes, hidden, depth)
    param = teacher.parameterization
    opt = torch.optim.AdamW(teacher.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=lr * 0.05)
    for _ in range(steps):
        labels = world.sample_labels(batch_size, rng)
        x0 = world.sample(labels, rng)
        cond = world.cond(labels)
        drop = torch.rand(batch_size, generator=rng) < label_dropout
        cond["label"][drop] = 0.0
        noise = randn_like(x0, rng)
        t = torch.rand(batch_size, generator=rng)
        pred = teacher(param.renoise(x0, noise, t), t, cond)
        loss = torch.mean((pred - param.target(x0, noise)) ** 2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    teacher.eval().requires_grad_(False)
    return teacher


def sliced_wasserstein(a: Tensor, b: Tensor, n_proj: int = 128, generator: torch.Generator | None = None,
                       p: int = 1) -> Tensor:
    """Sliced ``p``-Wasserstein distance between two equally sized point clouds ``(n, D)``.

    ``(mean over random unit directions and quantiles of |sorted a.u - sorted b.u|^p)^(1/p)``. The
    default ``p = 1`` because with well-separated modes ``W2`` is dominated by the sampling noise of
    the modes' weights (a 1% imbalance moves 1% of the mass across the gap, squared).
    """
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"point clouds must have the same (n, D) shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    dirs = torch.randn(a.shape[1], n_proj, generator=generator, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    # (n_proj, n): sorting along the contiguous last dim is several times faster than along dim 0
    pa = torch.sort(dirs.T @ a.double().T, dim=1).values
    pb = torch.sort(dirs.T @ b.double().T, dim=1).values
    return ((pa - pb).abs() ** p).mean().pow(1.0 / p).float()


def class_sliced_wasserstein(a: Tensor, b: Tensor, labels: Tensor, n_proj: int = 128,
                             generator: torch.Generator | None = None, p: int = 1) -> Tensor:
    """The mean over classes of :func:`sliced_wasserstein` between the two clouds' points of each class.

    ``a`` and ``b`` are paired by ``labels`` (the same label vector generated both), so a generator that
    ignores its conditioning is far even when its marginal matches.
    """
    dists = [sliced_wasserstein(a[labels == c], b[labels == c], n_proj, generator, p)
             for c in torch.unique(labels).tolist()]
    return torch.stack(dists).mean()
