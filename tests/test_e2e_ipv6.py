"""End to end IPv6 (-6): a guest in a fresh namespace (slirpy's `--` form, which implies -c) gets a
SLAAC fd00::/64 address and a default route via fe80::2 from slirpy's router advertisements, then
pings fd00::2/fd00::3, moves 20 MB each way to a host server on ::1 via [fd00::2], uses UDP and
DNS (UDP and TCP) over IPv6, receives IPv6 port forwards, and reaches a "world" namespace over
IPv6 (with --outbound-addr6). Also: --outbound-addr for IPv4, and a guest without -6 gets nothing.
Every check is on bytes, hashes, addresses or counts."""
from __future__ import annotations

import hashlib
import json
import os
import queue
import select
import shutil
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from nsutil import UdpServer, _env, api, dns_answer, exchange, free_port, run_world

pytestmark = pytest.mark.netns
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 20 * 1024 * 1024


def _need():
    if shutil.which("unshare") is None or not os.path.exists("/dev/net/tun"):
        pytest.skip("LOUD: unshare or /dev/net/tun missing: IPv6 end-to-end tests cannot run")


# Guest-side helpers, prepended to every guest script.
GUEST_LIB = r'''
import hashlib, socket, struct, sys, time
T0 = time.monotonic()

def v6state():
    addrs = [l.split() for l in open("/proc/net/if_inet6")]
    glob = sorted(a[0] for a in addrs if a[5] == "tap0" and a[0].startswith("fd00"))
    routes = [l.split() for l in open("/proc/net/ipv6_route")]
    via = sorted(r[4] for r in routes if r[0] == "0" * 32 and r[1] == "00" and r[9] == "tap0")
    return glob, via

def wait_slaac(limit=8.0):
    while True:
        g, via = v6state()
        if (g and via) or time.monotonic() - T0 > limit:
            break
        time.sleep(0.02)
    print("SLAAC", g, via, "%.2f" % (time.monotonic() - T0), flush=True)

def ping6(addr, n=2, timeout=3):
    r = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
    r.settimeout(timeout)
    ok = 0
    payload = bytes(range(40))
    try:
        for seq in range(n):
            r.sendto(struct.pack("!BBHHH", 128, 0, 0, 0x4242, seq) + payload, (addr, 0))
            while True:
                d, a = r.recvfrom(2000)
                if d[0] == 129 and struct.unpack("!HH", d[4:8]) == (0x4242, seq):
                    ok += d[8:] == payload and a[0] == addr.split("%")[0]
                    break
    except socket.timeout:
        pass
    return ok

def ping6_err(addr, timeout=3):
    """(type, code, source) of the ICMPv6 error quoting our echo request to addr, or None."""
    r = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
    r.settimeout(timeout)
    r.sendto(struct.pack("!BBHHH", 128, 0, 0, 0x4343, 5) + b"probe", (addr, 0))
    try:
        while True:
            d, a = r.recvfrom(2000)
            q = d[8:]
            if d[0] in (1, 3) and len(q) >= 48 and q[40] == 128 and \
                    struct.unpack("!HH", q[44:48]) == (0x4343, 5) and q[48:] == b"probe":
                return d[0], d[1], a[0]
    except socket.timeout:
        return None
'''


def run_guest(code, *args, timeout=60):
    _need()
    cmd = [sys.executable, "-m", "slirpy", "-c", *args, "--", sys.executable, "-c",
           GUEST_LIB + textwrap.dedent(code)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=_env())
    assert r.returncode == 0, f"rc={r.returncode}\nstdout={r.stdout}\nstderr={r.stderr[-3000:]}"
    return r.stdout


def _slaac_ok(out):
    line = [ln for ln in out.splitlines() if ln.startswith("SLAAC ")][0]
    assert "['fd000000000000000000000000000100'] ['fe800000000000000000000000000002']" in line, line
    return float(line.split()[-1])


def test_slaac_route_and_ping6():
    out = run_guest("""
        wait_slaac()
        print("PING2", ping6("fd00::2"))
        print("PING3", ping6("fd00::3"))
        print("PINGLL", ping6("fe80::2%tap0"))
        print("PINGNONE", ping6("fd00::77", n=1, timeout=1))
    """, "-6")
    took = _slaac_ok(out)
    assert took < 3.0, out
    assert "PING2 2" in out and "PING3 2" in out and "PINGLL 2" in out
    assert "PINGNONE 0" in out  # nobody else lives in fd00::/64


