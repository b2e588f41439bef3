"""``python -m aetcdcfg``: the same as the ``aetcdcfg`` console script."""

from .cli import main

main()
