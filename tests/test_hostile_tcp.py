"""A hostile guest against the TCP engine's memory: overlapping out-of-order segments must not
hold more than the advertised window per flow (64 x 64 KB before the byte cap)."""

from slirpy.stack.tcp import ACK
from slirpy.stack.tcp_state import TcpState
from test_tcp_engine import H, est


def _ooo_bytes(h, fl):
    f = h.e._flows[fl]
    return sum(len(b) for b, _ in (f.rcv.ooo or {}).values())


def test_overlapping_out_of_order_segments_stay_within_the_window():
    h = H()
    fl, s = est(h)
    big = b"o" * 65000  # as large as a reassembled IPv4 datagram can carry
    for i in range(1, 200):  # each starts one byte further: all distinct keys, all in window
        h.seg(1001 + i, s, ACK, big)
    held = _ooo_bytes(h, fl)
    assert held <= h.e.rcvbuf, held
    assert h.stats.dropped["tcp_ooo_cap"] > 0
    assert "tcp_internal_error" not in h.stats.dropped
    # the hole is then filled: data flows in order, nothing is lost up to what was kept
    h.seg(1001, s, ACK, b"i")
    got = h.e.recv_tcp(fl, 1 << 20, 0.0)
    assert got[:1] == b"i" and set(got[1:]) <= {ord("o")} and len(got) > 1


def test_many_flows_out_of_order_total_is_windows_not_segments():
    h = H()
    flows = []
    for k in range(20):
        h.ev.clear()
        fl, s = est(h) if k == 0 else _est_port(h, 41000 + k)
        flows.append((fl, s, 41000 + k if k else 40000))
    for fl, s, port in flows:
        for i in range(1, 100):
            h.seg(1001 + i * 7, s, ACK, b"q" * 60000, sport=port)
    total = sum(_ooo_bytes(h, fl) for fl, _, _ in flows)
    assert total <= 20 * h.e.rcvbuf, total


def _est_port(h, port, gisn=1000):
    from slirpy.stack import events as E
    from slirpy.stack import seq
    from slirpy.stack.tcp import RST, SYN
    h.seg(gisn, 0, SYN, sport=port)
    req = [e for e in h.ev if isinstance(e, E.TcpConnectRequest)][-1]
    h.ev.clear()
    h.e.accept_tcp(req.flow, 0.0)
    sa = h.pop()[-1]
    h.seg(gisn + 1, seq.add(sa.seq, 1), ACK, window=1000, sport=port)
    return req.flow, seq.add(sa.seq, 1)


def test_rst_after_both_fins_keeps_the_guests_last_bytes():
    """Seen through a port forward: host sends data + FIN, the guest echoes, closes, and answers
    our duplicate ACK of its FIN with RST while the echo still waits for the glue. The RST must
    not reset the host side (the client lost the whole echo: 'connection reset', 0 bytes)."""
    from slirpy.stack import events as E
    from slirpy.stack.tcp import FIN, PSH, RST
    h = H()
    fl, s = est(h)
    assert h.e.send_tcp(fl, b"ping", 0.0) == 4
    h.e.shutdown_tcp(fl, 0.0)  # the host half-closed: data then FIN to the guest
    h.pop()
    # the guest acks data+FIN, sends its echo and its FIN
    h.seg(1001, s + 5, ACK | PSH | FIN, b"ping")
    h.ev.clear()
    h.seg(1006, s + 5, RST)  # the guest's RST at rcv_nxt, the echo not read by the glue yet
    assert not any(isinstance(e, E.TcpReset) for e in h.ev)
    assert h.e.recv_tcp(fl, 100, 0.0) == b"ping"
    assert h.stats.dropped["tcp_rst_after_close"] == 1
    # before both FINs, a RST still resets
    h2 = H()
    fl2, s2 = est(h2)
    h2.seg(1001, s2, ACK | PSH, b"data")
    h2.ev.clear()
    h2.seg(1005, s2, RST)
    assert any(isinstance(e, E.TcpReset) for e in h2.ev)


