"""The TCP engine's own cost, sans-IO (no sockets, no tap): the per-segment and per-connection
paths, in microseconds (best of several runs, so a loaded machine shows less noise than bench/run).

    PYTHONPATH=. python3 bench/tcpengine.py [--n 20000]

  rr-engine   one request/response round on an established flow: a guest data segment in, the
              host reads it and answers, the guest's ACK in, coalesced ACKs flushed
  rr-stack    the same through Stack: Ethernet frames in (checksums verified), frames out
  crr-engine  one whole connection: SYN, accept, ACK, request, answer, FINs both ways, TIME_WAIT
  rr-vnet     rr-stack as the daemon runs it: frames with the virtio-net header (checksums the
              kernel vouched for: DATA_VALID), 64 KiB GSO frames out
  bulk-vnet   host -> guest bulk as the daemon runs it (virtio-net header): per 64 KiB GSO
              frame, send_tcp of its bytes, the frame out, the guest's ACK in (us per frame)
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


VNET_VALID = wire.VNET.pack(wire.VNET_F_DATA_VALID, 0, 0, 0, 0, 0)


def _established(vnet, opts=b""):
    """A Stack (with the virtio-net header when vnet) and one established flow from the guest
    -> (stack, flow, the guest's next seq, ours, frame(seq, ack, flags, payload=b""))."""
    s = Stack(Config(), 0.0, offload=3 if vnet else -1)  # TUN_F_CSUM | TUN_F_TSO4

    def frame(sq, ack, flags, payload=b"", options=b""):
        l4 = wire.tcp_segment(4, G, R, 40000, 80, sq, ack, flags, 65535, options, payload)
        f = bytes(wire.build_ipv4(ROUTER_MAC, GUEST_MAC, G, R, 6, l4))
        return VNET_VALID + f if vnet else f
    s.receive_frame(frame(1000, 0, SYN, options=opts), 0.0)
    fl = s.next_event().flow
    s.accept_tcp(fl, 0.0)
    isn = struct.unpack_from("!I", s.frames_to_send(0.0)[0], s.vnet_hdr_len + 14 + 20 + 4)[0]
    s.receive_frame(frame(1001, isn + 1, ACK), 0.0)
    s.frames_to_send(0.0)
    while s.next_event():
        pass
    return s, fl, 1001, seq.add(isn, 1), frame


def rr_stack(n, vnet=False):
    s, fl, g, h, frame = _established(vnet)
    frames = [(frame(g + 100 * i, seq.add(h, 100 * i), ACK | PSH, b"q" * 100),
               frame(g + 100 * (i + 1), seq.add(h, 100 * (i + 1)), ACK)) for i in range(n)]
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


def bulk_vnet(n):
    s, fl, g, h, frame = _established(True, OPTS)  # window scaling: the guest offers 8 MiB
    size = s.tcp.seg_max - s.tcp.seg_max % 1460
    data = bytes(size)
    acks = [frame(g, seq.add(h, size * (i + 1)), ACK) for i in range(n)]
    now = 0.0
    t0 = time.perf_counter()
    for ack in acks:
        now += 0.0001
        s.send_tcp(fl, data, now)
        out = s.frames_to_send(now)
        s.receive_frame(ack, now)
        while s.next_event():
            pass
    assert len(out) == 1 and len(out[0]) > size
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
                        ("crr-engine", crr_engine, args.n // 4),
                        ("rr-vnet", lambda n: rr_stack(n, True), args.n // 2),
                        ("bulk-vnet", bulk_vnet, args.n // 4)):
        best = min(fn(n) for _ in range(args.runs))
        print(f"{name:11s} {best / n * 1e6:8.2f} us")


if __name__ == "__main__":
    main()
