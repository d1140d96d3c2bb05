"""Outbound TCP NAT glue: a guest SYN becomes a non-blocking host socket; bytes are bridged
between the trio socket and the sans-IO stack flow with flow control on both sides."""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import socket
import struct

import trio

from .logutil import RateLimited
from .stack.events import (TcpClosed, TcpConnected, TcpConnectRequest, TcpGuestEof, TcpReadable,
                           TcpReset, TcpWritable)

log = logging.getLogger(__name__)
_refused = RateLimited(log, logging.INFO, interval=10.0)  # one line per reason per 10 s
CONNECT_TIMEOUT = 15.0
CHUNK = 256 * 1024  # per host recv / guest read: fewer wakeups, syscalls and ACKs


class _Bridge:
    __slots__ = ("flow", "sock", "readable", "writable", "connected", "closed", "reset", "scope",
                 "running")

    def __init__(self, flow, sock=None):
        self.flow, self.sock = flow, sock
        self.readable = trio.Event()
        self.writable = trio.Event()
        self.connected = trio.Event()
        self.closed = False
        self.reset = False
        self.scope = trio.CancelScope()  # cancelled when the stack drops the flow (e.g. evicted)
        self.running = None  # the bridge's cancel scope: a reset ends it even mid-send


class TcpNat:
    def __init__(self, daemon):
        self.d = daemon
        daemon.tcp_nat = self
        self.bridges: dict[int, _Bridge] = {}
        daemon.add_handler(TcpConnectRequest, self._on_request)
        daemon.add_handler(TcpConnected, self._on_connected)
        daemon.add_handler(TcpReadable, lambda ev: self._wake(ev.flow, "readable"))
        daemon.add_handler(TcpGuestEof, lambda ev: self._wake(ev.flow, "readable"))
        daemon.add_handler(TcpWritable, lambda ev: self._wake(ev.flow, "writable"))
        daemon.add_handler(TcpReset, self._on_reset)
        daemon.add_handler(TcpClosed, self._on_closed)

    # ----------------------------------------------------------------- events
    def _wake(self, flow, what):
        b = self.bridges.get(flow)
        if b is not None:
            getattr(b, what).set()

    def _on_connected(self, ev):
        b = self.bridges.get(ev.flow)
        if b is not None:
            b.connected.set()

    def _on_reset(self, ev):
        b = self.bridges.get(ev.flow)
        if b is not None:
            b.reset = True
            self._linger0(b.sock)
            if b.running is not None:  # a send_all blocked on a host that does not read
                b.running.cancel()

    def _on_closed(self, ev):
        b = self.bridges.pop(ev.flow, None)
        if b is not None:
            b.closed = True
            b.readable.set()
            b.writable.set()
            b.connected.set()
            b.scope.cancel()

    @staticmethod
    def _linger0(sock):
        if sock is None:
            return
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass

    def _map(self, ev):
        """(host, port) to dial for a guest SYN, or None to refuse it."""
        cfg = self.d.config
        dst = ipaddress.ip_address(ev.dst)
        if ev.family == 4:
            if dst == cfg.gateway:
                return None if cfg.disable_host_loopback else ("127.0.0.1", ev.dport)
            if dst == cfg.dns:
                return self._dns_upstream(ev)
        else:
            if str(dst) == "fd00::2":
                return None if cfg.disable_host_loopback else ("::1", ev.dport)
            if str(dst) == "fd00::3":
                return self._dns_upstream(ev)
        return ev.dst, ev.dport

    def _dns_upstream(self, ev):
        """DNS over TCP at .3:53 goes to the first upstream, at the upstream's own port."""
        dns = getattr(self.d, "dns", None)
        if ev.dport != 53 or dns is None or self.d.config.disable_dns:
            return None
        ups = dns.upstreams()
        if not ups:
            return None
        return (str(ups[0][0]), int(ups[0][1])) if isinstance(ups[0], tuple) else (str(ups[0]), 53)

    def _on_request(self, ev):
        self.bridges[ev.flow] = _Bridge(ev.flow)
        self.d.nursery.start_soon(self._guarded, ev)

    async def _guarded(self, ev):
        """One flow's failure is that flow's RST, never the daemon's end."""
        try:
            await self._outbound(ev)
        except Exception:
            log.exception("tcp flow %d to %s:%d", ev.flow, ev.dst, ev.dport)
            st = self.d.stack
            st.stats.drop("tcp_glue_error")
            b = self.bridges.pop(ev.flow, None)
            if b is not None and b.sock is not None:
                self._linger0(b.sock)
                b.sock.close()
            st.reset_tcp(ev.flow, self.d.now())
            self.d.flush()

    # ----------------------------------------------------------------- outbound
    async def _outbound(self, ev):
        d, st = self.d, self.d.stack
        b = self.bridges.get(ev.flow)
        if b is None:
            return
        target = None
        try:
            target = self._map(ev)
        except Exception:
            target = None
        if target is None:
            _refused.log("policy", "tcp %s:%d -> %s:%d refused: no host mapping (host loopback disabled "
                         "or DNS address)", ev.src, ev.sport, ev.dst, ev.dport)
            st.reject_tcp(ev.flow, "refused", d.now())
            d.flush()
            self.bridges.pop(ev.flow, None)
            return
        host, port = target
        fam = socket.AF_INET if ":" not in host else socket.AF_INET6
        try:
            sock = trio.socket.socket(fam, socket.SOCK_STREAM)
        except OSError as e:  # EMFILE/ENFILE/ENOBUFS: refuse this flow, the others go on
            self.bridges.pop(ev.flow, None)
            st.reject_tcp(ev.flow, "no_fd" if e.errno in (errno.EMFILE, errno.ENFILE) else "socket",
                          d.now())
            d.flush()
            return
        b.sock = sock
        reason = None
        with b.scope:
            try:
                bind = self.d.config.outbound_addr if fam == socket.AF_INET else self.d.config.outbound_addr6
                if bind is not None:
                    await sock.bind((str(bind), 0))
                with trio.fail_after(CONNECT_TIMEOUT):
                    await sock.connect((host, port))
            except ConnectionRefusedError:
                reason = "refused"
            except trio.TooSlowError:
                reason = "timeout"
            except OSError as e:
                reason = "no_fd" if e.errno in (errno.EMFILE, errno.ENFILE) else "unreachable"
        if reason is not None or b.closed or b.scope.cancelled_caught:
            sock.close()
            self.bridges.pop(ev.flow, None)
            if reason is not None:
                _refused.log(reason, "tcp %s:%d -> %s:%d refused: connect to %s port %d: %s", ev.src,
                             ev.sport, ev.dst, ev.dport, host, port, reason)
                st.reject_tcp(ev.flow, reason, d.now())
                d.flush()
            return
        st.accept_tcp(ev.flow, d.now())
        d.flush()
        await self._bridge(b)

    async def forward_inbound(self, sock, family, src, sport, guest_addr, guest_port):
        d, st = self.d, self.d.stack
        flow = st.connect_tcp(family, src, sport, guest_addr, guest_port, d.now())
        d.flush()
        if flow is None:
            self._linger0(sock)
            sock.close()
            return
        b = self.bridges.setdefault(flow, _Bridge(flow, sock))
        b.sock = sock
        await b.connected.wait()
        if b.closed:
            self._linger0(sock)
            sock.close()
            return
        await self._bridge(b)

    # ----------------------------------------------------------------- bridge
    async def _bridge(self, b):
        try:
            for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                b.sock.setsockopt(socket.SOL_SOCKET, opt, 1 << 20)
        except OSError:
            pass
        try:
            async with trio.open_nursery() as n:
                b.running = n.cancel_scope
                if b.reset:
                    n.cancel_scope.cancel()
                n.start_soon(self._host_to_guest, b)
                await self._guest_to_host(b)
                n.cancel_scope.cancel()
        finally:
            b.sock.close()
            self.bridges.pop(b.flow, None)

    async def _host_to_guest(self, b):
        d, st = self.d, self.d.stack
        pending = b""
        while not b.closed:
            if not pending:
                try:
                    data = await b.sock.recv(CHUNK)
                except OSError:
                    if not b.closed:
                        st.reset_tcp(b.flow, d.now())
                        d.flush()
                    return
                if b.closed:
                    return
                if not data:
                    st.shutdown_tcp(b.flow, d.now())
                    d.flush()
                    return
                pending = memoryview(data)  # partial takes slice it without copying
            b.writable = trio.Event()
            n = st.send_tcp(b.flow, pending, d.now())
            d.flush()
            pending = pending[n:]
            if pending:
                await b.writable.wait()

    async def _guest_to_host(self, b):
        d, st = self.d, self.d.stack
        while not b.closed:
            b.readable = trio.Event()
            data = st.recv_tcp(b.flow, CHUNK, d.now())
            d.flush()
            if data:
                try:
                    await b.sock.send_all(data) if hasattr(b.sock, "send_all") else await _sendall(b.sock, data)
                except OSError:
                    if not b.closed:
                        st.reset_tcp(b.flow, d.now())
                        d.flush()
                    return
                continue
            if self._guest_eof(b):
                try:
                    b.sock.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                while not b.closed:  # keep the socket open until the stack says closed
                    await b.readable.wait()
                    b.readable = trio.Event()
                return
            await b.readable.wait()

    def _guest_eof(self, b):
        f = self.d.stack.tcp._flows.get(b.flow)
        return f is None or f.eof_pushed


async def _sendall(sock, data):
    view = memoryview(data)
    fd = sock.fileno()
    while view:
        try:  # the socket is non-blocking: write now, a trip through the scheduler only on EAGAIN
            n = os.write(fd, view)
        except BlockingIOError:
            n = await sock.send(view)
        view = view[n:]