def test_nothing_past_an_out_of_order_fin_is_delivered():
    """Issue #20 (2): "world"+FIN at offset 5, then "EVILEVIL" at offset 10 (past the FIN), then
    the hole: the host got `helloworldVILEVIL` (the drain loop went on after the FIN, one byte
    shifted by the FIN's sequence number). The stream ends at the FIN."""
    from slirpy.stack import events as E
    from slirpy.stack.tcp import FIN
    h = H()
    fl, s = est(h)
    h.seg(1006, s, ACK | FIN, b"world")
    h.seg(1011, s, ACK, b"EVILEVIL")
    h.seg(1001, s, ACK, b"hello")
    assert h.e.recv_tcp(fl, 1 << 20, 0.0) == b"helloworld"
    assert E.TcpGuestEof(fl) in h.ev
    assert h.e.recv_tcp(fl, 1 << 20, 0.0) == b""
    f = h.e._flows[fl]
    assert f.rcv.nxt == 1012 and not f.rcv.ooo and f.rcv.ooo_bytes == 0
    assert h.e.mem_bytes == h.e.mem_recount() == 0
    assert h.stats.dropped["tcp_data_after_fin"] == 1
    # a retransmission of the bytes past the FIN changes nothing either
    h.seg(1011, s, ACK, b"EVILEVIL")
    assert h.e.recv_tcp(fl, 1 << 20, 0.0) == b""
    # the same with the FIN segment arriving in order after the queued bytes past it
    h2 = H()
    fl2, s2 = est(h2)
    h2.seg(1011, s2, ACK, b"EVILEVIL")
    h2.seg(1001, s2, ACK | FIN, b"helloworld")
    assert h2.e.recv_tcp(fl2, 1 << 20, 0.0) == b"helloworld"
    assert h2.e.mem_bytes == h2.e.mem_recount() == 0


def test_ack_of_data_never_sent_drops_the_segment():
    """Issue #20 (3), RFC 9293 3.10.7.4 / RFC 5961 5.2: a segment whose ACK acknowledges data we
    never sent is answered with an ACK and dropped, payload and FIN included. Then the guest's
    correct retransmission is new data and its FIN ends the stream."""
    from slirpy.stack import events as E
    from slirpy.stack.tcp import FIN, PSH
    h = H()
    fl, s = est(h)
    h.pop()
    h.seg(1001, s + 1000, ACK | PSH | FIN, b"bogus")  # acks 1000 bytes we never sent
    assert h.ev == [] and h.e.recv_tcp(fl, 100, 0.0) == b""
    (ack,) = h.pop()
    assert ack.flags == ACK and ack.seq == s and ack.ack == 1001 and not bytes(ack.payload)
    assert h.stats.dropped["tcp_ack_future"] == 1
    f = h.e._flows[fl]
    assert f.rcv.nxt == 1001 and f.state is TcpState.ESTABLISHED and f.snd.una == s
    h.seg(1001, s, ACK | PSH | FIN, b"right")
    assert h.e.recv_tcp(fl, 100, 0.0) == b"right"
    assert E.TcpGuestEof(fl) in h.ev
    # RFC 5961 5.2's other end: an ACK older than anything ever in flight is dropped the same way
    assert h.e.send_tcp(fl, b"x" * 100, 0.0) == 100
    h.seg(1006, s + 100, ACK)  # acked: snd_una = s + 100
    h.pop()
    h.seg(1006, s - 300000, ACK | PSH, b"blind")
    (ack,) = h.pop()
    assert ack.flags == ACK and ack.ack == 1007
    assert h.stats.dropped["tcp_ack_too_old"] == 1
    assert h.e.recv_tcp(fl, 100, 0.0) == b""


def test_reset_of_a_forward_before_the_guest_answered_stops_its_syns():
    """Issue #20 (4), the engine's part: the glue resets a forward whose host client hung up
    while our SYN waits for the guest: a bare RST at the SYN's end (no ACK: the guest's ISN is
    unknown), the flow is gone, and no SYN is retransmitted."""
    from slirpy.stack import events as E
    from slirpy.stack.tcp import RST, SYN
    h = H(isn=100)
    fl = h.e.connect_tcp(4, "127.0.0.9", 80, "10.0.2.100", 40000, 0.0)
    (syn,) = h.pop()
    assert syn.flags == SYN
    h.e.reset_tcp(fl, 0.5)
    (rst,) = h.pop()
    assert rst.flags == RST and rst.seq == 101 and rst.ack == 0
    assert h.ev == [E.TcpClosed(fl)] and h.e.flows() == []
    h.e.handle_timer(100.0)
    assert h.pop() == [] and h.e.get_timer() is None
