"""The virtio-net header path (IFF_VNET_HDR + TUNSETOFFLOAD): codec, stack boundary, the helper's
offload fallback, and end to end with the header on (the default) and off (SLIRPY_VNET_HDR=0)."""
from __future__ import annotations

import errno
import hashlib
import ipaddress
import os
import shutil
import socket
import struct
import subprocess
import sys
import textwrap
import threading

import pytest
from hypothesis import given, settings, strategies as st

from nsutil import exchange

from slirpy import helper
from slirpy.config import Config
from slirpy.stack import wire
from slirpy.stack.checksum import checksum
from slirpy.stack.stack import Stack

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GUEST_MAC = bytes.fromhex("021122334455")
G4 = ipaddress.IPv4Address("10.0.2.100").packed
H4 = ipaddress.IPv4Address("10.0.2.2").packed
G6 = ipaddress.IPv6Address("fd00::100").packed
H6 = ipaddress.IPv6Address("fd00::2").packed


def _kernel_finish(frame: bytes) -> bytes:
    """What the kernel does with NEEDS_CSUM: sum from csum_start to the end, store the complement
    at csum_start + csum_offset. Returns the Ethernet frame without the virtio-net header."""
    flags, _gt, _hl, _gs, start, off = wire.VNET.unpack_from(frame, 0)
    eth = bytearray(frame[wire.VNET_LEN:])
    assert flags & wire.VNET_F_NEEDS_CSUM
    struct.pack_into("!H", eth, start + off, checksum(eth[start:]))
    return bytes(eth)


# ------------------------------------------------------------------------------- codec
def test_vnet_header_codec_roundtrip():
    raw = wire.VNET.pack(1, 4, 74, 1440, 54, 16) + b"frame"
    flags, gso_type, hdr_len, gso_size, cstart, coff, rest = wire.parse_vnet_untrusted(
        memoryview(raw))
    assert (flags, gso_type, hdr_len, gso_size, cstart, coff) == (1, 4, 74, 1440, 54, 16)
    assert bytes(rest) == b"frame"
    assert wire.parse_vnet_untrusted(memoryview(b"\0" * 9)) == "vnet_truncated"
    # a header alone is a header with an empty frame (the stack then counts eth_truncated)
    assert wire.parse_vnet_untrusted(memoryview(b"\0" * 10)) == (0, 0, 0, 0, 0, 0, b"")
    assert len(wire.VNET_NONE) == wire.VNET.size == wire.VNET_LEN == 10


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("n", [0, 1, 1460, 1461, 60000])
def test_build_tcp_vnet_matches_plain_segment_after_kernel_checksum(family, n):
    src, dst = (H4, G4) if family == 4 else (H6, G6)
    payload = hashlib.shake_256(b"%d" % n).digest(n)
    opts = b"\x02\x04\x05\xb4" if n == 0 else b""
    mss = 1460 if family == 4 else 1440
    frame = wire.build_tcp_vnet(GUEST_MAC, b"\x52\x55\x0a\x00\x02\x02", family, src, dst, 80,
                                40000, 1000, 2000, 0x18, 512, opts, payload, 7, mss)
    flags, gso_type, hdr_len, gso_size, cstart, coff = wire.VNET.unpack_from(frame, 0)
    iphl = 20 if family == 4 else 40
    assert (flags, cstart, coff) == (wire.VNET_F_NEEDS_CSUM, 14 + iphl, 16)
    assert hdr_len == 14 + iphl + 20 + len(opts)
    if n > mss:
        assert gso_type == (wire.VNET_GSO_TCPV4 if family == 4 else wire.VNET_GSO_TCPV6)
        assert gso_size == mss
    else:
        assert (gso_type, gso_size) == (wire.VNET_GSO_NONE, 0)
    eth = _kernel_finish(frame)
    # the finished frame parses with every checksum verified, and carries exactly our bytes
    _d, smac, et, ip = wire.parse_ethernet_untrusted(memoryview(eth))
    if family == 4:
        s, d, proto, _ttl, _id, foff, more, l4 = wire.parse_ipv4_untrusted(ip)
        assert (foff, more) == (0, False)
    else:
        s, d, proto, _hl, frag, l4 = wire.parse_ipv6_untrusted(ip)
        assert frag is None
    assert (bytes(s), bytes(d), proto) == (src, dst, 6)
    t = wire.parse_tcp_untrusted(l4, wire.pseudo_sum(family, src, dst, 6, len(l4)))
    assert not isinstance(t, str), t
    assert t[:6] == (80, 40000, 1000, 2000, 0x18, 512)
    assert bytes(t[7]) == payload
    # and the TCP bytes are the ones the non-vnet builder makes
    assert bytes(l4) == bytes(wire.tcp_segment(family, src, dst, 80, 40000, 1000, 2000, 0x18,
                                               512, opts, payload))


