"""End-to-end DHCP: a guest without -c configures itself with busybox udhcpc (and asks DHCPv6),
against slirpy and against the real /usr/bin/slirp4netns in the same test; the leases must agree.

Each run: `unshare -Urn sleep` holds a namespace, the daemon is started on it as plain
`DAEMON [-r FD] PID tap0` (no -c: the tap comes up unaddressed), then inside it
`ip link set tap0 up` and `udhcpc -i tap0 -n -q -O mtu -s SCRIPT`; SCRIPT applies the address and
the default route, writes a resolv.conf and records what it was given."""

from __future__ import annotations

import json
import os
import select
import shutil
import socket
import subprocess
import sys
import threading
from contextlib import contextmanager

import pytest

from nsutil import NsHolder, Slirpy, require_netns

pytestmark = pytest.mark.netns

SLIRP4NETNS = "/usr/bin/slirp4netns"
BUSYBOX = shutil.which("busybox") or "/bin/busybox"
LEASE_KEYS = ("ip", "mask", "subnet", "router", "dns", "lease", "serverid")

SCRIPT = """#!/bin/sh
# udhcpc calls this with deconfig / bound / renew / nak / leasefail
case "$1" in
bound|renew)
    ip addr add "$ip/$mask" dev "$interface"
    for r in $router; do ip route replace default via "$r" dev "$interface"; break; done
    : > {resolv}
    for d in $dns; do echo "nameserver $d" >> {resolv}; done
    printf 'ip=%s\\nmask=%s\\nsubnet=%s\\nrouter=%s\\ndns=%s\\nlease=%s\\nserverid=%s\\nmtu=%s\\n' \\
        "$ip" "$mask" "$subnet" "$router" "$dns" "$lease" "$serverid" "$mtu" > {out}
    ;;
esac
"""

# sends Information-Requests from the tap's link-local address (the kernel answers the
# daemon's neighbour solicitation) and prints one JSON line per request: the reply's source
# port and bytes, or null
PROBE6 = r"""
import json, socket, sys, time
from scapy.all import raw
from scapy.layers.dhcp6 import (DHCP6_InfoRequest, DHCP6OptClientId, DHCP6OptElapsedTime,
                                DHCP6OptIA_NA, DHCP6OptOptReq, DUID_LL)
idx = socket.if_nametoindex("tap0")
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"tap0")
s.bind(("::", 546, 0, idx))
s.settimeout(2.0)
msgs = [
    DHCP6_InfoRequest(trid=0x123456) / DHCP6OptClientId(duid=DUID_LL(lladdr="02:00:00:00:00:0a"))
    / DHCP6OptOptReq(reqopts=[23, 24]),
    DHCP6_InfoRequest(trid=0x123457) / DHCP6OptElapsedTime() / DHCP6OptOptReq(reqopts=[24]),
    DHCP6_InfoRequest(trid=0x123458) / DHCP6OptIA_NA() / DHCP6OptOptReq(reqopts=[23]),
]
for m in msgs:
    for _ in range(200):  # until the link-local source address has passed DAD
        try:
            s.sendto(raw(m), ("ff02::1:2", 547, 0, idx)); break
        except OSError:
            time.sleep(0.05)
    try:
        d, a = s.recvfrom(65535)
        print(json.dumps({"port": a[1], "src": a[0], "reply": d.hex()}))
    except socket.timeout:
        print(json.dumps(None))
"""


@pytest.fixture(autouse=True)
def _need_tools():
    require_netns()
    for tool in ("ip", BUSYBOX):
        if not shutil.which(tool):
            pytest.skip(f"LOUD: {tool} missing: run bash tests/install-deps.sh")


