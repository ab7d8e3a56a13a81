"""``[torchrun ...] recipes/sd3m_dmdr.py [--section.field value ...]``: the recipe :mod:`dmdr.recipes.sd3m_dmdr`."""

import sys

from dmdr.recipes import run

if __name__ == "__main__":
    sys.exit(run("sd3m_dmdr"))
