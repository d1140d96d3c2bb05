"""Fakes shared by the UDP/DNS/ICMP glue tests: a daemon and a stack that records calls."""

from __future__ import annotations

import select

import trio

from slirpy.config import Config
from slirpy.stack.stats import Stats


class FakeStack:
    def __init__(self):
        self.stats = Stats()
        self.udp: list[tuple] = []
        self.unreach: list[tuple] = []
        self.echo: list[tuple] = []
        self.got = trio.Event()

    def _note(self):
        self.got.set()
        self.got = trio.Event()

    def send_udp(self, family, src, sport, dst, dport, payload, now):
        self.udp.append((family, src, sport, dst, dport, bytes(payload)))
        self._note()

    def send_udp_unreachable(self, family, src, sport, dst, dport, payload, code, now):
        self.unreach.append((family, src, sport, dst, dport, bytes(payload), code))
        self._note()

    def send_icmp_echo_reply(self, family, src, dst, ident, seq, payload, now):
        self.echo.append((family, src, dst, ident, seq, bytes(payload)))
        self._note()


class FakeDaemon:
    def __init__(self, nursery, config: Config | None = None):
        self.config = config or Config()
        self.stack = FakeStack()
        self.nursery = nursery
        self.handlers = {}
        self.flushes = 0
        self.sandbox_paths = None
        self.hot: dict = {}  # fd -> fn(fd, mask), as the daemon's pump serves them
        self.hot_ep = select.epoll()
        self._pumping = False

    def now(self) -> float:
        return trio.current_time()

    def flush(self):
        self.flushes += 1

    def add_handler(self, typ, fn):
        self.handlers[typ] = fn

    def add_hot_fd(self, fd, fn, mask=select.EPOLLIN):
        self.hot_ep.register(fd, mask)
        self.hot[fd] = fn
        if not self._pumping:
            self._pumping = True
            self.nursery.start_soon(self._pump)

    def remove_hot_fd(self, fd):
        if self.hot.pop(fd, None) is not None:
            self.hot_ep.unregister(fd)

    async def _pump(self):
        """The daemon pump's contract in miniature: every ready hot fd served, then a flush."""
        while True:
            await trio.lowlevel.wait_readable(self.hot_ep.fileno())
            for fd, mask in self.hot_ep.poll(0):
                fn = self.hot.get(fd)
                if fn is not None:
                    fn(fd, mask)
            self.flush()


def udp_nat(d, **kw):
    """A UdpNat wired as daemon.wire does: the address rules, its own DNS forwarder."""
    from slirpy.dns import DnsForwarder
    from slirpy.stack.addrmap import AddressMap
    from slirpy.udp_nat import UdpNat
    return UdpNat(d, AddressMap(d.config), DnsForwarder(d), **kw)


def icmp_nat(d, **kw):
    from slirpy.icmp_nat import IcmpNat
    from slirpy.stack.addrmap import AddressMap
    return IcmpNat(d, AddressMap(d.config), **kw)


async def wait_for(stack: FakeStack, pred, limit: float = 5.0):
    """Wait until pred() is true; returns False after `limit` seconds (a hang guard, not timing)."""
    with trio.move_on_after(limit):
        while not pred():
            await stack.got.wait()
        return True
    return pred()
