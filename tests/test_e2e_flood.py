"""End to end: one busy guest must not starve everyone (issue #20, the weakness).

The guest opens FLOOD_CONNS connections as fast as it can to a host server that pushes 64 KB
into each, and never reads. Meanwhile, from the same guest: pings to the gateway (10.0.2.2) and
DNS (10.0.2.3) addresses, which the stack answers itself; a 20 MB download from another host
server; and from the host, get_stats on the API socket. Then the guest closes everything.

The issue's figures are for 20,000 connections on an idle machine. The test runs a scaled flood
(FLOOD_CONNS, default 6000: about 10 s here, well under 60 s on this loaded 2-core machine;
the 19,000 of docs/limits.md take about 35 s) with the issue's targets as generous bounds:
each ping answered within PING_BOUND, get_stats within API_BOUND, the download intact within
20 s, every connect completed (within 45 s), RSS under budget x 1.1 + 8 KiB per flow + 32 MiB,
and back under idle + 30 MB within 30 s of the close. Before issue #20's changes it failed at
4000 already (700 connects reset by half-open evictions, pings lost, 7000 frames dropped at the
guest's tap, flows outliving the guest by a minute). Run with FLOOD_CONNS=19000 (and -s) for the
full-size figures; bounded in count (the connections) and time (every wait has a deadline).
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import textwrap
import threading
import time

import pytest

from nsutil import Slirpy, api, proc_status, require_netns

pytestmark = pytest.mark.netns

CONNS = int(os.environ.get("FLOOD_CONNS", "6000"))
PUSH = 64 * 1024
BULK = 20 * 1000 * 1000
PING_BOUND = 0.2 * 3  # the 200 ms, x3: this machine is shared and loaded
API_BOUND = 0.2 * 3
BUDGET = 128 << 20  # the default


def _blob():
    return hashlib.shake_256(b"bulk").digest(BULK)


class Servers:
    """Host side: a listener pushing PUSH bytes into each connection (kept open), and a bulk
    listener sending BULK bytes then closing."""

    def __init__(self):
        self.push = socket.create_server(("127.0.0.1", 0), backlog=4096)
        self.bulk = socket.create_server(("127.0.0.1", 0), backlog=16)
        self.push_port = self.push.getsockname()[1]
        self.bulk_port = self.bulk.getsockname()[1]
        self.conns, self.accepted, self.errors = [], 0, []
        self.data = b"f" * PUSH
        self.stopped = False
        threading.Thread(target=self._push_loop, daemon=True).start()
        threading.Thread(target=self._bulk_loop, daemon=True).start()

    def _push_loop(self):
        while True:
            try:
                c, _ = self.push.accept()
            except OSError:
                return
            self.accepted += 1
            c.setblocking(False)
            try:
                c.send(self.data)  # the kernel takes it (slirpy's socket has a 1 MiB buffer)
            except OSError as e:
                self.errors.append(repr(e))
            self.conns.append(c)

    def _bulk_loop(self):
        blob = _blob()
        while True:
            try:
                c, _ = self.bulk.accept()
            except OSError:
                return
            try:
                c.settimeout(60)
                c.sendall(blob)
            except OSError as e:
                self.errors.append("bulk " + repr(e))
            finally:
                c.close()

    def close(self):
        self.push.close()
        self.bulk.close()
        for c in self.conns:
            c.close()
        self.conns = []


FLOOD = """
import os, resource, selectors, socket, sys, time
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
n, port, stop = {conns}, {port}, {stop!r}
sel = selectors.DefaultSelector()
socks, done, failed, errs = [], 0, 0, {{}}
t0 = time.monotonic()
def reap(timeout):
    global done, failed
    for key, _ in sel.select(timeout):
        s = key.fileobj
        sel.unregister(s)
        e = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if e:
            failed += 1
            errs[e] = errs.get(e, 0) + 1
        else:
            done += 1
for i in range(n):
    s = socket.socket()
    s.setblocking(False)
    s.connect_ex(("10.0.2.2", port))
    sel.register(s, selectors.EVENT_WRITE)
    socks.append(s)
    if i % 256 == 255:
        reap(0)
print("SENT", round(time.monotonic() - t0, 2), flush=True)
end = t0 + {limit}
while done + failed < n and time.monotonic() < end:
    reap(0.2)
print("CONNECTS", done, failed, n - done - failed, round(time.monotonic() - t0, 2), errs, flush=True)
end = time.monotonic() + 120
while not os.path.exists(stop) and time.monotonic() < end:
    time.sleep(0.1)
for s in socks:
    s.close()
print("CLOSED", flush=True)
"""

PROBE = """
import hashlib, json, os, socket, struct, threading, time
out = {{}}
def bulk():
    t0 = time.monotonic()
    h, n = hashlib.sha256(), 0
    try:
        s = socket.create_connection(("10.0.2.2", {bulk_port}), timeout=30)
        s.settimeout(30)
        while True:
            b = s.recv(1 << 20)
            if not b:
                break
            h.update(b)
            n += len(b)
    except OSError as e:
        out["bulk_error"] = repr(e)
    out["bulk"] = [n, h.hexdigest(), round(time.monotonic() - t0, 3)]
