"""uvloop's Protocol echo server: the asyncio Protocol peer on uvloop's event loop."""

from __future__ import annotations

import asyncio
import sys

from bench.peers.asyncio_protocol import serve


def main() -> int:
    """Run the uvloop peer, or exit 3 with one line when uvloop is not installed."""
    try:
        import uvloop
    except ImportError:
        print("uvloop_protocol: error: uvloop is not installed", file=sys.stderr)
        return 3
    if hasattr(uvloop, "run"):
        uvloop.run(serve("uvloop-protocol"))
    else:
        # uvloop < 0.18 has no uvloop.run(); install() sets the loop policy instead.
        uvloop.install()
        asyncio.run(serve("uvloop-protocol"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
