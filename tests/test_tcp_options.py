"""TCP options (slirpy/stack/tcp_options.py) against the RFCs' rules, compared with scapy.

RFC 9293 3.1/3.2 (kinds 0 and 1 are one byte, every other option is kind, length, data; unknown
kinds are skipped by their length; an impossible length is refused), MSS (kind 2, length 4),
RFC 7323 (window scale: kind 3, length 3, shifts above 14 are used as 14; timestamps: kind 8,
length 10), RFC 2018 (SACK permitted: kind 4, length 2; SACK: kind 5, length 2 + 8n, at most
four blocks, three next to timestamps in the 40 option bytes).
"""

import struct

from hypothesis import given, settings, strategies as st
from scapy.layers.inet import TCP

from slirpy.stack.tcp_options import (MAX_SACK_BLOCKS, NO_OPTIONS, TcpOptions, build_tcp_options,
                                      parse_tcp_options_untrusted as parse)

u32 = st.integers(0, 2**32 - 1)


def test_empty_and_padding():
    assert parse(b"") == NO_OPTIONS
    assert parse(b"\x01\x01\x01\x01") == NO_OPTIONS
    assert parse(b"\x00") == NO_OPTIONS
    # after End of Option List nothing is read, garbage included (RFC 9293 3.1)
    assert parse(b"\x00\x02\x04\x05\xb4\xff") == NO_OPTIONS
    assert parse(b"\x01\x00\x02") == NO_OPTIONS


def test_each_option_alone():
    assert parse(b"\x02\x04\x05\xb4") == TcpOptions(mss=1460)
    assert parse(b"\x02\x04\xff\xff") == TcpOptions(mss=65535)
    assert parse(b"\x01\x03\x03\x07") == TcpOptions(wscale=7)
    assert parse(b"\x03\x03\x00") == TcpOptions(wscale=0)
    assert parse(b"\x04\x02") == TcpOptions(sack_perm=True)
    assert parse(b"\x08\x0a" + struct.pack("!II", 0xFFFFFFFF, 1)) == \
        TcpOptions(ts_val=0xFFFFFFFF, ts_ecr=1)
    assert parse(b"\x05\x0a" + struct.pack("!II", 2**32 - 5, 3)) == \
        TcpOptions(sack_blocks=((2**32 - 5, 3),))


def test_window_scale_above_14_is_used_as_14():
    """RFC 7323 2.3: a shift above 14 MUST be used as 14."""
    assert parse(b"\x03\x03\x0e").wscale == 14
    assert parse(b"\x03\x03\x0f").wscale == 14
    assert parse(b"\x03\x03\xff").wscale == 14
    assert parse(b"\x03\x03\x0d").wscale == 13


def test_unknown_kinds_are_skipped_by_their_length():
    # kind 30 (MPTCP) with 6 bytes, kind 34 (TFO) with 2, then an MSS
    opts = b"\x1e\x06abcd" + b"\x22\x02" + b"\x02\x04\x05\xb4"
    assert parse(opts) == TcpOptions(mss=1460)
    # a later MSS replaces an earlier one: the last one counts
    assert parse(b"\x02\x04\x00\x01\x02\x04\x00\x02") == TcpOptions(mss=2)


def test_impossible_lengths_are_refused_never_raised():
    for bad in (b"\x02",  # a kind with no length byte
                b"\x01\x01\x02",
                b"\x1e",
                b"\x02\x01\x05\xb4",  # length below 2 would loop or step backwards
                b"\x1e\x00",
                b"\x1e\x01",
                b"\x02\x05\x05\xb4\x00",  # MSS must be 4
                b"\x02\x03\x05",
                b"\x02\x04\x05",  # runs past the end
                b"\x03\x04\x07\x00",  # window scale must be 3
                b"\x03\x02",
                b"\x04\x03\x00",  # SACK permitted must be 2
                b"\x05\x02",  # SACK with no block
                b"\x05\x09" + b"\0" * 7,  # SACK not 2 + 8n
                b"\x05\x0b" + b"\0" * 9,
                b"\x08\x08" + b"\0" * 6,  # timestamps must be 10
                b"\x08\x0b" + b"\0" * 9,
                b"\x08\x0a" + b"\0" * 7):
        r = parse(bad)
        assert r in ("tcp_option_truncated", "tcp_option_bad_length"), (bad, r)
    assert parse(b"\x02") == "tcp_option_truncated"
    assert parse(b"\x01\x1e") == "tcp_option_truncated"
    assert parse(b"\x1e\x03\x00\x00") == NO_OPTIONS  # exactly to the end is fine
    assert parse(b"\x1e\x05\x00\x00") == "tcp_option_bad_length"


