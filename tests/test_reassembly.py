"""Reassembly: every order, duplicates, overlaps, timeouts, caps, the libslirp 3+dup case."""

from __future__ import annotations

import itertools
import os

from hypothesis import given, settings, strategies as st

from slirpy.stack.reassembly import Reassembler
from slirpy.stack.stats import Stats

KEY = (4, b"\x0a\0\2\x64", b"\x01\2\3\4", 17, 1)


def frags(data, step=8):
    return [(o, o + step < len(data), data[o:o + step]) for o in range(0, len(data), step)]


def test_every_order_of_four_fragments():
    data = os.urandom(30)
    fs = frags(data)
    for perm in itertools.permutations(fs):
        r = Reassembler(Stats())
        results = [r.insert(KEY, o, m, d, 0.0) for o, m, d in perm]
        assert results[:-1] == [None] * 3 and results[-1] == data
        assert len(r) == 0 and r.bytes_held == 0


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=1, max_size=200), st.randoms(), st.integers(1, 5))
def test_random_order_with_duplicates(data, rnd, step8):
    fs = frags(data, 8 * step8)
    seq = fs + [rnd.choice(fs) for _ in range(3)]
    rnd.shuffle(seq)
    r = Reassembler(Stats())
    out = [x for x in (r.insert(KEY, o, m, d, 0.0) for o, m, d in seq) if x is not None]
    # a duplicate after completion opens a fresh (incomplete or single-piece) entry
    assert out[0] == data
    assert all(x == data for x in out)
    assert r.bytes_held == sum(len(e.pieces and b"".join(e.pieces.values()))
                               for e in r._t.values())


def test_libslirp_three_fragments_then_duplicate_last():
    data = os.urandom(24)
    st_ = Stats()
    r = Reassembler(st_)
    fs = frags(data)
    assert r.insert(KEY, *fs[0], 0.0) is None
    assert r.insert(KEY, *fs[1], 0.0) is None
    assert r.insert(KEY, *fs[2], 0.0) == data
    assert len(r) == 0
    assert r.insert(KEY, *fs[2], 0.0) is None  # late duplicate: new entry, no crash
    assert len(r) == 1
    r.expire(31.0)
    assert len(r) == 0 and r.bytes_held == 0 and st_.dropped["reass_timeout"] == 1


def test_overlap_drops_whole_datagram():
    st_ = Stats()
    r = Reassembler(st_)
    assert r.insert(KEY, 0, True, b"a" * 16, 0.0) is None
    assert r.insert(KEY, 8, True, b"b" * 16, 0.0) is None
    assert len(r) == 0 and st_.dropped["reass_overlap"] == 1
    # the rest arriving later does not complete anything
    assert r.insert(KEY, 24, False, b"c", 0.0) is None


def test_exact_duplicate_ignored():
    st_ = Stats()
    r = Reassembler(st_)
    r.insert(KEY, 0, True, b"a" * 8, 0.0)
    r.insert(KEY, 0, True, b"a" * 8, 0.0)
    assert st_.dropped["reass_duplicate"] == 1
    assert r.insert(KEY, 8, False, b"z", 0.0) == b"a" * 8 + b"z"


def test_missing_piece_times_out():
    st_ = Stats()
    r = Reassembler(st_)
    r.insert(KEY, 0, True, b"a" * 8, 0.0)
    assert r.get_timer() == 30.0
    r.expire(29.9)
    assert len(r) == 1
    r.expire(30.0)
    assert len(r) == 0 and st_.dropped["reass_timeout"] == 1 and r.get_timer() is None


def test_caps_entries_bytes_size():
    st_ = Stats()
    r = Reassembler(st_, max_entries=64, max_bytes=1 << 20)
    for i in range(100):
        r.insert((4, b"a", b"b", 17, i), 0, True, b"x" * 8, 0.0)
    # full: the oldest in progress are evicted, the newest 64 are kept
    assert len(r) == 64 and st_.dropped["reass_evicted"] == 36
    assert sorted(k[4] for k in r._t) == list(range(36, 100))
    r2 = Reassembler(st_, max_entries=1000)
    for i in range(40):
        r2.insert((4, b"a", b"b", 17, i), 0, True, b"x" * 32768, 0.0)
    assert r2.bytes_held <= 1 << 20 and st_.dropped["reass_evicted"] == 36 + 8
    assert sorted(k[4] for k in r2._t) == list(range(8, 40))
    assert r.insert(KEY, 65528, False, b"x" * 16, 0.0) is None
    assert st_.dropped["reass_too_big"] == 1


def test_inconsistent_last_fragment():
    st_ = Stats()
    r = Reassembler(st_)
    r.insert(KEY, 16, True, b"x" * 8, 0.0)
    assert r.insert(KEY, 8, False, b"y" * 8, 0.0) is None
    assert st_.dropped["reass_inconsistent_length"] == 1 and len(r) == 0


