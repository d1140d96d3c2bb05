"""Hostile frame generator, run INSIDE the guest namespace by tests/test_hostile_frames.py:

    python3 hostile_sender.py CONFIG_JSON

Writes ~125k crafted Ethernet frames into tap0 through AF_PACKET sockets (one of them with PACKET_VNET_HDR: GSO super-segments and random virtio headers) (the guest's side of
the tap, so slirpy reads them as if the guest kernel had sent them), paced through slirpy's API
`get_stats` (frames_in) so that the tap's ring never overflows and every frame is really parsed.
Frames are built with struct from a few templates and mutated as bytes (scapy is far too slow for
this many). Prints one JSON object of counts and observations on stdout.

Observations made on the reply side (a second AF_PACKET socket that ignores our own frames):
ARP replies and echo replies seen per target address (only .2/.3 and fd00::2/::3 may answer).
"""

from __future__ import annotations

import json
import os
import random
import socket
import struct
import sys
import time

from nsutil import api  # this script's directory is sys.path[0]

ETH_P_ALL = 0x0003
PACKET_IGNORE_OUTGOING = 23
PACKET_VNET_HDR = 15
SOL_PACKET = 263

R = random.Random(12)  # deterministic: a failure reproduces
MAC_ROUTER = bytes.fromhex("52550a000202")
BCAST = b"\xff" * 6
G4 = socket.inet_aton("10.0.2.100")
X4 = socket.inet_aton("10.0.2.150")  # crafted TCP source: not on tap0, so the guest kernel stays quiet
GW4 = socket.inet_aton("10.0.2.2")
DNS4 = socket.inet_aton("10.0.2.3")
G6 = socket.inet_pton(socket.AF_INET6, "fd00::100")
X6 = socket.inet_pton(socket.AF_INET6, "fd00::150")
GW6 = socket.inet_pton(socket.AF_INET6, "fd00::2")
DNS6 = socket.inet_pton(socket.AF_INET6, "fd00::3")
LL6 = socket.inet_pton(socket.AF_INET6, "fe80::2")
FIN, SYN, RST, PSH, ACK, URG, ECE, CWR = 1, 2, 4, 8, 16, 32, 64, 128


def csum(data: bytes, start: int = 0) -> int:
    if len(data) & 1:
        data += b"\0"
    s = int.from_bytes(data, "big") % 0xFFFF + start
    s = (s & 0xFFFF) + (s >> 16)
    s = (s & 0xFFFF) + (s >> 16)
    return (~s) & 0xFFFF or 0xFFFF


def pseudo(src, dst, proto, n):
    if len(src) == 4:
        return int.from_bytes(src + dst + struct.pack("!BBH", 0, proto, n), "big") % 0xFFFF
    return int.from_bytes(src + dst + struct.pack("!IxxxB", n, proto), "big") % 0xFFFF


def l4sum(src, dst, proto, seg: bytearray, off: int):
    seg[off:off + 2] = b"\0\0"
    seg[off:off + 2] = struct.pack("!H", csum(bytes(seg), pseudo(src, dst, proto, len(seg))))
    return seg


def eth(dst, src, et, payload):
    return dst + src + struct.pack("!H", et) + payload


def ip4(src, dst, proto, payload, ident=0, ff=0, ttl=64, opts=b"", total=None, ck=True):
    ihl = 5 + len(opts) // 4
    h = bytearray(struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, total if total is not None else
                              20 + len(opts) + len(payload), ident, ff, ttl, proto, 0, src, dst)
                  + opts)
    if ck:
        h[10:12] = struct.pack("!H", csum(bytes(h)))
    return bytes(h) + payload


def ip6(src, dst, nh, payload, hlim=64, plen=None):
    return struct.pack("!IHBB16s16s", 0x60000000, len(payload) if plen is None else plen, nh,
                       hlim, src, dst) + payload


