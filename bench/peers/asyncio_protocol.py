"""The standard library's asyncio echo server, Protocol flavour (the fast asyncio path).

Also the body of the uvloop peer, which only swaps the event loop.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from typing import cast

from bench.peers.common import announce, listen, parse_args


class EchoProtocol(asyncio.Protocol):
    """Write back whatever arrives; asyncio's transport buffers partial writes."""

    transport: asyncio.Transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A cast, not an isinstance check: uvloop's transports do not subclass asyncio's.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


async def serve(name: str, argv: list[str] | None = None) -> None:
    """Serve until SIGTERM or SIGINT."""
    args = parse_args(name, argv)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(EchoProtocol, sock=listen(args.host, args.port))
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    announce(name, server.sockets[0], args.ready_file)
    await stop.wait()
    server.close()


def main() -> int:
    """Run the asyncio Protocol peer."""
    asyncio.run(serve("asyncio-protocol"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
