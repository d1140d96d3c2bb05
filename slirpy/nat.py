"""TCP NAT glue: a guest SYN becomes a non-blocking host socket; port forwards hand accepted
sockets in. Bytes move between the host sockets and the sans-IO stack's flows with flow control
on both sides.

No task per flow. Every host TCP socket is an edge-triggered hot fd in the daemon pump's epoll
set: per round, up to the pump's HOST_FDS_PER_ROUND ready sockets are served (the others in
the next rounds, in order) and the daemon flushed. Guest data
goes to the host socket from the stack's event handler itself (TcpReadable), so a request from
the guest reaches the host in the same loop iteration that read it from the tap.

The glue holds no flow's bytes: it reads from a host socket only what the stack takes now
(`send_room`), and sends guest bytes straight from the stack's receive buffer (`peek_tcp`),
which lets go of them only when the socket took them (`consume_tcp`). So every byte slirpy
holds for a flow is in the engine's memory budget. What a socket cannot take now waits in the
stack until EPOLLOUT; what the stack cannot take waits in the host's kernel until TcpWritable.
Connect timeouts are one deque (the timeout is constant, so deadlines come in order) and one
task.
"""

from __future__ import annotations

import collections
import errno
import logging
import math
import select
import socket
import struct

import trio

from . import errors
from .logutil import RateLimited
from .stack import addrmap
from .stack.events import (TcpClosed, TcpConnected, TcpConnectRequest, TcpGuestEof, TcpReadable,
                           TcpReset, TcpWritable)

log = logging.getLogger(__name__)
_refused = RateLimited(log, logging.INFO, interval=10.0)  # one line per reason per 10 s
CONNECT_TIMEOUT = 15.0
CHUNK = 256 * 1024  # per host recv: fewer wakeups, syscalls and ACKs
SOCK_BUF = 1 << 20

_IN, _OUT, _ERR, _HUP, _RDHUP = (select.EPOLLIN, select.EPOLLOUT, select.EPOLLERR, select.EPOLLHUP,
                                 select.EPOLLRDHUP)
# EPOLLOUT only while bytes wait for the socket (and while connecting): otherwise every ACK from
# the host that frees send space would be an event, a wakeup per request on a request/response
_MASK_IN = _IN | _RDHUP | select.EPOLLET
_MASK_OUT = _IN | _OUT | _RDHUP | select.EPOLLET
_LINGER0 = struct.pack("ii", 1, 0)

# conn states: host connect in progress / a forward's SYN into the guest unanswered yet / bridging /
# closed
CONNECTING, GUEST_WAIT, OPEN, DONE = range(4)


class _Conn:
    __slots__ = ("flow", "sock", "fd", "state", "readable", "want_out", "writable", "rdhup",
                 "host_eof", "shut_wr", "desc")

    def __init__(self, flow, sock, state, desc):
        self.flow, self.sock, self.fd, self.state = flow, sock, sock.fileno(), state
        self.desc = desc  # (src, sport, dst, dport, host, port) for log lines
        self.readable = self.writable = self.rdhup = False  # edges seen, not yet used up
        self.want_out = True  # registered for EPOLLOUT
        self.host_eof = self.shut_wr = False


def _reason(err: int) -> str:
    if err == errno.ECONNREFUSED:
        return "refused"
    if err == errno.ETIMEDOUT:
        return "timeout"
    if err in (errno.EMFILE, errno.ENFILE):
        return "no_fd"
    return "unreachable"


def _unreach(err: int, at_once: bool) -> str | None:
    """How the guest learns that the host's connect() failed, as libslirp answers: None for an
    RST (ECONNREFUSED, and a failure reported later other than the ones below); "host" (ICMP
    host / address unreachable) for EHOSTUNREACH and our connect timeout; "net" (net
    unreachable / no route) for ENETUNREACH and any other failure of connect() itself."""
    if err == errno.ECONNREFUSED:
        return None
    if err in (errno.EHOSTUNREACH, errno.ETIMEDOUT):
        return "host"
    if err == errno.ENETUNREACH or at_once:
        return "net"
    return None