def test_sack_blocks_are_capped_at_four():
    blocks = [(i * 100, i * 100 + 50) for i in range(1, 5)]
    raw = bytes((5, 2 + 8 * 4)) + b"".join(struct.pack("!II", *b) for b in blocks)
    assert parse(raw).sack_blocks == tuple(blocks)
    # a fifth block cannot fit in 40 option bytes; were it there it would not be kept
    five = blocks + [(900, 950)]
    raw = bytes((5, 2 + 8 * 5)) + b"".join(struct.pack("!II", *b) for b in five)
    assert parse(raw).sack_blocks == tuple(blocks)


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.none(), st.integers(0, 65535)), st.one_of(st.none(), st.integers(0, 14)),
       st.booleans(), st.lists(st.tuples(u32, u32), max_size=4),
       st.one_of(st.none(), st.tuples(u32, u32)))
def test_build_then_parse_round_trip(mss, ws, sack_perm, blocks, ts):
    raw = build_tcp_options(mss, ws, sack_perm, blocks, ts)
    assert len(raw) % 4 == 0 and len(raw) <= 40  # the data offset counts 32-bit words
    got = parse(raw)
    assert (got.mss, got.wscale, got.sack_perm) == (mss, ws, sack_perm)
    assert (got.ts_val, got.ts_ecr) == (ts if ts else (None, None))
    # as many SACK blocks as fit in what the other options leave (RFC 2018 3)
    used = (4 if mss is not None else 0) + (4 if sack_perm else 0) + (12 if ts else 0) \
        + (4 if ws is not None else 0)
    fit = min(MAX_SACK_BLOCKS, (40 - used - 2) // 8)
    assert got.sack_blocks == tuple(blocks[:fit])
    # scapy reads the same options
    p = TCP(bytes(TCP(dataofs=5 + len(raw) // 4)) + raw)
    seen = dict(p.options)
    if mss is not None:
        assert seen["MSS"] == mss
    if ws is not None:
        assert seen["WScale"] == ws
    if ts:
        assert seen["Timestamp"] == ts
    assert ("SAckOK" in seen) == sack_perm


def test_build_sizes_and_order():
    assert build_tcp_options() == b""
    assert build_tcp_options(mss=1460) == b"\x02\x04\x05\xb4"
    assert build_tcp_options(wscale=7) == b"\x01\x03\x03\x07"
    assert build_tcp_options(sack_perm=True) == b"\x01\x01\x04\x02"
    assert build_tcp_options(ts=(1, 2)) == b"\x01\x01\x08\x0a" + struct.pack("!II", 1, 2)
    assert build_tcp_options(ts=(2**32 + 1, -1)) == b"\x01\x01\x08\x0a" + struct.pack(
        "!II", 1, 2**32 - 1)  # timestamps are taken modulo 2**32
    assert build_tcp_options(sack_blocks=[(2**32 + 3, 7)]) == \
        b"\x01\x01\x05\x0a" + struct.pack("!II", 3, 7)
    # a SYN with everything is 24 bytes, a data segment with timestamps and 3 blocks is 40
    assert len(build_tcp_options(mss=1460, wscale=7, sack_perm=True, ts=(1, 0))) == 24
    full = build_tcp_options(ts=(1, 2), sack_blocks=[(1, 2), (3, 4), (5, 6), (7, 8)])
    assert len(full) == 40 and len(parse(full).sack_blocks) == 3
    # everything at once: 24 bytes leave room for exactly one block
    most = build_tcp_options(mss=1, wscale=1, sack_perm=True, ts=(0, 0), sack_blocks=[(5, 6),
                                                                                      (7, 8)])
    assert len(most) == 36 and parse(most) == TcpOptions(1, 1, True, ((5, 6),), 0, 0)
