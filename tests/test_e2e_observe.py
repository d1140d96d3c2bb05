"""Observability end to end through the real daemon: --pcap (read back by dpkt and tcpdump),
get_stats / list_flows over the API socket, and the log lines (events yes, packets no)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time

import dpkt
import pytest

from nsutil import NsHolder, Slirpy, require_netns
from slirpy.api_client import call

pytestmark = pytest.mark.netns

ROUTER_MAC = bytes.fromhex("52550a000202")  # 52:55 + 10.0.2.2: source of every guest-bound frame
EXIT_RE = re.compile(r"exit after [\d.]+s: frames in/out (\d+)/(\d+), bytes in/out (\d+)/(\d+), (\d+) dropped")


@pytest.fixture(autouse=True)
def _netns():
    require_netns()


def api(path, execute, **arguments):
    req = {"execute": execute}
    if arguments:
        req["arguments"] = arguments
    return json.loads(call(path, json.dumps(req).encode()))


def read_pcap(path):
    with open(path, "rb") as f:
        return [(ts, bytes(buf)) for ts, buf in dpkt.pcap.Reader(f)]


def icmp_echoes(frames):
    """[(type, src, dst, ident, seq, data)] of the IPv4 ICMP echo frames."""
    out = []
    for _, buf in frames:
        eth = dpkt.ethernet.Ethernet(buf)
        ip = eth.data
        if isinstance(ip, dpkt.ip.IP) and isinstance(ip.data, dpkt.icmp.ICMP) and ip.data.type in (0, 8):
            e = ip.data.data
            out.append((ip.data.type, socket.inet_ntoa(ip.src), socket.inet_ntoa(ip.dst), e.id, e.seq,
                        bytes(e.data)))
    return out


def tcpdump(path, *args):
    p = subprocess.run(["tcpdump", "-nn", "-r", path, *args], capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    return p.stdout.splitlines()


def exit_counters(stderr):
    m = EXIT_RE.findall(stderr)
    assert len(m) == 1, stderr
    return tuple(int(x) for x in m[0])


def test_pcap_matches_frames_dpkt_and_tcpdump(tmp_path):
    pcap = str(tmp_path / "cap.pcap")
    with Slirpy(f"--pcap={pcap}", "--log-level=INFO") as s:
        p = s.run_in_ns("ping", "-c", "3", "-i", "0.2", "-s", "100", "-p", "a5", "10.0.2.2")
        assert p.returncode == 0, p.stdout + p.stderr
    frames_in, frames_out, bytes_in, bytes_out, _ = exit_counters(s.stderr)

    frames = read_pcap(pcap)
    # every frame of the run, both directions, exactly as the daemon counted them
    to_guest = [b for _, b in frames if b[6:12] == ROUTER_MAC]
    from_guest = [b for _, b in frames if b[6:12] != ROUTER_MAC]
    assert (len(from_guest), len(to_guest)) == (frames_in, frames_out)
    assert (sum(map(len, from_guest)), sum(map(len, to_guest))) == (bytes_in, bytes_out)
    ts = [t for t, _ in frames]
    assert ts == sorted(ts) and abs(ts[0] - time.time()) < 120

    ech = icmp_echoes(frames)
    reqs = [e for e in ech if e[0] == 8]
    reps = [e for e in ech if e[0] == 0]
    assert len(reqs) == 3 and len(reps) == 3
    assert {(e[1], e[2]) for e in reqs} == {("10.0.2.100", "10.0.2.2")}
    assert {(e[1], e[2]) for e in reps} == {("10.0.2.2", "10.0.2.100")}
    assert [e[4] for e in reqs] == [e[4] for e in reps] == [1, 2, 3]
    for q, r in zip(reqs, reps):
        assert len(q[5]) == 100 and q[5] == r[5] and q[5][-4:] == b"\xa5" * 4  # payload echoed
    # 14 eth + 20 ip + 8 icmp + 100 data
    assert all(len(b) == 142 for _, b in frames if b[12:14] == b"\x08\x00" and b[23] == 1)

    # tcpdump reads the same file: same frame count, same echoes
    lines = tcpdump(pcap)
    assert len(lines) == len(frames)
    assert sum("10.0.2.100 > 10.0.2.2: ICMP echo request" in ln for ln in lines) == 3
    assert sum("10.0.2.2 > 10.0.2.100: ICMP echo reply" in ln for ln in lines) == 3
    assert sum(", length 108" in ln and "ICMP echo" in ln for ln in lines) == 6
    # and as raw ethernet with MACs
    elines = tcpdump(pcap, "-e", "icmp")
    assert len(elines) == 6
    assert sum(ln.split()[1] == "52:55:0a:00:02:02" for ln in elines) == 3
    if shutil.which("tshark"):  # Wireshark's reader too, where it is installed (not in CI)
        t = subprocess.run(["tshark", "-n", "-r", pcap, "-Y", "icmp.type == 0"], capture_output=True,
                           text=True, timeout=60)
        assert t.returncode == 0 and len(t.stdout.splitlines()) == 3, t.stdout + t.stderr


def test_pcap_max_bytes_stops_with_one_log_line(tmp_path):
    pcap = str(tmp_path / "cap.pcap")
    cap = 600
    sock = str(tmp_path / "api.sock")
    with Slirpy(f"--pcap={pcap}", f"--pcap-max-bytes={cap}", "--log-level=WARNING", "-a", sock) as s:
        p = s.run_in_ns("ping", "-c", "8", "-i", "0.05", "-s", "200", "10.0.2.2")
        assert p.returncode == 0, p.stdout + p.stderr
        st = api(sock, "get_stats")["return"]
        assert st["pcap"]["stopped"] is True and st["pcap"]["max_bytes"] == cap
        assert st["pcap"]["bytes"] <= cap
    size = os.path.getsize(pcap)
    assert size <= cap and size == st["pcap"]["bytes"]
    frames = read_pcap(pcap)
    assert len(frames) == st["pcap"]["frames"] >= 1
    assert len(tcpdump(pcap)) == len(frames)
    assert s.stderr.count("--pcap-max-bytes 600 reached") == 1, s.stderr
    assert len(s.stderr.splitlines()) == 1, s.stderr  # WARNING level: nothing else to say


def test_pcap_complete_after_sigterm(tmp_path):
    pcap = str(tmp_path / "cap.pcap")
    with Slirpy(f"--pcap={pcap}") as s:
        assert s.run_in_ns("ping", "-c", "2", "-i", "0.2", "10.0.2.2").returncode == 0
        s.proc.send_signal(signal.SIGTERM)
        assert s.wait(10) == 0
    ech = icmp_echoes(read_pcap(pcap))
    # every request and reply, in an order that depends on timing: ready is written before the
    # loop runs, so the guest's first ARP may wait for the daemon's imports, and the kernel then
    # sends both queued echo requests at once
    got = [(e[0], e[4]) for e in ech]
    assert sorted(got) == [(0, 1), (0, 2), (8, 1), (8, 2)], got
    assert got.index((8, 1)) < got.index((0, 1)) and got.index((8, 2)) < got.index((0, 2)), got


def test_pcap_errors_are_one_line(tmp_path):
    from nsutil import run_slirpy
    p = run_slirpy("--pcap-max-bytes=100", "1", timeout=10)
    assert (p.returncode, p.stderr) == (1, "slirpy: error: --pcap-max-bytes needs --pcap=FILE\n")
    with NsHolder() as ns:
        p = run_slirpy(f"--pcap={tmp_path}/no/such/dir/x.pcap", str(ns.pid), timeout=20)
    assert p.returncode == 1 and p.stderr.startswith("slirpy: error: --pcap ") and \
        p.stderr.count("\n") == 1, p.stderr


GUEST_CLIENT = textwrap.dedent("""
    import socket, sys, time
    tport, uport, closed, n = (int(a) for a in sys.argv[1:5])
    c = socket.create_connection(("10.0.2.2", tport), timeout=5)
    c.sendall(b"g" * n)
    assert c.recv(100) == b"ok"
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.sendto(b"u" * 77, ("10.0.2.2", uport))
    refused = 0
    for _ in range(4):
        try:
            socket.create_connection(("10.0.2.2", closed), timeout=5).close()
        except ConnectionRefusedError:
            refused += 1
    raw = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    raw.bind(("tap0", 0))
    for _ in range(5):  # unknown ethertype: a counted drop in the stack
        raw.send(b"\\x52\\x55\\x0a\\x00\\x02\\x02" + b"\\x02" * 6 + b"\\x88\\xb5" + b"x" * 50)
    print(refused, c.getsockname()[1], u.getsockname()[1], flush=True)
    sys.stdin.read()  # hold the connection open until the test says so