@settings(max_examples=80, deadline=None)
@given(st.sampled_from([4, 6]), st.integers(0, 40), st.integers(0, 2**32 - 1),
       st.integers(0, 3000))
def test_build_tcp_vnet_header_fields(family, olen, ident, n):
    """What scapy reads in a GSO frame once the kernel finished it: options padded with zeros
    to a 32-bit boundary (RFC 9293 3.1, data offset in words), IPv4 ID the low 16 bits of our
    counter (RFC 791), DF, TOS 0 and TTL / hop limit 64 as libslirp sends (IPDEFTTL), and a
    valid IPv4 header checksum whatever the ID."""
    from scapy.layers.inet import IP, TCP
    from scapy.layers.inet6 import IPv6
    from scapy.layers.l2 import Ether
    src, dst = (H4, G4) if family == 4 else (H6, G6)
    opts = b"\x01" * olen
    payload = bytes(i & 0xFF for i in range(n))
    frame = wire.build_tcp_vnet(GUEST_MAC, b"\x52\x55\x0a\x00\x02\x02", family, src, dst, 80,
                                40000, 1000, 2000, 0x18, 512, opts, payload, ident, 1460)
    p = Ether(_kernel_finish(frame))
    words = (olen + 3) // 4
    if family == 4:
        ip = p[IP]
        assert (ip.ttl, ip.tos, ip.id, ip.flags.DF, ip.len) == (64, 0, ident & 0xFFFF, 1,
                                                                20 + 20 + 4 * words + n)
        assert wire.parse_ipv4_untrusted(memoryview(bytes(ip))) != "ipv4_bad_checksum"
    else:
        assert (p[IPv6].hlim, p[IPv6].plen, p[IPv6].nh) == (64, 20 + 4 * words + n, 6)
    t = p[TCP]
    raw = bytes(t)
    assert t.dataofs == 5 + words
    assert raw[20:20 + olen] == opts and raw[20 + olen:20 + 4 * words] == bytes(4 * words - olen)
    assert raw[20 + 4 * words:] == payload
    # the plain (non-GSO) builder makes the same segment, checksum included
    assert raw == bytes(wire.tcp_segment(family, src, dst, 80, 40000, 1000, 2000, 0x18, 512, opts,
                                         payload))


# ------------------------------------------------------------------------------- stack boundary
def _guest_tcp_frame(payload: bytes, good_csum: bool, vnet_flags: int) -> bytes:
    seg = bytearray(wire.tcp_segment(4, G4, H4, 40000, 80, 1, 0, 0x02, 65535, b"", payload))
    if not good_csum:
        struct.pack_into("!H", seg, 16, 0x1234)  # as a checksum-offloading guest leaves it
    eth = wire.build_ipv4(b"\x52\x55\x0a\x00\x02\x02", GUEST_MAC, G4, H4, 6, seg)
    return wire.VNET.pack(vnet_flags, 0, 0, 0, 0, 0) + bytes(eth)