@contextmanager
def real_slirp4netns(*flags):
    """The real slirp4netns on a fresh namespace, without -c, as a guest with a DHCP client
    sees it. Yields the NsHolder."""
    if not os.access(SLIRP4NETNS, os.X_OK):
        pytest.skip(f"LOUD: {SLIRP4NETNS} missing: run bash tests/install-deps.sh")
    with NsHolder() as ns:
        ready_r, ready_w = os.pipe()
        proc = subprocess.Popen([SLIRP4NETNS, "-r", str(ready_w), *flags, str(ns.pid), "tap0"],
                                pass_fds=(ready_w,), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        os.close(ready_w)
        try:
            r, _, _ = select.select([ready_r], [], [], 30)
            assert r and os.read(ready_r, 1) == b"1", "slirp4netns not ready"
            yield ns
        finally:
            os.close(ready_r)
            proc.terminate()
            proc.wait(timeout=10)


@contextmanager
def slirpy(*flags):
    with Slirpy(*flags, configure=False) as s:
        yield s.ns


def udhcpc(ns, tmp_path, tag):
    """Runs udhcpc in ns; -> (what the script recorded as a dict, resolv.conf text, output)."""
    out, resolv, script = (tmp_path / f"{tag}.lease", tmp_path / f"{tag}.resolv",
                           tmp_path / f"{tag}.sh")
    script.write_text(SCRIPT.format(out=out, resolv=resolv))
    script.chmod(0o755)
    p = ns.run("sh", "-c", f"ip link set tap0 up && {BUSYBOX} udhcpc -i tap0 -n -q -t 5 -T 2 "
               f"-O mtu -s {script}", timeout=40)
    assert p.returncode == 0, p.stdout + p.stderr
    assert out.exists(), p.stdout + p.stderr
    lease = dict(line.split("=", 1) for line in out.read_text().splitlines())
    return lease, resolv.read_text(), p.stdout + p.stderr


class _Server:
    """A TCP server on the host's 127.0.0.1 answering each connection with sha-like echo."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self):
        self.sock.settimeout(30)
        try:
            c, _ = self.sock.accept()
        except OSError:
            return
        with c:
            data = b""
            while not data.endswith(b"\n"):
                b = c.recv(4096)
                if not b:
                    break
                data += b
            c.sendall(b"host saw " + data)

    def close(self):
        self.sock.close()
        self.t.join(5)


def _connect_host(ns, port):
    code = (f"import socket; s = socket.create_connection(('10.0.2.2', {port}), timeout=10); "
            "s.sendall(b'hello from the guest\\n'); s.shutdown(socket.SHUT_WR); b = b''\n"
            "while (x := s.recv(4096)): b += x\n"
            "print(b.decode(), end='')")
    return ns.run(sys.executable, "-c", code)


def _guest_config(ns):
    addrs = [(a["local"], a["prefixlen"]) for l in ns.ip_json("addr", "show", "dev", "tap0")
             for a in l["addr_info"] if a["family"] == "inet"]
    routes = [(r["dst"], r.get("gateway"), r["dev"]) for r in ns.ip_json("route", "show", "default")]
    return addrs, routes


def test_udhcpc_gets_the_same_lease_from_slirpy_and_slirp4netns(tmp_path):
    leases = {}
    with slirpy() as ns:
        lease, resolv, out = udhcpc(ns, tmp_path, "slirpy")
        assert "lease of 10.0.2.15 obtained from 10.0.2.2, lease time 86400" in out, out
        assert _guest_config(ns) == ([("10.0.2.15", 24)], [("default", "10.0.2.2", "tap0")])
        assert resolv == "nameserver 10.0.2.3\n"
        srv = _Server()
        try:
            p = _connect_host(ns, srv.port)
        finally:
            srv.close()
        assert p.returncode == 0 and p.stdout == "host saw hello from the guest\n", p.stderr
        p = ns.run("ping", "-c1", "-W5", "10.0.2.3")
        assert p.returncode == 0 and "bytes from 10.0.2.3" in p.stdout, p.stdout + p.stderr
        leases["slirpy"] = lease
    with real_slirp4netns() as ns:
        lease, resolv4, out = udhcpc(ns, tmp_path, "slirp4netns")
        assert _guest_config(ns) == ([("10.0.2.15", 24)], [("default", "10.0.2.2", "tap0")])
        srv = _Server()
        try:
            p = _connect_host(ns, srv.port)
        finally:
            srv.close()
        assert p.stdout == "host saw hello from the guest\n", p.stderr
        leases["slirp4netns"] = lease
    a, b = leases["slirpy"], leases["slirp4netns"]
    assert {k: a[k] for k in LEASE_KEYS} == {k: b[k] for k in LEASE_KEYS}
    assert (a["ip"], a["mask"], a["router"], a["dns"], a["lease"]) == (
        "10.0.2.15", "24", "10.0.2.2", "10.0.2.3", "86400")
    assert resolv == resolv4
    # the one difference: slirpy answers udhcpc's request for the interface MTU (option 26),
    # libslirp 4.7 never sends it (docs/dhcp.md)
    assert a["mtu"] == "1500" and b["mtu"] == ""


def test_udhcpc_with_disable_dns_gets_no_dns_server(tmp_path):
    with slirpy("--disable-dns", "--mtu=4000") as ns:
        lease, resolv, _ = udhcpc(ns, tmp_path, "nodns")
        assert (lease["ip"], lease["router"], lease["dns"], lease["mtu"]) == (
            "10.0.2.15", "10.0.2.2", "", "4000")
        assert resolv == ""


def _probe6(ns, tmp_path, tag):
    probe = tmp_path / f"probe6-{tag}.py"
    probe.write_text(PROBE6)
    p = ns.run("sh", "-c", f"ip link set tap0 up && {sys.executable} {probe}", timeout=60)
    assert p.returncode == 0, p.stderr
    return [json.loads(line) for line in p.stdout.splitlines()]


def test_dhcpv6_information_request_same_reply_as_slirp4netns(tmp_path):
    with slirpy("--enable-ipv6") as ns:
        ours = _probe6(ns, tmp_path, "slirpy")
    with real_slirp4netns("--enable-ipv6") as ns:
        theirs = _probe6(ns, tmp_path, "slirp4netns")
    assert len(ours) == len(theirs) == 3
    assert ours[0]["reply"] == ("071234560001000a0003000102000000000a"
                                "00170010fd000000000000000000000000000003")
    assert [r["reply"] for r in ours] == [r["reply"] for r in theirs]
    assert all(r["src"].split("%")[0] == "fd00::2" for r in ours + theirs)
    # libslirp sends from its port number byte-swapped (8962 = 0x2302) on this little-endian
    # machine; slirpy from 547
    assert {r["port"] for r in ours} == {547}
    assert {r["port"] for r in theirs} <= {547, 8962}
