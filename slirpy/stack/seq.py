"""TCP sequence-number arithmetic modulo 2**32: the only place it is done (RFC 9293 3.4)."""

from __future__ import annotations

MOD = 1 << 32
MASK = MOD - 1
HALF = 1 << 31


def add(a: int, n: int) -> int:
    return (a + n) & MASK


def sub(a: int, b: int) -> int:
    """Signed distance a - b, in (-2**31, 2**31]."""
    d = (a - b) & MASK
    return d - MOD if d > HALF else d


def lt(a: int, b: int) -> bool:
    return 0 < ((b - a) & MASK) < HALF


def le(a: int, b: int) -> bool:
    return ((b - a) & MASK) < HALF


def gt(a: int, b: int) -> bool:
    return 0 < ((a - b) & MASK) < HALF  # lt(b, a), one call less on the per-segment path


def ge(a: int, b: int) -> bool:
    return ((a - b) & MASK) < HALF


def between(lo: int, x: int, hi: int) -> bool:
    """lo <= x < hi in sequence space."""
    return ((x - lo) & MASK) < ((hi - lo) & MASK)


def max_seq(a: int, b: int) -> int:
    return b if lt(a, b) else a
