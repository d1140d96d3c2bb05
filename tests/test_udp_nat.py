"""UDP NAT: the flow table (fake clock) and the glue against real loopback sockets."""

from __future__ import annotations

import errno
import socket
import struct

import pytest
import trio

from slirpy.config import Config
from slirpy.hostsock import FlowTable
from slirpy.stack.events import UdpDatagram
from slirpy.stack.stats import Stats
from slirpy.udp_nat import (
    ICMP6_NO_ROUTE, ICMP_HOST_UNREACH, ICMP_NET_UNREACH, ICMP_PORT_UNREACH, SO_EE_ORIGIN_ICMP,
    parse_errqueue,
)
from test_udp_fakes import FakeDaemon, udp_nat, wait_for

G = "10.0.2.100"


# ---- FlowTable -------------------------------------------------------------------------------
def test_5000_short_flows_expire_to_empty():
    removed = []
    t = FlowTable(8192, lambda k, v: removed.append(k))
    for i in range(5000):
        t.add(("f", i), i, now=i * 0.001, timeout=10.0 if i % 2 else 60.0)
    assert len(t) == 5000
    assert t.expire(now=15.0) == 2500  # the DNS-like (10 s) half
    assert len(t) == 2500 and all(k[1] % 2 == 1 for k in removed)
    assert t.expire(now=59.0) == 0
    assert t.expire(now=65.0) == 2500
    assert len(t) == 0 and len(removed) == 5000
    assert t.next_deadline() is None


def test_refresh_moves_deadline():
    t = FlowTable(10)
    t.add("a", 1, now=0.0, timeout=10.0)
    t.add("b", 2, now=0.0, timeout=10.0)
    assert t.get("a", now=8.0) == 1
    assert t.expire(10.0) == 1 and "a" in t and "b" not in t
    assert t.next_deadline() == 18.0
    assert t.expire(17.9) == 0 and t.expire(18.0) == 1


def test_cap_evicts_least_recently_used_and_counts():
    st = Stats()
    removed = []
    t = FlowTable(3, lambda k, v: removed.append(k), st, "udp_flow")
    for k in "abc":
        t.add(k, k, 0.0, 60.0)
    t.get("a", 1.0)  # a is now most recently used
    t.add("d", "d", 2.0, 60.0)
    assert removed == ["b"] and len(t) == 3
    assert st.dropped["udp_flow_evicted"] == 1
    for i in range(100):
        t.add(i, i, 3.0, 60.0)
    assert len(t) == 3 and st.dropped["udp_flow_evicted"] == 101


def test_heap_stays_bounded_under_churn():
    t = FlowTable(4)
    for i in range(20000):
        t.add(i % 7, i, now=float(i), timeout=0.5)
        t.expire(now=float(i) + 1)
    assert len(t) == 0 and len(t._heap) < 200


def test_parse_errqueue():
    ee = struct.pack("=IBBBBII", errno.ECONNREFUSED, SO_EE_ORIGIN_ICMP, 3, 3, 0, 0, 0)
    assert parse_errqueue(ee, socket.AF_INET) == (errno.ECONNREFUSED, ICMP_PORT_UNREACH)
    ee = struct.pack("=IBBBBII", errno.EHOSTUNREACH, SO_EE_ORIGIN_ICMP, 3, 1, 0, 0, 0)
    assert parse_errqueue(ee, socket.AF_INET) == (errno.EHOSTUNREACH, ICMP_HOST_UNREACH)
    assert parse_errqueue(b"\x01\x02", socket.AF_INET) is None
    ee = struct.pack("=IBBBBII", errno.EMSGSIZE, 1, 0, 0, 0, 1400, 0)  # local origin
    assert parse_errqueue(ee, socket.AF_INET) is None


# ---- glue ------------------------------------------------------------------------------------
def _echo_server():
    s = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    return s


async def _serve_echo(s, task_status=trio.TASK_STATUS_IGNORED):
    task_status.started()
    while True:
        data, addr = await s.recvfrom(65535)
        await s.sendto(data[::-1], addr)


