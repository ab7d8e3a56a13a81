"""dmdr's tests, one package per area (``tests.<area>``), imported by their package names.

Shared across areas: :mod:`tests.tiny_helpers` (the tiny recipe's config on test assets, the tools as modules and as
scripts) and :mod:`tests.tiny_models` (session fixtures: the tiny SD3 assets, the tiny reward checkpoints), which
tests/conftest.py loads as a plugin so every area sees its fixtures.
"""