def udp(src, dst, sport, dport, payload, good=True):
    seg = bytearray(struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload)
    if good or len(src) == 16:
        l4sum(src, dst, 17, seg, 6)
    if not good:
        seg[6] ^= 0x5A
    return bytes(seg)


def tcp(src, dst, sport, dport, seq, ack, flags, win=65535, opts=b"", payload=b"", urg=0,
        good=True):
    doff = (20 + len(opts)) // 4
    seg = bytearray(struct.pack("!HHIIBBHHH", sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF,
                                doff << 4, flags & 0xFF, win, 0, urg) + opts + payload)
    l4sum(src, dst, 6, seg, 16)
    if not good:
        seg[16] ^= 0xA5
    return bytes(seg)


def icmp4(typ, code, rest, body):
    m = bytearray(struct.pack("!BBHI", typ, code, 0, rest) + body)
    m[2:4] = struct.pack("!H", csum(bytes(m)))
    return bytes(m)


def icmp6(src, dst, typ, code, rest, body):
    m = bytearray(struct.pack("!BBHI", typ, code, 0, rest) + body)
    return bytes(l4sum(src, dst, 58, m, 2))


def rb(n):
    return R.randbytes(n)


class Wire:
    def __init__(self, cfg):
        self.cfg = cfg
        self.tx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self.tx.bind(("tap0", 0))
        self.tx.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        self.rx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self.rx.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
        self.rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        self.rx.bind(("tap0", 0))
        self.rx.setblocking(False)
        # frames with a virtio_net_hdr of our choosing (GSO, checksum offload): the kernel checks
        # it, the tap hands slirpy the header it derives (slirpy runs with IFF_VNET_HDR)
        self.vtx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self.vtx.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
        self.vtx.bind(("tap0", 0))
        self.vnet_rejected = 0
        self.vnet_sent = 0
        self.vnet_arrived = 0
        self.mac = self.tx.getsockname()[4]  # tap0's MAC (/sys is the host's: no mount ns here)
        self.sent = 0
        self.send_errors = 0
        self.unpaced = 0
        self.families: dict = {}
        self.base = self.frames_in()
        self.batch = 0
        self.seen_arp: set = set()
        self.seen_echo4: set = set()
        self.seen_echo6: set = set()
        self.synack: dict = {}  # (sport) -> (their isn, our next seq)
        self.fins: set = set()

    # ---- pacing through the API --------------------------------------------------------
    def frames_in(self):
        return api(self.cfg["api"], {"execute": "get_stats"})["return"]["frames_in"]

    def pace(self, limit=15.0):
        target = self.base + self.sent
        t = time.monotonic() + limit
        while time.monotonic() < t:
            if self.frames_in() >= target:
                return
            time.sleep(0.005)
        self.unpaced += 1

    def send(self, family, frame):
        try:
            self.tx.send(frame)
        except OSError:
            self.send_errors += 1
            return
        self.sent += 1
        self.batch += 1
        self.families[family] = self.families.get(family, 0) + 1
        if self.batch >= 1000:
            self.batch = 0
            self.pace()
            self.poll()

    def send_vnet(self, hdr, frame):
        """Not paced by count: the kernel may still drop (bad GSO) or split what send() took."""
        try:
            self.vtx.send(hdr + frame)
        except OSError:
            self.vnet_rejected += 1  # the kernel refused the header: never reaches slirpy
            return
        self.vnet_sent += 1
        if self.vnet_sent % 250 == 0:
            self.settle()

    def settle(self, limit=5.0):
        """Wait until slirpy's frame count stops moving, then count from there."""
        t = time.monotonic() + limit
        last = -1
        while time.monotonic() < t:
            n = self.frames_in()
            if n == last:
                break
            last = n
            time.sleep(0.03)
        self.base = self.frames_in() - self.sent
        self.poll()

    # ---- reply side ----------------------------------------------------------------------
    def poll(self):
        while True:
            try:
                f = self.rx.recv(70000)
            except BlockingIOError:
                return
            self.observe(f)

    def observe(self, f):
        if len(f) < 14:
            return
        et = struct.unpack_from("!H", f, 12)[0]
        if et == 0x0806 and len(f) >= 42 and struct.unpack_from("!H", f, 20)[0] == 2:
            self.seen_arp.add(socket.inet_ntoa(f[28:32]))
        elif et == 0x0800 and len(f) >= 34:
            ihl = (f[14] & 15) * 4
            proto, src = f[23], f[26:30]
            l4 = f[14 + ihl:]
            if proto == 1 and l4[:1] == b"\x00":
                self.seen_echo4.add(socket.inet_ntoa(src))
            elif proto == 6 and f[30:34] == X4 and len(l4) >= 20:
                sport, dport, sq, ak, _o, fl = struct.unpack_from("!HHIIBB", l4)
                if fl & (SYN | ACK) == SYN | ACK:
                    self.synack[dport] = (sq, ak)
                if fl & FIN:
                    self.fins.add(dport)
        elif et == 0x86DD and len(f) >= 54 and f[20] == 58 and f[54] == 129:
            self.seen_echo6.add(socket.inet_ntop(socket.AF_INET6, f[22:38]))

    def wait_synacks(self, ports, limit=10.0):
        t = time.monotonic() + limit
        while time.monotonic() < t and not all(p in self.synack for p in ports):
            time.sleep(0.01)
            self.poll()
        return [p for p in ports if p in self.synack]

    def flush(self):
        self.batch = 0
        self.pace()
        self.poll()