def test_without_ipv6_the_guest_gets_nothing(tmp_path):
    api = str(tmp_path / "api.sock")
    out = run_guest(f"""
        def ll_ready():  # the link-local address has finished DAD (not IFA_F_TENTATIVE)
            return any(a[5] == "tap0" and a[0].startswith("fe80") and not int(a[4], 16) & 0x40
                       for a in (l.split() for l in open("/proc/net/if_inet6")))
        while not ll_ready() and time.monotonic() - T0 < 6:
            time.sleep(0.05)
        time.sleep(0.5)  # room for an RS and its (absent) answer
        print("STATE", v6state())
        print("PINGLL", ping6("fe80::2%tap0", n=1, timeout=1))
        import json
        c = socket.socket(socket.AF_UNIX); c.connect({api!r})
        c.sendall(b'{{"execute":"get_stats"}}'); c.shutdown(socket.SHUT_WR)
        print("STATS", c.recv(65536).decode())
    """, "-a", api)
    assert "STATE ([], [])" in out and "PINGLL 0" in out
    stats = json.loads([ln for ln in out.splitlines() if ln.startswith("STATS ")][0][6:])
    assert stats["return"]["dropped"]["ipv6_disabled"] >= 2  # at least the RS and our echo


def _blob(n, seed):
    return hashlib.shake_256(seed).digest(n)


def test_20mb_both_ways_via_fd00_2_and_host_loopback_rules():
    up, down = _blob(N, b"up6"), _blob(N, b"down6")
    srv = socket.socket(socket.AF_INET6)
    srv.bind(("::1", 0))
    srv.listen(4)
    port = srv.getsockname()[1]
    got = {}

    def serve():
        c, a = srv.accept()
        got["peer"] = a[0]
        got["up"] = exchange(c, down)
        c.close()

    th = threading.Thread(target=serve, daemon=True)
    th.start()
    try:
        out = run_guest(f"""
            import threading
            wait_slaac()
            up = hashlib.shake_256(b"up6").digest({N})
            s = socket.create_connection(("fd00::2", {port}), timeout=30)
            print("LOCAL", s.getsockname()[0])
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
            try:
                socket.create_connection(("fd00::2", 1), timeout=10); print("OPEN")
            except ConnectionRefusedError:
                print("REFUSED")
        """, "-6")
    finally:
        srv.close()
    th.join(10)
    assert f"DOWN {N} {hashlib.sha256(down).hexdigest()}" in out
    assert got["up"] == (N, hashlib.sha256(up).hexdigest())
    assert got["peer"] == "::1"
    assert "LOCAL fd00::100" in out and "REFUSED" in out
    out = run_guest("""
        import errno
        wait_slaac()
        try:
            socket.create_connection(("fd00::2", 1), timeout=10); print("OPEN")
        except OSError as e:  # ICMPv6 no route, as slirp4netns (tests/test_e2e_refusals.py)
            print("ERR", errno.errorcode.get(e.errno))
    """, "-6", "--disable-host-loopback")
    assert "ERR ENETUNREACH" in out


def _tcp_dns_server():
    """One-shot DNS-over-TCP server on 127.0.0.1 (length-prefixed), in a thread."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(2)
    s.settimeout(30)

    def run():
        try:
            c, _ = s.accept()
        except OSError:
            return
        with c:
            c.settimeout(10)
            buf = b""
            while len(buf) < 2 or len(buf) < 2 + struct.unpack("!H", buf[:2])[0]:
                b = c.recv(4096)
                if not b:
                    return
                buf += b
            r = dns_answer(buf[2:], "192.0.2.77")
            c.sendall(struct.pack("!H", len(r)) + r)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return s, t


GUEST_UDP_DNS = """
wait_slaac()
q = struct.pack("!HHHHHH", 0x4243, 0x0100, 1, 0, 0, 0) + b"\\x04test\\x07example\\x00\\x00\\x01\\x00\\x01"
u = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); u.settimeout(4)
u.connect(("fd00::2", {echo}))
u.send(b"hello6"); print("ECHO", u.recv(100))
big = bytes(range(251)) * 20
u.send(big); r = u.recv(70000); print("BIG", len(r), hashlib.sha256(r).hexdigest())
c = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); c.settimeout(4)
c.connect(("fd00::2", {closed})); c.send(b"knock")
try:
    c.recv(10); print("NOERR")
