"""Issue #24 part 2: a forward's loopback client is spliced in the kernel (slirpy/splice.py):
the helper stays in the container's namespaces as a connector, the daemon moves the bytes with
splice(2). Both peers here are the kernel's own TCP: a 127.0.0.1 (or ::1) client on the host and
a server in the `unshare -Urn` guest namespace. Non-loopback clients keep the tap path
(test_e2e_portfwd.py's test_tcp_forward_keeps_world_source_address)."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import time

import pytest

from nsutil import Slirpy, api, free_port, proc_status, require_netns

pytestmark = pytest.mark.netns

MIB = 1 << 20

# One connection per request line "MODE N\n"; results the client cannot see go to stdout.
GUEST = r"""
import hashlib, random, socket, struct, sys, threading
fam = socket.AF_INET6 if sys.argv[2] == "6" else socket.AF_INET
s = socket.socket(fam)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("::" if fam == socket.AF_INET6 else "0.0.0.0", int(sys.argv[1])))
s.listen(64)
print("ready", flush=True)
def line(c):
    b = b""
    while not b.endswith(b"\n"):
        k = c.recv(1)
        if not k:
            return None
        b += k
    return b.decode().split()
def to_eof(c):
    h, n = hashlib.sha256(), 0
    while True:
        b = c.recv(1 << 16)
        if not b:
            return n, h.hexdigest()
        h.update(b); n += len(b)
def serve(c, a):
    try:
        req = line(c)
        if req is None:
            print("closed-before-request", flush=True); return
        mode, n = req[0], int(req[1])
        if mode == "sha":  # client -> guest to EOF, then the answer and n bytes, then close
            got = to_eof(c)
            c.sendall(("%s %d %s\n" % (a[0], got[0], got[1])).encode())
            c.sendall(random.Random(n).randbytes(n))
        elif mode == "first":  # guest -> client first, half-close, then the client's bytes
            c.sendall(random.Random(n).randbytes(n))
            c.shutdown(socket.SHUT_WR)
            got = to_eof(c)
            print("first %s %d %s" % (a[0], got[0], got[1]), flush=True)
        elif mode == "wait":  # read until the client's end: EOF or a reset
            try:
                got = to_eof(c)
                print("wait eof %d" % got[0], flush=True)
            except ConnectionResetError:
                print("wait reset", flush=True)
        elif mode == "rst":  # the guest resets
            c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    finally:
        c.close()
while True:
    c, a = s.accept()
    threading.Thread(target=serve, args=(c, a), daemon=True).start()
"""


class Guest:
    def __init__(self, sl, port, family=4):
        self.p = subprocess.Popen(["nsenter", "-t", str(sl.ns.pid), "-U", "-n",
                                   "--preserve-credentials", sys.executable, "-c", GUEST,
                                   str(port), str(family)], stdout=subprocess.PIPE, text=True)
        assert self.p.stdout.readline().strip() == "ready"

    def said(self) -> str:
        return self.p.stdout.readline().strip()

    def close(self):
        self.p.kill()
        self.p.wait()


def connect(port, host="127.0.0.1"):
    return socket.create_connection((host, port), timeout=30)


def read_to_eof(c) -> bytes:
    out = bytearray()
    while b := c.recv(1 << 20):
        out += b
    return bytes(out)


def sha_exchange(port, n=8 * MIB, host="127.0.0.1") -> str:
    """n random bytes to the guest, half-close, then the guest's answer (its peer address, what
    it received) and n bytes of its own, both checked. Returns the peer address the guest saw."""
    data = os.urandom(n)
    c = connect(port, host)
    try:
        c.sendall(b"sha %d\n" % n + data)
        c.shutdown(socket.SHUT_WR)  # half-close: the guest's answer still comes back
        got = read_to_eof(c)
    finally:
        c.close()
    head, _, body = got.partition(b"\n")
    peer, count, digest = head.decode().split()
    assert int(count) == n and digest == hashlib.sha256(data).hexdigest()
    assert hashlib.sha256(body).digest() == hashlib.sha256(random.Random(n).randbytes(n)).digest()
    return peer


def stats(path) -> dict:
    return api(path, {"execute": "get_stats"})["return"]


def splice_stats(path, until=None) -> dict:
    """get_stats' forward_splice, waiting (bounded) until ``until(s)`` holds when given."""
    for _ in range(100):
        s = stats(path)["forward_splice"]
        if until is None or until(s):
            return s
        time.sleep(0.05)
    return s


def outcome(c) -> str:
    """What a client sees next: data, an EOF or a reset."""
    try:
        b = c.recv(100)
    except ConnectionResetError:
        return "reset"
    return "eof" if b == b"" else "data"


