"""Refusals as slirp4netns makes them, end to end: the same guest action through the real
slirp4netns and through slirpy gives the same result.

- --disable-host-loopback: TCP to 10.0.2.2 (fd00::2 with -6) fails at once with ENETUNREACH
  (ICMP net unreachable / ICMPv6 no route, not an RST: libslirp's answer to its refused
  connect()); UDP there gets the same error (seen with IP_RECVERR); nothing reaches the host's
  loopback.
- --disable-dns: TCP and UDP to 10.0.2.3:53 get no answer at all (the guest times out).
  slirp4netns then sends the guest's packets to the literal address 10.0.2.3 from the host;
  slirpy sends nothing anywhere (the one difference, asserted).

Both daemons run inside a network namespace this test makes (`unshare -n`, as root): its
loopback is "the host's", and its only other route is a default route over a veth pair whose
other end, up but with no address, drops every frame (the gateway's MAC is a static neighbour
entry nobody has): slirp4netns's packets to 10.0.2.3 go nowhere, as on a host where that address
does not answer, and are counted on the device.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap

import pytest

from nsutil import REPO, Slirpy, _env, api, require_netns

pytestmark = pytest.mark.netns
SLIRP4NETNS = "/usr/bin/slirp4netns"
TESTS = os.path.dirname(os.path.abspath(__file__))

OUTER = """set -e
ip link set lo up
ip link add d0 type veth peer name d1
sysctl -qw net.ipv6.conf.d0.disable_ipv6=1 net.ipv6.conf.d1.disable_ipv6=1
ip link set d0 up
ip link set d1 up
ip addr add 192.0.2.1/24 dev d0
ip neigh add 192.0.2.254 lladdr 02:00:00:00:00:fe dev d0 nud permanent
ip route add default via 192.0.2.254 dev d0
exec "$@"
"""

GUEST = r'''
import errno, socket, sys, time
T0 = time.monotonic()
IP_RECVERR, IPV6_RECVERR = 11, 25

def wait_slaac(limit=15.0):  # an fd00:: address past DAD and the default route from the RA
    while time.monotonic() - T0 < limit:
        addrs = [l.split() for l in open("/proc/net/if_inet6")]
        ok = any(a[5] == "tap0" and a[0].startswith("fd00") and not int(a[4], 16) & 0x40
                 for a in addrs)
        routes = [l.split() for l in open("/proc/net/ipv6_route")]
        if ok and any(r[0] == "0" * 32 and r[9] == "tap0" for r in routes):
            return True
        time.sleep(0.05)
    return False

def tcp(addr, port, timeout=4):
    fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.settimeout(timeout)
    t = time.monotonic()
    try:
        s.connect((addr, port))
        r = "OPEN"
    except socket.timeout:
        r = "TIMEOUT"
    except OSError as e:
        r = errno.errorcode.get(e.errno, str(e.errno))
    return r, time.monotonic() - t

def udp(addr, port, timeout=3):
    fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_DGRAM)
    if fam == socket.AF_INET:
        s.setsockopt(socket.IPPROTO_IP, IP_RECVERR, 1)
    else:
        s.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVERR, 1)
    s.settimeout(timeout)
    s.connect((addr, port))
    s.send(b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x04test\x00\x00\x01\x00\x01")
    try:
        s.recv(2048)
        return "ANSWER"
    except socket.timeout:
        return "TIMEOUT"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))
'''

SCENARIOS = {
    "host-loopback-v4": (["--disable-host-loopback"], """
        r, took = tcp("10.0.2.2", PORT)
        print("TCP", r, took < 2)
        print("UDP", udp("10.0.2.2", PORT))
    """),
    "host-loopback-v6": (["-6", "--disable-host-loopback"], """
        print("SLAAC", wait_slaac())
        r, took = tcp("fd00::2", PORT)
        print("TCP", r, took < 2)
        print("UDP", udp("fd00::2", PORT))
    """),
    "disable-dns": (["--disable-dns"], """
        r, took = tcp("10.0.2.3", 53, timeout=3)
        print("TCP", r)
        print("UDP", udp("10.0.2.3", 53))
    """),
}


def _driver(argv0: str, scenario: str, api_path: str) -> None:
    """Runs inside the outer namespace: a host server on its loopback, the daemon, the guest
    action; prints one JSON line with what each side saw."""
    flags, code = SCENARIOS[scenario]
    tcp_srv = socket.socket()
    tcp_srv.bind(("127.0.0.1", 0))
    tcp_srv.listen(8)
    port = tcp_srv.getsockname()[1]
    udp_srv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp_srv.bind(("127.0.0.1", port))
    tcp6 = socket.socket(socket.AF_INET6)
    tcp6.bind(("::1", port))
    tcp6.listen(8)
    udp6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    udp6.bind(("::1", port))

    def tx():  # frames sent on d0 (/proc/net/dev is per network namespace; /sys is not here)
        with open("/proc/net/dev") as f:
            for line in f:
                name, _, counters = line.partition(":")
                if name.strip() == "d0":
                    return int(counters.split()[9])
        raise AssertionError("no d0")

    tx0 = tx()
    stats = None
    with Slirpy(*flags, "-a", api_path, argv0=argv0 or None) as s:
        p = s.run_in_ns(sys.executable, "-c", GUEST + textwrap.dedent(code).replace("PORT", str(port)),
                        timeout=60)
        if not argv0:
            stats = api(api_path, {"execute": "get_stats"})["return"]["dropped"]
        s.close_exit_fd()
        rc = s.wait()
    host = 0
    for srv in (tcp_srv, udp_srv, tcp6, udp6):
        srv.setblocking(False)
        try:
            srv.accept() if srv.type == socket.SOCK_STREAM else srv.recv(2048)
            host += 1
        except BlockingIOError:
            pass
    print(json.dumps({"guest": p.stdout.splitlines(), "guest_err": p.stderr[-2000:], "rc": rc,
                      "tx": tx() - tx0, "host": host, "stats": stats}))


def _run(argv0: str, scenario: str, tmp_path) -> dict:
    api_path = str(tmp_path / f"{os.path.basename(argv0 or 'slirpy')}.sock")
    prog = (f"import sys; sys.path[:0] = [{TESTS!r}, {REPO!r}]; import test_e2e_refusals as t; "
            f"t._driver({argv0!r}, {scenario!r}, {api_path!r})")
    p = subprocess.run(["unshare", "-n", "sh", "-c", OUTER, "sh", sys.executable, "-c", prog],
                       capture_output=True, text=True, timeout=120, env=_env(), cwd=REPO)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.splitlines()[-1])


def _need():
    require_netns()
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("LOUD: need root and ip(8) for the outer namespace with its dummy route")
    if not os.path.exists(SLIRP4NETNS):
        pytest.skip(f"LOUD: {SLIRP4NETNS} missing: nothing to compare with")


@pytest.mark.parametrize("scenario", ["host-loopback-v4", "host-loopback-v6"])
def test_refused_host_loopback_as_slirp4netns(scenario, tmp_path):
    _need()
    theirs = _run(SLIRP4NETNS, scenario, tmp_path)
    ours = _run("", scenario, tmp_path)
    want = ["TCP ENETUNREACH True", "UDP ENETUNREACH"]
    if scenario.endswith("v6"):
        want.insert(0, "SLAAC True")
    assert theirs["guest"] == want, theirs
    assert ours["guest"] == want, ours
    assert theirs["host"] == ours["host"] == 0  # nothing reached the host's loopback
    assert (theirs["rc"], ours["rc"]) == (0, 0)
    assert ours["stats"]["tcp_connect_host_loopback_disabled"] == 1
    assert ours["stats"]["udp_host_loopback_disabled"] == 1


def test_disable_dns_no_answer_at_all_as_slirp4netns(tmp_path):
    _need()
    theirs = _run(SLIRP4NETNS, "disable-dns", tmp_path)
    ours = _run("", "disable-dns", tmp_path)
    assert theirs["guest"] == ours["guest"] == ["TCP TIMEOUT", "UDP TIMEOUT"], (theirs, ours)
    assert theirs["tx"] > 0  # slirp4netns sent the guest's packets on to 10.0.2.3 itself
    assert ours["tx"] == 0  # slirpy sent nothing anywhere
    assert ours["host"] == 0
    assert ours["stats"]["udp_dns_disabled"] >= 1
    assert ours["stats"]["tcp_connect_dns_disabled"] >= 1
