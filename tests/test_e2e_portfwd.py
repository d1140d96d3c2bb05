"""End to end port forwarding through the real daemon into an `unshare -Urn` guest namespace."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import struct
import subprocess
import sys
import time

import pytest

from nsutil import Slirpy, api_raw, free_port, require_netns, run_world

pytestmark = pytest.mark.netns

UDP_ECHO = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
print("ready", flush=True)
while True:
    d, a = s.recvfrom(65535)
    s.sendto(b"echo:" + a[0].encode() + b":" + d, a)
"""


def api(path, obj) -> bytes:
    """The reply's raw bytes (the tests compare exact JSON); obj is a dict or the raw request."""
    return api_raw(path, obj if isinstance(obj, bytes) else json.dumps(obj).encode())


def guest_bg(sl, code, *args):
    p = subprocess.Popen(["nsenter", "-t", str(sl.ns.pid), "-U", "-n", "--preserve-credentials",
                          sys.executable, "-c", code, *map(str, args)],
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    return p


def udp_roundtrip(port, payload, src=("127.0.0.1", 0), tries=20):
    c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    c.bind(src)
    c.settimeout(0.5)
    try:
        for _ in range(tries):  # bounded retries: the guest may still be answering ARP
            c.sendto(payload, ("127.0.0.1", port))
            try:
                return c.recvfrom(70000)
            except socket.timeout:
                continue
        raise AssertionError("no UDP reply through the forward")
    finally:
        c.close()


def test_udp_forward_echo_and_api(tmp_path):
    require_netns()
    hp = free_port(socket.SOCK_DGRAM)
    sock = str(tmp_path / "api.sock")
    with Slirpy("--port", f"127.0.0.1:{hp}:9000/udp", "--api-socket", sock) as sl:
        assert oct(os.stat(sock).st_mode & 0o777) == "0o600"
        srv = guest_bg(sl, UDP_ECHO, 9000)
        try:
            data, frm = udp_roundtrip(hp, b"hello")
            assert data == b"echo:10.0.2.2:hello" and frm == ("127.0.0.1", hp)
            big = os.urandom(4000)
            data, _ = udp_roundtrip(hp, big)
            assert hashlib.sha256(data).digest() == hashlib.sha256(b"echo:10.0.2.2:" + big).digest()
            # a second client on another loopback address gets its own mapping
            data, _ = udp_roundtrip(hp, b"two", src=("127.0.0.5", 0))
            assert data == b"echo:10.0.2.2:two"
            # API: the -p forward is id 1; add another, list exact JSON, remove, port closed
            hp2 = free_port(socket.SOCK_DGRAM)
            r = api(sock, {"execute": "add_hostfwd", "arguments": {
                "proto": "udp", "host_addr": "127.0.0.1", "host_port": hp2, "guest_port": 9000}})
            assert r == b'{"return":{"id":2}}'
            assert api(sock, b'{"execute":"list_hostfwd"}') == (
                '{"entries":[{"id":1,"proto":"udp","host_addr":"127.0.0.1","host_port":%d,'
                '"guest_addr":"10.0.2.100","guest_port":9000},'
                '{"id":2,"proto":"udp","host_addr":"127.0.0.1","host_port":%d,'
                '"guest_addr":"10.0.2.100","guest_port":9000}]}' % (hp, hp2)).encode()
            data, _ = udp_roundtrip(hp2, b"via-api")
            assert data == b"echo:10.0.2.2:via-api"
            assert api(sock, b'{"execute":"remove_hostfwd","arguments":{"id":2}}') == b'{"return":{}}'
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind(("127.0.0.1", hp2))  # the port is free again
            s.close()
            # TCP forward via the API: listener up, then closed after remove
            tp = free_port()
            assert api(sock, {"execute": "add_hostfwd", "arguments": {
                "proto": "tcp", "host_addr": "127.0.0.1", "host_port": tp, "guest_port": 8000}}) \
                == b'{"return":{"id":3}}'
            try:  # accepted (listener up); the guest's RST (no server on 8000) may beat connect()
                socket.create_connection(("127.0.0.1", tp), timeout=5).close()
            except ConnectionResetError:
                pass
            assert api(sock, b'{"execute":"remove_hostfwd","arguments":{"id":3}}') == b'{"return":{}}'
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", tp), timeout=5)
            assert api(sock, b'{"execute":"remove_hostfwd","arguments":{"id":3}}') == \
                b'{"error":{"desc":"bad request: remove_hostfwd: bad arguments.id"}}'
            st = json.loads(api(sock, b'{"execute":"get_stats"}'))
            assert st["return"]["frames_in"] > 0
        finally:
            srv.kill()
            srv.wait()
    assert not os.path.exists(sock)


def test_port_taken_is_startup_error():
    require_netns()
    from nsutil import run_slirpy
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    p = taken.getsockname()[1]
    try:
        r = run_slirpy("--port", f"127.0.0.1:{p}:80", "--", "true")
    finally:
        taken.close()
    assert r.returncode == 1
    assert r.stderr.startswith("slirpy: error:") and str(p) in r.stderr, r.stderr
    r = run_slirpy("--port", "80:80", "--", "true")
    assert r.returncode == 1 and "80" in r.stderr and "ip_unprivileged_port_start" in r.stderr, r.stderr


TCP_SERVER = r"""
import hashlib, socket, sys, threading
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(256)
print("ready", flush=True)
def serve(c, a):
    with c:
        n = int.from_bytes(c.recv(8, socket.MSG_WAITALL), "big")
        h = hashlib.sha256(); left = n
        while left:
            b = c.recv(min(left, 1 << 20))
            if not b: return
            h.update(b); left -= len(b)
        c.sendall(a[0].encode().ljust(40) + h.digest())
        blk = bytes(range(256)) * 4096
        left = n
        while left:
            k = min(left, len(blk)); c.sendall(blk[:k]); left -= k
while True:
    c, a = s.accept()
    threading.Thread(target=serve, args=(c, a), daemon=True).start()
"""


def test_tcp_forward_50mb_each_way_and_100_concurrent():
    """The tap path (the user-space TCP engine) under a bulk transfer and a crowd: loopback
    clients are spliced in the kernel by default (test_e2e_splice.py), so this one opts out."""
    require_netns()
    hp = free_port()
    with Slirpy("--port", f"127.0.0.1:{hp}:8000", "--disable-forward-splice") as sl:
        srv = guest_bg(sl, TCP_SERVER, 8000)
        try:
            n = 50 * 1024 * 1024
            payload = os.urandom(1 << 20)
            c = socket.create_connection(("127.0.0.1", hp), timeout=30)
            c.sendall(n.to_bytes(8, "big"))
            h = hashlib.sha256()
            for _ in range(50):
                c.sendall(payload)
                h.update(payload)
            head = b""
            while len(head) < 72:
                b = c.recv(72 - len(head))
                assert b
                head += b
            assert head[:40].strip() == b"10.0.2.2"
            assert head[40:] == h.digest()
            blk = bytes(range(256)) * 4096
            exp, left, got = hashlib.sha256(), n, hashlib.sha256()
            while left:
                k = min(left, len(blk)); exp.update(blk[:k]); left -= k
            total = 0
            while total < n:
                b = c.recv(1 << 20)
                assert b
                got.update(b); total += len(b)
            assert total == n and got.digest() == exp.digest()
            c.close()
            # 100 concurrent forwarded connections, small transfer each
            conns = [socket.create_connection(("127.0.0.1", hp), timeout=30) for _ in range(100)]
            for i, c in enumerate(conns):
                c.sendall((1000).to_bytes(8, "big") + bytes([i]) * 1000)
            for i, c in enumerate(conns):
                want = 72 + 1000
                buf = b""
                while len(buf) < want:
                    b = c.recv(want - len(buf))
                    assert b, i
                    buf += b
                assert buf[40:72] == hashlib.sha256(bytes([i]) * 1000).digest()
                assert buf[72:] == (bytes(range(256)) * 4)[:1000]
                c.close()
        finally:
            srv.kill()
            srv.wait()


WORLD_CLIENT = r"""
import socket, sys
for src in sys.argv[2:]:
    c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    c.bind((src, 0)); c.settimeout(0.5)
    for _ in range(20):
        c.sendto(b"hi", (sys.argv[1].split(":")[0], int(sys.argv[1].split(":")[1])))
        try:
            print(c.recvfrom(100)[0].decode(), flush=True); break
        except socket.timeout:
            pass
    else:
        print("NO_REPLY", flush=True)
"""


def forward_from_world(port_spec, server, client, host_port):
    """Run slirpy (with `--port port_spec`, the guest running `server GUESTPORT`) inside a netns
    the test made (A) with a veth to a "world" netns (192.0.2.2 <-> A's 192.0.2.1); then run
    `client` from the world (source 192.0.2.2) and from A's loopback. Returns its output lines."""
    guest_port = port_spec.split(":")[-1].split("/")[0]
    body = f"""
"$PY" -m slirpy -c --port {port_spec} -- "$PY" -c "$1" {guest_port} &
S=$!
trap 'kill $S $W; wait $S || true' EXIT
world "$PY" -c "$2" 192.0.2.1:{host_port} 192.0.2.2
"$PY" -c "$2" 127.0.0.1:{host_port} 127.0.0.1
"""
    r = run_world(body, server, client, timeout=60)
    assert r.returncode == 0, f"stdout={r.stdout}\nstderr={r.stderr}"
    return r.stdout.splitlines(), r.stderr


def test_udp_forward_keeps_world_source_address():
    """A world client is seen by the guest with its real address, a loopback client as 10.0.2.2."""
    lines, err = forward_from_world("0.0.0.0:40123:9000/udp",
                                    UDP_ECHO.replace('print("ready", flush=True)', ""),
                                    WORLD_CLIENT, 40123)
    assert lines == ["echo:192.0.2.2:hi", "echo:10.0.2.2:hi"], err

TCP_WHO = r"""
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(8)
while True:
    c, a = s.accept()
    c.sendall(b"peer:" + a[0].encode() + b":" + c.recv(100)); c.close()
"""

WORLD_TCP_CLIENT = r"""
import socket, sys, time
host, port = sys.argv[1].split(":")
for src in sys.argv[2:]:
    for _ in range(50):  # bounded: the guest server may not be listening yet
        try:
            c = socket.create_connection((host, int(port)), timeout=3, source_address=(src, 0))
            c.sendall(b"hi"); print(c.recv(100).decode(), flush=True); c.close(); break
        except (ConnectionRefusedError, ConnectionResetError, socket.timeout):
            time.sleep(0.1)
    else:
        print("NO_REPLY", flush=True)
"""


def test_tcp_forward_keeps_world_source_address():
    """As the UDP test: a TCP client in the world netns is seen by the guest server with its real
    address (192.0.2.2: the tap path); a loopback client is spliced in the kernel (issue #24) and
    comes from the guest's own address 10.0.2.100, never from a loopback one."""
    lines, err = forward_from_world("0.0.0.0:40124:9000", TCP_WHO, WORLD_TCP_CLIENT, 40124)
    assert lines == ["peer:192.0.2.2:hi", "peer:10.0.2.100:hi"], err


GUEST_LATE_ACCEPT = r"""
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(0)  # one connection fits the accept queue; SYNs beyond it are dropped, unanswered
print("ready", flush=True)
sys.stdin.readline()
served = dead = 0
s.settimeout(20)  # SYNs dropped while the queue was full come back after 1, 3, 7, 15 s
while served < int(sys.argv[2]):
    try:
        c, a = s.accept()
    except socket.timeout:
        break
    c.settimeout(5)
    try:
        d = c.recv(100)
    except OSError:
        d = b""
    if not d:
        dead += 1
    else:
        c.sendall(b"echo:" + d)
        served += 1
    c.close()
print("served", served, "dead", dead, flush=True)
"""


def _tcp_flows(path):
    return json.loads(api(path, {"execute": "get_stats"}))["return"]["flows"]["tcp"]


def test_forward_clients_that_hang_up_before_the_guest_answers_are_forgotten(tmp_path):
    """Issue #20 (4): host clients connect through a forward while the guest does not answer
    SYNs (its accept queue is full) and give up (close, or reset). Their flows used to go on
    retrying SYNs for a minute, and the guest, once it accepted, got those dead connections
    first. Now a host hang-up while the forward waits for the guest resets the flow at once.
    (The tap path's engine: loopback clients are spliced unless --disable-forward-splice.)"""
    require_netns()
    hp, gp, dead_n, live_n = free_port(), 8011, 30, 5
    api_path = str(tmp_path / "api.sock")
    with Slirpy("--port", f"127.0.0.1:{hp}:{gp}", f"--api-socket={api_path}",
                "--disable-forward-splice") as sl:
        g = subprocess.Popen(["nsenter", "-t", str(sl.ns.pid), "-U", "-n", "--preserve-credentials",
                              sys.executable, "-c", GUEST_LATE_ACCEPT, str(gp), str(live_n + 1)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        clients = []
        try:
            assert g.stdout.readline().strip() == "ready"
            hold = socket.create_connection(("127.0.0.1", hp), timeout=10)
            hold.sendall(b"hold")
            clients.append(hold)
            for _ in range(100):  # the guest's accept queue is full once this one is in
                if _tcp_flows(api_path)["states"].get("ESTABLISHED") == 1:
                    break
                time.sleep(0.05)
            assert _tcp_flows(api_path)["states"] == {"ESTABLISHED": 1}
            for i in range(dead_n):  # connect and give up: half close, half reset
                c = socket.create_connection(("127.0.0.1", hp), timeout=10)
                if i % 2:
                    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                c.close()
            for _ in range(100):  # every dead client's flow is reset (they retried SYNs 60 s)
                st = json.loads(api(api_path, {"execute": "get_stats"}))["return"]
                if st["dropped"].get("tcp_host_gone_early", 0) == dead_n:
                    break
                time.sleep(0.1)
            assert st["dropped"].get("tcp_host_gone_early") == dead_n, st
            assert st["flows"]["tcp"]["open"] == 1, st["flows"]
            for i in range(live_n):
                c = socket.create_connection(("127.0.0.1", hp), timeout=10)
                c.sendall(b"live%d" % i)
                clients.append(c)
            g.stdin.write("go\n")
            g.stdin.flush()
            for i, c in enumerate(clients):
                c.settimeout(20)
                want = b"echo:" + (b"hold" if i == 0 else b"live%d" % (i - 1))
                got = b""
                while len(got) < len(want):
                    b = c.recv(100)
                    if not b:
                        break
                    got += b
                assert got == want, (i, got)
            out, _ = g.communicate(timeout=30)
            assert out.split() == ["served", str(live_n + 1), "dead", "0"], out
        finally:
            for c in clients:
                c.close()
            if g.poll() is None:
                g.kill()
                g.wait()


GUEST_SHA_TO_EOF = r"""
import hashlib, socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(64)
print("ready", flush=True)
for _ in range(int(sys.argv[2])):
    c, _ = s.accept()
    h, n = hashlib.sha256(), 0
    while True:
        b = c.recv(65536)
        if not b:
            break
        h.update(b)
        n += len(b)
    c.sendall(b"%d %s" % (n, h.hexdigest().encode()))
    c.close()
"""


def test_forward_client_that_writes_and_half_closes_at_once_is_served_whole():
    """A host client that sends its request and shuts its write side down right after connect(),
    while the forward's SYN to the guest is still in flight: the guest must get every byte and
    then EOF (a half-close is not a hang-up), and its answer must reach the client."""
    require_netns()
    hp, gp, rounds = free_port(), 8012, 12
    with Slirpy("--port", f"127.0.0.1:{hp}:{gp}") as sl:
        g = guest_bg(sl, GUEST_SHA_TO_EOF, gp, rounds)
        try:
            for i in range(rounds):
                data = hashlib.shake_256(b"half-close %d" % i).digest(5 if i % 2 else 200_000)
                c = socket.create_connection(("127.0.0.1", hp), timeout=20)
                c.sendall(data)
                c.shutdown(socket.SHUT_WR)
                got = b""
                while True:
                    b = c.recv(4096)
                    if not b:
                        break
                    got += b
                c.close()
                assert got == b"%d %s" % (len(data), hashlib.sha256(data).hexdigest().encode()), i
        finally:
            g.kill()
            g.wait()
