"""``python tools/cache_text_embeddings.py``: :mod:`dmdr.cli.cache_text_embeddings`
(also installed as ``dmdr-cache-text-embeddings``)."""

import sys

from dmdr.cli.cache_text_embeddings import main

if __name__ == "__main__":
    sys.exit(main())
