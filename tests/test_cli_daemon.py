"""The Daemon hub contract with a fake stack over a SEQPACKET socketpair standing in for the tap."""

from __future__ import annotations

import os
import socket

import pytest
import trio
import trio.testing

from slirpy import daemon as daemon_mod
from slirpy.config import Config
from slirpy.stack.events import TcpConnectRequest, UdpDatagram
from slirpy.stack.stats import Stats


def bare(d):
    """No components: the daemon's loop alone (handlers are added by the test)."""
    return []


class FakeStack:
    def __init__(self):
        self.stats = Stats()
        self.out, self.events, self.received, self.timers, self.rejected = [], [], [], [], []
        self.timer = None

    def receive_frame(self, buf, now):
        self.received.append(bytes(buf))
        self.out.append(b"echo:" + bytes(buf))

    def opens_tcp(self, buf):
        return False

    def frames_to_send(self, now):
        o, self.out = self.out, []
        return o

    def next_event(self):
        return self.events.pop(0) if self.events else None

    def get_timer(self):
        return self.timer

    def handle_timer(self, now):
        self.timers.append(now)
        self.timer = None
        self.out.append(b"timer-frame")

    def reject_tcp(self, flow, reason, now):
        self.rejected.append((flow, reason))


@pytest.fixture
def pair():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    a.setblocking(False)
    b.setblocking(False)
    yield a, b
    a.close()
    b.close()


def _recv_all(sock):
    out = []
    while True:
        try:
            out.append(sock.recv(70000))
        except BlockingIOError:
            return out


async def test_frames_echoed_events_dispatched_and_exit_fd_ends(pair):
    a, b = pair
    exit_r, exit_w = os.pipe()
    stack = FakeStack()
    d = daemon_mod.Daemon(Config(exit_fd=exit_r), a.fileno(), stack, wiring=bare)
    seen = []

    def on_udp(ev):
        seen.append(ev)
        stack.out.append(b"reply-to-udp")
        d.flush()  # re-entrant: a no-op, the outer flush writes the frame

    d.add_handler(UdpDatagram, on_udp)
    async with trio.open_nursery() as n:
        n.start_soon(d.main)
        await trio.sleep(0.05)
        got = []
        for i in range(300):  # more than one read batch
            while True:
                try:
                    b.send(b"frame%d" % i)
                    break
                except BlockingIOError:
                    got += _recv_all(b)
                    await trio.sleep(0.001)
        udp = UdpDatagram(family=4, src="10.0.2.100", sport=1, dst="10.0.2.2", dport=2, payload=b"x")
        for _ in range(200):
            got += _recv_all(b)
            if len(got) >= 300:
                break
            await trio.sleep(0.005)
        stack.events.append(udp)
        stack.events.append(TcpConnectRequest(flow=9, family=4, src="10.0.2.100", sport=5, dst="1.2.3.4", dport=80))
        d.flush()
        await trio.sleep(0.05)
        got += _recv_all(b)
        assert got[:300] == [b"echo:frame%d" % i for i in range(300)]
        assert stack.received == [b"frame%d" % i for i in range(300)]
        assert seen == [udp] and got[300:] == [b"reply-to-udp"]
        assert stack.rejected == [(9, "refused")]
        assert stack.stats.as_dict()["dropped"] == {"no_handler_TcpConnectRequest": 1}
        os.close(exit_w)  # EOF on the exit fd ends d.main, and so the nursery


async def test_timer_fires_at_deadline_and_rearms(pair, autojump_clock):
    a, b = pair
    exit_r, exit_w = os.pipe()
    stack = FakeStack()
    d = daemon_mod.Daemon(Config(exit_fd=exit_r), a.fileno(), stack, wiring=bare)
    async with trio.open_nursery() as n:
        n.start_soon(d.main)
        await trio.sleep(1)
        assert stack.timers == []
        stack.timer = trio.current_time() + 5
        d.flush()  # re-arms the timer task
        await trio.sleep(4.9)
        assert stack.timers == []
        await trio.sleep(0.2)
        assert len(stack.timers) == 1
        assert _recv_all(b) == [b"timer-frame"]
        os.close(exit_w)


async def test_write_eagain_queues_then_drains(pair):
    a, b = pair
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    exit_r, exit_w = os.pipe()
    stack = FakeStack()
    d = daemon_mod.Daemon(Config(exit_fd=exit_r), a.fileno(), stack, wiring=bare)
    async with trio.open_nursery() as n:
        n.start_soon(d.main)
        await trio.sleep(0.05)
        frames = [b"%05d" % i + b"z" * 1000 for i in range(500)]
        stack.out.extend(frames)
        d.flush()
        assert d.tap.queue  # the socket could not take them all
        got = []
        for _ in range(200):
            got += _recv_all(b)
            if len(got) == 500:
                break
            await trio.sleep(0.01)
        assert got == frames
        assert not d.tap.queue
        os.close(exit_w)


async def test_internal_error_from_the_stack_is_logged_rate_limited(pair, caplog):
    """The stack reports a bug of its own (it reset the flow and counted it) as InternalError:
    the daemon logs it at ERROR, once per kind within the interval, never raises."""
    from slirpy.stack.events import InternalError
    a, _b = pair
    stack = FakeStack()
    d = daemon_mod.Daemon(Config(), a.fileno(), stack)
    d._bug_log.clock = lambda: 0.0  # no time passes: the second of a kind is suppressed
    stack.events += [InternalError("tcp", 7, "ZeroDivisionError: planted"),
                     InternalError("tcp", 8, "ZeroDivisionError: planted again"),
                     InternalError("tcp", 9, "KeyError: 3")]
    with caplog.at_level("ERROR", logger="slirpy.daemon"):
        d.flush()
    lines = [r.getMessage() for r in caplog.records if r.name == "slirpy.daemon"]
    assert lines == ["internal error in tcp (flow 7), flow reset: ZeroDivisionError: planted",
                     "internal error in tcp (flow 9), flow reset: KeyError: 3"]
    assert stack.events == [] and not stack.stats.dropped