async def test_udp_echo_through_gateway_maps_to_loopback():
    async with trio.open_nursery() as n:
        srv = _echo_server()
        await srv.bind(("127.0.0.1", 0))
        port = srv.getsockname()[1]
        await n.start(_serve_echo, srv)
        d = FakeDaemon(n)
        nat = udp_nat(d)
        for i in range(3):
            nat.handle(UdpDatagram(4, G, 40000, "10.0.2.2", port, b"hello%d" % i))
        big = bytes(range(256)) * 16  # 4096 bytes
        nat.handle(UdpDatagram(4, G, 40001, "10.0.2.2", port, big))
        assert await wait_for(d.stack, lambda: len(d.stack.udp) == 4)
        got = sorted(d.stack.udp)
        assert got[:3] == [(4, "10.0.2.2", port, G, 40000, b"%dolleh" % i) for i in range(3)]
        assert got[3] == (4, "10.0.2.2", port, G, 40001, big[::-1])
        assert len(nat.table) == 2
        n.cancel_scope.cancel()


async def test_closed_port_gives_port_unreachable_quoting_datagram():
    async with trio.open_nursery() as n:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()  # now closed: the kernel answers ICMP port unreachable
        d = FakeDaemon(n)
        nat = udp_nat(d)
        nat.handle(UdpDatagram(4, G, 40002, "10.0.2.2", port, b"knock"))
        assert await wait_for(d.stack, lambda: d.stack.unreach)
        assert d.stack.unreach[0] == (4, G, 40002, "10.0.2.2", port, b"knock", ICMP_PORT_UNREACH)
        n.cancel_scope.cancel()


async def test_disable_host_loopback_and_dns_ports():
    """libslirp's answers: the gateway with --disable-host-loopback and the DNS address on a port
    other than 53 get ICMP net unreachable; with --disable-dns nothing answers at the DNS
    address at all, and no host socket is opened for it."""
    async with trio.open_nursery() as n:
        d = FakeDaemon(n, Config(disable_host_loopback=True))
        nat = udp_nat(d)
        nat.handle(UdpDatagram(4, G, 1, "10.0.2.2", 9, b"x"))
        nat.handle(UdpDatagram(4, G, 3, "10.0.2.3", 54, b"z"))
        nat.handle(UdpDatagram(6, "fd00::100", 4, "fd00::2", 9, b"v6"))
        codes = [(u[0], u[2], u[6]) for u in d.stack.unreach]
        assert codes == [(4, 1, ICMP_NET_UNREACH), (4, 3, ICMP_NET_UNREACH), (6, 4, ICMP6_NO_ROUTE)]
        assert len(nat.table) == 0
        assert d.stack.stats.dropped["udp_host_loopback_disabled"] == 2
        assert d.stack.stats.dropped["udp_dns_address"] == 1

        d = FakeDaemon(n, Config(disable_dns=True))
        nat = udp_nat(d)
        nat.handle(UdpDatagram(4, G, 2, "10.0.2.3", 53, b"y" * 20))
        nat.handle(UdpDatagram(4, G, 5, "10.0.2.3", 54, b"w"))
        nat.handle(UdpDatagram(6, "fd00::100", 6, "fd00::3", 53, b"q"))
        assert d.stack.unreach == [] and len(nat.table) == 0 and d.stack.udp == []
        assert d.stack.stats.dropped["udp_dns_disabled"] == 3
        n.cancel_scope.cancel()


async def test_intercepts_consulted_first_and_bad_destinations_dropped():
    async with trio.open_nursery() as n:
        d = FakeDaemon(n)
        seen = []
        nat = udp_nat(d, intercept=lambda ev: seen.append(ev) or ev.dport == 7)
        nat.handle(UdpDatagram(4, G, 1, "10.0.2.2", 7, b"x"))
        nat.handle(UdpDatagram(4, G, 1, "224.0.0.1", 9, b"x"))
        nat.handle(UdpDatagram(4, G, 1, "127.0.0.1", 0, b"x"))
        assert len(seen) == 3 and len(nat.table) == 0
        assert d.stack.stats.dropped["udp_bad_destination"] == 2
        n.cancel_scope.cancel()