t = threading.Thread(target=bulk)
t.start()
def csum(b):
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF
r = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
r.settimeout(0.05)
ident = os.getpid() & 0xFFFF
rtts = {{}}
for dst in ("10.0.2.2", "10.0.2.3") * {pings}:
    seqno = len(rtts.get(dst, [])) + (0 if dst.endswith("2") else 1000)
    body = struct.pack("!HH", ident, seqno) + b"probe" * 8
    pkt = struct.pack("!BBH", 8, 0, 0) + body
    pkt = struct.pack("!BBH", 8, 0, csum(pkt)) + body
    t0 = time.monotonic()
    r.sendto(pkt, (dst, 0))
    got = None
    while time.monotonic() - t0 < 2.0:
        try:
            d, a = r.recvfrom(2048)
        except socket.timeout:
            continue
        ihl = (d[0] & 15) * 4
        if a[0] == dst and d[ihl] == 0 and d[ihl + 4:ihl + 8] == body[:4]:
            got = time.monotonic() - t0
            break
    rtts.setdefault(dst, []).append(None if got is None else round(got, 4))
    time.sleep(0.25)
t.join(60)
out["ping"] = rtts
print("PROBE " + json.dumps(out), flush=True)
"""


def _rss(pid):
    return int(proc_status(pid)["VmRSS"].split()[0]) * 1024


def _popen_ns(s, code):
    import subprocess
    return subprocess.Popen(["nsenter", "-t", str(s.ns.pid), "-U", "-n", "--preserve-credentials",
                             sys.executable, "-c", code], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _lines(p, into):
    for line in p.stdout:
        into.append(line.strip())


def test_one_busy_guest_does_not_starve_everyone(tmp_path):
    require_netns()
    api_path = str(tmp_path / "api.sock")
    stop = str(tmp_path / "stop")
    srv = Servers()
    want_bulk = hashlib.sha256(_blob()).hexdigest()
    try:
        with Slirpy(f"--api-socket={api_path}") as s:
            pid = s.proc.pid
            time.sleep(0.5)
            idle = _rss(pid)
            flood_out: list[str] = []
            flood = _popen_ns(s, textwrap.dedent(FLOOD.format(conns=CONNS, port=srv.push_port,
                                                             stop=stop, limit=45)))
            reader = threading.Thread(target=_lines, args=(flood, flood_out), daemon=True)
            reader.start()
            end = time.monotonic() + 30
            while srv.accepted < min(CONNS // 4, 1000) and time.monotonic() < end:
                time.sleep(0.05)
            # the flood is under way: probes from the guest, get_stats from the host
            probe = _popen_ns(s, textwrap.dedent(PROBE.format(bulk_port=srv.bulk_port, pings=5)))
            api_times, peak = [], 0
            while probe.poll() is None and len(api_times) < 400:
                t0 = time.monotonic()
                st = api(api_path, {"execute": "get_stats"}, timeout=30)
                api_times.append(time.monotonic() - t0)
                peak = max(peak, _rss(pid))
                time.sleep(0.1)
            pout, perr = probe.communicate(timeout=90)
            end = time.monotonic() + 60
            while not any(x.startswith("CONNECTS") for x in flood_out) and time.monotonic() < end:
                peak = max(peak, _rss(pid))
                time.sleep(0.2)
            st = api(api_path, {"execute": "get_stats"}, timeout=30)["return"]
            flows = st["flows"]["tcp"]["open"]
            tap = s.ns.ip_json("-s", "link", "show", "tap0")[0]["stats64"]
            peak = max(peak, _rss(pid))
            open(stop, "w").close()
            flood.wait(timeout=60)
            reader.join(10)
            # the host's ends close too: a flow whose guest RST was lost (the guest's tap queue
            # is 500 frames; its close of thousands of sockets is a burst faster than any
            # reader) ends with our FIN, which the guest answers with another RST
            srv.close()
            # every flow closes, then RSS comes back
            t_close = time.monotonic()
            end = t_close + 60
            while time.monotonic() < end:
                left = api(api_path, {"execute": "get_stats"}, timeout=30)["return"]["flows"]["tcp"]
                if left["open"] == 0:
                    break
                time.sleep(0.2)
            t_closed = time.monotonic() - t_close
            after = _rss(pid)
            end = time.monotonic() + 30
            while after > idle + (30 << 20) and time.monotonic() < end:
                time.sleep(0.5)
                after = _rss(pid)
            t_back = time.monotonic() - t_close

            res = json.loads(next(x for x in pout.splitlines() if x.startswith("PROBE "))[6:])
            connects = next(x for x in flood_out if x.startswith("CONNECTS")).split(maxsplit=5)
            rtts = [r for v in res["ping"].values() for r in v]
            rss_bound = int(BUDGET * 1.1) + 8192 * CONNS + (32 << 20)
            print(f"\nflood {CONNS}: {' '.join(flood_out)}\n"
                  f"ping {res['ping']}\nget_stats max {max(api_times):.3f} s over "
                  f"{len(api_times)}, bulk {res['bulk'][0]} B in {res['bulk'][2]} s\n"
                  f"flows at the end {flows}; RSS idle {idle >> 20} MiB, peak {peak >> 20} MiB "
                  f"(bound {rss_bound >> 20}), {after >> 20} MiB {t_back:.1f} s after the close "
                  f"(flows gone in {t_closed:.1f} s)\ndropped {st['dropped']}\nguest tap0 {tap}")
            assert not srv.errors, srv.errors[:3]
            assert int(connects[1]) == CONNS, connects  # every connect completed
            assert flows >= CONNS, flows
            assert res["bulk"][:2] == [BULK, want_bulk] and res["bulk"][2] < 20, res
            assert None not in rtts and max(rtts) <= PING_BOUND, res["ping"]
            assert max(api_times) <= API_BOUND, api_times
            assert peak <= rss_bound, (peak, rss_bound)
            assert left["open"] == 0, left
            assert after <= idle + (30 << 20), (after, idle)
    finally:
        srv.close()
