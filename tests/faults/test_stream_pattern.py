"""Unit tests of the stream check of ``faultlib.stream_echo`` (the 256 MiB stream fault).

The echo is compared with what was sent at each offset, piece by piece, as it
arrives: these cases feed it a right stream cut anywhere, and streams with a
flipped byte, a dropped chunk, a doubled chunk and two chunks swapped, and
check that it finds the first wrong byte, and nothing in the right one.
"""

from __future__ import annotations

import os
import random
from typing import List, Optional

import pytest
from faultlib import _StreamPattern

pytestmark = pytest.mark.suite("faults")

CHUNK = 4096


def stream(block: bytes, numbers: List[int]) -> bytes:
    """The chunks ``numbers`` of the pattern, in that order."""
    pattern = _StreamPattern(block)
    return b"".join(bytes(pattern.at(n)) for n in numbers)


def check(block: bytes, data: bytes, seed: int) -> Optional[int]:
    """Feed ``data`` in random pieces (1 byte to 3 chunks) as stream_echo's reader does."""
    pattern = _StreamPattern(block)
    rng = random.Random(seed)
    offset = 0
    while offset < len(data):
        n = rng.randint(1, 3 * CHUNK)
        found = pattern.first_wrong(offset, memoryview(data)[offset : offset + n])
        if found is not None:
            return found
        offset += n
    return None


@pytest.mark.parametrize("seed", range(5))
def test_the_stream_sent_passes_however_it_is_cut(seed: int) -> None:
    block = os.urandom(CHUNK)
    assert check(block, stream(block, list(range(8))), seed) is None


@pytest.mark.parametrize("seed", range(3))
def test_a_flipped_byte_is_found_where_it_is(seed: int) -> None:
    block = os.urandom(CHUNK)
    data = bytearray(stream(block, list(range(8))))
    where = random.Random(seed).randrange(len(data))
    data[where] ^= 0x01
    assert check(block, bytes(data), seed) == where


@pytest.mark.parametrize(("numbers", "first"), [
    ([0, 1, 3, 4], 2 * CHUNK + 7),  # chunk 2 dropped: chunk 3's header, 8 bytes, differs in its last
    ([0, 1, 1, 2], 2 * CHUNK + 7),  # chunk 1 doubled
    ([0, 2, 1, 3], 1 * CHUNK + 7),  # chunks 1 and 2 swapped (header 2 against 1: its last byte)
])
def test_a_dropped_doubled_or_swapped_chunk_is_found(numbers: List[int], first: int) -> None:
    block = os.urandom(CHUNK)
    assert check(block, stream(block, numbers), seed=1) == first