except ConnectionRefusedError:
    print("UDP_REFUSED")
d = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); d.settimeout(4)
d.connect(("fd00::3", 53)); d.send(q)
r = d.recv(512); print("DNSUDP", r[:2].hex(), socket.inet_ntoa(r[-4:]), r[3] & 15)
t = socket.create_connection(("fd00::3", 53), timeout=10)
t.sendall(struct.pack("!H", len(q)) + q)
r = b""
while len(r) < 2 or len(r) < 2 + struct.unpack("!H", r[:2])[0]:
    b = t.recv(4096)
    if not b: break
    r += b
print("DNSTCP", r[2:4].hex(), socket.inet_ntoa(r[-4:]))
"""


def test_udp_echo_and_dns_udp_tcp_over_ipv6():
    echo = UdpServer(lambda d: d[::-1], "::1")
    dns = UdpServer(lambda q: dns_answer(q, "192.0.2.66"))
    closed = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    closed.bind(("::1", 0))
    cport = closed.getsockname()[1]
    closed.close()
    tdns, tt = _tcp_dns_server()
    tport = tdns.getsockname()[1]
    # UDP queries try the upstreams in order (nothing answers UDP on the TCP server's port, so
    # the second answers); TCP queries go to the first, on its own port (not 53)
    try:
        out = run_guest(GUEST_UDP_DNS.format(echo=echo.port, closed=cport), "-6",
                        f"--dns-upstream=127.0.0.1:{tport}", f"--dns-upstream=127.0.0.1:{dns.port}")
    finally:
        echo.close()
        dns.close()
        tdns.close()
        tt.join(5)
    assert "ECHO b'6olleh'" in out
    big = (bytes(range(251)) * 20)
    assert f"BIG {len(big)} {hashlib.sha256(big[::-1]).hexdigest()}" in out
    assert "UDP_REFUSED" in out
    assert "DNSUDP 4243 192.0.2.66 0" in out
    assert "DNSTCP 4243 192.0.2.77" in out
    assert [len(d) for d, a in echo.seen] == [6, len(big)]
    assert all(a[0] == "::1" for _, a in echo.seen)
    assert len(dns.seen) == 1 and b"\x04test\x07example" in dns.seen[0][0]


def test_ipv6_port_forwards_cli_and_api(tmp_path):
    _need()
    sock = str(tmp_path / "api.sock")
    htcp = free_port(socket.SOCK_STREAM, "::1")
    hudp = free_port(socket.SOCK_DGRAM, "::1")
    guest = GUEST_LIB + textwrap.dedent("""
        wait_slaac()
        ls = socket.socket(socket.AF_INET6); ls.bind(("::", 8080)); ls.listen(2)
        us = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); us.bind(("::", 5300))
        print("LISTENING", flush=True)
        c, a = ls.accept()
        data = c.recv(100)
        c.sendall(data.upper() + b" " + a[0].encode() + b" " + c.getsockname()[0].encode())
        c.close()
        d, a = us.recvfrom(100)
        us.sendto(d[::-1] + b" " + a[0].encode(), a)
        print("GUEST_DONE", flush=True)
    """)
    cmd = [sys.executable, "-m", "slirpy", "-c", "-6", "-a", sock, "-p", f"[::1]:{htcp}:8080",
           "--", sys.executable, "-c", guest]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                         env=_env())
    lines: queue.Queue = queue.Queue()
    out_lines: list = []

    def pump():
        for ln in p.stdout:
            out_lines.append(ln)
            lines.put(ln)

    threading.Thread(target=pump, daemon=True).start()
    try:
        line = lines.get(timeout=15)
        assert line.startswith("SLAAC"), line
        assert lines.get(timeout=10) == "LISTENING\n"
        add = api(sock, {"execute": "add_hostfwd", "arguments": {
            "proto": "udp", "host_addr": "::", "host_port": hudp, "guest_port": 5300}}, timeout=5)
        assert "return" in add, add
        entries = api(sock, {"execute": "list_hostfwd"}, timeout=5)["entries"]
        assert {(e["proto"], e["host_addr"], e["guest_addr"], e["guest_port"]) for e in entries} == {
            ("tcp", "::1", "fd00::100", 8080), ("udp", "::", "fd00::100", 5300)}
        c = socket.create_connection(("::1", htcp), timeout=10)
        c.sendall(b"hello forward")
        buf = b""
        while True:
            b = c.recv(100)
            if not b:
                break
            buf += b
        c.close()
        # the loopback client was spliced (issue #24): the guest saw the connection come from its
        # own address, and was reached on fd00::100
        assert buf == b"HELLO FORWARD fd00::100 fd00::100"
        u = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        u.settimeout(10)
        u.sendto(b"ping6", ("::1", hudp))
        d, a = u.recvfrom(100)
        assert d == b"6gnip fd00::2" and a[1] == hudp
        u.close()
        assert p.wait(timeout=20) == 0, p.stderr.read()[-2000:]
        assert lines.get(timeout=5) == "GUEST_DONE\n"
    finally:
        if p.poll() is None:
            p.terminate()  # slirpy SIGTERMs the guest command and reaps it
            p.wait(timeout=10)


GUEST_WORLD = r"""
wait_slaac()
print("PINGW", ping6("2001:db8:1::2"))
print("ERR3", ping6_err("2001:db8:3::1"))
print("ERR4", ping6_err("2001:db8:4::1"))
s = socket.create_connection(("2001:db8:1::2", 7000), timeout=10)
s.sendall(b"over v6"); s.shutdown(socket.SHUT_WR)
r = b""
while True:
    b = s.recv(1000)
    if not b: break
    r += b
