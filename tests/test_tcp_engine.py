"""Sans-IO tests of the TCP engine: fake emit/push, `now` advanced by hand."""
import hashlib

from slirpy.config import Config
from slirpy.stack import events as E
from slirpy.stack import seq
from slirpy.stack.stats import Stats
from slirpy.stack.tcp import ACK, FIN, PSH, RST, SYN, TcpEngine
from slirpy.stack.tcp_options import build_tcp_options

G = bytes([10, 0, 2, 100])
R = bytes([127, 0, 0, 9])


class H:
    def __init__(self, isn=5, **kw):
        self.out, self.ev = [], []
        self.stats = Stats()
        self.e = TcpEngine(Config(), lambda *a: self.out.append(a), self.ev.append, self.stats)
        self.e.isn = lambda: isn
        for k, v in kw.items():
            setattr(self.e, k, v)

    def seg(self, seqno, ackno, flags, payload=b"", window=65535, options=b"", now=0.0, sport=40000):
        self.e.on_segment(4, G, sport, R, 80, seqno, ackno, flags, window, options,
                          memoryview(payload), now)

    def pop(self):
        o, self.out = self.out, []
        return o


def est(h, gisn=1000):
    h.seg(gisn, 0, SYN, options=build_tcp_options(mss=1460, wscale=7, sack_perm=True))
    (req,) = h.ev
    assert isinstance(req, E.TcpConnectRequest) and req.dst == "127.0.0.9" and req.dport == 80
    h.ev.clear()
    h.seg(gisn, 0, SYN)  # retransmitted SYN absorbed while pending
    assert h.out == []
    h.e.accept_tcp(req.flow, 0.0)
    (sa,) = h.pop()
    assert sa[7] == SYN | ACK and sa[6] == gisn + 1
    h.seg(gisn + 1, seq.add(sa[5], 1), ACK, window=1000)
    return req.flow, seq.add(sa[5], 1)


def test_handshake_and_data_both_ways():
    h = H()
    fl, s = est(h)
    h.seg(1001, s, ACK | PSH, b"hello")
    assert h.ev == [E.TcpReadable(fl)]
    assert h.e.recv_tcp(fl, 100, 0.0) == b"hello"
    h.e.flush_pending(0.0)
    assert h.pop()[-1][6] == 1006
    assert h.e.send_tcp(fl, b"x" * 3000, 0.0) == 3000
    segs = h.pop()
    assert b"".join(bytes(x[10]) for x in segs) == b"x" * 3000
    assert [x[5] for x in segs] == [s, s + 1460, s + 2920]


def test_isn_near_wrap_and_ooo_and_fin_both_ways():
    h = H(isn=2**32 - 3)
    fl, s = est(h, gisn=2**32 - 2)
    g = seq.add(2**32 - 2, 1)
    data = bytes(range(256)) * 20
    h.seg(seq.add(g, 1000), s, ACK, data[1000:2000])
    h.seg(seq.add(g, 3000), s, ACK, data[3000:])
    h.seg(seq.add(g, 2000), s, ACK, data[2000:3000])
    assert h.ev == []
    h.seg(g, s, ACK, data[:1000])
    h.seg(seq.add(g, 500), s, ACK, data[500:1500])  # duplicate
    h.seg(seq.add(g, len(data)), s, ACK | FIN)
    got = h.e.recv_tcp(fl, 10**6, 0.0)
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
    assert E.TcpGuestEof(fl) in h.ev
    h.e.send_tcp(fl, b"bye", 0.0)
    h.e.shutdown_tcp(fl, 0.0)
    out = h.pop()
    assert b"".join(bytes(x[10]) for x in out) == b"bye" and out[-1][7] & FIN
    h.seg(seq.add(g, len(data) + 1), seq.add(s, 4), ACK)
    assert E.TcpClosed(fl) in h.ev
    h.e.handle_timer(10.0)
    assert h.e.flows() == []


def test_retransmit_backoff_then_give_up():
    h = H()
    fl, s = est(h)
    h.e.send_tcp(fl, b"a" * 100, 0.0)
    h.pop()
    t = h.e.get_timer()
    assert t is not None
    h.e.handle_timer(t)
    (rx,) = h.pop()
    assert rx[5] == s and bytes(rx[10]) == b"a" * 100
    for _ in range(20):
        t = h.e.get_timer()
        if t is None:
            break
        h.e.handle_timer(t)
    assert h.ev[-2:] == [E.TcpReset(fl), E.TcpClosed(fl)]
    assert h.e.flows() == []


def test_fast_retransmit_on_three_dupacks():
    h = H()
    fl, s = est(h)
    h.seg(1001, s, ACK, window=65535)
    h.e.send_tcp(fl, b"z" * 5000, 0.0)
    h.pop()
    for _ in range(3):
        h.seg(1001, s, ACK, window=65535)
    out = h.pop()
    assert out and out[0][5] == s


def test_guest_rst_and_unknown_flow_rst():
    h = H()
    fl, s = est(h)
    h.seg(1001, s, RST)
    assert h.ev[-2:] == [E.TcpReset(fl), E.TcpClosed(fl)]
    h.pop()
    h.seg(5, 77, ACK, b"x")
    (r,) = h.pop()
    assert r[7] == RST and r[5] == 77


def test_reject_and_flow_cap():
    h = H(max_flows=2)
    h.seg(1, 0, SYN, sport=1)
    h.seg(1, 0, SYN, sport=2)
    h.seg(1, 0, SYN, sport=3)
    assert len(h.e.flows()) == 2
    (r,) = h.pop()
    assert r[7] == RST | ACK and r[6] == 2
    h.e.reject_tcp(h.ev[0].flow, "refused", 0.0)
    assert h.pop()[0][7] == RST | ACK
    assert len(h.e.flows()) == 1


def test_connect_tcp_both_outcomes():
    h = H(isn=100)
    fl = h.e.connect_tcp(4, "127.0.0.9", 80, "10.0.2.100", 40000, 0.0)
    (syn,) = h.pop()
    assert syn[7] == SYN
    h.seg(7000, 101, SYN | ACK)
    assert h.ev == [E.TcpConnected(fl)]
    fl2 = h.e.connect_tcp(4, "127.0.0.9", 80, "10.0.2.100", 40001, 0.0)
    h.seg(0, 101, RST | ACK, sport=40001)
    assert h.ev[-2:] == [E.TcpReset(fl2), E.TcpClosed(fl2)]


def test_zero_window_probe():
    h = H()
    fl, s = est(h)
    h.seg(1001, s, ACK, window=0)
    h.e.send_tcp(fl, b"q" * 10, 0.0)
    assert h.pop() == []
    t = h.e.get_timer()
    h.e.handle_timer(t)
    (p,) = h.pop()
    assert bytes(p[10]) == b"q"


def test_garbage_never_raises():
    h = H()
    fl, s = est(h)
    for fl_ in range(256):
        h.seg(fl_ * 7919, fl_ * 104729, fl_, b"\xff" * (fl_ % 7), options=b"\x02\x01")