def test_loopback_client_is_spliced_sha256_both_ways_and_counted(tmp_path):
    """8 MiB each way, sha256-exact, through the splice; the guest sees its own address as the
    peer (never 127.x); get_stats counts exactly this connection and its bytes."""
    require_netns()
    hp, path = free_port(), str(tmp_path / "api.sock")
    with Slirpy("-p", f"127.0.0.1:{hp}:8000", "-a", path) as sl:
        g = Guest(sl, 8000)
        try:
            assert sha_exchange(hp) == "10.0.2.100"
            n = 8 * MIB
            head = len("sha %d\n" % n)
            answer = len("10.0.2.100 %d %s\n" % (n, "0" * 64))
            s = splice_stats(path, lambda s: s["active"] == 0)
            assert s["enabled"] and s["helper_alive"] and s["total"] == 1 and s["active"] == 0
            assert s["bytes_to_guest"] == head + n
            assert s["bytes_from_guest"] == answer + n
            assert s["fallbacks"] == {} and s["refused"] == 0 and s["resets"] == 0
            # the tap carried none of it: no TCP flow was ever opened in the engine
            assert stats(path)["flows"]["tcp"]["open"] == 0
        finally:
            g.close()


def test_half_close_from_the_guest_first(tmp_path):
    """The guest sends, shuts its write side; the client reads to EOF, then sends its own bytes
    and shuts down: the guest still reads every one of them."""
    require_netns()
    hp = free_port()
    with Slirpy("-p", f"127.0.0.1:{hp}:8000") as sl:
        g = Guest(sl, 8000)
        try:
            n = 8 * MIB
            c = connect(hp)
            c.sendall(b"first %d\n" % n)
            got = read_to_eof(c)  # the guest's half-close reached us as an EOF
            assert hashlib.sha256(got).digest() == hashlib.sha256(random.Random(n).randbytes(n)).digest()
            data = os.urandom(n)
            c.sendall(data)  # our direction is still open
            c.shutdown(socket.SHUT_WR)
            assert read_to_eof(c) == b""
            c.close()
            assert g.said() == f"first 10.0.2.100 {n} {hashlib.sha256(data).hexdigest()}"
        finally:
            g.close()


def test_reset_each_way(tmp_path):
    """A client's RST (SO_LINGER 0 close) is the guest's ECONNRESET; the guest's RST is the
    client's ECONNRESET; both counted."""
    require_netns()
    hp, path = free_port(), str(tmp_path / "api.sock")
    with Slirpy("-p", f"127.0.0.1:{hp}:8000", "-a", path) as sl:
        g = Guest(sl, 8000)
        try:
            c = connect(hp)
            c.sendall(b"wait 0\n" + b"x" * 1000)
            splice_stats(path, lambda s: s["bytes_to_guest"] >= 1007)
            flows = api(path, {"execute": "list_flows"})["return"]["flows"]
            assert [(f["state"], f["forward"], f["client"], f["src"], f["sport"], f["dst"],
                     f["dport"], f["bytes_out"]) for f in flows if f["proto"] == "tcp"] == [
                ("SPLICED", 1, "127.0.0.1:%d" % c.getsockname()[1], "10.0.2.100", 8000,
                 "127.0.0.1", c.getsockname()[1], 1007)]
            c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            c.close()
            assert g.said() == "wait reset"
            c = connect(hp)
            c.sendall(b"rst 0\n")
            assert outcome(c) == "reset"
            c.close()
            s = splice_stats(path, lambda s: s["active"] == 0)
            assert (s["total"], s["resets"], s["active"]) == (2, 2, 0)
        finally:
            g.close()


def test_refused_guest_port_is_the_same_as_on_the_tap_path(tmp_path):
    """Nothing listens in the guest: the client is accepted, then reset, through the splice
    and through the tap path (API "splice": false) alike."""
    require_netns()
    hp, path = free_port(), str(tmp_path / "api.sock")
    with Slirpy("-p", f"127.0.0.1:{hp}:8099", "-a", path):
        tap = free_port()
        assert api(path, {"execute": "add_hostfwd", "arguments": {
            "proto": "tcp", "host_addr": "127.0.0.1", "host_port": tap, "guest_port": 8099,
            "splice": False}}) == {"return": {"id": 2}}
        seen = []
        for port in (hp, tap):
            c = connect(port)
            seen.append(outcome(c))
            c.close()
        assert seen == ["reset", "reset"]
        s = splice_stats(path)
        assert (s["refused"], s["total"], s["fallbacks"]) == (1, 0, {})


