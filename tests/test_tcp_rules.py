"""The TCP engine against rules of RFC 9293 (and RFC 5681/6298 for retransmission), stated so
that they hold whatever the implementation: sans-IO, `now` advanced by hand."""

import pytest

from slirpy.stack import events as E
from slirpy.stack import seq
from slirpy.stack.tcp import ACK, FIN, PSH, RST, SYN
from slirpy.stack.tcp_options import build_tcp_options
from test_tcp_engine import H, est

G4, R4 = "10.0.2.100", "127.0.0.9"
EMIT = ("family", "src", "sport", "dst", "dport", "seq", "ack", "flags", "window", "options",
        "payload")


def seg(o):
    """An emitted segment as a dict (the order of emit's arguments in tcp.py's contract)."""
    return dict(zip(EMIT, o))


G4B, R4B = bytes([10, 0, 2, 100]), bytes([127, 0, 0, 9])


def bare_reset(o, seqno, ackno, flags, gport=40000, rport=80, window=0):
    """A reset we send is a bare segment from the remote end to the guest: the family and the
    4-tuple of the connection, no options, no data (as slirp4netns sends it); window 0 when
    there is no connection (a receiver ignores a RST's window either way)."""
    r = seg(o)
    assert (r["family"], r["src"], r["sport"], r["dst"], r["dport"]) == (4, R4B, rport, G4B,
                                                                         gport)
    assert (r["seq"], r["ack"], r["flags"]) == (seqno, ackno, flags)
    assert window is None or r["window"] == window
    assert bytes(r["options"]) == b"" and bytes(r["payload"]) == b""


# ------------------------------------------------------------------- RFC 9293 3.10.7.1: CLOSED
def test_segments_without_a_connection_get_the_rfc_reset():
    """No connection: with ACK set the reset is <SEQ=SEG.ACK><CTL=RST>; without it
    <SEQ=0><ACK=SEG.SEQ+SEG.LEN><CTL=RST,ACK>, SYN and FIN counting one each; a RST is never
    answered. Addresses and ports are the segment's, swapped."""
    h = H()
    h.seg(500, 777, ACK | PSH, b"data")
    h.seg(2**32 - 2, 0, FIN | PSH, b"abc")  # SEG.LEN = 3 + FIN, across the wrap
    h.seg(2**32 - 1, 4321, SYN | ACK)
    h.seg(9, 0, RST)
    h.seg(9, 1234, RST | ACK)
    a, b, c = h.pop()
    bare_reset(a, 777, 0, RST)
    bare_reset(b, 0, 2, RST | ACK)
    bare_reset(c, 4321, 0, RST)
    assert h.stats.dropped["tcp_no_flow"] == 5 and h.ev == []


def test_syn_sent_refuses_an_unacceptable_ack():
    """RFC 9293 3.10.7.3 SYN-SENT: an ACK outside ISS+1 is answered <SEQ=SEG.ACK><CTL=RST>
    (unless it is a RST, then dropped); a RST with an acceptable ACK resets; a RST without ACK is
    dropped."""
    h = H(isn=1000)
    fl = h.e.connect_tcp(4, R4, 80, G4, 40000, 0.0)
    h.pop()
    h.seg(50, 5000, SYN | ACK)
    (r,) = h.pop()
    assert (r[5], r[7]) == (5000, RST)
    h.seg(50, 5000, RST | ACK)
    h.seg(50, 0, RST)
    assert h.pop() == [] and h.ev == [] and len(h.e.flows()) == 1
    h.seg(50, 1001, RST | ACK)
    assert h.ev == [E.TcpReset(fl), E.TcpClosed(fl)] and h.e.flows() == []


