"""The standard library's asyncio echo server, streams flavour (StreamReader/StreamWriter)."""

from __future__ import annotations

import asyncio
import signal
import sys

from bench.peers.common import announce, listen, parse_args

# What one read asks for: as large as the largest message the runner sends.
_CHUNK = 65536


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            data = await reader.read(_CHUNK)
            if not data:
                break
            writer.write(data)
            # drain() is the streams API's backpressure; the idiomatic loop awaits it.
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def serve(argv: list[str] | None = None) -> None:
    """Serve until SIGTERM or SIGINT."""
    args = parse_args("asyncio-streams", argv)
    server = await asyncio.start_server(_echo, sock=listen(args.host, args.port))
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    announce("asyncio-streams", server.sockets[0], args.ready_file)
    await stop.wait()
    server.close()


def main() -> int:
    """Run the asyncio streams peer."""
    asyncio.run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
