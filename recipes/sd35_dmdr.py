"""``[torchrun ...] recipes/sd35_dmdr.py [--section.field value ...]``: the recipe :mod:`dmdr.recipes.sd35_dmdr`."""

import sys

from dmdr.recipes import run

if __name__ == "__main__":
    sys.exit(run("sd35_dmdr"))
