"""Host-side faults outside TCP: no descriptors left (EMFILE) for UDP, ICMP and DNS sockets,
resolver down. Each is a counted drop; existing flows keep working; nothing raises."""

from __future__ import annotations

import contextlib
import gc
import os
import resource
import socket

import trio

from slirpy.config import Config
from slirpy.dns import build_servfail
from slirpy.stack.events import IcmpEchoRequest, UdpDatagram
from test_dns import make_query
from test_udp_fakes import FakeDaemon, icmp_nat, udp_nat, wait_for

G = "10.0.2.100"


@contextlib.contextmanager
def fds_exhausted():
    """Lower RLIMIT_NOFILE to what is open now and fill the holes below it, so the next
    socket() fails with EMFILE; everything is given back on exit. The garbage of earlier tests
    (sockets, epoll objects in reference cycles) is collected first and the collector held off
    meanwhile: one closing in the middle would open a hole that the next socket() takes."""
    gc.collect()
    gc_was = gc.isenabled()
    gc.disable()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    top = max(int(n) for n in os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (top + 1, hard))
    filler = []
    try:
        for _ in range(top + 2):
            try:
                filler.append(os.open("/dev/null", os.O_RDONLY))
            except OSError as e:
                assert e.errno == 24
                break
        try:
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM).close()
            bit = False
        except OSError as e:
            bit = e.errno == 24  # EMFILE: the limit is in force
        assert bit, "RLIMIT_NOFILE did not bite"
        yield
    finally:
        for fd in filler:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        if gc_was:
            gc.enable()


async def _echo(s, task_status=trio.TASK_STATUS_IGNORED):
    task_status.started()
    while True:
        data, addr = await s.recvfrom(65535)
        await s.sendto(data.upper(), addr)


async def test_udp_emfile_is_a_counted_drop_and_existing_flow_lives():
    async with trio.open_nursery() as n:
        srv = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        await srv.bind(("127.0.0.1", 0))
        port = srv.getsockname()[1]
        await n.start(_echo, srv)
        d = FakeDaemon(n)
        nat = udp_nat(d)
        nat.handle(UdpDatagram(4, G, 1000, "10.0.2.2", port, b"before"))
        assert await wait_for(d.stack, lambda: len(d.stack.udp) == 1)
        with fds_exhausted():
            for i in range(200):  # 200 new flows, no descriptor for any of them
                nat.handle(UdpDatagram(4, G, 2000 + i, "10.0.2.2", port, b"new"))
            nat.handle(UdpDatagram(4, G, 1000, "10.0.2.2", port, b"during"))  # existing flow
            assert await wait_for(d.stack, lambda: len(d.stack.udp) == 2)
        assert d.stack.stats.dropped["udp_socket_no_fds"] == 200
        assert d.stack.stats.dropped["udp_socket_failed"] == 200
        assert [u[5] for u in d.stack.udp] == [b"BEFORE", b"DURING"]
        assert len(nat.table) == 1 and nat.fds_logged
        # descriptors back: new flows work again
        nat.handle(UdpDatagram(4, G, 3000, "10.0.2.2", port, b"after"))
        assert await wait_for(d.stack, lambda: len(d.stack.udp) == 3)
        assert d.stack.udp[2][5] == b"AFTER"
        n.cancel_scope.cancel()


async def test_icmp_emfile_is_a_counted_drop(monkeypatch):
    async with trio.open_nursery() as n:
        d = FakeDaemon(n)
        nat = icmp_nat(d)
        with fds_exhausted():
            for i in range(50):
                nat.handle(IcmpEchoRequest(4, G, "198.51.100.7", i, 1, b"x"))
        dropped = d.stack.stats.dropped
        # where ping sockets are denied the kernel says EACCES before it needs a descriptor
        assert dropped["icmp_socket_no_fds"] + dropped["icmp_ping_socket_denied"] == 50
        assert len(nat.table) == 0
        n.cancel_scope.cancel()