# ----------------------------------------------------------------------------- generators
def l2_garbage(w):
    for _ in range(4000):
        w.send("l2", rb(R.randrange(14, 80)))  # the kernel refuses < 14 bytes on a tap
    for _ in range(2000):
        w.send("l2", eth(MAC_ROUTER, w.mac, R.randrange(0, 0x10000), rb(R.randrange(0, 200))))
    for _ in range(500):  # VLAN-tagged IPv4
        w.send("l2", eth(MAC_ROUTER, w.mac, 0x8100, struct.pack("!HH", R.randrange(4096), 0x800)
                         + ip4(G4, GW4, 1, icmp4(8, 0, 1, b"v"))))


def arp(w):
    tmpl = struct.pack("!HHBBH6s4s6s4s", 1, 0x800, 6, 4, 1, w.mac, G4, b"\0" * 6, GW4)
    for i in range(256):  # every address in the CIDR
        w.send("arp", eth(BCAST, w.mac, 0x806, tmpl[:24] + bytes([10, 0, 2, i])))
    for _ in range(3000):  # lying headers, truncation, random opcodes
        b = bytearray(tmpl)
        for _ in range(R.randrange(1, 4)):
            b[R.randrange(len(b))] = R.randrange(256)
        w.send("arp", eth(BCAST, w.mac, 0x806, bytes(b[:R.randrange(0, 40)])))
    for _ in range(500):  # spoofing: someone else claims the gateway, the DNS and the guest
        spa = R.choice([GW4, DNS4, G4, X4])
        op = R.choice([1, 2])
        w.send("arp", eth(R.choice([BCAST, MAC_ROUTER]), rb(6), 0x806, struct.pack(
            "!HHBBH6s4s6s4s", 1, 0x800, 6, 4, op, rb(6), spa, rb(6), R.choice([GW4, DNS4, G4]))))
    w.flush()