def test_connect_tcp_sends_a_syn_and_retries_it_with_backoff():
    """A port forward opens with <SEQ=ISS><CTL=SYN> carrying our MSS, window scale and
    SACK-permitted; unanswered it is resent with the timeout doubled each time (RFC 6298 5.5)
    and given up after a bounded number of tries, the glue told (TcpReset, TcpClosed) and the
    guest sent a RST. The same 4-tuple cannot be opened twice while the first is alive."""
    from slirpy.stack.tcp_options import parse_tcp_options_untrusted
    h = H(isn=2**32 - 1)
    fl = h.e.connect_tcp(4, R4, 80, G4, 40000, 0.0)
    (syn,) = (seg(o) for o in h.pop())
    assert (syn["seq"], syn["flags"], syn["dport"], syn["sport"]) == (2**32 - 1, SYN, 40000, 80)
    o = parse_tcp_options_untrusted(syn["options"])
    assert o.mss == h.e._mss_for(4) and o.wscale is not None and o.sack_perm
    assert h.e.connect_tcp(4, R4, 80, G4, 40000, 0.0) is None
    assert h.stats.dropped["tcp_flow_cap"] == 1
    times = []
    while (t := h.e.get_timer()) is not None and len(times) < 20:
        h.e.handle_timer(t)
        times.append(t)
        out = [seg(x) for x in h.pop()]
        assert all(x["seq"] == 2**32 - 1 for x in out if x["flags"] & SYN)
    gaps = [b - a for a, b in zip([0.0] + times, times)]
    assert all(g2 == 2 * g1 for g1, g2 in zip(gaps, gaps[1:-1]))
    assert h.ev[-2:] == [E.TcpReset(fl), E.TcpClosed(fl)]
    assert h.stats.dropped["tcp_handshake_timeout"] == 1 and h.e.flows() == []
    # answered in time: ESTABLISHED, our ACK of its SYN, the glue told
    h = H(isn=7)
    fl = h.e.connect_tcp(4, R4, 80, G4, 40001, 0.0)
    h.pop()
    h.seg(2**32 - 1, 8, SYN | ACK, window=100, sport=40001)
    (ack,) = (seg(o) for o in h.pop())
    assert (ack["seq"], ack["ack"], ack["flags"]) == (8, 0, ACK)
    assert h.ev == [E.TcpConnected(fl)] and h.e.get_timer() is None
    assert h.e.send_tcp(fl, b"x" * 300, 0.0) == 300
    assert sum(len(o[10]) for o in h.pop()) == 100  # a SYN-ACK's window is not scaled


def test_reject_answers_the_guests_syn_with_a_reset():
    """The host refused, could not reach, or timed out: the guest's SYN gets
    <SEQ=0><ACK=SYN+1><CTL=RST,ACK> (what slirp4netns sends for a refused port), counted by
    reason, the flow gone (its 4-tuple free for a new SYN)."""
    for reason in ("refused", "unreachable", "timeout"):
        h = H()
        h.seg(2**32 - 1, 0, SYN)
        (req,) = h.ev
        h.ev.clear()
        h.e.reject_tcp(req.flow, reason, 0.0)
        (r,) = h.pop()
        bare_reset(r, 0, 0, RST | ACK)
        assert h.stats.dropped["tcp_connect_" + reason] == 1
        assert h.ev == [E.TcpClosed(req.flow)] and h.e.flows() == []
        h.e.reject_tcp(req.flow, reason, 0.0)  # twice, or for no flow: nothing
        assert h.pop() == [] and h.stats.dropped["tcp_connect_" + reason] == 1
        h.seg(2**32 - 1, 0, SYN)
        assert isinstance(h.ev[-1], E.TcpConnectRequest)
    # a connection already answered (SYN-ACK sent) is reset at our next sequence number
    h = H(isn=50)
    h.seg(10, 0, SYN)
    (req,) = h.ev
    h.e.accept_tcp(req.flow, 0.0)
    h.pop()
    h.e.reject_tcp(req.flow, "timeout", 0.0)
    (r,) = h.pop()
    bare_reset(r, 51, 11, RST | ACK, window=None)


def test_host_reset_resets_the_guest():
    """The host side reset: the guest gets <SEQ=SND.NXT><ACK=RCV.NXT><CTL=RST,ACK>, the glue
    TcpClosed; a connect still pending is refused the same way at <SEQ=0>; a flow in TIME_WAIT
    just goes (nothing to reset); afterwards the guest's segments find no connection."""
    h = H()
    fl, s = est(h)
    h.seg(1001, s, ACK | PSH, b"abc")
    h.e.send_tcp(fl, b"xy", 0.0)
    h.pop()
    h.ev.clear()
    h.e.reset_tcp(fl, 0.0)
    (r,) = h.pop()
    bare_reset(r, seq.add(s, 2), 1004, RST | ACK, window=None)
    assert h.ev == [E.TcpClosed(fl)] and h.e.flows() == []
    h.e.reset_tcp(fl, 0.0)
    assert h.pop() == []
    h.seg(1004, s, ACK)
    assert seg(h.pop()[0])["flags"] == RST
    h = H()
    h.seg(99, 0, SYN)
    (req,) = h.ev
    h.ev.clear()
    h.e.reset_tcp(req.flow, 0.0)
    (r,) = h.pop()
    bare_reset(r, 0, 100, RST | ACK)
    assert h.ev == [E.TcpClosed(req.flow)]
    h = H()
    fl, s = est(h)
    h.e.shutdown_tcp(fl, 0.0)
    h.seg(1001, seq.add(s, 1), ACK | FIN)  # our FIN acked, then theirs: we closed first
    h.pop()
    h.ev.clear()
    assert [f["state"] for f in h.e.flows()] == ["TIME_WAIT"]
    h.e.reset_tcp(fl, 0.0)
    assert h.pop() == [] and h.ev == [] and h.e.flows() == []