async def test_dns_emfile_gives_servfail_not_a_crash():
    """Before the fix the upstream socket() raised out of the query task and killed the daemon."""
    async with trio.open_nursery() as n:
        d = FakeDaemon(n, Config(dns_upstreams=(("127.0.0.1", 9),)))
        nat = udp_nat(d)
        q = make_query(0x4242)
        with fds_exhausted():
            nat.handle(UdpDatagram(4, G, 5353, "10.0.2.3", 53, q))
            assert await wait_for(d.stack, lambda: d.stack.udp)
        assert d.stack.udp == [(4, "10.0.2.3", 53, G, 5353, build_servfail(q))]
        assert d.stack.stats.dropped["dns_socket_failed"] == 1
        assert nat.dns.inflight == 0
        n.cancel_scope.cancel()


async def test_resolver_down_servfail_for_every_query_and_inflight_returns_to_zero():
    async with trio.open_nursery() as n:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
        s.close()
        d = FakeDaemon(n, Config(dns_upstreams=(("127.0.0.1", dead), ("127.0.0.1", dead))))
        nat = udp_nat(d)
        qs = [make_query(i) for i in range(100)]
        for i, q in enumerate(qs):
            nat.handle(UdpDatagram(4, G, 6000 + i, "10.0.2.3", 53, q))
        assert await wait_for(d.stack, lambda: len(d.stack.udp) == 100)
        assert sorted(u[5] for u in d.stack.udp) == sorted(build_servfail(q) for q in qs)
        assert nat.dns.inflight == 0 and d.stack.stats.dropped["dns_servfail"] == 100
        n.cancel_scope.cancel()


def _read_all(b, size):
    """Every frame the guest side of a socketpair can read now (non-blocking)."""
    out = []
    while True:
        try:
            out.append(b.recv(size))
        except BlockingIOError:
            return out


def _drain_all(t, b, size):
    """The guest reads again: drain the tap's queue until empty, collecting what came out."""
    got = []
    for _ in range(10_000):
        done = t.drain()
        got += _read_all(b, size)
        if done:
            return got
    return got


def test_tap_write_queue_bounded_when_the_guest_does_not_read():
    """The guest stops reading: the tap takes nothing (EAGAIN); the queue keeps the newest
    MAX_WRITE_QUEUE frames, drops the oldest and counts them."""
    from slirpy import tap as tap_mod
    from slirpy.stack.stats import Stats
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        a.setblocking(False)
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        st = Stats()
        t = tap_mod.Tap(a.fileno(), st)
        frames = [b"%06d" % i + b"x" * 200 for i in range(5000)]
        for i in range(0, 5000, 250):
            t.write_frames(frames[i:i + 250])
        q = t.queue
        assert len(q) == tap_mod.MAX_WRITE_QUEUE
        assert q[-1] == frames[-1] and q[0] == frames[5000 - tap_mod.MAX_WRITE_QUEUE]
        b.setblocking(False)
        written = _read_all(b, 4096)
        assert written == frames[:len(written)]  # what the fd took went out in order
        assert st.dropped["tap_write_queue_full"] == 5000 - len(written) - len(q)
        # the guest reads again: the queue drains in order
        got = _drain_all(t, b, 4096)
        assert got == list(frames[5000 - tap_mod.MAX_WRITE_QUEUE:])
    finally:
        a.close()
        b.close()


def test_tap_write_queue_bounded_in_bytes_with_gso_frames():
    """The same with 64 KiB GSO frames: 1024 of them would be 64 MiB, so the queue is also
    capped at MAX_WRITE_QUEUE_BYTES (8 MiB): the newest frames that fit stay, in order, the
    oldest are dropped and counted, and the byte count matches the queue throughout."""
    from slirpy import tap as tap_mod
    from slirpy.stack.stats import Stats
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        a.setblocking(False)
        b.setblocking(False)
        st = Stats()
        t = tap_mod.Tap(a.fileno(), st)
        frames = [b"%06d" % i + bytes(65530) for i in range(300)]
        for i in range(0, 300, 20):
            t.write_frames(frames[i:i + 20])
            assert t.queue_bytes == sum(len(f) for f in t.queue) <= tap_mod.MAX_WRITE_QUEUE_BYTES
        q = list(t.queue)
        assert len(q) == tap_mod.MAX_WRITE_QUEUE_BYTES // 65536 < tap_mod.MAX_WRITE_QUEUE
        assert q == frames[300 - len(q):]
        written = _read_all(b, 70000)
        assert written and written == frames[:len(written)]
        assert st.dropped["tap_write_queue_full"] == 300 - len(written) - len(q)
        got = _drain_all(t, b, 70000)
        assert got == q and t.queue_bytes == 0
    finally:
        a.close()
        b.close()


