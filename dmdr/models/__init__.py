"""Model families behind one :class:`~dmdr.models.base.Backbone` protocol.

* :func:`load_backbone` reads a local diffusers folder (``model_index.json`` decides the family) and
  returns the frozen teacher, text encoder(s) and VAE; adapters: :mod:`dmdr.models.sd3`,
  :mod:`dmdr.models.zimage`, :mod:`dmdr.models.sdxl`, each declaring its
  :class:`~dmdr.models.family.FamilySpec` (registry: :mod:`dmdr.models.families`).
* :func:`make_generator` and :func:`add_critic_lora` build the trainable roles on it.
* :mod:`dmdr.models.tiny` writes tiny random pipeline folders for tests and the demo.

Importing this package does not import diffusers or transformers; loading a family does.
"""

from dmdr.models.base import (
    Backbone,
    Conditioning,
    Denoiser,
    LatentCodec,
    TextEncoder,
    cat_conditioning,
    repeat_conditioning,
)
from dmdr.models.families import FAMILIES, family_spec, register_family
from dmdr.models.family import FamilySpec
from dmdr.models.loading import load_backbone
from dmdr.models.roles import CRITIC, GENERATOR, add_critic_lora, make_generator
from dmdr.models.tiny import build_tiny, build_tiny_sd3, build_tiny_sdxl, build_tiny_zimage
from dmdr.models.tiny_flux import build_tiny_flux, build_tiny_flux2  # also adds them to build_tiny

__all__ = [
    "Backbone", "Conditioning", "Denoiser", "LatentCodec", "TextEncoder", "cat_conditioning",
    "repeat_conditioning", "FAMILIES", "FamilySpec", "family_spec", "load_backbone", "register_family",
    "CRITIC", "GENERATOR",
    "add_critic_lora", "make_generator", "build_tiny", "build_tiny_sd3", "build_tiny_sdxl",
    "build_tiny_zimage", "build_tiny_flux", "build_tiny_flux2",
]