class TcpNat:
    """needs: the daemon (stack, flush, hot fds), the address rules, the DNS forwarder (for
    DNS over TCP at .3:53). offers: handlers() for the stack's TCP events, forward_inbound()
    for port forwards, compact()."""

    def __init__(self, daemon, addrs, dns):
        self.d = daemon
        self.addrs = addrs
        self.dns = dns
        self.conns: dict[int, _Conn] = {}  # flow id -> conn
        self._by_fd: dict[int, _Conn] = {}
        self._ep = daemon.hot_ep  # the pump's set: every host socket is one of its hot fds
        self._connecting: collections.deque = collections.deque()  # (deadline, conn), in order
        self._reaper_scope: trio.CancelScope | None = None
        self._probe = select.poll()
        self._buf = bytearray(CHUNK)
        self._view = memoryview(self._buf)

    def handlers(self) -> dict:
        """The stack's TCP events and what serves each (the daemon dispatches them)."""
        return {ev_type: self._safe(fn) for ev_type, fn in (
            (TcpConnectRequest, self._on_request), (TcpConnected, self._on_connected),
            (TcpReadable, self._on_readable), (TcpGuestEof, self._on_readable),
            (TcpWritable, self._on_writable), (TcpReset, self._on_reset),
            (TcpClosed, self._on_closed))}

    def _safe(self, fn):
        """One flow's failure is that flow's RST, never the daemon's end."""
        def handler(ev):
            try:
                fn(ev)
            except Exception:
                if errors.STRICT:
                    raise
                log.exception("tcp flow %d", ev.flow)
                self.d.stack.stats.drop("tcp_glue_error")
                self._fail(ev.flow)
        return handler

    def _fail(self, flow, c=None):
        c = c or self.conns.get(flow)
        if c is not None:
            self._close(c, linger0=True)
        self.d.stack.reset_tcp(flow, self.d.now())

    # ------------------------------------------------------------------------------ tasks
    async def serve(self, task_status=trio.TASK_STATUS_IGNORED):
        async with trio.open_nursery() as n:
            n.start_soon(self._reaper)
            task_status.started()

    def _host_ready(self, fd, mask):
        """The daemon's pump found a host socket ready (the pump flushes after the round)."""
        c = self._by_fd.get(fd)
        if c is None:
            return
        try:
            self._host_event(c, mask)
        except Exception:
            if errors.STRICT:
                raise
            log.exception("tcp flow %d", c.flow)
            self.d.stack.stats.drop("tcp_glue_error")
            self._fail(c.flow, c)

    async def _reaper(self):
        """Connect timeouts (the flow is refused)."""
        cq, d = self._connecting, self.d
        while True:
            with trio.CancelScope(deadline=cq[0][0] if cq else math.inf) as cs:
                self._reaper_scope = cs
                await trio.sleep_forever()
            self._reaper_scope = None
            now = d.now()
            while cq and cq[0][0] <= now:
                _, c = cq.popleft()
                if c.state == CONNECTING:
                    self._refuse(c, errno.ETIMEDOUT)
            d.flush()

    def _schedule(self, q, c, timeout):
        while q and q[0][1].state in (OPEN, DONE):  # finished early: trim, keep the queue small
            q.popleft()
        q.append((self.d.now() + timeout, c))
        if len(q) == 1 and self._reaper_scope is not None:
            self._reaper_scope.deadline = min(self._reaper_scope.deadline, q[0][0])

    # ------------------------------------------------------------------------- host side
    def _host_event(self, c, mask):
        state = c.state
        if state != OPEN:
            if state == CONNECTING and mask & (_OUT | _ERR | _HUP):
                self._connected(c)  # bytes or an EOF that came with it are served below
            elif (state == GUEST_WAIT and mask & (_ERR | _HUP | _RDHUP)
                  and self._gone_early(c, mask)):
                # the host client hung up before the guest answered our SYN: the flow would go
                # on retrying it, and the guest, once it answers, get a dead connection first
                self.d.stack.stats.drop("tcp_host_gone_early")
                self._fail(c.flow, c)
                return
            if c.state != OPEN:
                return  # GUEST_WAIT: TcpConnected starts with both edges assumed
        if mask & (_IN | _ERR | _HUP | _RDHUP):
            c.readable = True
            if mask & (_RDHUP | _HUP | _ERR):
                c.rdhup = True
            self._to_guest(c)
            if (c.state == OPEN and c.readable and not c.host_eof and mask & (_ERR | _HUP)
                    and not c.shut_wr):
                # the host is gone (reset, or closed both ways) while its last bytes wait for
                # a guest that takes nothing: nobody is left to take them, so no wait
                self.d.stack.stats.drop("tcp_host_gone")
                self._fail(c.flow, c)
                return
        if mask & (_OUT | _ERR | _HUP) and c.state == OPEN:
            c.writable = True
            self._to_host(c)

    @staticmethod
    def _gone_early(c, mask):
        """A forward's client, before the guest answered: reset or closed (HUP/ERR), or an EOF
        with nothing sent before it. An EOF after a request is a half-close: the request still
        waits for the guest, and its answer for the client."""
        if mask & (_ERR | _HUP):
            return True
        try:
            return c.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True

    def _to_guest(self, c):
        """Host socket -> stack, while both have something to give and room to take it: no
        more is read than the stack takes now, so nothing waits here."""
        st, now, flow = self.d.stack, self.d.now(), c.flow
        view = self._view
        while c.readable and not c.host_eof:
            want = st.send_room(flow)
            if want <= 0:
                return  # TcpWritable brings us back
            if want > CHUNK:
                want = CHUNK
            try:
                k = c.sock.recv_into(view[:want] if want < CHUNK else view)
            except BlockingIOError:
                c.readable = False
                return
            except InterruptedError:
                continue
            except OSError:  # ECONNRESET and kin: the guest gets an RST
                self._host_failed(c)
                return
            if k == 0:
                c.host_eof = True
                st.shutdown_tcp(flow, now)
                return
            if k < want and not c.rdhup:
                c.readable = False  # a short read emptied the socket; the next arrival re-arms
            n = st.send_tcp(flow, view[:k], now)
            if n < k:  # send_room promised it: our bug, loud in tests, this flow's RST here
                raise RuntimeError(f"send_tcp took {n} of {k} bytes send_room offered")

    def _to_host(self, c):
        """Stack -> host socket, while the socket takes it. The bytes leave the stack's buffer
        (and the budget) only once the socket has taken them."""
        st, flow, sock = self.d.stack, c.flow, c.sock
        while c.writable and c.state == OPEN:
            out = st.peek_tcp(flow)
            if out is None:
                if self._guest_eof(flow):
                    self._shut_wr(c)
                return
            size = len(out)
            try:
                n = sock.send(out)
            except BlockingIOError:
                n = 0
            except InterruptedError:
                continue
            except OSError:  # EPIPE / ECONNRESET
                self._host_failed(c)
                return
            finally:
                out.release()  # before the engine's buffer changes
            if n:
                st.consume_tcp(flow, n, self.d.now())
            if n < size:
                c.writable = False  # full: EPOLLOUT re-arms
                if not c.want_out:
                    c.want_out = True
                    self._ep.modify(c.fd, _MASK_OUT)
                return
            if c.want_out:
                c.want_out = False
                self._ep.modify(c.fd, _MASK_IN)

    def _shut_wr(self, c):
        if c.shut_wr:
            return
        c.shut_wr = True
        try:
            c.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def _guest_eof(self, flow):
        f = self.d.stack.tcp._flows.get(flow)
        return f is None or f.eof_pushed

    def _host_failed(self, c):
        self._fail(c.flow, c)

    def _close(self, c, linger0=False):
        if c.state == DONE:
            return
        c.state = DONE
        if self.conns.get(c.flow) is c:
            del self.conns[c.flow]
        self._by_fd.pop(c.fd, None)
        self.d.remove_hot_fd(c.fd, True)  # closed below: the close leaves the epoll set
        if linger0:
            try:
                c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER0)
            except OSError:
                pass
        c.sock.close()

    def _add(self, c):
        self.conns[c.flow] = c
        self._by_fd[c.fd] = c
        self.d.add_hot_fd(c.fd, self._host_ready, _MASK_OUT)

    def compact(self) -> None:
        """After a crowd of flows closed (the Observer's trim): the tables at their present
        size, and the connect queue without the finished."""
        for d in (self.conns, self._by_fd):
            items = list(d.items())
            d.clear()
            d.update(items)
        q = self._connecting
        live = [e for e in q if e[1].state == CONNECTING]
        q.clear()
        q.extend(live)

    # --------------------------------------------------------------------- stack events
    def _on_readable(self, ev):  # TcpReadable, and TcpGuestEof: _to_host sees the EOF itself
        c = self.conns.get(ev.flow)
        if c is not None and c.state == OPEN:
            self._to_host(c)

    def _on_writable(self, ev):
        c = self.conns.get(ev.flow)
        if c is not None and c.state == OPEN:
            self._to_guest(c)

    def _on_connected(self, ev):
        c = self.conns.get(ev.flow)
        if c is not None and c.state == GUEST_WAIT:
            c.state = OPEN  # a forward's socket: its edges were seen before; try both ways
            c.readable = c.writable = True
            self._to_guest(c)
            if c.state == OPEN:
                self._to_host(c)

    def _on_reset(self, ev):
        c = self.conns.get(ev.flow)
        if c is not None:
            self._close(c, linger0=True)

    def _on_closed(self, ev):
        """The flow is gone (an RST-worthy end came as TcpReset first; an orderly end only
        once the host took every guest byte, which stay in the stack until then)."""
        c = self.conns.get(ev.flow)
        if c is not None:
            self._close(c)

    # ------------------------------------------------------------------------- outbound
    def _map(self, ev):
        """Where to dial for a guest SYN (addrmap's verdict): DNS over TCP at .3:53 goes to the
        first upstream of the DNS forwarder, at the upstream's own port."""
        v = self.addrs.outbound("tcp", ev.family, ev.dst, ev.dport)
        if v.kind != addrmap.DNS:
            return v
        ups = self.dns.upstreams()
        if not ups:
            return addrmap.refuse("dns_address", "net")
        return (addrmap.dial(str(ups[0][0]), int(ups[0][1])) if isinstance(ups[0], tuple)
                else addrmap.dial(str(ups[0]), 53))

    def _on_request(self, ev):
        d, st = self.d, self.d.stack
        try:
            v = self._map(ev)
        except Exception:  # our bug: refuse this flow (net unreachable), loudly in the counters
            if errors.STRICT:
                raise
            v = addrmap.refuse("map_error", "net")
        if v.kind == addrmap.REFUSE:  # ICMP, or silence for --disable-dns
            if not v.reason.startswith("policy_"):  # egress.log_denied logs those, per rule
                _refused.log(v.reason, "tcp %s:%d -> %s:%d refused: %s", ev.src, ev.sport,
                             ev.dst, ev.dport, v.reason.replace("_", " "))
            st.refuse_tcp(ev.flow, v.unreach, v.reason, d.now())
            return
        host, port = v.host, v.port
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            sock = socket.socket(fam, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        except OSError as e:  # EMFILE/ENFILE/ENOBUFS: refuse this flow, the others go on
            st.refuse_tcp(ev.flow, "net", "no_fd" if e.errno in (errno.EMFILE, errno.ENFILE)
                          else "socket", d.now())
            return
        c = _Conn(ev.flow, sock, CONNECTING, (ev.src, ev.sport, ev.dst, ev.dport, host, port))
        try:
            bind = d.config.outbound_addr if fam == socket.AF_INET else d.config.outbound_addr6
            if bind is not None:
                sock.bind((str(bind), 0))
            err = sock.connect_ex((host, port))
        except OSError as e:
            err = e.errno or errno.EHOSTUNREACH
        except (ValueError, OverflowError):
            err = errno.EHOSTUNREACH
        if err not in (0, errno.EINPROGRESS):
            sock.close()
            self._log_refused(c, _reason(err))
            self._answer_failure(ev.flow, err, True)
            return
        self._add(c)
        if err == 0 or self._done_already(c.fd):
            self._connected(c)
            return
        self._schedule(self._connecting, c, CONNECT_TIMEOUT)

    def _answer_failure(self, flow, err, at_once):
        """The guest's SYN gets libslirp's answer to the failed connect(): an RST or ICMP."""
        st, now = self.d.stack, self.d.now()
        unreach = _unreach(err, at_once)
        if unreach is None:
            st.reject_tcp(flow, _reason(err), now)
        else:
            st.refuse_tcp(flow, unreach, _reason(err), now)

    def _done_already(self, fd):
        """A connect to a local port has usually finished (or failed) by the time connect()
        returns EINPROGRESS: one poll(0) lets the SYN-ACK go out in this loop iteration."""
        p = self._probe
        p.register(fd, select.POLLOUT)
        try:
            return bool(p.poll(0))
        finally:
            p.unregister(fd)

    def _connected(self, c):
        err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._refuse(c, err)
            return
        for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            try:
                c.sock.setsockopt(socket.SOL_SOCKET, opt, SOCK_BUF)
            except OSError:
                pass
        c.state = OPEN
        c.writable = True  # the connect's EPOLLOUT edge is used up; the socket has room
        self.d.stack.accept_tcp(c.flow, self.d.now())

    def _refuse(self, c, err):
        """The host connect failed later (SO_ERROR) or timed out (ETIMEDOUT)."""
        self._log_refused(c, _reason(err))
        self._close(c)
        self._answer_failure(c.flow, err, False)

    @staticmethod
    def _log_refused(c, reason):
        src, sport, dst, dport, host, port = c.desc
        _refused.log(reason, "tcp %s:%d -> %s:%d refused: connect to %s port %d: %s", src, sport,
                     dst, dport, host, port, reason)

    def reset_outbound(self, denied) -> int:
        """End the flows the guest opened whose destination ``denied(family, dst, dport)``
        refuses now (the egress rules changed): an RST to the guest, the host socket closed
        with an RST. A forward's flows (inbound) are left alone. Returns how many."""
        n = 0
        for c in list(self.conns.values()):
            _src, _sport, dst, dport, host, _port = c.desc
            if not host or c.state == DONE:  # a forward's flow (no host dialled): not egress
                continue
            if denied(6 if ":" in dst else 4, dst, dport):
                self.d.stack.stats.drop("tcp_policy_reset")
                self._fail(c.flow, c)
                n += 1
        if n:
            self.d.flush()
        return n

    # -------------------------------------------------------------------------- inbound
    async def forward_inbound(self, sock, family, src, sport, guest_addr, guest_port):
        """A port forward accepted `sock` (a trio socket): open a flow into the guest for it.
        Returns at once; the socket is the NAT's from here on."""
        self.accept_inbound(socket.socket(fileno=sock.detach()), family, src, sport, guest_addr,
                            guest_port)

    def accept_inbound(self, sock, family, src, sport, guest_addr, guest_port):
        d, st = self.d, self.d.stack
        sock.setblocking(False)
        flow = st.connect_tcp(family, src, sport, guest_addr, guest_port, d.now())
        if flow is None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER0)
            except OSError:
                pass
            sock.close()
            d.flush()
            return
        for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            try:
                sock.setsockopt(socket.SOL_SOCKET, opt, SOCK_BUF)
            except OSError:
                pass
        self._add(_Conn(flow, sock, GUEST_WAIT, (src, sport, guest_addr, guest_port, "", 0)))
        d.flush()
