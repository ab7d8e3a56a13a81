"""``python tools/profile.py``: :mod:`dmdr.cli.profile` (also installed as ``dmdr-profile``).

This file bears the standard library's name ``profile``: imported under it (any tool run by path has this
folder first on ``sys.path``), it hands the name to the standard module (see :mod:`dmdr.cli`).
"""

import sys

if __name__ == "profile":
    from dmdr.cli import become_stdlib_module

    become_stdlib_module(__name__)
elif __name__ == "__main__":
    from dmdr.cli.profile import main

    sys.exit(main())