""")


def test_stats_and_flows_follow_traffic(tmp_path):
    sock = str(tmp_path / "api.sock")
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(4)
    tport = lst.getsockname()[1]
    usock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    usock.bind(("127.0.0.1", 0))
    uport = usock.getsockname()[1]
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    closed = probe.getsockname()[1]  # bound, never listening: connections are refused
    script = tmp_path / "client.py"
    script.write_text(GUEST_CLIENT)
    n = 30000
    with Slirpy("-a", sock, "-p", f"127.0.0.1:{_free()}:80") as s:
        before = api(sock, "get_stats")["return"]
        assert before["flows"]["tcp"]["open"] == 0 and before["forwards"] == {
            "tcp": 1, "udp": 0, "udp_mappings": 0}
        assert api(sock, "list_flows") == {"return": {"flows": []}}
        proc = subprocess.Popen(["nsenter", "-t", str(s.ns.pid), "-U", "-n", "--preserve-credentials",
                                 sys.executable, str(script), str(tport), str(uport), str(closed), str(n)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            lst.settimeout(10)
            conn, _ = lst.accept()
            got = b""
            conn.settimeout(10)
            while len(got) < n:
                got += conn.recv(65536)
            conn.sendall(b"ok")
            usock.settimeout(10)
            assert usock.recvfrom(100)[0] == b"u" * 77
            line = proc.stdout.readline().split()
            assert line and int(line[0]) == 4, line
            gtport, guport = int(line[1]), int(line[2])
            st = api(sock, "get_stats")["return"]
            flows = api(sock, "list_flows")["return"]["flows"]
        finally:
            proc.stdin.close()
            proc.wait(timeout=10)
            conn.close()
    assert got == b"g" * n
    tcp = [f for f in flows if f["proto"] == "tcp"]
    udp = [f for f in flows if f["proto"] == "udp"]
    assert len(tcp) == 1, flows
    t = tcp[0]
    assert (t["family"], t["src"], t["sport"], t["dst"], t["dport"]) == (4, "10.0.2.100", gtport, "10.0.2.2", tport)
    assert t["state"] == "ESTABLISHED" and t["bytes_in"] == n and t["bytes_out"] == 2
    assert len(udp) == 1, flows
    u = udp[0]
    assert (u["src"], u["sport"], u["dst"], u["dport"], u["bytes_in"], u["bytes_out"]) == (
        "10.0.2.100", guport, "10.0.2.2", uport, 77, 0)
    assert 0 <= u["idle"] < 10 and 0 < u["expires_in"] <= 60
    # counters moved
    # with TSO (virtio-net header) the 30 kB arrive in one or two frames, not 21
    assert st["frames_in"] > before["frames_in"] + 10 and st["bytes_in"] > before["bytes_in"] + n
    # to the guest: SYN-ACK, (coalesced) ACKs, "ok", 4 RSTs, ARP: 7 or more, not always 11
    assert st["frames_out"] >= before["frames_out"] + 7
    assert st["dropped"].get("eth_unknown_type", 0) - before["dropped"].get("eth_unknown_type", 0) == 5
    assert st["dropped"].get("tcp_connect_refused", 0) - before["dropped"].get("tcp_connect_refused", 0) == 4
    assert st["flows"]["tcp"]["open"] == 1 and st["flows"]["tcp"]["states"] == {"ESTABLISHED": 1}
    assert st["flows"]["udp"]["open"] == 1
    assert st["uptime"] > before["uptime"] >= 0
    assert st["reassembly"]["entries"] == 0 and st["buffers"]["tap_write_queue"] == 0
    assert st["dropped_total"] == sum(st["dropped"].values())
    lst.close()
    usock.close()
    probe.close()


def _free():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def test_logs_events_not_packets(tmp_path):
    sock = str(tmp_path / "api.sock")
    fport = _free()
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    closed = probe.getsockname()[1]
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.bind(("127.0.0.1", 0))
    dead_dns = u.getsockname()[1]
    u.close()  # nothing listens there: every query gets SERVFAIL
    with Slirpy("--log-level=INFO", "-a", sock, "-p", f"127.0.0.1:{fport}:80",
                f"--dns-upstream=127.0.0.1:{dead_dns}") as s:
        p = s.run_in_ns("ping", "-c", "60", "-i", "0.01", "-q", "10.0.2.2")
        assert p.returncode == 0, p.stdout + p.stderr
        # 10 refused connections: one log line (rate-limited)
        code = ("import socket\nfor _ in range(10):\n    try: socket.create_connection"
                f"(('10.0.2.2', {closed}), timeout=5)\n    except ConnectionRefusedError: pass\n")
        assert s.run_in_ns(sys.executable, "-c", code).returncode == 0
        # 6 DNS queries to a dead upstream: SERVFAIL each time, one resolver-problem line
        dns = ("import socket\nq = b'\\x12\\x34\\x01\\x00\\x00\\x01' + bytes(6) + b'\\x07example\\x03com\\x00'"
               " + b'\\x00\\x01\\x00\\x01'\nn = 0\nfor _ in range(6):\n    s = socket.socket(socket.AF_INET,"
               " socket.SOCK_DGRAM)\n    s.settimeout(5)\n    s.sendto(q, ('10.0.2.3', 53))\n"
               "    r = s.recv(512)\n    n += r[:2] == q[:2] and r[3] & 15 == 2\nprint(n)\n")
        pd = s.run_in_ns(sys.executable, "-c", dns)
        assert pd.returncode == 0 and pd.stdout.strip() == "6", pd.stdout + pd.stderr
        p2 = _free()
        r = api(sock, "add_hostfwd", proto="udp", host_addr="127.0.0.1", host_port=p2, guest_port=53)
        assert r == {"return": {"id": 2}}
        assert api(sock, "remove_hostfwd", id=2) == {"return": {}}
        assert "error" in api(sock, "add_hostfwd", proto="tcp", host_addr="127.0.0.1", host_port=fport,
                              guest_port=80)
    err = s.stderr.splitlines()
    assert all(ln.startswith("slirpy: ") for ln in err), err
    text = s.stderr
    assert text.count(" starting: ") == 1
    assert text.count("slirpy.daemon: ready") == 1
    assert f"forward 1 added: tcp 127.0.0.1:{fport} -> 10.0.2.100:80" in text
    assert f"forward 2 added: udp 127.0.0.1:{p2} -> 10.0.2.100:53" in text
    assert f"forward 2 removed: udp 127.0.0.1:{p2}" in text
    assert text.count("add_hostfwd refused") == 1
    assert len(re.findall(rf"-> 10\.0\.2\.2:{closed} refused: connect to 127\.0\.0\.1 port {closed}: refused", text)) == 1
    assert text.count(f"dns: no upstream answered (127.0.0.1:{dead_dns}); guest gets SERVFAIL") == 1
    assert text.count("exit after") == 1
    # 60 pings + 10 SYNs + ARP: still a handful of lines, none per packet (13: the splice
    # connector's start-up line, "forward splice: connector pid N ready (...)")
    assert text.count("forward splice: connector pid") == 1
    assert len(err) <= 13, text
    assert "ICMP" not in text and "echo" not in text
    probe.close()


def test_quiet_by_default_and_debug_is_ours_only(tmp_path):
    with Slirpy() as s:
        assert s.run_in_ns("ping", "-c", "5", "-i", "0.01", "-q", "10.0.2.2").returncode == 0
    assert s.stderr == ""
    with Slirpy("--log-level=DEBUG") as s:
        assert s.run_in_ns("ping", "-c", "50", "-i", "0.01", "-q", "10.0.2.2").returncode == 0
    lines = s.stderr.splitlines()
    assert lines and all(ln.startswith("slirpy: ") for ln in lines), s.stderr
    # pyroute2's per-netlink-message debug output stays off; only slirpy.* loggers speak
    assert all(re.match(r"slirpy: \w+ slirpy(\.\w+)*: ", ln) for ln in lines), s.stderr
    assert len(lines) <= 12, s.stderr


def test_limit_reached_logged_once_with_counts(tmp_path):
    """A burst of 500 DNS queries to an upstream that never answers hits the in-flight cap (and the
    rate limit): hundreds of drops, one warning line per limit, counters in get_stats agree."""
    sock = str(tmp_path / "api.sock")
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))  # bound, never read: queries wait for the upstream timeout
    code = ("import socket, struct\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            "for i in range(500):\n    s.sendto(struct.pack('!HHHHHH', i, 0x100, 1, 0, 0, 0) + "
            "b'\\x01a\\x00\\x00\\x01\\x00\\x01', ('10.0.2.3', 53))\n")
    with Slirpy("--log-level=WARNING", "-a", sock,
                f"--dns-upstream=127.0.0.1:{silent.getsockname()[1]}") as s:
        assert s.run_in_ns(sys.executable, "-c", code).returncode == 0
        def seen(st):  # every query is either refused at a limit or was taken (in flight or done)
            d, q = st["dropped"], st["dns"]
            return (d.get("dns_too_many_inflight", 0) + d.get("dns_rate_limited", 0)
                    + q["inflight"] + q["servfail"] + q["answered"])
        for _ in range(200):
            st = api(sock, "get_stats")["return"]
            if seen(st) >= 500:
                break
            time.sleep(0.05)
    silent.close()
    d = st["dropped"]
    assert seen(st) == 500, st
    # at most 256 in flight at once and at most 400 (+ refill) through the bucket: hundreds refused
    assert d.get("dns_too_many_inflight", 0) > 0 and st["dns"]["inflight"] <= 256, st
    assert d.get("dns_too_many_inflight", 0) + d.get("dns_rate_limited", 0) >= 100, d
    lines = s.stderr.splitlines()
    assert sum("limit reached: dns_too_many_inflight" in ln for ln in lines) == 1, s.stderr
    assert sum("limit reached: dns_rate_limited" in ln for ln in lines) == (1 if d.get("dns_rate_limited") else 0)
    assert all(ln.startswith("slirpy: WARNING ") for ln in lines), s.stderr
    assert len(lines) <= 3, s.stderr
