"""Suite-wide settings: CPU only, deterministic, Triton (if exercised) through its interpreter."""

import os

# Triton reads this when a kernel is defined; kernel modules are imported lazily, after this line.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))
