"""ICMP echo NAT: reply parsing, the EACCES path, and a real ping socket inside a netns the
test makes (unshare -Urn, ping_group_range opened there only)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import trio
from hypothesis import given, settings, strategies as st

from slirpy.icmp_nat import parse_echo_reply_untrusted
from slirpy.stack.events import IcmpEchoRequest
from test_udp_fakes import FakeDaemon, icmp_nat

G = "10.0.2.100"
HERE = os.path.dirname(os.path.abspath(__file__))


def test_parse_echo_reply_untrusted():
    assert parse_echo_reply_untrusted(b"\x00\x00\x00\x00\x12\x34\x00\x07abc", 4) == (7, b"abc")
    assert parse_echo_reply_untrusted(b"\x81\x00\x00\x00\x12\x34\x01\x00", 6) == (256, b"")
    assert parse_echo_reply_untrusted(b"\x08\x00\x00\x00\x12\x34\x00\x07", 4) is None
    assert parse_echo_reply_untrusted(b"\x00\x01\x00\x00\x12\x34\x00\x07", 4) is None
    for n in range(8):
        assert parse_echo_reply_untrusted(b"\x00" * n, 4) is None


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64), st.sampled_from([4, 6]))
def test_parse_echo_reply_untrusted_never_raises(data, family):
    """What a ping socket hands back is parsed or refused (None), never raised on; only an echo
    reply of the socket's family with code 0 is taken (RFC 792 / RFC 4443 4.2)."""
    r = parse_echo_reply_untrusted(data, family)
    if r is not None:
        assert len(data) >= 8 and data[0] == (0 if family == 4 else 129) and data[1] == 0
        assert r == (int.from_bytes(data[6:8], "big"), data[8:])


async def test_ping_socket_denied_is_logged_once_and_counted(monkeypatch, caplog):
    import slirpy.icmp_nat as m

    def deny(self, family, dst):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(m.IcmpNat, "_open", deny)
    async with trio.open_nursery() as n:
        d = FakeDaemon(n)
        nat = icmp_nat(d)
        for i in range(3):
            nat.handle(IcmpEchoRequest(4, G, "192.0.2.1", 0x42, i, b"x"))
        assert d.stack.stats.dropped["icmp_ping_socket_denied"] == 3
        assert sum("ping_group_range" in r.getMessage() for r in caplog.records) == 1
        assert len(nat.table) == 0
        n.cancel_scope.cancel()


def test_table_cap_and_expiry_with_fake_sockets(monkeypatch):
    import socket as s
    import slirpy.icmp_nat as m

    opened = []

    def fake_open(self, family, dst):
        a, b = s.socketpair(s.AF_UNIX, s.SOCK_DGRAM)
        a.setblocking(False)
        opened.append((a, b))
        return a

    monkeypatch.setattr(m.IcmpNat, "_open", fake_open)

    async def main():
        async with trio.open_nursery() as n:
            d = FakeDaemon(n)
            nat = icmp_nat(d, max_flows=8)
            for i in range(20):
                nat.handle(IcmpEchoRequest(4, G, "192.0.2.%d" % i, 7, 1, b"p"))
            assert len(nat.table) == 8 and d.stack.stats.dropped["icmp_flow_evicted"] == 12
            # the request as the "host" sees it: type 8, seq 1, payload
            a, b = opened[-1]
            assert b.recv(100) == b"\x08\x00\x00\x00\x00\x00\x00\x01p"
            b.send(b"\x00\x00\x00\x00\x99\x99\x00\x01p")  # reply with the kernel's own ident
            with trio.fail_after(5):
                while not d.stack.echo:
                    await trio.sleep(0.01)
            assert d.stack.echo == [(4, "192.0.2.19", G, 7, 1, b"p")]
            nat.table.expire(d.now() + 31)
            assert len(nat.table) == 0 and all(x[0].fileno() == -1 for x in opened)
            n.cancel_scope.cancel()

    trio.run(main)
    for a, b in opened:
        b.close()


CHILD = textwrap.dedent("""
    import sys, trio
    sys.path.insert(0, %r)
    from test_udp_fakes import FakeDaemon, icmp_nat
    from slirpy.icmp_nat import IcmpNat
    from slirpy.stack.events import IcmpEchoRequest

    async def main():
        async with trio.open_nursery() as n:
            d = FakeDaemon(n)
            nat = icmp_nat(d)
            payload = bytes(range(56))
            for seq in range(3):
                nat.handle(IcmpEchoRequest(4, "10.0.2.100", "127.0.0.1", 0xABCD, seq, payload))
            nat.handle(IcmpEchoRequest(4, "10.0.2.100", "127.0.0.1", 0x1111, 9, b"two"))
            with trio.fail_after(5):
                while len(d.stack.echo) < 4:
                    await d.stack.got.wait()
            for e in sorted(d.stack.echo):
                print(e)
            n.cancel_scope.cancel()
    trio.run(main)
""")


def test_real_ping_socket_in_private_netns():
    if shutil.which("unshare") is None:
        pytest.skip("LOUD: unshare(1) missing: cannot make a private netns for the ping test")
    script = "ip link set lo up && echo '0 0' > /proc/sys/net/ipv4/ping_group_range && exec \"$0\" -c \"$1\""
    r = subprocess.run(["unshare", "-Urn", "sh", "-c", script, sys.executable, CHILD % HERE],
                       capture_output=True, text=True, timeout=30,
                       cwd=os.path.dirname(HERE))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    payload = bytes(range(56))
    assert lines == [repr((4, "127.0.0.1", "10.0.2.100", 0x1111, 9, b"two"))] + [
        repr((4, "127.0.0.1", "10.0.2.100", 0xABCD, seq, payload)) for seq in range(3)]


@pytest.mark.parametrize("err, family, want", [
    (101, 4, (3, 0)), (113, 4, (3, 1)),  # ENETUNREACH: net unreachable; EHOSTUNREACH: host
    (101, 6, (1, 0)), (113, 6, (1, 3)),  # ICMPv6: no route; address unreachable
])
async def test_send_failing_at_once_gives_the_matching_unreachable(monkeypatch, err, family, want):
    import slirpy.icmp_nat as m

    def fail(self, fam, dst):
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(m.IcmpNat, "_open", fail)
    errors = []
    async with trio.open_nursery() as n:
        d = FakeDaemon(n)
        d.stack.send_icmp_echo_error = lambda *a: errors.append(a)
        nat = icmp_nat(d)
        dst, src = ("192.0.2.1", G) if family == 4 else ("2001:db8::1", "fd00::100")
        nat.handle(IcmpEchoRequest(family, src, dst, 0x42, 7, b"x"))
        (e,) = errors
        assert (e[0], e[1], e[2], e[3]) == (family, "10.0.2.2" if family == 4 else "fd00::2",
                                            src, dst)
        assert (e[7], e[8]) == want
        n.cancel_scope.cancel()
