"""``[torchrun ...] recipes/sdxl_dmdr.py [--section.field value ...]``: the recipe :mod:`dmdr.recipes.sdxl_dmdr`."""

import sys

from dmdr.recipes import run

if __name__ == "__main__":
    sys.exit(run("sdxl_dmdr"))
