"""DNS forwarder: resolv.conf parsing, token bucket, SERVFAIL, forwarding with fallback."""

from __future__ import annotations

import logging
import os
import socket
import struct

import trio

from slirpy.config import Config
from slirpy.dns import (
    DnsForwarder, TokenBucket, build_servfail, parse_query_untrusted, parse_resolv_conf,
)
from slirpy.stack.events import UdpDatagram
from test_udp_fakes import FakeDaemon, udp_nat, wait_for

G = "10.0.2.100"


def make_query(qid: int, name: str = "example.com", qtype: int = 1) -> bytes:
    q = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    for label in name.split("."):
        q += bytes([len(label)]) + label.encode()
    return q + b"\x00" + struct.pack("!HH", qtype, 1)


def answer(q: bytes, ip: str) -> bytes:
    qid = q[:2]
    end = parse_query_untrusted(q)[1]
    hdr = qid + struct.pack("!HHHHH", 0x8180, 1, 1, 0, 0)
    rr = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 60, 4) + socket.inet_aton(ip)
    return hdr + q[12:end] + rr


def test_parse_resolv_conf():
    text = """# generated
nameserver 127.0.0.53   # systemd stub
; comment
nameserver fe80::1%eth0
nameserver 2001:db8::53
nameserver not-an-ip
nameserver
search example.org
options edns0
nameserver 127.0.0.53
  nameserver 8.8.8.8
nameserver 0.0.0.0
"""
    assert parse_resolv_conf(text) == [
        ("127.0.0.53", 53), ("fe80::1", 53), ("2001:db8::53", 53), ("8.8.8.8", 53), ("127.0.0.1", 53)]
    assert parse_resolv_conf("") == []


def test_token_bucket():
    b = TokenBucket(rate=4, burst=5, now=100.0)
    assert [b.take(100.0) for _ in range(7)] == [True] * 5 + [False] * 2
    assert b.take(100.125) is False  # half a token
    assert b.take(100.25) is True
    assert b.take(100.25) is False
    assert [b.take(200.0) for _ in range(6)].count(True) == 5  # refill capped at burst


def test_servfail_from_query():
    q = make_query(0xBEEF, "a.b.example")
    r = build_servfail(q)
    qid, flags, qd, an, ns, ar = struct.unpack("!HHHHHH", r[:12])
    assert qid == 0xBEEF and flags & 0x8000 and flags & 0x0100 and flags & 0xF == 2
    assert (qd, an, ns, ar) == (1, 0, 0, 0) and r[12:] == q[12:]
    # hostile / odd inputs: never raise
    assert build_servfail(b"") is None
    assert build_servfail(b"\x00" * 11) is None
    assert build_servfail(r) is None  # a response is not a query
    trunc = build_servfail(q[:16])
    assert trunc[:2] == b"\xbe\xef" and len(trunc) == 12
    ptr = build_servfail(q[:12] + b"\xc0\x0c\x00\x01\x00\x01")
    assert len(ptr) == 12
    for n in range(len(q)):
        build_servfail(q[:n])
        build_servfail(bytes([0xFF]) * n)


async def _dns_server(s, ip, task_status=trio.TASK_STATUS_IGNORED):
    task_status.started()
    while True:
        q, addr = await s.recvfrom(4096)
        await s.sendto(b"\x00\x00" + b"junk" * 3, addr)  # wrong id: must be ignored
        await s.sendto(answer(q, ip), addr)


async def _bound(ip="127.0.0.1"):
    s = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await s.bind((ip, 0))
    return s, s.getsockname()[1]


async def test_forward_with_fallback_from_silent_upstream():
    async with trio.open_nursery() as n:
        silent, sport = await _bound()  # never answers: forces the timeout path
        srv, port = await _bound()
        await n.start(_dns_server, srv, "192.0.2.7")
        cfg = Config(dns_upstreams=(("127.0.0.1", sport), ("127.0.0.1", port)))
        d = FakeDaemon(n, cfg)
        nat = udp_nat(d)
        assert nat.dns.upstreams() == [("127.0.0.1", sport), ("127.0.0.1", port)]
        nat.dns.timeout = 0.3
        queries = [make_query(0x1234), make_query(0x1234, "other.example")]  # same id, concurrent
        for i, q in enumerate(queries):
            nat.handle(UdpDatagram(4, G, 5000 + i, "10.0.2.3", 53, q))
        assert await wait_for(d.stack, lambda: len(d.stack.udp) == 2)
        for u in d.stack.udp:
            fam, src, sp, dst, dp, payload = u
            assert (fam, src, sp, dst) == (4, "10.0.2.3", 53, G)
            q = queries[dp - 5000]
            assert payload == answer(q, "192.0.2.7")
        assert nat.dns.answered == 2 and len(nat.table) == 0
        n.cancel_scope.cancel()