print("WORLD", r.decode())
u = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); u.settimeout(4)
u.connect(("2001:db8:1::2", 9)); u.send(b"anyone?")
try:
    u.recv(10); print("NOERR")
except ConnectionRefusedError:
    print("WORLD_UDP_REFUSED")
"""

WORLD_SERVER = r"""
import socket
s = socket.socket(socket.AF_INET6); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("2001:db8:1::2", 7000)); s.listen(1); s.settimeout(30)
c, a = s.accept()
d = b""
while True:
    b = c.recv(1000)
    if not b: break
    d += b
c.sendall(d.upper() + b" from " + a[0].encode()); c.close()
"""


def test_world_namespace_over_ipv6_with_outbound_addr6():
    """slirpy's parent runs in a netns the test made (A) with a veth to a "world" netns that
    holds 2001:db8:1::2; A has 2001:db8:1::1 and ::10, slirpy binds outbound to ::10. The world
    routes 2001:db8:3::/64 (A's route to it goes there) to "unreachable"."""
    body = textwrap.dedent("""
        ip addr add 2001:db8:1::10/64 dev v0 nodad
        ip -6 route add 2001:db8:3::/64 via 2001:db8:1::2
        world sh -ec 'echo 1 > /proc/sys/net/ipv6/conf/all/forwarding
            ip -6 route add unreachable 2001:db8:3::/64'
        world "$PY" -c "$2" & S=$!
        sleep 0.5
        "$PY" -m slirpy -c -6 --outbound-addr6=2001:db8:1::10 -- "$PY" -c "$1"
        wait $S
    """)
    r = run_world(body, GUEST_LIB + GUEST_WORLD, WORLD_SERVER, ipv6=True, ping=True, timeout=60)
    assert r.returncode == 0, f"stdout={r.stdout}\nstderr={r.stderr}"
    _slaac_ok(r.stdout)
    assert "PINGW 2" in r.stdout
    # an ICMPv6 error from the world router (no route: type 1 code 0) reaches the guest from
    # the router's address; no route on slirpy's host: from fd00::2
    assert "ERR3 (1, 0, '2001:db8:1::2')" in r.stdout
    assert "ERR4 (1, 0, 'fd00::2')" in r.stdout
    assert "WORLD OVER V6 from 2001:db8:1::10" in r.stdout
    assert "WORLD_UDP_REFUSED" in r.stdout


def test_outbound_addr_ipv4_tcp_udp():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    srv.settimeout(30)
    port = srv.getsockname()[1]
    udp = UdpServer(lambda d: d)
    got = {}

    def serve():
        try:
            c, a = srv.accept()
        except OSError:
            return
        got["peer"] = a[0]
        c.sendall(b"hi " + a[0].encode())
        c.close()

    th = threading.Thread(target=serve, daemon=True)
    th.start()
    try:
        out = run_guest(f"""
            s = socket.create_connection(("10.0.2.2", {port}), timeout=10)
            print("TCP", s.recv(100).decode())
            u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(4)
            u.connect(("10.0.2.2", {udp.port})); u.send(b"x"); print("UDP", u.recv(10))
        """, "--outbound-addr=127.0.0.2")
    finally:
        srv.close()
        udp.close()
    th.join(5)
    assert got["peer"] == "127.0.0.2" and "TCP hi 127.0.0.2" in out
    assert "UDP b'x'" in out and [a[0] for _, a in udp.seen] == ["127.0.0.2"]


def test_outbound_addr_errors_are_one_line():
    from nsutil import run_slirpy
    for args, needle in ((["--outbound-addr=192.0.2.123", "1"], "cannot bind"),
                         (["--outbound-addr=::1", "1"], "outbound-addr has to be valid ipv4 address"),
                         (["--outbound-addr6=127.0.0.1", "1"],
                          "outbound-addr6 has to be valid ipv6 address"),
                         (["--outbound-addr=nosuchif0", "1"],
                          "outbound-addr has to be valid ipv4 address or interface name"),
                         (["-6", "--mtu=1000", "1"], "1280")):
        p = run_slirpy(*args, timeout=10)
        assert p.returncode == 1 and p.stderr.startswith("slirpy: error: "), (args, p.stderr)
        assert needle in p.stderr and p.stderr.count("\n") == 1, (args, p.stderr)
    from slirpy import cli
    c = cli.parse_args(["--outbound-addr=lo", "--outbound-addr6=lo", "1"])
    assert (str(c.outbound_addr), str(c.outbound_addr6)) == ("127.0.0.1", "::1")


NS_SERVER = r"""
import socket, sys
ls = socket.socket(socket.AF_INET6); ls.bind(("::", 8080)); ls.listen(1); ls.settimeout(20)
print("LISTENING", flush=True)
c, a = ls.accept()
c.sendall(("%s %s" % (a[0], c.getsockname()[0])).encode()); c.close()
"""


def _ns_global6(s, want_permanent=True, limit=10.0):
    """The namespace's fd00:: address on tap0 once DAD is over, polled from outside."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit:
        for line in s.run_in_ns("cat", "/proc/net/if_inet6").stdout.splitlines():
            a = line.split()
            if a[5] == "tap0" and a[0].startswith("fd00") and not int(a[4], 16) & 0x40:
                return ":".join(a[0][i:i + 4] for i in range(0, 32, 4)), time.monotonic() - t0
        time.sleep(0.1)
    return None, time.monotonic() - t0


def test_path_form_without_configure_forward_follows_the_learned_address():
    """As a caller that configures the tap itself (no -c): the guest does DAD and makes an
    EUI-64 SLAAC address from our RA; a v6 port forward reaches it, learned from its DAD probe
    before it ever sent a packet from that address (PID/path forms, user namespace joined)."""
    _need()
    import ipaddress
    from nsutil import Slirpy
    hp = free_port(socket.SOCK_STREAM, "::1")
    with Slirpy("-6", "-p", f"[::1]:{hp}:8080", path_form=True, configure=False) as s:
        for cmd in (("ip", "link", "set", "lo", "up"), ("ip", "link", "set", "tap0", "up")):
            r = s.run_in_ns(*cmd)
            assert r.returncode == 0, r.stderr
        addr, took = _ns_global6(s)
        assert addr is not None, "no SLAAC address within 10 s"
        addr = str(ipaddress.IPv6Address(addr))
        assert addr != "fd00::100" and ipaddress.IPv6Address(addr) in ipaddress.IPv6Network(
            "fd00::/64")
        srv = subprocess.Popen(["nsenter", "-t", str(s.ns.pid), "-U", "-n", "--preserve-credentials",
                                sys.executable, "-c", NS_SERVER], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, bufsize=0)
        try:
            buf, t0 = b"", time.monotonic()
            while b"\n" not in buf and time.monotonic() - t0 < 10:
                r, _, _ = select.select([srv.stdout], [], [], 1)
                if r:
                    b = os.read(srv.stdout.fileno(), 100)
                    if not b:
                        break
                    buf += b
            assert buf == b"LISTENING\n", (buf, srv.stderr.read() if srv.poll() is not None else "")
            c = socket.create_connection(("::1", hp), timeout=10)
            c.settimeout(10)
            got = c.recv(200).decode()
            c.close()
            # spliced from the address the forward follows, to that address (issue #24)
            assert got == f"{addr} {addr}"
            assert srv.wait(timeout=10) == 0
        finally:
            if srv.poll() is None:
                srv.kill()
                srv.wait(timeout=5)
