"""make bench: iomux against asyncio, uvloop and a C epoll server, through one load client."""