async def test_flow_cap_closes_evicted_sockets():
    async with trio.open_nursery() as n:
        srv = _echo_server()
        await srv.bind(("127.0.0.1", 0))
        port = srv.getsockname()[1]
        await n.start(_serve_echo, srv)
        d = FakeDaemon(n)
        nat = udp_nat(d, max_flows=4)
        socks = []
        for i in range(10):
            nat.handle(UdpDatagram(4, G, 50000 + i, "10.0.2.2", port, b"p%d" % i))
            socks.append(nat.table.get((4, G, 50000 + i, "10.0.2.2", port)).sock)
        assert len(nat.table) == 4
        assert sum(s.fileno() == -1 for s in socks) == 6
        assert d.stack.stats.dropped["udp_flow_evicted"] == 6
        assert await wait_for(d.stack, lambda: len(d.stack.udp) >= 4)
        assert {u[4] for u in d.stack.udp} >= {50006, 50007, 50008, 50009}
        n.cancel_scope.cancel()


async def test_serve_expires_idle_flows(autojump_clock):
    async with trio.open_nursery() as n:
        d = FakeDaemon(n)
        nat = udp_nat(d)
        await n.start(nat.serve)
        nat.handle(UdpDatagram(4, G, 1, "127.0.0.1", 9, b"x"))  # discard port: no reply
        nat.handle(UdpDatagram(4, G, 2, "127.0.0.1", 53, b"x"))
        sock = nat.table.get((4, G, 1, "127.0.0.1", 9)).sock
        assert len(nat.table) == 2
        await trio.sleep(12)
        assert len(nat.table) == 1  # the port 53 flow went after 10 s
        await trio.sleep(50)
        assert len(nat.table) == 0 and sock.fileno() == -1
        n.cancel_scope.cancel()


async def test_ipv6_gateway_maps_to_ipv6_loopback():
    try:
        srv = trio.socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        await srv.bind(("::1", 0))
    except OSError as e:
        pytest.skip(f"LOUD: no ::1 on this host: {e}")
    port = srv.getsockname()[1]
    async with trio.open_nursery() as n:
        await n.start(_serve_echo, srv)
        d = FakeDaemon(n)
        nat = udp_nat(d)
        nat.handle(UdpDatagram(6, "fd00::100", 4242, "fd00::2", port, b"six"))
        assert await wait_for(d.stack, lambda: d.stack.udp)
        assert d.stack.udp == [(6, "fd00::2", port, "fd00::100", 4242, b"xis")]
        n.cancel_scope.cancel()


def test_socket_flows_catch_all_raises_under_tests_and_drops_the_flow_in_production(monkeypatch):
    """A bug in a UDP/ICMP handler (ours, never the guest's bytes): under tests (errors.STRICT,
    set by conftest) it raises; in the daemon that flow alone goes, counted as
    `<name>_glue_error`, and the pump goes on."""
    from slirpy import errors
    from slirpy.hostsock import SocketFlows

    class Daemon:
        def __init__(self):
            self.hot = {}

        def add_hot_fd(self, fd, fn, mask):
            self.hot[fd] = fn

        def remove_hot_fd(self, fd):
            self.hot.pop(fd, None)

    class Flow:
        key = "k"

        def __init__(self):
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

        def close(self):
            self.sock.close()

    def buggy(flow, mask):
        raise ZeroDivisionError("planted")

    d, st = Daemon(), Stats()
    sf = SocketFlows(d, buggy, 8, st, "udp_flow")
    f = Flow()
    sf.add("k", f, 0.0, 60.0)
    fd = f.sock.fileno()
    assert errors.STRICT
    with pytest.raises(ZeroDivisionError):
        d.hot[fd](fd, 1)
    assert "k" in sf.table
    monkeypatch.setattr(errors, "STRICT", False)
    d.hot[fd](fd, 1)
    assert st.dropped["udp_flow_glue_error"] == 1 and "k" not in sf.table
    f.sock.close()