def test_flows_lists_each_connection_and_its_bytes():
    h = H()
    fl, s = est(h)
    h.seg(1001, s, ACK | PSH, b"hello")
    h.e.recv_tcp(fl, 100, 0.0)
    h.e.send_tcp(fl, b"world!", 0.0)
    (f,) = h.e.flows()
    assert f == {"id": fl, "family": 4, "src": G4, "sport": 40000, "dst": R4, "dport": 80,
                 "state": "ESTABLISHED", "bytes_in": 5, "bytes_out": 6}


def test_mem_stats_count_what_is_held():
    h = H()
    fl, s = est(h)
    h.seg(1001, s, ACK | PSH, b"q" * 100)
    h.seg(2001, s, ACK | PSH, b"o" * 50)  # out of order: held too
    m = h.e.mem_stats()
    assert m == {"tcp_mem_bytes": 150, "tcp_mem_budget": h.e.mem_budget,
                 "tcp_mem_window_limited": 0, "tcp_mem_send_limited": 0}
    assert h.e.mem_recount() == 150


# --------------------------------------------------------------------- retransmission (5681)
def test_fast_retransmit_needs_three_duplicate_acks():
    """RFC 5681 3.2: the third duplicate ACK (not the second) triggers the retransmission of
    the first unacknowledged segment, once."""
    h = H()
    fl, s = est(h)
    h.seg(1001, s, ACK, window=65535)
    h.e.send_tcp(fl, b"z" * 5000, 0.0)
    first = [seg(o) for o in h.pop()]
    for _ in range(2):
        h.seg(1001, s, ACK, window=65535)
    assert h.pop() == []
    h.seg(1001, s, ACK, window=65535)
    (rx,) = (seg(o) for o in h.pop())
    assert rx["seq"] == s and bytes(rx["payload"]) == bytes(first[0]["payload"])
    assert rx["flags"] & ACK and not rx["flags"] & FIN  # RFC 9293 3.4: ACK on all but SYN
    h.seg(1001, s, ACK, window=65535)  # a fourth: no second retransmission of the same hole
    assert h.pop() == []


def test_progress_resets_the_retry_count():
    """RFC 6298 5: an ACK for new data restarts the timer; a connection that keeps making
    progress, however slowly, is never given up: the give-up counts unanswered timeouts in a
    row."""
    h = H()
    fl, s = est(h)
    h.seg(1001, s, ACK, window=65535)
    h.e.send_tcp(fl, b"p" * 20 * 1460, 0.0)
    h.pop()
    acked = s
    for _ in range(12):  # more rounds than the give-up limit, each loses a timeout first
        t = h.e.get_timer()
        h.e.handle_timer(t)
        h.pop()
        acked = seq.add(acked, 1460)
        h.seg(1001, acked, ACK, window=65535, now=t)
        h.pop()
    assert [f["state"] for f in h.e.flows()] == ["ESTABLISHED"]
    assert not any(isinstance(e, E.TcpReset) for e in h.ev)


def test_fin_is_acknowledged_only_by_the_byte_after_it():
    """RFC 9293 3.10.7.4: our FIN occupies one sequence number; an ACK up to the FIN but not past
    it leaves it unacknowledged (we keep retransmitting it), only SND.NXT acknowledges it."""
    h = H()
    fl, s = est(h)
    h.e.send_tcp(fl, b"end", 0.0)
    h.e.shutdown_tcp(fl, 0.0)
    out = [seg(o) for o in h.pop()]
    assert out[-1]["flags"] & FIN
    h.seg(1001, seq.add(s, 3), ACK)  # the data, not the FIN
    h.pop()
    t = h.e.get_timer()
    assert t is not None
    h.e.handle_timer(t)
    (fin,) = (seg(o) for o in h.pop())
    assert fin["flags"] & FIN and fin["seq"] == seq.add(s, 3)
    assert h.e.get_timer() is not None  # still owed: the FIN
    h.seg(1001, seq.add(s, 4), ACK)
    assert h.pop() == [] and h.e.get_timer() is None  # acknowledged: nothing left to resend
    h.seg(1001, seq.add(s, 4), ACK | FIN)  # the guest closes too: the connection ends
    assert E.TcpClosed(fl) in h.ev or [f["state"] for f in h.e.flows()] == ["TIME_WAIT"]


def test_closing_last_waits_for_the_ack_of_our_fin():
    """RFC 9293 3.6 (LAST-ACK): after the guest's FIN, our FIN must itself be acknowledged
    (SEG.ACK past it) before the connection is closed; an ACK of the data before it is not
    enough, and the FIN is resent meanwhile."""
    h = H()
    fl, s = est(h)
    h.seg(1001, s, ACK | FIN)
    assert E.TcpGuestEof(fl) in h.ev
    h.e.send_tcp(fl, b"end", 0.0)
    h.e.shutdown_tcp(fl, 0.0)
    h.pop()
    h.ev.clear()
    h.seg(1002, seq.add(s, 3), ACK)  # the data is acknowledged, the FIN (at s + 3) is not
    assert E.TcpClosed(fl) not in h.ev
    assert [f["state"] for f in h.e.flows()] == ["ESTABLISHED"]
    h.e.handle_timer(h.e.get_timer())
    (fin,) = (seg(o) for o in h.pop())
    assert fin["flags"] & FIN and fin["seq"] == seq.add(s, 3)
    h.seg(1002, seq.add(s, 4), ACK)
    assert E.TcpClosed(fl) in h.ev


