"""The registry of model families: each adapter's :class:`~dmdr.models.family.FamilySpec`, by name.

Adding a family: its adapter module in this package ends with ``FAMILY = FamilySpec(...)``; list it here.
Importing the adapters imports torch only (diffusers and transformers load with a family's weights).
"""

from __future__ import annotations

from dmdr.errors import ConfigError
from dmdr.models import flux, flux2, sd3, sdxl, zimage
from dmdr.models.family import FamilySpec

FAMILIES: dict[str, FamilySpec] = {spec.name: spec for spec in (sd3.FAMILY, zimage.FAMILY, sdxl.FAMILY,
                                                          flux.FAMILY, flux2.FAMILY)}


def register_family(spec: FamilySpec) -> None:
    """Add a family defined outside this package (a plug-in; in-tree families are listed above)."""
    FAMILIES[spec.name] = spec


def family_spec(name: str) -> FamilySpec:
    """The spec of family ``name``; an unknown name is a one-line :class:`~dmdr.errors.ConfigError`."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ConfigError(f"unknown model family {name!r} (dmdr has: {', '.join(FAMILIES)})") from None


def family_of_pipeline(pipeline_class: str) -> FamilySpec | None:
    """The family whose folders declare ``pipeline_class`` (``None`` when dmdr has none)."""
    return next((f for f in FAMILIES.values() if f.pipeline_class == pipeline_class), None)


register_family(__import__("dmdr.models.qwenimage", fromlist=["FAMILY"]).FAMILY)  # added families: one line each
