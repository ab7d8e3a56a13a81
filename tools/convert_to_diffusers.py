"""``python tools/convert_to_diffusers.py``: :mod:`dmdr.cli.convert_to_diffusers`
(also installed as ``dmdr-convert-to-diffusers``)."""

import sys

from dmdr.cli.convert_to_diffusers import main

if __name__ == "__main__":
    sys.exit(main())