# ------------------------------------------------------------------ SACK to the guest (2018)
from hypothesis import given, settings, strategies as st  # noqa: E402

from slirpy.stack.tcp_options import parse_tcp_options_untrusted  # noqa: E402


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 14), min_size=1, max_size=10, unique=True))
def test_sack_blocks_describe_what_is_held(slots):
    """RFC 2018 4: every ACK sent while data is held out of order carries SACK blocks; each
    block is a contiguous run of held bytes bounded by holes (adjacent segments are one block),
    all above the cumulative ACK; the first block holds the segment just received; at most 4.
    (Segments are 100-byte slots after a hole at RCV.NXT, arriving in any order.)"""
    h = H()
    fl, s = est(h)
    h.pop()
    base = 1001
    held = set()
    for k in slots:
        h.seg(base + 100 * k, s, ACK | PSH, bytes([k]) * 100)
        held.add(k)
        (a,) = h.pop()  # out-of-order data is acknowledged at once
        assert a[6] == base
        blocks = parse_tcp_options_untrusted(a[9]).sack_blocks
        runs, start = [], None
        for i in range(1, 16):
            if i in held and start is None:
                start = i
            if i not in held and start is not None:
                runs.append((base + 100 * start, base + 100 * i))
                start = None
        assert 1 <= len(blocks) <= 4 and len(set(blocks)) == len(blocks)
        assert set(blocks) <= set(runs)
        assert len(blocks) == min(4, len(runs))
        assert blocks[0][0] <= base + 100 * k < blocks[0][1]  # the newest first
    # the hole filled: the ACK moves to the next hole; what lies beyond it is still SACKed
    h.seg(base, s, ACK | PSH, b"\0" * 100)
    h.e.flush_pending(1.0)
    last = h.pop()[-1]
    held.add(0)
    first_hole = min(i for i in range(16) if i not in held)
    assert last[6] == base + 100 * first_hole
    beyond = [r for r in runs if r[0] > last[6]]
    blocks = parse_tcp_options_untrusted(last[9]).sack_blocks
    assert set(blocks) <= set(beyond) and len(blocks) == min(4, len(beyond))


def _fire_all(h, limit=30):
    """Let every timer fire in turn; returns the times and what was sent at each."""
    log = []
    while (t := h.e.get_timer()) is not None and len(log) < limit:
        h.e.handle_timer(t)
        log.append((t, [seg(o) for o in h.pop()]))
    return log


def test_handshake_retries_give_up_after_a_minute_not_before():
    """An unanswered SYN (port forward) or SYN-ACK (guest connection) is resent with the
    timeout doubling (RFC 6298 5.5), from the same ISS, and the attempt is abandoned after
    about a minute: not before 60 s, not after libslirp's 75 s (TCPTV_KEEP_INIT); the guest
    gets <SEQ=ISS+1><CTL=RST,ACK>, the glue TcpReset and TcpClosed."""
    for passive in (False, True):
        h = H(isn=900)
        if passive:  # the guest offers window scale 0: both sides then scale (RFC 7323 2.2)
            h.seg(77, 0, SYN, options=build_tcp_options(mss=1460, wscale=0))
            (req,) = h.ev
            fl = req.flow
            h.e.accept_tcp(fl, 0.0)
            want = SYN | ACK
        else:
            fl = h.e.connect_tcp(4, R4, 80, G4, 40000, 0.0)
            want = SYN
        (first,) = (seg(o) for o in h.pop())
        log = _fire_all(h)
        *retries, (t_end, last) = log
        # a retransmitted SYN is the same SYN: the options (MSS, window scale, SACK-permitted:
        # only ever sent on a SYN, RFC 7323 1.3 / RFC 2018 2) are offered again
        assert all(bytes(out[0]["options"]) == bytes(first["options"]) != b""
                   for _, out in retries)
        assert all([x["flags"] for x in out] == [want] and out[0]["seq"] == 900
                   for _, out in retries)
        assert 60.0 <= t_end <= 75.0
        assert [(x["seq"], x["flags"]) for x in last] == [(901, RST | ACK)]
        assert h.ev[-2:] == [E.TcpReset(fl), E.TcpClosed(fl)]
        assert h.stats.dropped["tcp_handshake_timeout"] == 1


