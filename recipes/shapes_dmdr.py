"""``[torchrun ...] recipes/shapes_dmdr.py [--section.field value ...]``: the recipe :mod:`dmdr.recipes.shapes_dmdr`."""

import sys

from dmdr.recipes import run

if __name__ == "__main__":
    sys.exit(run("shapes_dmdr"))
