"""``python tools/plan.py``: :mod:`dmdr.cli.plan` (also installed as ``dmdr-plan``)."""

import sys

from dmdr.cli.plan import main

if __name__ == "__main__":
    sys.exit(main())
