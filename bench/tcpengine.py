"""The TCP engine's own cost, sans-IO (no sockets, no tap): the per-segment and per-connection
paths, in microseconds (best of several runs, so a loaded machine shows less noise than bench/run).

    PYTHONPATH=. python3 bench/tcpengine.py [--n 20000]

  rr-engine   one request/response round on an established flow: a guest data segment in, the
              host reads it and answers, the guest's ACK in, coalesced ACKs flushed
  rr-stack    the same through Stack: Ethernet frames in (checksums verified), frames out
  crr-engine  one whole connection: SYN, accept, ACK, request, answer, FINs both ways, TIME_WAIT
"""

from __future__ import annotations

import argparse
import struct
import time

from slirpy.config import Config
from slirpy.stack import seq, wire
from slirpy.stack.stack import Stack
from slirpy.stack.stats import Stats
from slirpy.stack.tcp import ACK, FIN, PSH, SYN, TcpEngine
from slirpy.stack.tcp_options import build_tcp_options

G, R = bytes([10, 0, 2, 100]), bytes([198, 51, 100, 7])  # documentation addresses: no traffic
GUEST_MAC, ROUTER_MAC = bytes.fromhex("020000000001"), b"\x52\x55\x0a\x00\x02\x02"
OPTS = build_tcp_options(mss=1460, wscale=7, sack_perm=True)
EMPTY = memoryview(b"")


def rr_engine(n):
    out, ev = [], []
    e = TcpEngine(Config(), out.append, ev.append, Stats())
    e.isn = lambda: 5
    e.on_segment(4, G, 40000, R, 80, 1000, 0, SYN, 65535, OPTS, EMPTY, 0.0)
    fl = ev[0].flow
    e.accept_tcp(fl, 0.0)
    s, g, now = 6, 1001, 0.0
    e.on_segment(4, G, 40000, R, 80, g, s, ACK, 65535, b"", EMPTY, now)
    req = memoryview(b"q" * 100)
    t0 = time.perf_counter()
    for _ in range(n):
        now += 0.0001
        e.on_segment(4, G, 40000, R, 80, g, s, ACK | PSH, 65535, b"", req, now)
        g += 100
        e.recv_tcp(fl, 1 << 20, now)
        e.send_tcp(fl, b"a" * 100, now)
        s = seq.add(s, 100)
        e.on_segment(4, G, 40000, R, 80, g, s, ACK, 65535, b"", EMPTY, now)
        e.flush_pending(now)
        out.clear()
    return time.perf_counter() - t0


def _frame(sq, ack, flags, payload=b""):
    l4 = wire.tcp_segment(4, G, R, 40000, 80, sq, ack, flags, 65535, b"", payload)
    return bytes(wire.build_ipv4(ROUTER_MAC, GUEST_MAC, G, R, 6, l4))


def rr_stack(n):
    s = Stack(Config(), 0.0)
    s.receive_frame(_frame(1000, 0, SYN), 0.0)
    fl = s.next_event().flow
    s.accept_tcp(fl, 0.0)
    isn = struct.unpack_from("!I", s.frames_to_send(0.0)[0], 14 + 20 + 4)[0]
    s.receive_frame(_frame(1001, isn + 1, ACK), 0.0)
    s.frames_to_send(0.0)
    while s.next_event():
        pass
    g, h = 1001, isn + 1
    frames = [(_frame(g + 100 * i, seq.add(h, 100 * i), ACK | PSH, b"q" * 100),
               _frame(g + 100 * (i + 1), seq.add(h, 100 * (i + 1)), ACK)) for i in range(n)]
    now = 0.0
    t0 = time.perf_counter()
    for req, ack in frames:
        now += 0.0001
        s.receive_frame(req, now)
        while s.next_event():
            pass
        s.recv_tcp(fl, 1 << 20, now)
        s.send_tcp(fl, b"a" * 100, now)
        s.frames_to_send(now)
        s.receive_frame(ack, now)
        s.frames_to_send(now)
    return time.perf_counter() - t0


def crr_engine(n):
    out, ev = [], []
    e = TcpEngine(Config(), out.append, ev.append, Stats())
    e.isn = lambda: 5
    req, now = memoryview(b"GET"), 0.0
    t0 = time.perf_counter()
    for i in range(n):
        port = 10000 + i % 50000
        now += 0.001
        e.on_segment(4, G, port, R, 80, 1000, 0, SYN, 65535, OPTS, EMPTY, now)
        fl = ev[-1].flow
        e.accept_tcp(fl, now)
        e.on_segment(4, G, port, R, 80, 1001, 6, ACK, 65535, b"", EMPTY, now)
        e.on_segment(4, G, port, R, 80, 1001, 6, ACK | PSH, 65535, b"", req, now)
        e.recv_tcp(fl, 100, now)
        e.send_tcp(fl, b"answer", now)
        e.shutdown_tcp(fl, now)
        e.on_segment(4, G, port, R, 80, 1004, 13, ACK | FIN, 65535, b"", EMPTY, now)
        e.flush_pending(now)
        e.handle_timer(now + 3)  # TIME_WAIT over
        out.clear()
        ev.clear()
    assert not e._flows
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--runs", type=int, default=10)
    args = ap.parse_args()
    for name, fn, n in (("rr-engine", rr_engine, args.n), ("rr-stack", rr_stack, args.n // 2),
                        ("crr-engine", crr_engine, args.n // 4)):
        best = min(fn(n) for _ in range(args.runs))
        print(f"{name:11s} {best / n * 1e6:8.2f} us")


if __name__ == "__main__":
    main()