def test_fragment_flood_does_not_lock_out_a_real_datagram():
    """A guest filling the table with never-finished datagrams must not stop the next real one."""
    st_ = Stats()
    r = Reassembler(st_)
    for i in range(10_000):
        r.insert((4, b"a", b"b", 17, i), 0, True, b"f" * 8, 0.0)
    whole = b"".join(bytes([i]) * 1480 for i in range(3))
    key = (4, b"a", b"b", 17, 99_999)
    assert r.insert(key, 0, True, whole[:1480], 1.0) is None
    assert r.insert(key, 1480, True, whole[1480:2960], 1.0) is None
    assert r.insert(key, 2960, False, whole[2960:], 1.0) == whole
    # and the libslirp 4.7.0 case: a duplicate of the last fragment after completion
    assert r.insert(key, 2960, False, whole[2960:], 1.0) is None
    assert len(r) <= 64 and r.bytes_held <= 1 << 20


def test_largest_datagram_is_65535_bytes():
    """RFC 791 3.1 / RFC 8200 4.5: a fragment whose offset + length passes 65535 is discarded,
    and the datagram it belonged to with it; 65535 itself is allowed."""
    st_ = Stats()
    r = Reassembler(st_)
    assert r.insert(KEY, 8, True, b"m" * 8, 0.0) is None
    assert r.insert(KEY, 65528, False, b"e" * 8, 0.0) is None  # ends at 65536
    assert st_.dropped["reass_too_big"] == 1 and len(r) == 0 and r.bytes_held == 0
    assert r.insert(KEY, 65528, False, b"e" * 7, 0.0) is None  # ends at 65535: kept
    assert st_.dropped["reass_too_big"] == 1 and len(r) == 1 and r.bytes_held == 7


def test_only_the_last_fragment_may_be_short():
    """RFC 8200 4.5 (and RFC 791's offsets in 8-byte units): a fragment with MF set must carry
    a non-zero multiple of 8 bytes; the last one may carry any length."""
    st_ = Stats()
    r = Reassembler(st_)
    for n in (0, 1, 7, 9, 15):
        assert r.insert(KEY, 0, True, b"q" * n, 0.0) is None
    assert st_.dropped["reass_bad_fragment_size"] == 5 and len(r) == 0
    assert r.insert(KEY, 0, True, b"q" * 16, 0.0) is None
    assert r.insert(KEY, 16, False, b"z", 0.0) == b"q" * 16 + b"z"
    assert st_.dropped["reass_bad_fragment_size"] == 5


def test_timeout_counts_from_the_first_fragment():
    """RFC 791 3.2 / RFC 8200 4.5: the reassembly timer starts with the first fragment and is
    not pushed back by later ones, so a trickle cannot hold an entry forever."""
    st_ = Stats()
    r = Reassembler(st_, timeout=30.0)
    r.insert(KEY, 0, True, b"a" * 8, 10.0)
    r.insert(KEY, 8, True, b"b" * 8, 35.0)  # 25 s later: still the same entry
    assert r.get_timer() == 40.0 and r.bytes_held == 16
    other = KEY[:4] + (2,)
    r.insert(other, 0, True, b"c" * 8, 20.0)
    assert r.get_timer() == 40.0  # the earliest deadline of all
    r.expire(39.999)
    assert len(r) == 2
    r.expire(40.0)
    assert len(r) == 1 and st_.dropped["reass_timeout"] == 1 and r.bytes_held == 8
    assert r.get_timer() == 50.0
    # the late fragment of the expired datagram opens a new entry, never completes the old one
    assert r.insert(KEY, 16, False, b"z", 41.0) is None


def test_bounds_are_inclusive_limits():
    """max_entries datagrams and max_bytes bytes may be in progress; one more evicts the oldest
    (never the datagram being added to); a fragment larger than the whole budget is refused."""
    st_ = Stats()
    r = Reassembler(st_, max_entries=3, max_bytes=48)
    for i in range(3):
        r.insert(KEY[:4] + (i,), 0, True, b"x" * 16, 0.0)
    assert len(r) == 3 and r.bytes_held == 48 and "reass_evicted" not in st_.dropped
    r.insert(KEY[:4] + (3,), 0, True, b"y" * 8, 0.0)  # a 4th datagram: the oldest goes
    assert sorted(k[4] for k in r._t) == [1, 2, 3] and st_.dropped["reass_evicted"] == 1
    assert r.bytes_held == 40
    r.insert(KEY[:4] + (3,), 8, True, b"y" * 8, 0.0)  # exactly at the byte budget: no eviction
    assert r.bytes_held == 48 and st_.dropped["reass_evicted"] == 1
    r.insert(KEY[:4] + (3,), 16, True, b"y" * 16, 0.0)  # over it: the oldest makes room
    assert sorted(k[4] for k in r._t) == [2, 3] and r.bytes_held == 48
    assert st_.dropped["reass_evicted"] == 2
    assert r.insert(KEY[:4] + (3,), 32, False, b"y", 0.0) == b"y" * 33
    assert st_.dropped["reass_evicted"] == 3
    assert len(r) == 0 and r.bytes_held == 0
    big = Reassembler(st_, max_bytes=16)
    assert big.insert(KEY, 0, True, b"b" * 24, 0.0) is None
    assert st_.dropped["reass_memory_full"] == 1 and len(big) == 0 and big.bytes_held == 0
    big.insert(KEY, 0, True, b"b" * 8, 0.0)
    assert big.insert(KEY, 8, True, b"b" * 16, 0.0) is None  # the one datagram cannot grow
    assert st_.dropped["reass_memory_full"] == 2 and len(big) == 1 and big.bytes_held == 8