def ipv4_lies(w):
    base = ip4(G4, GW4, 17, udp(G4, GW4, 4000, w.cfg["udp_sink"], b"L" * 32))
    for _ in range(12000):
        b = bytearray(base)
        k = R.randrange(8)
        if k == 0:
            b[0] = R.randrange(256)  # version / ihl
        elif k == 1:
            b[2:4] = struct.pack("!H", R.randrange(65536))  # total length lies
        elif k == 2:
            b[10] ^= 1 + R.randrange(255)  # header checksum
        elif k == 3:
            b = b[:R.randrange(len(b))]  # truncated anywhere
        elif k == 4:  # garbage options, good checksum
            b = bytearray(ip4(G4, GW4, 17, udp(G4, GW4, 4000, w.cfg["udp_sink"], b"O"),
                              opts=rb(4 * R.randrange(1, 11))))
        elif k == 5:  # fragment fields
            b = bytearray(ip4(G4, GW4, R.choice([1, 6, 17, 99]), rb(R.randrange(0, 64)),
                              ident=R.randrange(65536), ff=R.randrange(65536)))
        elif k == 6:  # ttl 0, odd protocols
            b = bytearray(ip4(G4, GW4, R.randrange(256), rb(40), ttl=R.choice([0, 1, 255])))
        else:
            for _ in range(3):
                b[R.randrange(len(b))] = R.randrange(256)
        w.send("ipv4", eth(MAC_ROUTER, w.mac, 0x800, bytes(b)))
    for src in ("0.0.0.0", "255.255.255.255", "127.0.0.1", "10.0.2.2", "224.0.0.1"):
        for dst in ("10.0.2.2", "255.255.255.255", "10.0.2.255", "224.0.0.251", "127.0.0.1",
                    "0.0.0.0"):
            s, d = socket.inet_aton(src), socket.inet_aton(dst)
            w.send("ipv4", eth(MAC_ROUTER, w.mac, 0x800, ip4(s, d, 17, udp(s, d, 1, 9, b"m"))))
    w.flush()


def cidr_sweep(w):
    sink, closed = w.cfg["udp_sink"], w.cfg["closed_port"]
    for i in range(256):
        d = bytes([10, 0, 2, i])
        w.send("sweep", eth(MAC_ROUTER, w.mac, 0x800, ip4(G4, d, 1, icmp4(8, 0, 0x77 << 16 | i,
                                                                          b"sweep"))))
        w.send("sweep", eth(MAC_ROUTER, w.mac, 0x800, ip4(G4, d, 17, udp(G4, d, 5000, sink,
                                                                          b"SWEEP%d" % i))))
        w.send("sweep", eth(MAC_ROUTER, w.mac, 0x800, ip4(X4, d, 6, tcp(X4, d, 5001, closed, 1,
                                                                         0, SYN))))
    for i in range(256):
        d = GW6[:15] + bytes([i])
        w.send("sweep", eth(MAC_ROUTER, w.mac, 0x86DD, ip6(G6, d, 58, icmp6(G6, d, 128, 0,
                                                                            0x66 << 16 | i, b"s6"))))
    w.flush()


def udp_storm(w):
    sink = w.cfg["udp_sink"]
    for _ in range(4000):  # bad checksums and lying lengths
        seg = bytearray(udp(G4, GW4, R.randrange(1, 65536), sink, rb(R.randrange(0, 64)),
                            good=R.random() < 0.5))
        if R.random() < 0.5:
            seg[4:6] = struct.pack("!H", R.randrange(65536))
        w.send("udp", eth(MAC_ROUTER, w.mac, 0x800, ip4(G4, GW4, 17, bytes(seg))))
    for p in range(6000):  # flow flood: more flows than the table's cap (eviction)
        w.send("udp", eth(MAC_ROUTER, w.mac, 0x800, ip4(G4, GW4, 17, udp(
            G4, GW4, 10000 + p, sink, b"FLOOD"))))
    for _ in range(2500):  # DNS: garbage and queries (to the test's loopback upstream only)
        q = rb(R.randrange(0, 80)) if R.random() < 0.7 else struct.pack(
            "!HHHHHH", R.randrange(65536), 0x100, 1, 0, 0, 0) + b"\x07example\x03com\x00\x00\x01\x00\x01"
        w.send("udp", eth(MAC_ROUTER, w.mac, 0x800, ip4(G4, DNS4, 17, udp(
            G4, DNS4, R.randrange(1024, 65536), R.choice([53, 53, 54]), q))))
    w.flush()


