"""End to end: the TCP memory budget (SLIRPY_TCP_MEM_BUDGET) in a real namespace. The guest's
kernel pushes 16 uploads of 3 MiB at a host server that reads nothing for a while: slirpy's
buffered total (get_stats, polled over the API socket) stays within a 2 MiB budget where the
per-flow caps alone would let it hold 4 MiB; then the server reads and every byte arrives intact."""
from __future__ import annotations

import hashlib
import sys
import textwrap
import threading
import time

import pytest

from nsutil import Slirpy, api, require_netns, sha_to_eof
from test_e2e_tcp import HostServer

pytestmark = pytest.mark.netns

BUDGET = 2 << 20
CONNS = 16
SIZE = 3 << 20  # nat.py gives each host socket a 1 MiB send buffer (2 MiB in the kernel): more


def blob(i):
    return hashlib.shake_256(b"c%d" % i).digest(SIZE)


class StallServer(HostServer):
    """Accepts; each connection waits for `go`, then reads an id line and the rest to EOF."""

    def __init__(self):
        self.go = threading.Event()
        # a small receive buffer: the host kernel must not absorb what slirpy is meant to hold back
        super().__init__(rcvbuf=4096)
        self.got: dict[int, tuple[int, str]] = {}

    def _serve(self, c):
        try:
            self.go.wait(60)
            c.settimeout(60)
            f = c.makefile("rb")
            i = int(f.readline())
            self.got[i] = sha_to_eof(lambda: f.read1(1 << 16))
        except (OSError, ValueError) as e:
            self.errors.append(repr(e))
        finally:
            c.close()

    def close(self):
        self.go.set()
        super().close()


def _stats(path):
    return api(path, {"execute": "get_stats"})["return"]


GUEST = """
import hashlib, socket, threading
res = []
def go(i):
    s = socket.create_connection(("10.0.2.2", {port}), timeout=60)
    s.settimeout(90)
    s.sendall(b"%d\\n" % i)
    s.sendall(hashlib.shake_256(b"c%d" % i).digest({size}))
    s.shutdown(socket.SHUT_WR)
    s.recv(1)
    s.close()
    res.append(i)
ts = [threading.Thread(target=go, args=(i,)) for i in range({conns})]
for t in ts: t.start()
for t in ts: t.join(120)
print("DONE", len(res))
"""


def test_budget_bounds_what_slirpy_holds_for_a_server_that_does_not_read(tmp_path, monkeypatch):
    require_netns()
    monkeypatch.setenv("SLIRPY_TCP_MEM_BUDGET", str(BUDGET))
    api = str(tmp_path / "api.sock")
    srv = StallServer()
    try:
        with Slirpy(f"--api-socket={api}") as s:
            out = {}
            code = textwrap.dedent(GUEST.format(port=srv.port, size=SIZE, conns=CONNS))
            t = threading.Thread(target=lambda: out.update(r=s.run_in_ns(sys.executable, "-c", code,
                                                                          timeout=150)))
            t.start()
            peak, samples = 0, 0
            end = time.monotonic() + 30
            while time.monotonic() < end:  # until the uploads have filled what they can
                st = _stats(api)
                b = st["buffers"]
                assert b["tcp_mem_budget"] == BUDGET
                assert b["tcp_mem_bytes"] <= BUDGET, b
                peak = max(peak, b["tcp_mem_bytes"])
                samples += 1
                if srv.accepted == CONNS and peak >= BUDGET // 2 and samples >= 20:
                    break
                time.sleep(0.1)
            held = st["buffers"]["tcp_recv_bytes"] + st["buffers"]["tcp_ooo_bytes"]
            assert srv.accepted == CONNS and peak >= BUDGET // 2, (srv.accepted, peak, st)
            assert held <= BUDGET and st["dropped"].get("tcp_mem_cap_window", 0) > 0, st
            srv.go.set()  # the server reads now: every flow must finish
            t.join(150)
            r = out["r"]
            assert r.returncode == 0 and f"DONE {CONNS}" in r.stdout, (r.stdout, r.stderr[-2000:])
            want = {i: (SIZE, hashlib.sha256(blob(i)).hexdigest()) for i in range(CONNS)}
            assert srv.got == want and not srv.errors, (len(srv.got), srv.errors[:3])
            for _ in range(50):
                st = _stats(api)
                if st["buffers"]["tcp_mem_bytes"] == 0:
                    break
                time.sleep(0.1)
            assert st["buffers"]["tcp_mem_bytes"] == 0, st["buffers"]
            print(f"peak {peak} of {BUDGET} over {samples} samples; dropped "
                  f"{ {k: v for k, v in st['dropped'].items() if k.startswith('tcp_mem')} }")
    finally:
        srv.close()