@pytest.mark.parametrize("vflags,accepted", [
    (wire.VNET_F_NEEDS_CSUM, True),   # partial checksum: the kernel says it was never computed
    (wire.VNET_F_DATA_VALID, True),
    (0, False),                       # no word from the kernel: verify, and it is wrong
])
def test_stack_trusts_kernel_checksum_flags_only(vflags, accepted):
    s = Stack(Config(), 0.0, offload=helper.TUN_F_CSUM | helper.TUN_F_TSO4)
    s.receive_frame(_guest_tcp_frame(b"", False, vflags), 0.0)
    ev = s.next_event()
    if accepted:
        assert type(ev).__name__ == "TcpConnectRequest" and ev.dport == 80
        assert "tcp_bad_checksum" not in s.stats.dropped
    else:
        assert ev is None
        assert s.stats.dropped["tcp_bad_checksum"] == 1


def test_stack_vnet_truncated_and_output_prefixed():
    s = Stack(Config(), 0.0, offload=0)
    s.receive_frame(b"\x00" * 5, 0.0)
    assert s.stats.dropped["vnet_truncated"] == 1
    # an ARP request for the gateway: the reply goes out with an all-zero header first
    arp = wire.build_arp(wire.BROADCAST, GUEST_MAC, 1, GUEST_MAC, G4, b"\0" * 6, H4)
    s.receive_frame(wire.VNET_NONE + bytes(arp), 0.0)
    out = s.frames_to_send(0.0)
    assert len(out) == 1 and bytes(out[0][:10]) == wire.VNET_NONE
    assert bytes(out[0][10:16]) == GUEST_MAC and out[0][22:24] == b"\x08\x06" and out[0][30:32] == b"\x00\x02"


def test_stack_without_vnet_has_no_header():
    s = Stack(Config(), 0.0)
    arp = wire.build_arp(wire.BROADCAST, GUEST_MAC, 1, GUEST_MAC, G4, b"\0" * 6, H4)
    s.receive_frame(bytes(arp), 0.0)
    out = s.frames_to_send(0.0)
    assert len(out) == 1 and bytes(out[0][:6]) == GUEST_MAC
    assert s.tcp.seg_max == 0


def test_stack_vnet_sends_one_gso_segment_for_bulk():
    """With the header, 200 KB toward the guest at MTU 1500 leave as a few GSO frames (not 140
    MTU-sized ones), and their bytes are the stream."""
    s = Stack(Config(mtu=1500), 0.0, offload=helper.TUN_F_CSUM | helper.TUN_F_TSO4)
    s.receive_frame(_guest_tcp_frame(b"", True, 0), 0.0)
    ev = s.next_event()
    s.accept_tcp(ev.flow, 0.0)
    synack = s.frames_to_send(0.0)[0]
    isn = struct.unpack_from("!I", synack, 10 + 14 + 20 + 4)[0]
    ack = wire.tcp_segment(4, G4, H4, 40000, 80, 2, (isn + 1) & 0xFFFFFFFF, 0x10, 65535, b"", b"")
    f = s.tcp._flows[ev.flow]
    s.receive_frame(wire.VNET_NONE + bytes(wire.build_ipv4(b"\x52\x55\x0a\x00\x02\x02",
                                                              GUEST_MAC, G4, H4, 6, ack)), 0.0)
    f.snd.wnd = 1 << 20  # the guest opened its window wide (scaled)
    data = hashlib.shake_256(b"bulk").digest(200_000)
    assert s.send_tcp(ev.flow, data, 0.0) > 0
    frames = [fr for fr in s.frames_to_send(0.0) if len(fr) > 100]
    assert 1 <= len(frames) <= 8
    got = b""
    for fr in frames:
        _f, gso_type, _h, gso_size, _cs, _co = wire.VNET.unpack_from(fr, 0)
        eth = _kernel_finish(fr)
        ip = wire.parse_ipv4_untrusted(memoryview(eth)[14:])
        t = wire.parse_tcp_untrusted(ip[7], wire.pseudo_sum(4, H4, G4, 6, len(ip[7])))
        assert not isinstance(t, str), t
        if len(t[7]) > 1460:
            assert (gso_type, gso_size) == (wire.VNET_GSO_TCPV4, 1460)
        got += bytes(t[7])
    assert data.startswith(got) and len(got) >= 65000


