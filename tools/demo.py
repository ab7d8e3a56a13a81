"""``python tools/demo.py``: :mod:`dmdr.cli.demo` (also installed as ``dmdr-demo``)."""

import sys

from dmdr.cli.demo import main

if __name__ == "__main__":
    sys.exit(main())
