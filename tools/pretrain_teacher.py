"""``python tools/pretrain_teacher.py``: :mod:`dmdr.cli.pretrain_teacher`
(also installed as ``dmdr-pretrain-teacher``)."""

import sys

from dmdr.cli.pretrain_teacher import main

if __name__ == "__main__":
    sys.exit(main())