async def test_no_upstream_answers_gives_servfail():
    async with trio.open_nursery() as n:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
        s.close()
        d = FakeDaemon(n, Config(dns_upstreams=(("127.0.0.1", dead),)))
        nat = udp_nat(d)
        q = make_query(7)
        nat.handle(UdpDatagram(4, G, 999, "10.0.2.3", 53, q))
        nat.handle(UdpDatagram(4, G, 999, "10.0.2.3", 53, b"\x01"))  # garbage: dropped
        assert await wait_for(d.stack, lambda: d.stack.udp)
        assert d.stack.udp == [(4, "10.0.2.3", 53, G, 999, build_servfail(q))]
        assert d.stack.stats.dropped["dns_bad_query"] == 1
        assert d.stack.stats.dropped["dns_servfail"] == 1
        n.cancel_scope.cancel()


async def test_rate_cap_drops_and_counts():
    async with trio.open_nursery() as n:
        d = FakeDaemon(n, Config(dns_upstreams=(("127.0.0.1", 9),)))
        fwd = DnsForwarder(d)
        fwd.bucket = TokenBucket(rate=0.001, burst=3, now=d.now())
        fwd.timeout = 0.05
        for i in range(10):
            fwd.handle_query(UdpDatagram(4, G, 1000 + i, "10.0.2.3", 53, make_query(i)))
        assert d.stack.stats.dropped["dns_rate_limited"] == 7
        assert await wait_for(d.stack, lambda: len(d.stack.udp) == 3)
        assert fwd.inflight == 0
        n.cancel_scope.cancel()


async def test_resolv_conf_read_and_reread(tmp_path, autojump_clock):
    async with trio.open_nursery() as n:
        p = tmp_path / "resolv.conf"
        p.write_text("nameserver 127.0.0.53\n")
        d = FakeDaemon(n)
        fwd = DnsForwarder(d, resolv_conf=str(p))
        assert fwd.upstreams() == [("127.0.0.53", 53)]
        p.write_text("nameserver ::1\nnameserver 127.0.0.1\n")
        os.utime(p, (1, 1))  # a distinct mtime
        assert fwd.upstreams() == [("127.0.0.53", 53)]  # checked at most once a second
        await trio.sleep(1.5)
        assert fwd.upstreams() == [("::1", 53), ("127.0.0.1", 53)]
        p.unlink()
        await trio.sleep(1.5)
        assert fwd.upstreams() == []
        n.cancel_scope.cancel()


def _same_stamp(path, like):
    """Give path the size-independent stamps of `like` (mtime), as a writer in the same clock
    tick would: the change must be seen by content, not by a timestamp."""
    st = os.stat(like)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


