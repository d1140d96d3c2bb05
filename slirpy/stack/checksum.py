"""Internet checksum (RFC 1071) without a Python loop over words.

The one's-complement sum of 16-bit big-endian words is congruent to the big-endian integer value
of the bytes modulo 0xFFFF (2**16 == 1 mod 0xFFFF), so ``int.from_bytes(data) % 0xFFFF`` gives the
folded sum in C. Representation: a folded sum of 0 can only arise from all-zero data (or an
0xFFFF-only carry chain); we map the residue 0 to 0xFFFF unless the data is all zero, so the
result matches the classic loop bit for bit.
"""

from __future__ import annotations

_from = int.from_bytes


def ones_sum(data, initial: int = 0) -> int:
    """Folded one's-complement sum of ``data`` (bytes-like) plus ``initial``; in 0..0xFFFF."""
    n = len(data)
    if n & 1:
        v = _from(data, "big") << 8
    else:
        v = _from(data, "big")
    total = v + initial
    if total == 0:
        return 0
    r = total % 0xFFFF
    return 0xFFFF if r == 0 else r


def checksum(data, initial: int = 0) -> int:
    """The value to put in a checksum field."""
    return (~ones_sum(data, initial)) & 0xFFFF
