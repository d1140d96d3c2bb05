"""TCP sequence-number arithmetic (slirpy/stack/seq.py), the rules of RFC 9293 3.4 / RFC 1982.

Sequence space is a circle of 2**32 numbers: "a is before b" when b is less than half the circle
ahead of a. Every comparison is checked right at the wrap (2**32 - 1 -> 0), at distance exactly
2**31 (where RFC 1982 leaves the order undefined: here neither is before the other, so no two
numbers are ever both before each other) and against its definition on random pairs.
"""

from hypothesis import given, settings, strategies as st

from slirpy.stack import seq

TOP = 2**32 - 1  # the last sequence number before the wrap
HALF = 2**31

u32 = st.integers(0, TOP)
# distances that matter: the wrap, the half-circle boundary on both sides, anything
dist = st.one_of(st.sampled_from([0, 1, 2, HALF - 1, HALF, HALF + 1, TOP - 1, TOP]), u32)


def test_add_wraps_modulo_2_32():
    assert seq.add(TOP, 1) == 0
    assert seq.add(TOP, 2) == 1
    assert seq.add(TOP - 9, 20) == 10
    assert seq.add(5, -10) == 2**32 - 5  # going back over zero
    assert seq.add(0, 2**32) == 0  # a whole turn is the same number
    assert seq.add(7, 0) == 7


def test_sub_is_the_signed_distance_across_the_wrap():
    assert seq.sub(2, TOP) == 3  # 2 is three steps after 2**32 - 1
    assert seq.sub(TOP, 2) == -3
    assert seq.sub(0, TOP) == 1
    assert seq.sub(5, 5) == 0
    # the range is (-2**31, 2**31]: half a turn ahead counts as ahead
    assert seq.sub(HALF, 0) == HALF
    assert seq.sub(0, HALF) == HALF
    assert seq.sub(HALF + 1, 0) == -(HALF - 1)
    assert seq.sub(TOP, 0) == -1


@given(u32, st.integers(-(HALF - 1), HALF))
def test_sub_undoes_add(a, n):
    assert seq.sub(seq.add(a, n), a) == n


def test_comparisons_across_the_wrap():
    a, b = TOP - 1, 3  # b is 5 steps after a, across 2**32
    assert seq.lt(a, b) and seq.le(a, b) and not seq.gt(a, b) and not seq.ge(a, b)
    assert seq.gt(b, a) and seq.ge(b, a) and not seq.lt(b, a) and not seq.le(b, a)
    assert seq.lt(TOP, 0) and seq.gt(0, TOP)
    assert seq.le(TOP, TOP) and seq.ge(TOP, TOP)
    assert not seq.lt(TOP, TOP) and not seq.gt(TOP, TOP)
    assert seq.max_seq(a, b) == b and seq.max_seq(b, a) == b
    assert seq.max_seq(TOP, 0) == 0 and seq.max_seq(0, TOP) == 0
    assert seq.max_seq(TOP, TOP) == TOP


def test_half_a_turn_apart_is_neither_before_nor_after():
    for a in (0, 1, HALF, TOP):
        b = seq.add(a, HALF)
        assert not seq.lt(a, b) and not seq.lt(b, a)
        assert not seq.gt(a, b) and not seq.gt(b, a)
        assert not seq.le(a, b) and not seq.le(b, a)
        assert not seq.ge(a, b) and not seq.ge(b, a)
        # one step less than half a turn is still "after"
        c = seq.add(a, HALF - 1)
        assert seq.lt(a, c) and seq.le(a, c) and seq.gt(c, a) and seq.ge(c, a)
        assert not seq.lt(c, a) and not seq.gt(a, c)


@settings(max_examples=300)
@given(u32, dist)
def test_comparisons_match_their_definition(a, d):
    b = seq.add(a, d)
    ahead = 0 < d < HALF  # b is after a
    assert seq.lt(a, b) is ahead
    assert seq.gt(b, a) is ahead
    assert seq.le(a, b) is (d == 0 or ahead)
    assert seq.ge(b, a) is (d == 0 or ahead)
    # antisymmetry: never both before each other, equal only when the same number
    assert not (seq.lt(a, b) and seq.lt(b, a))
    assert (seq.le(a, b) and seq.le(b, a)) is (d == 0)
    assert (seq.ge(a, b) and seq.ge(b, a)) is (d == 0)
    assert seq.lt(a, b) is seq.gt(b, a)
    assert seq.le(a, b) is seq.ge(b, a)
    assert seq.max_seq(a, b) == (b if ahead else a)


@settings(max_examples=300)
@given(u32, dist, dist)
def test_between_is_a_half_open_window(lo, dx, size):
    """between(lo, x, hi) is lo <= x < hi walking forward from lo (a receive window, RFC 9293
    3.10.7.4), wherever the window sits on the circle."""
    x, hi = seq.add(lo, dx), seq.add(lo, size)
    assert seq.between(lo, x, hi) is (dx < size)


def test_between_edges_at_the_wrap():
    lo = TOP - 2
    hi = seq.add(lo, 10)  # window [2**32 - 3, 7)
    assert seq.between(lo, lo, hi)
    assert seq.between(lo, TOP, hi) and seq.between(lo, 0, hi) and seq.between(lo, 6, hi)
    assert not seq.between(lo, 7, hi)  # hi itself is outside
    assert not seq.between(lo, lo - 1, hi)
    assert not seq.between(lo, lo, lo)  # an empty window holds nothing
