"""``[torchrun ...] recipes/zimage_dmdr.py [--section.field value ...]``: the recipe :mod:`dmdr.recipes.zimage_dmdr`."""

import sys

from dmdr.recipes import run

if __name__ == "__main__":
    sys.exit(run("zimage_dmdr"))