async def test_resolv_conf_changes_seen_by_content_and_logged_once(tmp_path, autojump_clock,
                                                                  caplog):
    """Every way a host changes its resolver (issue #25): a rename over the file and a re-pointed
    symlink with the same size and mtime, a link replaced by a plain file; each change is one
    INFO line old -> new; an unreadable resolv.conf is one WARNING (not one per check) and one
    INFO when it comes back; status() (get_stats) shows what is in use."""
    caplog.set_level(logging.INFO, logger="slirpy.dns")
    run = tmp_path / "run"
    run.mkdir()
    a, b = run / "a.conf", run / "b.conf"
    a.write_text("nameserver 127.0.0.53\n")
    b.write_text("nameserver 127.0.0.54\n")  # same size
    _same_stamp(b, a)
    link = tmp_path / "resolv.conf"
    link.symlink_to(a)
    async with trio.open_nursery() as n:
        d = FakeDaemon(n)
        fwd = DnsForwarder(d, resolv_conf=str(link))  # the first read, at start
        assert fwd.upstreams() == [("127.0.0.53", 53)]

        # symlink re-pointed (atomically) to a file of the same size and mtime
        tmp = tmp_path / ".new"
        tmp.symlink_to(b)
        os.rename(tmp, link)
        await trio.sleep(1.01)
        assert fwd.upstreams() == [("127.0.0.54", 53)]
        # the target renamed over, same size and mtime again
        c = run / "c.conf"
        c.write_text("nameserver 127.0.0.55\n")
        _same_stamp(c, b)
        os.rename(c, b)
        await trio.sleep(1.01)
        assert fwd.upstreams() == [("127.0.0.55", 53)]
        # the link replaced by a plain file
        tmp.write_text("nameserver ::1\n")
        os.rename(tmp, link)
        await trio.sleep(1.01)
        assert fwd.upstreams() == [("::1", 53)]
        assert fwd.status() == {"upstreams": ["::1"], "source": str(link),
                                "resolv_conf_target": str(link), "resolv_conf_error": None,
                                "changes": 3}
        # unreadable: one warning however often it is checked; SERVFAIL meanwhile (no servers)
        link.unlink()
        for _ in range(5):
            await trio.sleep(1.01)
            assert fwd.upstreams() == []
        st = fwd.status()
        assert st["upstreams"] == [] and st["resolv_conf_error"] == "No such file or directory"
        link.write_text("nameserver 127.0.0.53\n")
        await trio.sleep(1.01)
        assert fwd.upstreams() == [("127.0.0.53", 53)]
        n.cancel_scope.cancel()
    lines = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "slirpy.dns"]
    assert lines == [
        ("INFO", f"dns: upstreams 127.0.0.53 (from {link} -> {a})"),
        ("INFO", f"dns: {link} now leads to {b} (was {a})"),
        ("INFO", f"dns: upstreams changed: 127.0.0.53 -> 127.0.0.54 (from {link} -> {b})"),
        ("INFO", f"dns: upstreams changed: 127.0.0.54 -> 127.0.0.55 (from {link} -> {b})"),
        ("INFO", f"dns: {link} now leads to {link} (was {b})"),
        ("INFO", f"dns: upstreams changed: 127.0.0.55 -> ::1 (from {link})"),
        ("WARNING", f"dns: cannot read {link}: No such file or directory; guest queries get "
                    "SERVFAIL until it can be read"),
        ("INFO", f"dns: upstreams changed: ::1 -> none (from {link})"),
        ("INFO", f"dns: {link} can be read again"),
        ("INFO", f"dns: upstreams changed: none -> 127.0.0.53 (from {link})"),
    ], lines


async def test_status_with_configured_upstreams(autojump_clock):
    async with trio.open_nursery() as n:
        d = FakeDaemon(n, Config(dns_upstreams=(("127.0.0.1", 5353), ("::1", 53))))
        assert DnsForwarder(d).status() == {"upstreams": ["127.0.0.1:5353", "::1"],
                                            "source": "--dns-upstream"}
        n.cancel_scope.cancel()


async def test_forward_through_resolv_conf_loopback_upstream(tmp_path):
    """resolv.conf naming a loopback resolver works (port 53 is not free, so the glue is shown
    with a port override of the parsed list)."""
    async with trio.open_nursery() as n:
        srv, port = await _bound("127.0.0.1")
        await n.start(_dns_server, srv, "198.51.100.1")
        p = tmp_path / "resolv.conf"
        p.write_text("nameserver 127.0.0.1\n")
        d = FakeDaemon(n)
        fwd = DnsForwarder(d, resolv_conf=str(p))
        assert fwd.upstreams() == [("127.0.0.1", 53)]
        fwd._resolv = [("127.0.0.1", port)]
        q = make_query(0xAAAA, "x.test")
        fwd.handle_query(UdpDatagram(4, G, 4444, "10.0.2.3", 53, q))
        assert await wait_for(d.stack, lambda: d.stack.udp)
        assert d.stack.udp[0][5] == answer(q, "198.51.100.1")
        n.cancel_scope.cancel()


from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_hostile_queries_never_raise(data):
    p = parse_query_untrusted(data)
    r = build_servfail(data)
    assert (p is None) == (r is None)
    if r is not None:
        assert r[:2] == data[:2] and len(r) <= len(data) and r[2] & 0x80


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_resolv_conf_never_raises(text):
    for host, port in parse_resolv_conf(text):
        assert port == 53 and (":" in host or "." in host)