def test_tap_deleted_in_the_guest_ends_with_one_message():
    """Both forms: the guest deletes the tap (its network is going away): exit 1, one line."""
    import pytest
    from nsutil import Slirpy, require_netns
    require_netns()
    for path_form in (False, True):
        with Slirpy(path_form=path_form) as s:
            assert s.run_in_ns("ip", "link", "del", "tap0").returncode == 0
            try:
                rc = s.wait(timeout=10)
            except Exception:
                pytest.fail("slirpy kept running after its tap was deleted")
            err = s.proc.stderr.read()
        assert rc == 1
        assert err.startswith("slirpy: error: tap read:") and err.count("\n") == 1, err


async def test_tap_gone_during_a_flush_from_any_task_ends_cleanly(monkeypatch):
    """flush() runs in the timer task and in every glue task, not only in the guarded reader and
    writer: a dead tap found there must end the daemon with its message, not a traceback."""
    from slirpy import daemon as daemon_mod
    from test_cli_daemon import FakeStack, bare
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    a.setblocking(False)
    stack = FakeStack()
    d = daemon_mod.Daemon(Config(), a.fileno(), stack, wiring=bare)
    async with trio.open_nursery() as n:
        async def glue_task():
            await trio.sleep(0.05)
            b.shutdown(socket.SHUT_RDWR)  # writes now fail with EPIPE, like a vanished tap
            stack.out.append(b"frame from a glue task")
            d.flush()
        n.start_soon(glue_task)
        with trio.fail_after(5):
            rc = await d.main()
    assert rc == 1 and d.exit_message.startswith("tap write:")
    a.close()
    b.close()


def test_guest_sets_tap_down_and_up_again():
    """`ip link set tap0 down` in the guest makes tap writes fail with EIO: counted drops, not an
    exit; once the link is up again the network works."""
    import json
    from nsutil import Slirpy, require_netns
    require_netns()
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    hp = probe.getsockname()[1]
    probe.close()
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        api = os.path.join(tmp, "api.sock")
        # the tap path (a spliced forward would not touch the tap)
        with Slirpy("-6", "-a", api, "-p", f"127.0.0.1:{hp}:8080/tcp",
                    "--disable-forward-splice") as s:
            assert s.run_in_ns("ping", "-c1", "-W", "3", "10.0.2.2").returncode == 0
            assert s.run_in_ns("ip", "link", "set", "tap0", "down").returncode == 0
            for _ in range(5):  # frames toward the guest while its link is down
                try:
                    socket.create_connection(("127.0.0.1", hp), timeout=2).close()
                except OSError:
                    pass
            assert s.proc.poll() is None
            c = socket.socket(socket.AF_UNIX)
            c.connect(api)
            c.sendall(b'{"execute":"get_stats"}')
            c.shutdown(socket.SHUT_WR)
            buf = b""
            while b := c.recv(65536):
                buf += b
            c.close()
            assert json.loads(buf)["return"]["dropped"]["tap_write_link_down"] > 0
            assert s.run_in_ns("ip", "link", "set", "tap0", "up").returncode == 0
            s.run_in_ns("ip", "route", "replace", "default", "via", "10.0.2.2")
            assert s.run_in_ns("ping", "-c1", "-W", "3", "10.0.2.2").returncode == 0
            assert s.proc.poll() is None
