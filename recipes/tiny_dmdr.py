"""``[torchrun ...] recipes/tiny_dmdr.py [--section.field value ...]``: the recipe :mod:`dmdr.recipes.tiny_dmdr`."""

import sys

from dmdr.recipes import run

if __name__ == "__main__":
    sys.exit(run("tiny_dmdr"))
