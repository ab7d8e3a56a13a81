"""``python tools/eval.py``: :mod:`dmdr.cli.eval` (also installed as ``dmdr-eval``)."""

import sys

from dmdr.cli.eval import main

if __name__ == "__main__":
    sys.exit(main())