def test_ipv6_loopback_client(tmp_path):
    """-6, [::1] forward: spliced, the guest sees fd00::100 (its SLAAC address) as the peer."""
    require_netns()
    hp, path = free_port(addr="::1"), str(tmp_path / "api.sock")
    with Slirpy("-6", "-p", f"[::1]:{hp}:8000", "-a", path) as sl:
        g = Guest(sl, 8000, family=6)
        try:
            for _ in range(100):  # SLAAC from the first router advertisement
                addrs = [a["local"] for i in sl.ns.ip_json("-6", "addr", "show", "dev", "tap0")
                         for a in i["addr_info"]]
                if "fd00::100" in addrs:
                    break
                time.sleep(0.05)
            assert sha_exchange(hp, 1 * MIB, host="::1") == "fd00::100"
            s = splice_stats(path)
            assert s["total"] == 1 and s["fallbacks"] == {}
        finally:
            g.close()


def test_opt_outs_take_the_tap_path(tmp_path):
    """--disable-forward-splice, and add_hostfwd's "splice": false: the guest sees the gateway
    10.0.2.2, as with slirp4netns; list_hostfwd stays slirp4netns's exact reply."""
    require_netns()
    hp, path = free_port(), str(tmp_path / "api.sock")
    with Slirpy("-p", f"127.0.0.1:{hp}:8000", "-a", path, "--disable-forward-splice") as sl:
        g = Guest(sl, 8000)
        try:
            assert sha_exchange(hp, MIB) == "10.0.2.2"
            s = stats(path)["forward_splice"]
            assert not s["enabled"] and s["total"] == 0
        finally:
            g.close()
    hp = free_port()
    with Slirpy("-a", path) as sl:
        g = Guest(sl, 8000)
        try:
            bad = api(path, {"execute": "add_hostfwd", "arguments": {
                "proto": "tcp", "host_addr": "127.0.0.1", "host_port": hp, "guest_port": 8000,
                "splice": "no"}})
            assert bad == {"error": {"desc": "bad request: add_hostfwd: bad arguments.splice"}}
            assert api(path, {"execute": "add_hostfwd", "arguments": {
                "proto": "tcp", "host_addr": "127.0.0.1", "host_port": hp, "guest_port": 8000,
                "splice": False}}) == {"return": {"id": 1}}
            assert api(path, {"execute": "list_hostfwd"}) == {"entries": [
                {"id": 1, "proto": "tcp", "host_addr": "127.0.0.1", "host_port": hp,
                 "guest_addr": "10.0.2.100", "guest_port": 8000}]}
            assert sha_exchange(hp, MIB) == "10.0.2.2"
            hp2 = free_port()
            assert api(path, {"execute": "add_hostfwd", "arguments": {
                "proto": "tcp", "host_addr": "127.0.0.1", "host_port": hp2,
                "guest_port": 8000}}) == {"return": {"id": 2}}
            assert sha_exchange(hp2, MIB) == "10.0.2.100"
            s = stats(path)["forward_splice"]
            assert s["enabled"] and s["total"] == 1 and s["fallbacks"] == {}
        finally:
            g.close()


def _caps(status: dict) -> tuple:
    return tuple(int(status[k], 16) for k in ("CapEff", "CapPrm", "CapBnd", "CapAmb"))


@pytest.mark.parametrize("flags", [(), ("--enable-sandbox", "--enable-seccomp")])
def test_connector_is_locked_down_and_still_splices(tmp_path, flags):
    """The connector keeps the socketpair and stdio on /dev/null only, no capability,
    no_new_privs; with --enable-seccomp a filter, with --enable-sandbox its own mount
    namespace. Forwards still splice."""
    require_netns()
    hp, path = free_port(), str(tmp_path / "api.sock")
    with Slirpy("-p", f"127.0.0.1:{hp}:8000", "-a", path, *flags) as sl:
        g = Guest(sl, 8000)
        try:
            assert sha_exchange(hp, MIB) == "10.0.2.100"
            s = stats(path)["forward_splice"]
            assert s["helper_alive"] and s["total"] == 1
            pid = s["helper_pid"]
            st = proc_status(pid)
            assert st["PPid"] == str(sl.proc.pid)
            assert _caps(st) == (0, 0, 0, 0) and st["NoNewPrivs"] == "1"
            assert st["Seccomp"] == ("2" if flags else "0")
            fds = sorted(int(f) for f in os.listdir(f"/proc/{pid}/fd"))
            assert fds == [0, 1, 2, 3] or len(fds) == 4, fds
            assert all(os.readlink(f"/proc/{pid}/fd/{i}") == "/dev/null" for i in (0, 1, 2))
            assert os.readlink(f"/proc/{pid}/fd/{fds[3]}").startswith("socket:")
            same_mnt = os.stat(f"/proc/{pid}/ns/mnt").st_ino == os.stat("/proc/self/ns/mnt").st_ino
            assert same_mnt == (not flags)
        finally:
            g.close()


