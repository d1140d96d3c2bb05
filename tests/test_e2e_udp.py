"""End to end: slirpy's `--` form runs a guest command in a fresh user+net namespace; the guest
sends UDP / DNS through the tap; servers live on the host's loopback (made by the test)."""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import sys
import textwrap
import threading

import pytest

from nsutil import UdpServer, dns_answer, run_world

pytestmark = pytest.mark.netns

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _need():
    if shutil.which("unshare") is None or not os.path.exists("/dev/net/tun"):
        pytest.skip("LOUD: unshare or /dev/net/tun missing: UDP end-to-end tests cannot run")


def run_guest(code: str, *slirpy_args: str, wrap: list[str] | None = None, timeout=40):
    _need()
    cmd = [sys.executable, "-m", "slirpy", "-c", *slirpy_args, "--", sys.executable, "-c",
           textwrap.dedent(code)]
    if wrap:
        cmd = wrap + cmd
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert r.returncode == 0, f"rc={r.returncode}\nstdout={r.stdout}\nstderr={r.stderr}"
    return r.stdout


GUEST_DNS = """
import socket, struct, sys
q = struct.pack("!HHHHHH", 0x4242, 0x0100, 1, 0, 0, 0) + b"\\x04test\\x07example\\x00\\x00\\x01\\x00\\x01"
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(4)
s.connect(("10.0.2.3", 53)); s.send(q)
try:
    r = s.recv(512)
    print("ANSWER", r[:2].hex(), socket.inet_ntoa(r[-4:]), r[3] & 15)
except ConnectionRefusedError:
    print("REFUSED")
except socket.timeout:
    print("TIMEOUT")
"""


def test_udp_echo_big_datagram_and_closed_port():
    srv = UdpServer(lambda d: d[::-1])
    closed = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    closed.bind(("127.0.0.1", 0))
    cport = closed.getsockname()[1]
    closed.close()
    try:
        out = run_guest(f"""
            import socket, hashlib
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(4)
            s.connect(("10.0.2.2", {srv.port}))
            s.send(b"hello"); print("SMALL", s.recv(100))
            big = bytes(range(251)) * 16
            big = big[:4000]
            s.send(big); r = s.recv(70000)
            print("BIG", len(r), hashlib.sha256(r).hexdigest())
            c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); c.settimeout(4)
            c.connect(("10.0.2.2", {cport})); c.send(b"knock")
            try:
                c.recv(10); print("NOERR")
            except ConnectionRefusedError:
                print("REFUSED")
        """)
    finally:
        srv.close()
    big = (bytes(range(251)) * 16)[:4000]
    import hashlib
    assert "SMALL b'olleh'" in out
    assert f"BIG 4000 {hashlib.sha256(big[::-1]).hexdigest()}" in out
    assert "REFUSED" in out
    # the host side saw the 4000-byte datagram whole, from a loopback address
    sizes = [len(d) for d, a in srv.seen]
    assert sizes == [5, 4000] and all(a[0] == "127.0.0.1" for _, a in srv.seen)


def test_dns_via_dns_upstream_and_disable_dns():
    srv = UdpServer(lambda q: dns_answer(q, "192.0.2.53"))
    try:
        out = run_guest(GUEST_DNS, f"--dns-upstream=127.0.0.1:{srv.port}")
        assert "ANSWER 4242 192.0.2.53 0" in out
        assert len(srv.seen) == 1 and b"\x04test\x07example" in srv.seen[0][0]
        out = run_guest(GUEST_DNS, f"--dns-upstream=127.0.0.1:{srv.port}", "--disable-dns")
        assert "TIMEOUT" in out  # no answer at all, as slirp4netns (tests/test_e2e_refusals.py)
        assert len(srv.seen) == 1  # the upstream never heard of the second query
    finally:
        srv.close()


