"""iomux: an echo server with select, poll, epoll and kqueue backends.

The same package runs unchanged on Linux (epoll) and the BSDs (kqueue); the
``harness`` next to it runs it on real kernels and compares what they do.
"""

__version__ = "0.1.0"