def icmp_storm(w):
    for _ in range(1000):  # echo to the gateway, odd sizes
        w.send("icmp", eth(MAC_ROUTER, w.mac, 0x800, ip4(G4, GW4, 1, icmp4(
            8, 0, R.randrange(1 << 32), rb(R.randrange(0, 1400))))))
    for _ in range(4000):  # ICMP errors quoting nonsense, random types and codes, bad sums
        quote = R.choice([rb(R.randrange(0, 80)),
                          ip4(GW4, G4, 17, udp(GW4, G4, 53, 4000, rb(8)))[:R.randrange(0, 36)],
                          ip4(X4, GW4, 6, tcp(X4, GW4, 1, 2, 0, 0, SYN))])
        m = bytearray(icmp4(R.choice([3, 4, 5, 11, 12, R.randrange(256)]), R.randrange(16),
                            R.randrange(1 << 32), quote))
        if R.random() < 0.2:
            m[2] ^= 0x11
        w.send("icmp", eth(MAC_ROUTER, w.mac, 0x800, ip4(G4, R.choice([GW4, DNS4,
                                                                      socket.inet_aton("198.51.100.9")]),
                                                      1, bytes(m))))
    w.flush()


def frag4(src, dst, proto, ident, off, more, data, ttl=64):
    return ip4(src, dst, proto, data, ident=ident, ff=(0x2000 if more else 0) | (off // 8), ttl=ttl)


def fragments(w):
    sink = w.cfg["udp_sink"]
    # libslirp 4.7.0 SIGBUS: a valid 3-fragment UDP datagram, then a duplicate of its last fragment
    for k in range(100):
        payload = (b"SIGBUS%04d" % k) * 300  # 3000 bytes
        dg = udp(G4, GW4, 6000 + k, sink, payload)
        ident = 0x4000 + k
        pieces = [(0, True, dg[0:1480]), (1480, True, dg[1480:2960]), (2960, False, dg[2960:])]
        for off, more, data in pieces:
            w.send("frag4", eth(MAC_ROUTER, w.mac, 0x800, frag4(G4, GW4, 17, ident, off, more, data)))
        off, more, data = pieces[-1]
        w.send("frag4", eth(MAC_ROUTER, w.mac, 0x800, frag4(G4, GW4, 17, ident, off, more, data)))
    w.flush()
    for _ in range(12000):  # flood of first fragments with random ids: the table fills
        w.send("frag4", eth(MAC_ROUTER, w.mac, 0x800, frag4(G4, GW4, 17, R.randrange(65536), 0, True,
                                                            rb(8 * R.randrange(1, 180)))))
    for _ in range(3000):  # overlaps and duplicates
        ident = R.randrange(65536)
        for _ in range(R.randrange(2, 6)):
            more = R.random() < 0.8
            w.send("frag4", eth(MAC_ROUTER, w.mac, 0x800, frag4(
                G4, GW4, 17, ident, 8 * R.randrange(0, 40), more,
                rb(8 * R.randrange(1, 50) if more else R.randrange(1, 400)))))
    for _ in range(50):  # oversized: 46 fragments of 1480 reach past 65535
        ident = R.randrange(65536)
        for i in range(46):
            w.send("frag4", eth(MAC_ROUTER, w.mac, 0x800, frag4(G4, GW4, 17, ident, i * 1480, True,
                                                                b"\xAA" * 1480)))
    for _ in range(300):  # tiny fragments at the far end
        w.send("frag4", eth(MAC_ROUTER, w.mac, 0x800, frag4(G4, GW4, 17, R.randrange(65536),
                                                            65528, R.random() < 0.5, rb(8))))
    w.flush()


def ipv6_frames(w):
    sink = w.cfg["udp_sink6"]
    # header lies and extension-header garbage
    base = ip6(G6, GW6, 17, udp(G6, GW6, 4000, sink, b"six"))
    for _ in range(6000):
        b = bytearray(base)
        k = R.randrange(5)
        if k == 0:
            b[4:6] = struct.pack("!H", R.randrange(65536))
        elif k == 1:
            b = b[:R.randrange(len(b))]
        elif k == 2:  # chains of extension headers with random lengths
            chain = b""
            nh = 17
            for _ in range(R.randrange(1, 12)):
                chain = struct.pack("!BB", nh, R.randrange(4)) + rb(6) + chain
                nh = R.choice([0, 43, 60, 51, 44, 135])
            b = bytearray(ip6(G6, GW6, nh, chain + udp(G6, GW6, 4000, sink, b"x")))
        elif k == 3:
            b[6] = R.randrange(256)
        else:
            for _ in range(3):
                b[R.randrange(len(b))] = R.randrange(256)
        w.send("ipv6", eth(MAC_ROUTER, w.mac, 0x86DD, bytes(b)))
    # fragments: the same duplicate-last-fragment pattern, floods, overlaps, oversize
    for k in range(50):
        payload = (b"SIX%04d" % k) * 400  # 2800 bytes
        dg = udp(G6, GW6, 7000 + k, sink, payload)
        ident = 0x6000 + k
        cuts = [(0, True, dg[0:1400]), (1400, True, dg[1400:2800]), (2800, False, dg[2800:])]
        for off, more, data in cuts + cuts[-1:]:
            fh = struct.pack("!BBHI", 17, 0, off | more, ident)
            w.send("frag6", eth(MAC_ROUTER, w.mac, 0x86DD, ip6(G6, GW6, 44, fh + data)))
    for _ in range(6000):
        off = 8 * R.randrange(0, 8192)
        fh = struct.pack("!BBHI", 17, 0, off | (R.random() < 0.8), R.randrange(1 << 32))
        w.send("frag6", eth(MAC_ROUTER, w.mac, 0x86DD, ip6(G6, GW6, 44, fh + rb(8 * R.randrange(0, 100)))))
    # NDP: solicitations for many targets (sweep), bad hop limits, garbage options; spoofed
    # advertisements, redirects and router advertisements from the guest side
    for i in range(2000):
        tgt = R.choice([GW6, DNS6, LL6, GW6[:15] + bytes([i & 0xFF]), rb(16)])
        snm = bytes.fromhex("ff0200000000000000000001ff") + tgt[13:]
        opts = R.choice([b"\x01\x01" + w.mac, rb(8 * R.randrange(0, 4)), b"\x01\x00" + rb(6)])
        hl = R.choice([255, 255, 255, 64, 0])
        src = R.choice([G6, b"\0" * 16, socket.inet_pton(socket.AF_INET6, "fe80::99")])
        m = icmp6(src, snm, 135, R.choice([0, 0, 1]), 0, tgt + opts)
        w.send("ndp", eth(b"\x33\x33" + snm[12:], w.mac, 0x86DD, ip6(src, snm, 58, m, hlim=hl)))
    allnodes = socket.inet_pton(socket.AF_INET6, "ff02::1")
    for _ in range(2000):
        typ = R.choice([133, 134, 136, 137])
        body = rb(R.randrange(0, 64))
        if typ == 134:  # RA announcing a rogue prefix
            body = struct.pack("!BBHII", 64, 0xC0, 1800, 0, 0) + struct.pack(
                "!BBBBIII16s", 3, 4, 64, 0xC0, 1 << 30, 1 << 30, 0, rb(8) + b"\0" * 8) + rb(
                R.randrange(0, 24))
        if typ == 136:  # NA claiming the gateway's address
            body = GW6 + b"\x02\x01" + rb(6)
        dst = R.choice([allnodes, LL6, GW6])
        src = R.choice([socket.inet_pton(socket.AF_INET6, "fe80::66"), G6])
        w.send("ndp", eth(R.choice([b"\x33\x33\x00\x00\x00\x01", MAC_ROUTER]), rb(6), 0x86DD,
                          ip6(src, dst, 58, icmp6(src, dst, typ, 0, R.randrange(1 << 32), body),
                              hlim=255)))
    for _ in range(2000):  # ICMPv6 errors quoting nonsense, echo to the gateway
        typ = R.choice([1, 2, 3, 4, 128, 129, R.randrange(256)])
        m = icmp6(G6, GW6, typ, R.randrange(8), R.randrange(1 << 32), rb(R.randrange(0, 120)))
        w.send("icmp6", eth(MAC_ROUTER, w.mac, 0x86DD, ip6(G6, GW6, 58, m)))
    w.flush()


def tcp_states(w):
    """Every combination of the 8 flag bits into every state, with in-window and random
    sequence/ack numbers, payload, urgent pointer and zero windows."""
    P, Pclose, closed = w.cfg["tcp_hold"], w.cfg["tcp_closer"], w.cfg["closed_port"]
    port = [20000]

    def handshake(n, dport, complete=True):
        ports = list(range(port[0], port[0] + n))
        port[0] += n
        mss = b"\x02\x04\x05\xb4"
        for p in ports:
            w.send("tcp", eth(MAC_ROUTER, w.mac, 0x800, ip4(X4, GW4, 6, tcp(
                X4, GW4, p, dport, 1000, 0, SYN, opts=mss))))
        w.flush()
        ok = w.wait_synacks(ports)
        flows = []
        for p in ok:
            isn, _ = w.synack[p]
            if complete:
                w.send("tcp", eth(MAC_ROUTER, w.mac, 0x800, ip4(X4, GW4, 6, tcp(
                    X4, GW4, p, dport, 1001, isn + 1, ACK))))
            flows.append((p, dport, 1001, isn + 1))
        w.flush()
        return flows

    def hit(flows, variant):
        for combo, (p, dport, sq, ak) in zip(range(256), flows):
            for v in range(variant):
                s, a = (sq, ak) if v == 0 else (R.randrange(1 << 32), R.randrange(1 << 32))
                w.send("tcp", eth(MAC_ROUTER, w.mac, 0x800, ip4(X4, GW4, 6, tcp(
                    X4, GW4, p, dport, s, a, combo, win=R.choice([0, 1, 65535]),
                    payload=rb(R.choice([0, 0, 10, 500])), urg=R.randrange(65536)))))
        w.flush()

    hit([(p, closed, R.randrange(1 << 32), 0) for p in range(30000, 30256)], 2)  # no flow
    hit(handshake(256, P, complete=False), 3)  # SYN-ACK sent, not acknowledged
    est = handshake(256, P)
    hit(est, 3)  # established
    fw = handshake(256, P)
    for p, dport, sq, ak in fw:  # guest half-closes first
        w.send("tcp", eth(MAC_ROUTER, w.mac, 0x800, ip4(X4, GW4, 6, tcp(
            X4, GW4, p, dport, sq, ak, FIN | ACK))))
    w.flush()
    hit([(p, d, s + 1, a) for p, d, s, a in fw], 3)
    cw = handshake(256, Pclose)  # the host closes at once: slirpy sends FIN
    t = time.monotonic() + 5
    while time.monotonic() < t and not all(p in w.fins for p, *_ in cw):
        time.sleep(0.02)
        w.poll()
    hit(cw, 3)
    # RST/ACK storms with random numbers into live flows, garbage options, SYN flood
    live = handshake(64, P)
    for _ in range(20000):
        p, dport, sq, ak = R.choice(live)
        w.send("tcp", eth(MAC_ROUTER, w.mac, 0x800, ip4(X4, GW4, 6, tcp(
            X4, GW4, p, dport, R.randrange(1 << 32), R.randrange(1 << 32),
            R.choice([RST, ACK, RST | ACK, ACK | PSH])))))
    for _ in range(4000):
        p, dport, sq, ak = R.choice(live)
        o = rb(4 * R.randrange(0, 11))
        flags = R.choice([SYN, ACK, SYN | ACK, ACK | PSH])
        w.send("tcp", eth(MAC_ROUTER, w.mac, 0x800, ip4(X4, GW4, 6, tcp(
            X4, GW4, R.choice([p, R.randrange(1024, 65536)]), R.choice([dport, closed]),
            sq, ak, flags, opts=o, payload=rb(R.randrange(0, 20)), good=R.random() < 0.9))))
    for i in range(6000):  # SYN flood: to a closed port and to the holding server
        w.send("tcp", eth(MAC_ROUTER, w.mac, 0x800, ip4(X4, GW4, 6, tcp(
            X4, GW4, 40000 + (i % 20000), closed if i % 3 else P, R.randrange(1 << 32), 0, SYN,
            opts=b"\x02\x04\x05\xb4\x01\x03\x03\x07"))))
    # virtio_net_hdr: valid GSO super-segments into live flows, then random headers
    before = w.frames_in()
    for _ in range(3000):
        p, dport, sq, ak = R.choice(live)
        n = R.choice([1448 * 3, 1448 * 10, 20000, 60000])
        seg = tcp(X4, GW4, p, dport, sq, ak, ACK | PSH, payload=rb(64) * (n // 64))
        frame = eth(MAC_ROUTER, w.mac, 0x800, ip4(X4, GW4, 6, seg))
        if R.random() < 0.5:
            hdr = struct.pack("=BBHHHH", 1, 1, 54, 1448, 34, 16)  # NEEDS_CSUM, TCPV4
        else:
            hdr = struct.pack("=BBHHHH", R.randrange(4), R.choice([0, 1, 3, 4, 0x81, R.randrange(256)]),
                              R.randrange(200), R.randrange(65536), R.randrange(120),
                              R.choice([6, 16, R.randrange(65536)]))
        w.send_vnet(hdr, frame)
    w.settle()
    w.vnet_arrived = w.frames_in() - before
    # segments with lying data offsets / truncated TCP headers
    for _ in range(3000):
        seg = bytearray(tcp(X4, GW4, 1234, P, 1, 2, ACK, payload=b"zz"))
        seg[12] = R.randrange(256)
        seg = seg[:R.randrange(len(seg) + 1)]
        w.send("tcp", eth(MAC_ROUTER, w.mac, 0x800, ip4(X4, GW4, 6, bytes(seg))))
    w.flush()
    return len(est), len(cw), len(live)


def main():
    cfg = json.loads(sys.argv[1])
    w = Wire(cfg)
    t0 = time.monotonic()
    out = {}
    for name, fn in [("l2", l2_garbage), ("arp", arp), ("ipv4", ipv4_lies),
                     ("sweep", cidr_sweep), ("udp", udp_storm), ("icmp", icmp_storm),
                     ("frag", fragments), ("ipv6", ipv6_frames), ("tcp", tcp_states)]:
        t = time.monotonic()
        r = fn(w)
        out.setdefault("section_secs", {})[name] = round(time.monotonic() - t, 2)
        if r is not None:
            out[name + "_result"] = r
    time.sleep(0.5)
    w.poll()
    out.update(sent=w.sent, send_errors=w.send_errors, vnet_rejected=w.vnet_rejected, vnet_sent=w.vnet_sent, vnet_arrived=w.vnet_arrived, unpaced=w.unpaced, families=w.families,
               secs=round(time.monotonic() - t0, 2), arp_replies=sorted(w.seen_arp),
               echo4=sorted(w.seen_echo4), echo6=sorted(w.seen_echo6), guest_mac=w.mac.hex())
    print(json.dumps(out))


if __name__ == "__main__":
    main()