def test_same_range_with_other_bytes_is_an_overlap():
    """RFC 5722: overlapping fragments drop the whole datagram; only an identical copy of a
    fragment already held is a harmless duplicate (ignored, counted)."""
    st_ = Stats()
    r = Reassembler(st_)
    r.insert(KEY, 0, True, b"a" * 8, 0.0)
    assert r.insert(KEY, 0, True, b"b" * 8, 0.0) is None
    assert st_.dropped["reass_overlap"] == 1 and len(r) == 0
    # the same bytes as the last fragment, once the end is known, are a duplicate too
    r.insert(KEY, 8, False, b"end", 0.0)
    assert r.insert(KEY, 8, False, b"end", 0.0) is None
    assert st_.dropped["reass_duplicate"] == 1 and r.bytes_held == 3
    # ... but the same bytes claiming to be a middle fragment contradict the known end
    r.insert(KEY, 16, True, b"c" * 8, 0.0)
    assert st_.dropped["reass_inconsistent_length"] == 1 and len(r) == 0
    # a piece that only touches its neighbours is no overlap
    r.insert(KEY, 8, True, b"m" * 8, 0.0)
    r.insert(KEY, 16, False, b"e", 0.0)
    assert r.insert(KEY, 0, True, b"s" * 8, 0.0) == b"s" * 8 + b"m" * 8 + b"e"


def test_last_fragment_must_be_past_every_piece():
    """A last fragment (MF clear) fixes the datagram's end: a piece already held beyond it, or a
    second last fragment with another end, is inconsistent and drops the datagram."""
    st_ = Stats()
    r = Reassembler(st_)
    r.insert(KEY, 16, True, b"x" * 8, 0.0)
    assert r.insert(KEY, 0, False, b"y" * 8, 0.0) is None  # ends at 8 < 24
    assert st_.dropped["reass_inconsistent_length"] == 1 and len(r) == 0 and r.bytes_held == 0
    r.insert(KEY, 16, False, b"z" * 4, 0.0)  # ends at 20
    assert r.insert(KEY, 24, False, b"z", 0.0) is None  # another end
    assert st_.dropped["reass_inconsistent_length"] == 2 and len(r) == 0
    r.insert(KEY, 8, False, b"z" * 4, 0.0)  # ends at 12
    assert r.insert(KEY, 0, False, b"z" * 16, 0.0) is None  # another end
    assert st_.dropped["reass_inconsistent_length"] == 3 and len(r) == 0
    r.insert(KEY, 8, True, b"p" * 8, 0.0)
    assert r.insert(KEY, 0, False, b"y" * 16, 0.0) is None  # covers the held piece
    assert st_.dropped["reass_overlap"] == 1


def test_an_empty_last_fragment_ends_the_datagram():
    """Only MF fragments must carry data (a non-zero multiple of 8); a last fragment may be
    empty and still fixes the end: pieces ending exactly there complete the datagram."""
    st_ = Stats()
    r = Reassembler(st_)
    assert r.insert(KEY, 16, False, b"", 0.0) is None
    assert r.insert(KEY, 8, True, b"b" * 8, 0.0) is None  # ends exactly at the known end
    assert r.insert(KEY, 0, True, b"a" * 8, 0.0) == b"a" * 8 + b"b" * 8
    r.insert(KEY, 0, True, b"a" * 8, 0.0)
    r.insert(KEY, 8, True, b"b" * 8, 0.0)
    assert r.insert(KEY, 16, False, b"", 0.0) == b"a" * 8 + b"b" * 8
    assert not st_.dropped and len(r) == 0


def test_budget_pressure_never_evicts_the_datagram_being_completed():
    """Making room evicts the oldest *other* datagram: the one this fragment belongs to keeps
    its pieces even when it is the oldest, and completes."""
    st_ = Stats()
    r = Reassembler(st_, max_bytes=32)
    a, b = KEY[:4] + (1,), KEY[:4] + (2,)
    r.insert(a, 0, True, b"a" * 16, 0.0)  # the oldest
    r.insert(b, 0, True, b"b" * 16, 0.0)
    assert r.insert(a, 16, False, b"z" * 8, 0.0) == b"a" * 16 + b"z" * 8
    assert st_.dropped["reass_evicted"] == 1 and len(r) == 0 and r.bytes_held == 0