def test_connector_killed_forwards_fall_back_to_the_tap_path(tmp_path):
    """SIGKILL the connector: one warning line, and the next connection still gets every byte
    (through the tap: the guest sees the gateway), counted."""
    require_netns()
    hp, path = free_port(), str(tmp_path / "api.sock")
    with Slirpy("-p", f"127.0.0.1:{hp}:8000", "-a", path, "--log-level=WARNING") as sl:
        g = Guest(sl, 8000)
        try:
            assert sha_exchange(hp, MIB) == "10.0.2.100"
            pid = stats(path)["forward_splice"]["helper_pid"]
            os.kill(pid, signal.SIGKILL)
            s = splice_stats(path, lambda s: not s["helper_alive"])
            assert not s["helper_alive"]
            for _ in range(2):
                assert sha_exchange(hp, MIB) == "10.0.2.2"
            s = stats(path)["forward_splice"]
            assert s["total"] == 1 and s["fallbacks"] == {"helper_dead": 2}
            assert not os.path.exists(f"/proc/{pid}")  # reaped
        finally:
            g.close()
    lines = [ln for ln in sl.stderr.splitlines() if "forward splice" in ln]
    assert len(lines) == 1 and "tap path" in lines[0], sl.stderr


def test_no_connector_without_tcp_forwards():
    """No -p TCP forward and no API socket: no forward can exist, and the helper exits as
    before (no process stays in the container's namespaces)."""
    require_netns()
    with Slirpy("-p", f"127.0.0.1:{free_port(socket.SOCK_DGRAM)}:53/udp") as sl:
        children = set()
        for _ in range(50):
            with open(f"/proc/{sl.proc.pid}/task/{sl.proc.pid}/children") as f:
                children = set(f.read().split())
            if not children:
                break
            time.sleep(0.05)
        assert children == set()


def test_stats_table_shows_the_splice_line():
    """slirpy-api stats: one `splice` line with the counters and the fallbacks by reason."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from slirpy.api_client import format_stats
    from slirpy.splice import is_loopback
    text = format_stats({"forward_splice": {
        "enabled": True, "helper_alive": False, "active": 1, "total": 3, "bytes_to_guest": 2048,
        "bytes_from_guest": 10, "fallbacks": {"helper_dead": 2}}})
    assert ("splice      active=1 total=3 to_guest=2.0 KiB from_guest=10 B helper=gone "
            "fallbacks helper_dead=2\n") in text
    assert "splice" not in format_stats({"forward_splice": {"enabled": False, "total": 0}})
    assert [is_loopback(h) for h in ("127.0.0.1", "127.9.8.7", "::1", "::ffff:127.0.0.1",
                                     "10.0.2.2", "::ffff:10.0.0.1", "192.0.2.127", "::")] == \
        [True] * 4 + [False] * 4


def test_many_concurrent_clients_each_spliced(tmp_path):
    """60 clients connect at once (the connector's requests one at a time), each with its own
    bytes: every answer exact, every one spliced, the pipes and sockets closed after."""
    require_netns()
    hp, path, n = free_port(), str(tmp_path / "api.sock"), 60
    with Slirpy("-p", f"127.0.0.1:{hp}:8000", "-a", path) as sl:
        g = Guest(sl, 8000)
        try:
            splice_stats(path)
            before = len(os.listdir(f"/proc/{sl.proc.pid}/fd"))
            conns = [connect(hp) for _ in range(n)]
            datas = [os.urandom(1000 + i) for i in range(n)]
            for c, d in zip(conns, datas):
                c.sendall(b"sha %d\n" % len(d) + d)
                c.shutdown(socket.SHUT_WR)
            for c, d in zip(conns, datas):
                head, _, body = read_to_eof(c).partition(b"\n")
                c.close()
                assert head.decode().split() == ["10.0.2.100", str(len(d)),
                                                 hashlib.sha256(d).hexdigest()]
                assert body == random.Random(len(d)).randbytes(len(d))
            s = splice_stats(path, lambda s: s["active"] == 0)
            assert (s["total"], s["active"], s["fallbacks"]) == (n, 0, {})
            # no pipe or socket left behind (4 fds per connection while it lived)
            assert len(os.listdir(f"/proc/{sl.proc.pid}/fd")) == before
        finally:
            g.close()
