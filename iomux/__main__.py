"""python -m iomux: the same program as the ``iomux`` console script."""

from __future__ import annotations

import sys

from iomux.cli import main

if __name__ == "__main__":
    sys.exit(main())