def test_data_retransmission_gives_up_with_a_reset():
    """RFC 9293 3.8.3 (R2): when retransmissions stay unanswered the connection is closed: the
    guest gets RST at SND.NXT, the glue TcpReset, counted as a retransmit timeout."""
    h = H()
    fl, s = est(h)
    h.e.send_tcp(fl, b"lost", 0.0)
    h.pop()
    log = _fire_all(h)
    assert all(out[0]["seq"] == s and bytes(out[0]["payload"]) == b"lost" for _, out in log[:-1])
    # RFC 6298 5.5: the timeout doubles at each expiry, up to a maximum of at least 60 s (2.5);
    # RFC 1122 4.2.3.5: data is retransmitted for at least 100 s before giving up
    times = [t for t, _ in log]
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert all(g2 == min(2 * g1, g2) and (g2 == 2 * g1 or g2 >= 60.0)
               for g1, g2 in zip(gaps, gaps[1:]))
    assert gaps[-1] >= 60.0 and times[-1] >= 100.0
    assert [(x["seq"], x["flags"]) for x in log[-1][1]] == [(seq.add(s, 4), RST | ACK)]
    assert h.ev[-2:] == [E.TcpReset(fl), E.TcpClosed(fl)]
    assert h.stats.dropped["tcp_retransmit_timeout"] == 1


def test_fast_retransmit_of_the_last_segment_carries_the_fin():
    """RFC 9293 3.10.4: our FIN follows the last data byte; a retransmission that ends at that
    byte carries the FIN again, and a lone FIN is resent as such, at its own sequence number."""
    h = H()
    fl, s = est(h)
    h.seg(1001, s, ACK, window=65535)
    h.e.send_tcp(fl, b"d" * 100, 0.0)
    h.e.shutdown_tcp(fl, 0.0)
    h.pop()
    for _ in range(3):
        h.seg(1001, s, ACK, window=65535)
    (rx,) = (seg(o) for o in h.pop())
    assert rx["seq"] == s and bytes(rx["payload"]) == b"d" * 100 and rx["flags"] & FIN
    assert rx["flags"] & ACK
    # a FIN sent alone after all data was acknowledged, then three duplicate ACKs of it
    h = H()
    fl, s = est(h)
    h.seg(1001, s, ACK, window=65535)
    h.e.send_tcp(fl, b"d" * 100, 0.0)
    h.seg(1001, seq.add(s, 100), ACK, window=65535)
    h.pop()
    h.e.shutdown_tcp(fl, 0.0)
    (fin,) = (seg(o) for o in h.pop())
    assert fin["seq"] == seq.add(s, 100) and fin["flags"] & FIN
    for _ in range(3):
        h.seg(1001, seq.add(s, 100), ACK, window=65535)
    (rx,) = (seg(o) for o in h.pop())
    assert rx["seq"] == seq.add(s, 100) and rx["flags"] & FIN and bytes(rx["payload"]) == b""
    assert rx["flags"] & ACK
    # and the last segment resent while no FIN was asked for carries none
    h = H()
    fl, s = est(h)
    h.seg(1001, s, ACK, window=65535)
    h.e.send_tcp(fl, b"e" * 100, 0.0)
    h.pop()
    for _ in range(3):
        h.seg(1001, s, ACK, window=65535)
    (rx,) = (seg(o) for o in h.pop())
    assert bytes(rx["payload"]) == b"e" * 100 and rx["flags"] & (ACK | FIN) == ACK


def test_a_repeated_fin_is_acknowledged_again_a_bare_ack_is_not():
    """RFC 9293 3.10.7.4 (CLOSE-WAIT and later): a retransmitted FIN, or data beyond it, is
    answered with an ACK of RCV.NXT (the first ACK may have been lost); an ACK is never
    acknowledged."""
    h = H()
    fl, s = est(h)
    h.seg(1001, s, ACK | FIN)
    h.e.flush_pending(1.0)
    h.pop()
    h.seg(1001, s, ACK | FIN)
    (a,) = (seg(o) for o in h.pop())
    assert (a["ack"], a["flags"]) == (1002, ACK)
    h.seg(1002, s, ACK | PSH, b"late")
    (a,) = (seg(o) for o in h.pop())
    assert a["ack"] == 1002
    h.seg(1002, s, ACK)
    h.e.flush_pending(2.0)
    assert h.pop() == []


