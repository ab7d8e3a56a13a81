"""``[torchrun ...] recipes/qwenimage_dmdr.py [--section.field value ...]``: the recipe
:mod:`dmdr.recipes.qwenimage_dmdr`."""

import sys

from dmdr.recipes import run

if __name__ == "__main__":
    sys.exit(run("qwenimage_dmdr"))
