"""Generate seed corpora with scapy into fuzz/corpus/<harness>/ (gitignored).

    python3 fuzz/make_corpus.py
"""

from __future__ import annotations

import hashlib
import pathlib
import struct

from scapy.layers.dhcp import BOOTP, DHCP
from scapy.layers.dhcp6 import DHCP6_InfoRequest, DHCP6OptClientId, DHCP6OptOptReq, DUID_LL
from scapy.layers.inet import ICMP, IP, TCP, UDP, fragment
from scapy.layers.inet6 import (ICMPv6EchoRequest, ICMPv6ND_NS, ICMPv6ND_RS, ICMPv6NDOptSrcLLAddr,
                                IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop)
from scapy.layers.l2 import ARP, Ether

ROOT = pathlib.Path(__file__).resolve().parent / "corpus"
E = dict(src="02:11:22:33:44:55", dst="52:55:0a:00:02:02")
G4, G6 = "10.0.2.100", "fd00::100"


def frames():
    tcp_opts = [("MSS", 1460), ("SAckOK", b""), ("Timestamp", (1, 2)), ("WScale", 7), ("NOP", None)]
    yield Ether(**E) / IP(src=G4, dst="198.51.100.7") / TCP(flags="S", seq=2**32 - 1, options=tcp_opts)
    yield Ether(**E) / IP(src=G4, dst="198.51.100.7") / TCP(flags="PA") / b"GET / HTTP/1.0\r\n\r\n"
    yield Ether(**E) / IP(src=G4, dst="10.0.2.3") / UDP(sport=5353, dport=53) / (b"\x12\x34" * 10)
    yield Ether(**E) / IP(src=G4, dst="10.0.2.2") / ICMP(id=1, seq=1) / b"ping"
    yield Ether(**E) / IP(src=G4, dst="198.51.100.7", options=b"\x01\x01\x01\x00") / ICMP()
    yield Ether(src=E["src"], dst="ff:ff:ff:ff:ff:ff") / ARP(op=1, hwsrc=E["src"], psrc=G4,
                                                           pdst="10.0.2.2")
    for f in fragment(IP(src=G4, dst="198.51.100.7", id=7) / UDP() / (b"f" * 300), fragsize=128):
        yield Ether(**E) / f
    yield Ether(**E) / IPv6(src=G6, dst="fd00::2") / ICMPv6EchoRequest(data=b"x")
    yield Ether(**E) / IPv6(src="fe80::1", dst="ff02::1:ff00:2", hlim=255) / ICMPv6ND_NS(
        tgt="fd00::2") / ICMPv6NDOptSrcLLAddr(lladdr=E["src"])
    yield Ether(**E) / IPv6(src="fe80::1", dst="ff02::2", hlim=255) / ICMPv6ND_RS()
    yield Ether(**E) / IPv6(src=G6, dst="2001:db8::7") / IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt() / UDP()
    yield Ether(**E) / IPv6(src=G6, dst="2001:db8::7") / IPv6ExtHdrFragment(m=1, id=5) / UDP() / (b"y" * 64)
    yield Ether(**E) / IPv6(src=G6, dst="2001:db8::7") / TCP(flags="S", options=tcp_opts)
    mac = bytes.fromhex(E["src"].replace(":", ""))
    bc = dict(src=E["src"], dst="ff:ff:ff:ff:ff:ff")
    for opts in ([("message-type", "discover"), ("param_req_list", [1, 3, 6, 26])],
                 [("message-type", "request"), ("requested_addr", "10.0.2.15"),
                  ("server_id", "10.0.2.2")],
                 [("message-type", "request"), ("requested_addr", "10.0.2.99")],
                 [("message-type", "decline"), ("requested_addr", "10.0.2.15")],
                 [("message-type", "release")], [("message-type", "inform")], []):
        yield Ether(**bc) / IP(src="0.0.0.0", dst="255.255.255.255") / UDP(sport=68, dport=67) / BOOTP(
            chaddr=mac, xid=7, ciaddr="10.0.2.15" if len(opts) == 1 else "0.0.0.0") / DHCP(
            options=opts + ["end"])
    yield Ether(src=E["src"], dst="33:33:00:01:00:02") / IPv6(src="fe80::1", dst="ff02::1:2") / UDP(
        sport=546, dport=547) / DHCP6_InfoRequest(trid=1) / DHCP6OptClientId(
        duid=DUID_LL(lladdr=E["src"])) / DHCP6OptOptReq(reqopts=[23])


def layer(raw: bytes, name: str):
    p = Ether(raw)
    if name == "ethernet":
        return raw
    if name == "arp":
        return raw[14:] if ARP in p else None
    if name == "ipv4":
        return raw[14:] if IP in p and p.type == 0x800 else None
    if name == "ipv6":
        return raw[14:] if p.type == 0x86DD else None
    for cls, nm in ((TCP, "tcp"), (UDP, "udp"), (ICMP, "icmp")):
        if nm == name and cls in p:
            return bytes(p[cls])
    if name == "dhcp" and UDP in p and p[UDP].dport in (67, 547):
        return bytes(p[UDP].payload)
    if name == "ndp_options" and ICMPv6ND_NS in p:
        return bytes(p[ICMPv6NDOptSrcLLAddr])
    if name == "tcp_options" and TCP in p:
        t = bytes(p[TCP])
        return t[20:(t[12] >> 4) * 4]
    return None


def write(name, data):
    d = ROOT / name
    d.mkdir(parents=True, exist_ok=True)
    (d / hashlib.sha1(data).hexdigest()[:16]).write_bytes(data)


def main():
    raws = [bytes(f) for f in frames()]
    names = ["ethernet", "arp", "ipv4", "ipv6", "udp", "tcp", "icmp", "ndp_options", "tcp_options",
             "dhcp"]
    for raw in raws:
        for nm in names:
            x = layer(raw, nm)
            if x:
                write(nm, x)
        # fuzz_stack input: flag byte, then [u16 len][u8 dt][frame] records
        write("stack", b"\x01" + struct.pack("!HB", len(raw), 1) + raw)
    write("stack", b"\x01" + b"".join(struct.pack("!HB", len(r), 0) + r for r in raws))
    for i in range(4):
        write("reassembly", struct.pack("!B", i) * 64)
    print("corpus written to", ROOT)


if __name__ == "__main__":
    main()
