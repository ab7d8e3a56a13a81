"""``[torchrun ...] recipes/flux_dmdr.py [--section.field value ...]``: the recipe :mod:`dmdr.recipes.flux_dmdr`."""

import sys

from dmdr.recipes import run

if __name__ == "__main__":
    sys.exit(run("flux_dmdr"))
