"""The one differentiable image preprocessing shared by the CLIP-family reward models.

``images`` in ``[0, 1]``, shape ``(B, 3, H, W)`` -> resize the short side to ``size`` (bicubic,
antialiased, as ALGORITHM.md's RL branch says) -> centre-crop to ``size x size`` (a no-op for square
images, where this is one plain resize) -> ``(x - mean) / std``. Everything is a torch op inside the
graph, so ReFL's gradient reaches the images. Values are not clamped after the bicubic resize (a
clamp would zero the gradient of saturated pixels); CLIP's PIL pipeline clamps to uint8 instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _as_size(size: int | Sequence[int]) -> int:
    if isinstance(size, int):
        return size
    sizes = tuple(int(s) for s in size)
    if len(sizes) != 2 or sizes[0] != sizes[1]:
        raise ValueError(f"reward preprocessing needs a square input size, got {sizes}")
    return sizes[0]


class ImagePreprocess:
    """``[0, 1]`` RGB -> the reward model's normalised, ``size x size`` input (differentiable).

    Args:
        size: the model's square input resolution (e.g. 224).
        mean, std: per-channel normalisation of the model (OpenAI CLIP's by default).
    """

    def __init__(self, size: int | Sequence[int] = 224, mean: Sequence[float] = OPENAI_CLIP_MEAN,
                 std: Sequence[float] = OPENAI_CLIP_STD):
        self.size = _as_size(size)
        if self.size <= 0:
            raise ValueError(f"reward preprocessing size must be > 0, got {self.size}")
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"reward preprocessing needs 3 means and 3 positive stds, got {mean}, {std}")

    def __call__(self, images: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"reward models expect RGB images of shape (B, 3, H, W), got {tuple(images.shape)}")
        x = images.to(dtype or images.dtype)
        if not x.is_floating_point():
            raise ValueError(f"reward models expect float images in [0, 1], got {images.dtype}")
        h, w = x.shape[-2:]
        s = self.size
        if (h, w) != (s, s):
            scale = s / min(h, w)
            nh, nw = max(s, round(h * scale)), max(s, round(w * scale))
            x = F.interpolate(x, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)
            top, left = (nh - s) // 2, (nw - s) // 2
            x = x[:, :, top:top + s, left:left + s]
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        return (x - mean) / std

    def __repr__(self) -> str:
        return f"ImagePreprocess(size={self.size}, mean={self.mean}, std={self.std})"


__all__ = ["ImagePreprocess", "OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD"]
