"""Parse throughput: slirpy's wire parsers vs dpkt and scapy on the same frames.

    python3 bench/parse.py [--n 20000]

Each parser decodes Ethernet -> IP -> L4 and touches the L4 ports/ids. slirpy also verifies the
IPv4 header and L4 checksums (dpkt and scapy do not on parse), so the comparison favours them.
"""

from __future__ import annotations

import argparse
import time

import dpkt
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import Ether

from slirpy.stack import wire

E = dict(src="02:11:22:33:44:55", dst="52:55:0a:00:02:02")
FRAMES = {
    "tcp+opts": bytes(Ether(**E) / IP(src="10.0.2.100", dst="127.0.0.1")
                      / TCP(flags="PA", seq=123, ack=456,
                            options=[("NOP", None), ("NOP", None), ("Timestamp", (1, 2))])
                      / (b"x" * 1000)),
    "udp": bytes(Ether(**E) / IP(src="10.0.2.100", dst="10.0.2.3") / UDP(sport=5000, dport=53)
                 / (b"q" * 40)),
    "icmp": bytes(Ether(**E) / IP(src="10.0.2.100", dst="10.0.2.2") / ICMP(id=1, seq=1)
                  / (b"p" * 56)),
}


def slirpy_parse(raw):
    mv = memoryview(raw)
    _d, _s, _et, pl = wire.parse_ethernet_untrusted(mv)
    src, dst, proto, _t, _i, _f, _m, data = wire.parse_ipv4_untrusted(pl)
    if proto == 6:
        return wire.parse_tcp_untrusted(data, wire.pseudo_sum(4, src, dst, 6, len(data)))[0]
    if proto == 17:
        return wire.parse_udp_untrusted(data, wire.pseudo_sum(4, src, dst, 17, len(data)))[0]
    return wire.parse_icmp_untrusted(data)[0]


def dpkt_parse(raw):
    e = dpkt.ethernet.Ethernet(raw)
    l4 = e.data.data
    return getattr(l4, "sport", None) or l4.type


def scapy_parse(raw):
    p = Ether(raw)
    l4 = p[IP].payload
    return getattr(l4, "sport", None) or l4.type


def rate(fn, raw, n):
    t0 = time.perf_counter()
    for _ in range(n):
        fn(raw)
    return n / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20000)
    n = min(ap.parse_args().n, 200000)
    print(f"{'frame':10} {'slirpy f/s':>12} {'dpkt f/s':>12} {'scapy f/s':>12} "
          f"{'vs dpkt':>8} {'vs scapy':>9}")
    for name, raw in FRAMES.items():
        assert slirpy_parse(raw) == dpkt_parse(raw) == scapy_parse(raw)
        a = rate(slirpy_parse, raw, n)
        b = rate(dpkt_parse, raw, n)
        c = rate(scapy_parse, raw, max(200, n // 50))
        print(f"{name:10} {a:12,.0f} {b:12,.0f} {c:12,.0f} {a / b:7.1f}x {a / c:8.1f}x")


if __name__ == "__main__":
    main()