GUEST_DNS_TCP = """
import socket, struct
q = struct.pack("!HHHHHH", 0x5151, 0x0100, 1, 0, 0, 0) + b"\\x04test\\x07example\\x00\\x00\\x01\\x00\\x01"
s = socket.create_connection(("10.0.2.3", 53), timeout=4)
s.sendall(struct.pack("!H", len(q)) + q)
n = struct.unpack("!H", s.recv(2, socket.MSG_WAITALL))[0]
r = s.recv(n, socket.MSG_WAITALL)
print("ANSWER", r[:2].hex(), socket.inet_ntoa(r[-4:]), r[3] & 15, len(r) == n)
"""


def test_dns_over_tcp_goes_to_the_upstream_port():
    # a TCP DNS server on a non-53 loopback port: --dns-upstream's port must be used for TCP too
    lsn = socket.socket()
    lsn.bind(("127.0.0.1", 0))
    lsn.listen(4)
    lsn.settimeout(10)
    port = lsn.getsockname()[1]
    seen = []

    def serve():
        try:
            c, _ = lsn.accept()
        except OSError:
            return
        with c:
            n = struct.unpack("!H", c.recv(2, socket.MSG_WAITALL))[0]
            q = c.recv(n, socket.MSG_WAITALL)
            seen.append(q)
            a = dns_answer(q, "192.0.2.54")
            c.sendall(struct.pack("!H", len(a)) + a)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        out = run_guest(GUEST_DNS_TCP, f"--dns-upstream=127.0.0.1:{port}")
    finally:
        t.join(10)
        lsn.close()
    assert "ANSWER 5151 192.0.2.54 0 True" in out, out
    assert len(seen) == 1 and b"\x04test\x07example" in seen[0]


def test_dns_via_resolv_conf_loopback_stub(tmp_path):
    # a stub resolver on a private loopback address, port 53, named by a resolv.conf that only
    # slirpy's private mount namespace sees
    try:
        srv = UdpServer(lambda q: dns_answer(q, "198.51.100.9"), addr="127.83.0.53", port=53)
    except OSError as e:
        pytest.skip(f"LOUD: cannot bind 127.83.0.53:53 for the stub resolver: {e}")
    rc = tmp_path / "resolv.conf"
    rc.write_text("# test\nnameserver 127.83.0.53\n")
    try:
        wrap = ["unshare", "-m", "sh", "-c", f'mount --bind {rc} /etc/resolv.conf && exec "$@"', "sh"]
        out = run_guest(GUEST_DNS, wrap=wrap)
        assert "ANSWER 4242 198.51.100.9 0" in out
        assert len(srv.seen) == 1
    finally:
        srv.close()


GUEST_PING = """
import socket, struct, os
def csum(b):
    if len(b) % 2: b += b"\\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b)); s = (s >> 16) + (s & 0xffff); s += s >> 16
    return ~s & 0xffff
r = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP); r.settimeout(4)
payload = bytes(range(48))
for seq in range(3):
    h = struct.pack("!BBHHH", 8, 0, 0, 0x3131, seq)
    h = struct.pack("!BBHHH", 8, 0, csum(h + payload), 0x3131, seq)
    r.sendto(h + payload, ("192.0.2.2", 0))
    while True:
        d, a = r.recvfrom(2000)
        icmp = d[(d[0] & 15) * 4:]
        t, c, ck, ident, sq = struct.unpack("!BBHHH", icmp[:8])
        if t == 0:
            print("REPLY", a[0], hex(ident), sq, icmp[8:] == payload, csum(icmp) == 0)
            break
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(4)
u.connect(("192.0.2.2", 9)); u.send(b"anyone?")
try:
    u.recv(10); print("NOERR")
except ConnectionRefusedError:
    print("WORLD_REFUSED")
"""


def test_ping_and_closed_port_in_world_netns():
    """slirpy's parent runs in a netns the test made (A), with a veth to a "world" netns
    (192.0.2.2); ping_group_range is opened in A only."""
    r = run_world('"$PY" -m slirpy -c -- "$PY" -c "$1"\n', textwrap.dedent(GUEST_PING), ping=True,
                  timeout=40)
    assert r.returncode == 0, f"stdout={r.stdout}\nstderr={r.stderr}"
    lines = r.stdout.strip().splitlines()
    assert lines == [f"REPLY 192.0.2.2 0x3131 {seq} True True" for seq in range(3)] + ["WORLD_REFUSED"]