def test_writable_tells_the_glue_when_the_send_buffer_has_room_again():
    """Flow control toward the host socket: send_tcp takes what fits in the send buffer; once
    the guest acknowledges bytes, the glue is told once (TcpWritable) and exactly that room is
    taken; never after the host side closed (nothing more may be sent after a FIN)."""
    h = H(sndbuf=3000)
    fl, s = est(h)
    h.seg(1001, s, ACK, window=65535)
    assert h.e.send_tcp(fl, b"a" * 5000, 0.0) == 3000
    h.pop()
    h.ev.clear()
    h.seg(1001, seq.add(s, 1000), ACK, window=65535)
    assert h.ev == [E.TcpWritable(fl)]
    assert h.e.send_tcp(fl, b"b" * 5000, 0.0) == 1000  # the room that was freed, no more
    h.ev.clear()
    h.seg(1001, seq.add(s, 1500), ACK, window=65535)
    h.seg(1001, seq.add(s, 2000), ACK, window=65535)
    assert h.ev == [E.TcpWritable(fl)]  # once, until the glue writes again and is cut short
    h.ev.clear()
    h.seg(1001, seq.add(s, 2500), ACK, window=65535)
    assert h.ev == []
    assert h.e.send_tcp(fl, b"c" * 5000, 0.0) == 1500
    h.e.shutdown_tcp(fl, 0.0)
    h.ev.clear()
    h.seg(1001, seq.add(s, 3500), ACK, window=65535)
    assert not any(isinstance(e, E.TcpWritable) for e in h.ev)
    assert h.e.send_tcp(fl, b"d", 0.0) == 0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.booleans(), min_size=12, max_size=12).filter(lambda m: any(m[1:])))
