"""Hostile guest, in real namespaces: ~100k crafted frames written into the guest's side of the tap
(tests/hostile_sender.py, an AF_PACKET socket on tap0 inside the namespace), then slirpy must be
alive, small (RSS), answer ping and carry a 20 MB TCP transfer intact.

Everything the frames reach on the host is a server this test made on loopback; the DNS upstream
is a loopback sink too (--dns-upstream), so no frame leaves the machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import selectors
import socket
import sys
import threading
import time

import pytest

from nsutil import Slirpy, api, require_netns

pytestmark = pytest.mark.netns
HERE = os.path.dirname(os.path.abspath(__file__))
BIG = 20 * 1024 * 1024
RSS_LIMIT_KB = 150 * 1024


class Servers:
    """Loopback servers the crafted traffic reaches: a TCP server that holds connections, one
    that closes at once, one that sends BIG bytes, UDP sinks (v4, v6) and a silent DNS upstream."""

    def __init__(self):
        self.sel = selectors.DefaultSelector()
        self.stop = False
        self.udp4 = self._udp(socket.AF_INET, "127.0.0.1")
        self.udp6 = self._udp(socket.AF_INET6, "::1")
        self.dns = self._udp(socket.AF_INET, "127.0.0.1")
        self.hold = self._listen()
        self.closer = self._listen()
        self.big = self._listen()
        c = socket.socket()
        c.bind(("127.0.0.1", 0))
        self.closed_port = c.getsockname()[1]
        c.close()
        self.datagrams: list[bytes] = []
        self.dns_queries = 0
        self.accepted = {"hold": 0, "closer": 0, "big": 0}
        self.conns: list = []
        self.blob = hashlib.shake_256(b"hostile-big").digest(BIG)
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _udp(self, fam, host):
        s = socket.socket(fam, socket.SOCK_DGRAM)
        s.bind((host, 0))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        s.setblocking(False)
        return s

    def _listen(self):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen(4096)
        s.setblocking(False)
        return s

    def port(self, s):
        return s.getsockname()[1]

    def _run(self):
        sel = self.sel
        for name in ("udp4", "udp6", "dns", "hold", "closer", "big"):
            sel.register(getattr(self, name), selectors.EVENT_READ, name)
        while not self.stop:
            for key, _ in sel.select(0.2):
                name = key.data
                if name in ("udp4", "udp6", "dns"):
                    for _ in range(256):
                        try:
                            d = key.fileobj.recv(65535)
                        except BlockingIOError:
                            break
                        if name == "dns":
                            self.dns_queries += 1
                        elif d[:6] in (b"SIGBUS", b"SIX000") or d[:3] == b"SIX" or d[:5] == b"SWEEP":
                            self.datagrams.append(d)
                elif name in ("hold", "closer", "big"):
                    try:
                        c, _ = key.fileobj.accept()
                    except BlockingIOError:
                        continue
                    self.accepted[name] += 1
                    if name == "closer":
                        c.close()
                    elif name == "big":
                        threading.Thread(target=self._send_big, args=(c,), daemon=True).start()
                    else:
                        c.setblocking(False)
                        self.conns.append(c)
                        sel.register(c, selectors.EVENT_READ, "conn")
                else:  # a held connection: discard what comes, close on EOF/reset
                    try:
                        d = key.fileobj.recv(65536)
                    except BlockingIOError:
                        continue
                    except OSError:
                        d = b""
                    if not d:
                        sel.unregister(key.fileobj)
                        key.fileobj.close()

    def _send_big(self, c):
        try:
            c.sendall(self.blob)
            c.shutdown(socket.SHUT_WR)
            c.recv(1)
        except OSError:
            pass
        finally:
            c.close()

    def close(self):
        self.stop = True
        self.t.join(5)
        for c in self.conns:
            c.close()
        for s in (self.udp4, self.udp6, self.dns, self.hold, self.closer, self.big):
            s.close()


def proc_kb(pid, field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(field)


def test_hostile_frames(tmp_path):
    require_netns()
    srv = Servers()
    api_path = str(tmp_path / "api.sock")
    try:
        with Slirpy("--enable-ipv6", "-a", api_path,
                    "--dns-upstream", f"127.0.0.1:{srv.port(srv.dns)}") as sl:
            # the tap's ring must hold a pacing batch (1000 frames) without dropping
            assert sl.run_in_ns("ip", "link", "set", "tap0", "txqueuelen", "10000").returncode == 0
            cfg = {"api": api_path, "udp_sink": srv.port(srv.udp4), "udp_sink6": srv.port(srv.udp6),
                   "tcp_hold": srv.port(srv.hold), "tcp_closer": srv.port(srv.closer),
                   "closed_port": srv.closed_port}
            t0 = time.monotonic()
            r = sl.run_in_ns(sys.executable, os.path.join(HERE, "hostile_sender.py"),
                             json.dumps(cfg), timeout=170)
            secs = time.monotonic() - t0
            assert r.returncode == 0, r.stderr[-3000:]
            out = json.loads(r.stdout)
            print("sender:", json.dumps(out), f"wall {secs:.1f}s")
            pid = sl.proc.pid
            assert sl.proc.poll() is None, sl.proc.communicate(timeout=5)[1][-3000:]
            rss, hwm = proc_kb(pid, "VmRSS"), proc_kb(pid, "VmHWM")
            print(f"slirpy RSS after: {rss} kB, peak {hwm} kB")
            stats = api(api_path, {"execute": "get_stats"})["return"]
            d = stats["dropped"]
            print("stats:", json.dumps(stats))

            assert out["sent"] >= 95_000 and out["send_errors"] == 0
            assert stats["frames_in"] >= out["sent"]  # every crafted frame was read and parsed
            assert out["unpaced"] == 0
            assert out["vnet_arrived"] >= 1000  # GSO/offload frames really reached slirpy
            assert rss < RSS_LIMIT_KB, f"RSS {rss} kB"
            assert "tcp_internal_error" not in d  # the engine's catch-all never fired
            # the address sweep: only the gateway and DNS answer ARP and ping
            assert out["arp_replies"] == ["10.0.2.2", "10.0.2.3"]
            assert out["echo4"] == ["10.0.2.2", "10.0.2.3"]
            assert d["ipv4_dst_virtual_net"] >= 3 * 253
            assert out["echo6"] == ["fd00::2", "fd00::3"]
            assert d["ipv6_dst_in_guest_prefix"] >= 253
            # fragments: each duplicated-last-fragment datagram arrived exactly once, intact
            got = sorted(x for x in srv.datagrams if x[:6] == b"SIGBUS")
            assert got == sorted((b"SIGBUS%04d" % k) * 300 for k in range(100))
            got6 = sorted(x for x in srv.datagrams if x[:3] == b"SIX")
            assert got6 == sorted((b"SIX%04d" % k) * 400 for k in range(50))
            assert [x for x in srv.datagrams if x[:5] == b"SWEEP"] == [b"SWEEP2"]
            for reason in ("reass_evicted", "reass_overlap", "reass_too_big",
                           "udp_flow_evicted", "ipv4_bad_checksum", "arp_not_for_us"):
                assert d.get(reason, 0) > 0, reason
            est, cw, live = out["tcp_result"]
            assert est >= 250 and cw >= 250 and live == 64  # the handshakes really happened

            # afterwards: ping answers and a 20 MB transfer is intact
            p = sl.run_in_ns("ping", "-c", "3", "-i", "0.2", "-W", "2", "10.0.2.2")
            assert p.returncode == 0 and " 0% packet loss" in p.stdout, p.stdout + p.stderr
            code = ("import socket,hashlib\n"
                    f"s=socket.create_connection(('10.0.2.2',{srv.port(srv.big)}),timeout=30)\n"
                    "h=hashlib.sha256();n=0\n"
                    "while True:\n"
                    "    b=s.recv(1<<16)\n"
                    "    if not b: break\n"
                    "    h.update(b);n+=len(b)\n"
                    "print(n,h.hexdigest())\n")
            t = sl.run_in_ns(sys.executable, "-c", code, timeout=60)
            assert t.stdout.split() == [str(BIG), hashlib.sha256(srv.blob).hexdigest()], t.stderr
            assert sl.proc.poll() is None
            print(f"slirpy RSS at end: {proc_kb(pid, 'VmRSS')} kB, peak {proc_kb(pid, 'VmHWM')} kB")
    finally:
        srv.close()