# ------------------------------------------------------------------------------- helper fallback
def test_set_offload_steps_down_to_what_the_kernel_takes():
    accepted = helper.TUN_F_CSUM | helper.TUN_F_TSO4
    tried = []

    def fake_ioctl(fd, req, flags):
        assert req == helper.TUNSETOFFLOAD
        tried.append(flags)
        if flags & ~accepted:
            raise OSError(errno.EINVAL, "Invalid argument")
        return 0

    assert helper.set_offload(5, fake_ioctl) == accepted
    assert tried[0] == helper.OFFLOAD_STEPS[0] and tried[-1] == accepted


def test_set_offload_refused_entirely_is_zero():
    def refuse(fd, req, flags):
        raise OSError(errno.EINVAL, "Invalid argument")
    assert helper.set_offload(5, refuse) == 0


def test_create_tap_falls_back_to_plain_frames(monkeypatch):
    calls = []

    def fake_tunsetiff(name, flags):
        calls.append(flags)
        if flags & helper.IFF_VNET_HDR:
            raise OSError(errno.EINVAL, "Invalid argument")
        return os.open(os.devnull, os.O_RDONLY)

    monkeypatch.setattr(helper, "_tunsetiff", fake_tunsetiff)
    monkeypatch.setattr(os.path, "exists", lambda p: True)
    fd, offload = helper._create_tap("tap0", True)
    os.close(fd)
    assert offload == -1
    assert calls == [helper.IFF_TAP | helper.IFF_NO_PI | helper.IFF_VNET_HDR,
                     helper.IFF_TAP | helper.IFF_NO_PI]


def test_vnet_wanted_env(monkeypatch):
    monkeypatch.delenv("SLIRPY_VNET_HDR", raising=False)
    assert helper.vnet_wanted()
    monkeypatch.setenv("SLIRPY_VNET_HDR", "0")
    assert not helper.vnet_wanted()


# ------------------------------------------------------------------------------- end to end
N = 16 * 1024 * 1024


@pytest.mark.netns
@pytest.mark.parametrize("vnet", ["1", "0"])
@pytest.mark.parametrize("mtu", [1500, 65520])
def test_e2e_bulk_both_ways(vnet, mtu):
    if shutil.which("unshare") is None or not os.path.exists("/dev/net/tun"):
        pytest.skip("LOUD: unshare or /dev/net/tun missing: vnet end-to-end tests cannot run")
    up = hashlib.shake_256(b"up").digest(N)
    down = hashlib.shake_256(b"down").digest(N)
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    port = srv.getsockname()[1]
    got = {}

    def serve():
        c, _ = srv.accept()
        got["up"] = exchange(c, down)
        c.close()

    th = threading.Thread(target=serve, daemon=True)
    th.start()
    code = textwrap.dedent(f"""
        import socket, hashlib, threading, subprocess, json
        link = json.loads(subprocess.check_output(["ip", "-j", "-d", "link", "show", "tap0"]))
        print("VNET", link[0]["linkinfo"]["info_data"]["vnet_hdr"])
        up = hashlib.shake_256(b"up").digest({N})
        s = socket.create_connection(("10.0.2.2", {port}), timeout=30)
        t = threading.Thread(target=lambda: (s.sendall(up), s.shutdown(socket.SHUT_WR)))
        t.start()
        h, n = hashlib.sha256(), 0
        while True:
            b = s.recv(1 << 16)
            if not b:
                break
            h.update(b); n += len(b)
        t.join()
        print("DOWN", n, h.hexdigest())
    """)
    env = dict(os.environ, SLIRPY_VNET_HDR=vnet)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    try:
        r = subprocess.run([sys.executable, "-m", "slirpy", "-c", f"--mtu={mtu}", "--",
                            sys.executable, "-c", code], capture_output=True, text=True,
                           timeout=120, cwd=ROOT, env=env)
    finally:
        srv.close()
    th.join(10)
    assert r.returncode == 0, f"rc={r.returncode}\n{r.stdout}\n{r.stderr[-3000:]}"
    assert f"VNET {vnet == '1'}" in r.stdout
    assert f"DOWN {N} {hashlib.sha256(down).hexdigest()}" in r.stdout
    assert got["up"] == (N, hashlib.sha256(up).hexdigest())