def test_sack_recovery_resends_exactly_the_holes(sacked):
    """RFC 6675: on the third duplicate ACK, what the guest has not SACKed below its highest
    SACKed byte is resent, lowest first, segment by segment with the original bytes, each once;
    SACKed data is never resent, nor anything above the highest SACK."""
    from slirpy.stack.tcp_options import build_tcp_options
    sacked = [False] + sacked[1:]  # segment 0 is the hole that makes the ACKs duplicates
    h = H(isn=2**32 - 6 * 1460)  # the data crosses 2**32 halfway: order is sequence order
    fl, s = est(h)
    h.seg(1001, s, ACK, window=65535)
    data = b"".join(bytes([i]) * 1460 for i in range(12))
    h.e.send_tcp(fl, data, 0.0)
    h.pop()
    at = [seq.add(s, 1460 * i) for i in range(13)]
    runs, i = [], 0
    while i < 12:
        if sacked[i]:
            j = i
            while j < 12 and sacked[j]:
                j += 1
            runs.append((at[i], at[j]))
            i = j
        else:
            i += 1
    runs = runs[-4:]  # the guest reports at most 4 blocks; it keeps the highest ones here
    opts = build_tcp_options(sack_blocks=list(reversed(runs)))
    for _ in range(3):
        h.seg(1001, s, ACK, window=65535, options=opts)
    out = [seg(o) for o in h.pop() if o[10]]
    top = max(seq.sub(r, s) for _, r in runs) // 1460
    covered = {k for lo, hi in runs for k in range(seq.sub(lo, s) // 1460, seq.sub(hi, s) // 1460)}
    want = [k for k in range(top) if k not in covered]
    assert [seq.sub(o["seq"], s) // 1460 for o in out] == want
    assert all(bytes(o["payload"]) == data[1460 * k:1460 * (k + 1)] for o, k in zip(out, want))
    for _ in range(2):
        h.seg(1001, s, ACK, window=65535, options=opts)
    assert [o for o in h.pop() if o[10]] == []  # each hole once per recovery


def test_sack_recovery_sends_a_bounded_burst():
    """However many holes one ACK reveals, one ACK releases a bounded burst of retransmissions
    (16 segments): the rest follows as later ACKs arrive."""
    h = H(isn=2**32 - 10 * 1460)
    fl, s = est(h)
    h.seg(1001, s, ACK, window=65535)
    h.e.send_tcp(fl, bytes(1460 * 40), 0.0)
    h.pop()
    last = (seq.add(s, 1460 * 39), seq.add(s, 1460 * 40))
    opts = build_tcp_options(sack_blocks=[last])
    for _ in range(3):
        h.seg(1001, s, ACK, window=65535, options=opts)
    out = [seg(o) for o in h.pop() if o[10]]
    assert [o["seq"] for o in out] == [seq.add(s, 1460 * k) for k in range(16)]


def test_zero_window_probes_back_off_and_never_give_up_while_answered():
    """RFC 9293 3.8.6.1 / RFC 1122 4.2.2.17: with the guest's window closed, one byte is offered
    at growing intervals (each at least the previous, exponential until a cap), and the
    connection is kept as long as the guest keeps answering the probes, however long."""
    h = H()
    fl, s = est(h)
    h.seg(1001, s, ACK, window=0)
    h.e.send_tcp(fl, b"queued", 0.0)
    assert h.pop() == []
    times = []
    for _ in range(25):  # far more than any retry limit
        t = h.e.get_timer()
        h.e.handle_timer(t)
        (p,) = (seg(o) for o in h.pop())
        assert p["seq"] == s and bytes(p["payload"]) == b"q"
        h.seg(1001, s, ACK, window=0, now=t)  # "still no room"
        times.append(t)
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert all(g2 >= g1 for g1, g2 in zip(gaps, gaps[1:]))
    # the first probe after one RTO (the data was handed over at 0.0), then doubling
    assert gaps[0] == 2 * times[0] and gaps[1] == 2 * gaps[0] and gaps[2] == 2 * gaps[1]
    assert [f["state"] for f in h.e.flows()] == ["ESTABLISHED"] and h.ev == []
    h.seg(1001, s, ACK, window=100, now=times[-1])  # the window opens: everything goes
    assert b"".join(bytes(o[10]) for o in h.pop()) == b"queued"


def test_after_a_timeout_fast_retransmit_needs_three_new_duplicates():
    """The retransmission timer resets the duplicate-ACK count (RFC 5681 3.2 counts duplicates
    of one loss episode): after it, two duplicate ACKs trigger nothing, the third does."""
    h = H()
    fl, s = est(h)
    h.seg(1001, s, ACK, window=65535)
    h.e.send_tcp(fl, b"r" * 4 * 1460, 0.0)
    h.pop()
    h.seg(1001, s, ACK, window=65535)
    h.seg(1001, s, ACK, window=65535)  # two duplicates before the timeout
    h.e.handle_timer(h.e.get_timer())
    h.pop()
    for _ in range(2):
        h.seg(1001, s, ACK, window=65535)
    assert [o for o in h.pop() if o[10]] == []


def test_data_sent_before_the_handshake_completes_is_queued():
    """RFC 9293 3.10.2 (SEND in SYN-SENT / SYN-RECEIVED): data handed over before the
    connection is established is queued and sent once it is."""
    h = H(isn=10)
    fl = h.e.connect_tcp(4, R4, 80, G4, 40000, 0.0)
    h.pop()
    assert h.e.send_tcp(fl, b"early", 0.0) == 5
    h.seg(500, 11, SYN | ACK, window=1000)
    assert b"".join(bytes(o[10]) for o in h.pop()) == b"early"
    h = H(isn=10)
    h.seg(500, 0, SYN)
    (req,) = h.ev
    h.e.accept_tcp(req.flow, 0.0)
    h.pop()
    assert h.e.send_tcp(req.flow, b"hello", 0.0) == 5
    h.seg(501, 11, ACK, window=1000)
    assert b"".join(bytes(o[10]) for o in h.pop()) == b"hello"


def test_shutdown_sends_one_fin():
    h = H()
    fl, s = est(h)
    h.e.shutdown_tcp(fl, 0.0)
    h.e.shutdown_tcp(fl, 0.0)
    h.e.shutdown_tcp(12345, 0.0)  # no such flow: nothing
    out = [seg(o) for o in h.pop()]
    assert [(o["seq"], o["flags"] & FIN) for o in out] == [(s, FIN)]


# --------------------------------------------------------- receive window (RFC 9293 3.8.6)
def _filled(rcvbuf):
    """A connection whose receive buffer the guest has filled; no ACK owed any more."""
    h = H(rcvbuf=rcvbuf, _my_ws=0)
    fl, s = est(h)
    h.pop()
    sent = 0
    while sent < rcvbuf:
        n = min(1460, rcvbuf - sent)
        h.seg(1001 + sent, s, ACK | PSH, b"g" * n)
        sent += n
    h.e.flush_pending(1.0)
    out = [seg(o) for o in h.pop()]
    assert out[-1]["ack"] == 1001 + rcvbuf and out[-1]["window"] == 0  # full: window zero
    return h, fl, s


def _updates(h):
    return [o["window"] for o in (seg(x) for x in h.pop()) if not o["payload"]]


def test_window_updates_avoid_silly_window_syndrome():
    """RFC 1122 4.2.3.3 / RFC 9293 3.8.6.2.2: after the window closed, reading a little does
    not announce a little window; an update goes once the window grows by min(MSS, half the
    buffer), or first reaches one MSS, and not for every byte read after that."""
    h, fl, s = _filled(20000)
    assert len(h.e.recv_tcp(fl, 1459, 1.0)) == 1459
    assert _updates(h) == []  # 1459 bytes: less than a segment
    h.e.recv_tcp(fl, 1, 1.0)
    assert _updates(h) == [1460]  # one MSS of room: worth announcing
    h.e.recv_tcp(fl, 1, 1.0)
    assert _updates(h) == []  # one byte more is not
    h.e.recv_tcp(fl, 1458, 1.0)
    assert _updates(h) == []
    h.e.recv_tcp(fl, 1, 1.0)
    assert _updates(h) == [2920]  # grown by one MSS since the last announcement
    # with a small buffer the step is half of it (rounded down), not a whole MSS
    h, fl, s = _filled(2401)
    h.e.recv_tcp(fl, 1199, 1.0)
    assert _updates(h) == []
    h.e.recv_tcp(fl, 1, 1.0)
    assert _updates(h) == [1200]
    # a window announced smaller than a segment is updated as soon as a segment fits
    h = H(rcvbuf=20000, _my_ws=0)
    fl, s = est(h)
    h.pop()
    sent = 0
    while sent < 19500:
        n = min(1460, 19500 - sent)
        h.seg(1001 + sent, s, ACK | PSH, b"g" * n)
        sent += n
    h.e.flush_pending(1.0)
    assert [seg(o)["window"] for o in h.pop()][-1] == 500
    h.e.recv_tcp(fl, 959, 1.0)
    assert _updates(h) == []
    h.e.recv_tcp(fl, 1, 1.0)
    assert _updates(h) == [1460]


def test_no_window_is_offered_after_the_guests_fin():
    """After the guest's FIN no more data can come: reading what it sent announces nothing."""
    h = H(rcvbuf=20000, _my_ws=0)
    fl, s = est(h)
    h.seg(1001, s, ACK | PSH | FIN, b"x" * 5000)
    h.e.flush_pending(1.0)
    h.pop()
    assert h.e.recv_tcp(fl, 10000, 1.0) == b"x" * 5000
    assert _updates(h) == []


def test_resets_and_answers_on_every_path_are_complete():
    """Whatever path sends it, a reset or a challenge ACK is a whole segment for the guest's
    connection: RFC 9293 3.10.7.4 (SYN-RECEIVED, unacceptable ACK: <SEQ=SEG.ACK><CTL=RST>),
    RFC 5961 3.2 (an in-window RST not at RCV.NXT: challenge <SEQ=SND.NXT><ACK=RCV.NXT>), the
    table full (the SYN refused with <SEQ=0><ACK=SEG.SEQ+1><CTL=RST,ACK>), and a SYN repeated
    in SYN-RECEIVED is answered with the same SYN-ACK. The connect request names both ends."""
    h = H(isn=300)
    h.seg(10, 0, SYN, options=build_tcp_options(mss=1460, wscale=2))
    (req,) = h.ev
    assert (req.family, req.src, req.sport, req.dst, req.dport) == (4, G4, 40000, R4, 80)
    h.e.accept_tcp(req.flow, 0.0)
    (sa,) = h.pop()
    h.seg(10, 0, SYN)  # the guest did not get our SYN-ACK: the same one again
    (again,) = h.pop()
    assert again == sa
    h.seg(11, 777, ACK)  # acknowledges something we never sent
    (r,) = h.pop()
    bare_reset(r, 777, 0, RST)
    h.seg(11, 301, ACK)  # the right ACK: established
    h.seg(20, 301, RST)  # in the window, not at RCV.NXT: challenged, not obeyed
    (c,) = (seg(o) for o in h.pop())
    assert (c["seq"], c["ack"], c["flags"]) == (301, 11, ACK) and h.e.flows() != []
    h2 = H(max_flows=1)
    est(h2)
    h2.pop()
    h2.seg(5000, 0, SYN, sport=41000)
    (r,) = h2.pop()
    bare_reset(r, 0, 5001, RST | ACK, gport=41000)


def test_syn_sent_reset_is_complete():
    h = H(isn=1000)
    h.e.connect_tcp(4, R4, 80, G4, 40000, 0.0)
    h.pop()
    h.seg(50, 5000, SYN | ACK)
    (r,) = h.pop()
    bare_reset(r, 5000, 0, RST)


def test_syn_repeated_in_syn_received_gets_the_syn_ack_again_for_any_isn():
    """RFC 9293 3.10.7.4 / 3.5: a guest whose SYN-ACK was lost repeats its SYN; whatever its ISN
    (here in the upper half of sequence space, and right before the wrap), the answer is the
    same SYN-ACK again."""
    for isn in (2**32 - 10, 2**32 - 1):
        h = H(isn=300)
        h.seg(isn, 0, SYN)
        (req,) = h.ev
        h.e.accept_tcp(req.flow, 0.0)
        (sa,) = h.pop()
        h.seg(isn, 0, SYN)
        assert h.pop() == [sa]


def test_default_mss_is_536_without_the_option():
    """RFC 9293 3.7.1 / RFC 1122 4.2.2.6: a SYN without an MSS option means 536 bytes."""
    h = H()
    h.seg(100, 0, SYN)
    (req,) = h.ev
    h.e.accept_tcp(req.flow, 0.0)
    (sa,) = h.pop()
    h.seg(101, seq.add(sa[5], 1), ACK, window=65535)
    h.e.send_tcp(req.flow, b"m" * 2000, 0.0)
    assert [len(o[10]) for o in h.pop()] == [536, 536, 536, 392]
