"""API socket abuse against a real daemon: binary garbage, 1 MiB requests, 1000 concurrent
connections, clients that never send. Meanwhile and afterwards a forwarded port keeps working,
the API keeps answering and slirpy's memory stays bounded."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import threading
import time

import pytest

from nsutil import Slirpy, api_raw, require_netns

pytestmark = pytest.mark.netns

GUEST_ECHO = """
import socket, threading
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 8080))
s.listen(64)
print("listening", flush=True)
def serve(c):
    with c:
        while True:
            b = c.recv(65536)
            if not b:
                return
            c.sendall(b)
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""


def rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError


FAILS: list = []


def echo_once(port, n=4096) -> bool:
    data = random.randbytes(n)
    got = b""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
            c.sendall(data)
            c.shutdown(socket.SHUT_WR)  # FIN right behind the data (it once drew a reset)
            while b := c.recv(65536):
                got += b
        if got != data:
            FAILS.append(f"echo mismatch: {len(got)} of {n} bytes")
        return got == data
    except OSError as e:
        FAILS.append(f"{e!r} after {len(got)} bytes")
        return False


def test_api_abuse_keeps_forwarding(tmp_path):
    require_netns()
    path = str(tmp_path / "api.sock")
    with Slirpy("-a", path) as sl:
        guest = subprocess.Popen(["nsenter", "-t", str(sl.ns.pid), "-U", "-n",
                                  "--preserve-credentials", sys.executable, "-c", GUEST_ECHO],
                                 stdout=subprocess.PIPE, text=True)
        try:
            assert guest.stdout.readline().strip() == "listening"
            probe = socket.socket()
            probe.bind(("127.0.0.1", 0))
            hport = probe.getsockname()[1]
            probe.close()
            r = api_raw(path, json.dumps({"execute": "add_hostfwd", "arguments": {
                "proto": "tcp", "host_addr": "127.0.0.1", "host_port": hport,
                "guest_port": 8080}}).encode())
            assert r == b'{"return":{"id":1}}'
            assert echo_once(hport)
            pid = sl.proc.pid
            rss0 = rss_kb(pid)

            stop = threading.Event()
            echoes = {"ok": 0, "bad": 0}

            def forwarder():
                while not stop.is_set():
                    echoes["ok" if echo_once(hport) else "bad"] += 1
                    time.sleep(0.02)

            ft = threading.Thread(target=forwarder)
            ft.start()
            replies = {"garbage": [], "big": []}
            try:
                # 1000 concurrent connections that never send anything
                idle = []
                deadline = time.monotonic() + 30
                for _ in range(1000):
                    c = socket.socket(socket.AF_UNIX)
                    c.setblocking(False)
                    while True:  # EAGAIN = the listen backlog is full for a moment
                        try:
                            c.connect(path)
                            break
                        except BlockingIOError:
                            assert time.monotonic() < deadline, "API accept loop stalled"
                            time.sleep(0.001)
                    idle.append(c)
                # binary garbage and 1 MiB requests while they are all open
                rnd = random.Random(5)

                until = time.monotonic() + 7  # > the API read timeout (5 s): silent ones drop

                def garbage():
                    while time.monotonic() < until:
                        try:
                            replies["garbage"].append(api_raw(path, rnd.randbytes(rnd.randrange(1, 5000))))
                        except OSError as e:
                            replies["garbage"].append(repr(e).encode())

                def big():
                    while time.monotonic() < until:
                        try:
                            replies["big"].append(api_raw(path, b"{" + b"\xff" * (1 << 20)))
                        except OSError as e:  # the server may close before reading it all
                            replies["big"].append(type(e).__name__.encode())

                ts = [threading.Thread(target=garbage), threading.Thread(target=big)]
                for t in ts:
                    t.start()
                for t in ts:
                    t.join(60)
                mid_rss = rss_kb(pid)
                for c in idle:
                    c.close()
            finally:
                stop.set()
                ft.join(30)
            assert sl.proc.poll() is None
            assert echoes["bad"] == 0 and echoes["ok"] >= 5, (echoes, FAILS)
            # every garbage request that got through the connection cap has an error reply
            answered = [r for r in replies["garbage"] if r.startswith(b"{")]
            assert answered and all(r.startswith(b'{"error":{"desc":"bad request') for r in answered)
            assert len(replies["big"]) >= 10
            assert all(r in (b'{"error":{"desc":"bad request: too large message"}}', b"",
                             b"BrokenPipeError", b"ConnectionResetError") for r in replies["big"])
            # afterwards: the API answers, the forward still works, memory is bounded
            deadline = time.monotonic() + 15
            while True:  # the silent ones are dropped after the API read timeout
                try:
                    r = api_raw(path, b'{"execute":"list_hostfwd"}', timeout=2)
                    break
                except OSError:
                    assert time.monotonic() < deadline
                    time.sleep(0.2)
            assert json.loads(r)["entries"][0]["host_port"] == hport
            assert echo_once(hport, 1 << 20)
            rss1 = rss_kb(pid)
            print(f"slirpy RSS: start {rss0} kB, during {mid_rss} kB, after {rss1} kB; "
                  f"echoes {echoes}")
            assert rss1 < 150 * 1024 and mid_rss < 150 * 1024
        finally:
            guest.kill()
            guest.wait(5)
