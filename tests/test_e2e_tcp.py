"""End to end TCP: a guest in a fresh namespace (slirpy's `--` form) talks to a host server on
127.0.0.1 through 10.0.2.2; bytes checked with sha256."""
from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import threading

import pytest

pytestmark = pytest.mark.netns
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 50 * 1024 * 1024


def run_guest(code, *args, timeout=60):
    if shutil.which("unshare") is None or not os.path.exists("/dev/net/tun"):
        pytest.skip("LOUD: unshare or /dev/net/tun missing: TCP end-to-end tests cannot run")
    cmd = [sys.executable, "-m", "slirpy", "-c", *args, "--", sys.executable, "-c",
           textwrap.dedent(code)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert r.returncode == 0, f"rc={r.returncode}\nstdout={r.stdout}\nstderr={r.stderr[-3000:]}"
    return r.stdout


def _blob(n, seed):
    return hashlib.shake_256(seed).digest(n)


def test_bulk_both_ways_and_refused():
    up = _blob(N, b"up")
    down = _blob(N, b"down")
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    port = srv.getsockname()[1]
    got = {}

    def serve():
        c, a = srv.accept()
        got["peer"] = a[0]
        t = threading.Thread(target=c.sendall, args=(down,))
        t.start()
        h, n = hashlib.sha256(), 0
        while True:
            b = c.recv(1 << 16)
            if not b:
                break
            h.update(b)
            n += len(b)
        t.join()
        c.shutdown(socket.SHUT_WR)
        c.close()
        got["up"] = (n, h.hexdigest())

    th = threading.Thread(target=serve, daemon=True)
    th.start()
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    cport = closed.getsockname()[1]
    closed.close()
    try:
        out = run_guest(f"""
            import socket, hashlib, threading
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
            try:
                socket.create_connection(("10.0.2.2", {cport}), timeout=10); print("OPEN")
            except ConnectionRefusedError:
                print("REFUSED")
        """)
    finally:
        srv.close()
    th.join(10)
    assert f"DOWN {N} {hashlib.sha256(down).hexdigest()}" in out
    assert got["up"] == (N, hashlib.sha256(up).hexdigest())
    assert got["peer"] == "127.0.0.1"
    assert "REFUSED" in out


def test_disable_host_loopback_refuses():
    out = run_guest("""
        import socket
        try:
            socket.create_connection(("10.0.2.2", 1), timeout=10); print("OPEN")
        except ConnectionRefusedError:
            print("REFUSED")
    """, "--disable-host-loopback")
    assert "REFUSED" in out
