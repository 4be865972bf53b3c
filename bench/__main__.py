"""python -m bench (what `make bench` runs)."""

from __future__ import annotations

import sys

from bench.runner import main

sys.exit(main())
