"""``python tools/sample.py``: :mod:`dmdr.cli.sample` (also installed as ``dmdr-sample``)."""

import sys

from dmdr.cli.sample import main

if __name__ == "__main__":
    sys.exit(main())
