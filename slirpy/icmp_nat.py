"""ICMP echo out through unprivileged ping sockets (socket(AF_INET, SOCK_DGRAM, IPPROTO_ICMP)).

The kernel picks the echo identifier of a ping socket, so each (family, guest src, guest ident,
dst) gets its own socket connected to dst; replies are sent to the guest with its original ident.
Table: at most MAX_FLOWS sockets (LRU evicted, counted ``icmp_flow_evicted``), idle expiry 30 s.
When the host forbids ping sockets (net.ipv4.ping_group_range excludes our gid: EACCES) we log
once and drop (``icmp_ping_socket_denied``).

Errors: the sockets have IP_RECVERR/IPV6_RECVERR, so ICMP(v6) destination unreachable and time
exceeded about our echo requests arrive on the error queue; each is sent to the guest from the
reporting host (SO_EE_OFFENDER) quoting the guest's own request. A send that fails at once
becomes, from the gateway, net unreachable (ICMPv6 no route) for ENETUNREACH and host unreachable
(ICMPv6 address unreachable) for EHOSTUNREACH.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import select
import socket
import struct

import trio

from slirpy.hostsock import (EXT_ERR, SO_EE_ORIGIN_ICMP, SO_EE_ORIGIN_ICMP6, SocketFlows,
                             drain_errqueue, enable_recverr)
from slirpy.logutil import RateLimited
from slirpy.stack import addrmap
from slirpy.stack.events import IcmpEchoRequest

log = logging.getLogger(__name__)
_debug = RateLimited(log, logging.DEBUG, interval=10.0)  # per-datagram failures

ICMP_IDLE_TIMEOUT = 30.0
MAX_FLOWS = 1024
_ECHO = struct.Struct("!BBHHH")
# ICMP types passed on to the guest: (v4) unreachable, time exceeded; (v6) same
_PASS = {4: (3, 11), 6: (1, 3)}


def parse_icmp_errqueue(cdata: bytes, family: int):
    """(type, code, offender address or None) from an IP(V6)_RECVERR cmsg, or None if it is
    not an ICMP error of a kind we pass on."""
    if len(cdata) < EXT_ERR.size:
        return None
    _errno, origin, typ, code, _pad, _info, _data = EXT_ERR.unpack_from(cdata)
    if origin != (SO_EE_ORIGIN_ICMP if family == 4 else SO_EE_ORIGIN_ICMP6):
        return None
    if typ not in _PASS[family]:
        return None
    off = cdata[EXT_ERR.size:]
    who = None
    try:
        if family == 4 and len(off) >= 8 and int.from_bytes(off[:2], "little") == socket.AF_INET:
            who = str(ipaddress.IPv4Address(bytes(off[4:8])))
        elif family == 6 and len(off) >= 24 and \
                int.from_bytes(off[:2], "little") == socket.AF_INET6:
            who = str(ipaddress.IPv6Address(bytes(off[8:24])))
    except ValueError:
        who = None
    if who in ("0.0.0.0", "::"):
        who = None
    return typ, code, who


class _Ping:
    __slots__ = ("key", "sock", "bytes_in", "bytes_out")

    def __init__(self, key, sock):
        self.key = key
        self.bytes_in = self.bytes_out = 0  # echo payload bytes from / to the guest (list_flows)
        self.sock = sock


def parse_echo_reply_untrusted(data: bytes, family: int) -> tuple[int, bytes] | None:
    """(seq, payload) of an echo reply read from a ping socket, None otherwise."""
    if len(data) < 8:
        return None
    typ, code, _ck, _ident, seq = _ECHO.unpack_from(data)
    if typ != (0 if family == 4 else 129) or code != 0:
        return None
    return seq, bytes(data[8:])


class IcmpNat:
    """needs: the daemon (stack, flush, hot fds), the address rules. offers:
    handle(IcmpEchoRequest), the flow table (get_stats, list_flows)."""

    def __init__(self, daemon, addrs, max_flows: int = MAX_FLOWS):
        self.daemon = daemon
        self.stats = daemon.stack.stats
        self.addrs = addrs
        self.flows = SocketFlows(daemon, self._host_ready, max_flows, self.stats, "icmp_flow")
        self.table = self.flows.table
        self.denied_logged = False

    def _open(self, family: int, dst: str) -> socket.socket:
        cfg = self.daemon.config
        if family == 4:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP)
        else:
            s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM, socket.IPPROTO_ICMPV6)
        try:
            s.setblocking(False)
            enable_recverr(s, family)
            bind = cfg.outbound_addr if family == 4 else cfg.outbound_addr6
            if bind is not None:
                s.bind((str(bind), 0))
            s.connect((dst, 0))
        except BaseException:
            s.close()
            raise
        return s

    def handle(self, ev: IcmpEchoRequest) -> None:
        d = self.daemon
        now = d.now()
        key = (ev.family, ev.src, ev.ident, ev.dst)
        p = self.table.get(key, now)
        dst = ev.dst
        if p is None:  # the address rules (and an egress policy) decide once, for a new flow
            v = self.addrs.outbound("icmp", ev.family, ev.dst, 0)
            if v.kind != addrmap.DIAL:
                self.stats.drop("icmp_" + v.reason)
                if v.unreach is not None:
                    self._unreachable(ev, v.unreach)
                return
            dst = v.host
            try:
                sock = self._open(ev.family, dst)
            except PermissionError as e:
                if not self.denied_logged:
                    self.denied_logged = True
                    log.warning("ping sockets not allowed (net.ipv4.ping_group_range): %s; "
                                "guest echo requests are dropped", e)
                self.stats.drop("icmp_ping_socket_denied")
                return
            except OSError as e:
                _debug.log(("socket", e.errno), "ping socket to %s failed: %s", dst, e)
                self.stats.drop("icmp_socket_failed")
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self.stats.drop("icmp_socket_no_fds")
                self._no_route(ev, e)
                return
            p = _Ping(key, sock)
            self.flows.add(key, p, now, ICMP_IDLE_TIMEOUT)
        typ = 8 if ev.family == 4 else 128
        p.bytes_in += len(ev.payload)
        try:
            p.sock.send(_ECHO.pack(typ, 0, 0, 0, ev.seq & 0xFFFF) + bytes(ev.payload))
        except OSError as e:
            _debug.log(("send", e.errno), "ping send to %s: %s", dst, e)
            self.stats.drop("icmp_send_failed")
            self._no_route(ev, e)

    def _no_route(self, ev: IcmpEchoRequest, e: OSError) -> None:
        """No route on the host: net unreachable / ICMPv6 no route for ENETUNREACH, host /
        address unreachable for EHOSTUNREACH, so the guest's ping fails at once instead of
        timing out."""
        if e.errno == errno.ENETUNREACH:
            self._unreachable(ev, "net")
        elif e.errno == errno.EHOSTUNREACH:
            self._unreachable(ev, "host")

    def _unreachable(self, ev: IcmpEchoRequest, unreach: str) -> None:
        """Destination unreachable of kind ``unreach`` (addrmap.UNREACH_CODES) from the gateway
        to the guest, quoting its echo request."""
        d = self.daemon
        d.stack.send_icmp_echo_error(ev.family, self.addrs.gateway(ev.family), ev.src, ev.dst,
                                     ev.ident, ev.seq, bytes(ev.payload),
                                     3 if ev.family == 4 else 1,
                                     addrmap.unreach_code(unreach, ev.family), d.now())
        d.flush()

    def _host_ready(self, p: _Ping, mask: int) -> None:
        """The pump found the ping socket readable (or with an error): up to a batch of echo
        replies and errors to the guest (the pump flushes after its round)."""
        fam, gsrc, gident, gdst = p.key
        d = self.daemon
        st, sock, now = d.stack, p.sock, d.now()
        error = False
        for _ in range(64):
            try:
                data = sock.recv(65535)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._errors(p)
                error = True
                continue
            r = parse_echo_reply_untrusted(data, fam)
            if r is None:
                self.stats.drop("icmp_bad_reply")
                continue
            self.table.get(p.key, now)
            seq, payload = r
            st.send_icmp_echo_reply(fam, gdst, gsrc, gident, seq, payload, now)
            p.bytes_out += len(payload)
        if mask & select.EPOLLERR and not error:
            self._errors(p)

    def _errors(self, p: _Ping) -> None:
        """Drain the socket's error queue; ICMP errors go to the guest."""
        fam, gsrc, gident, gdst = p.key
        d = self.daemon
        for data, cdata in drain_errqueue(p.sock):
            e = parse_icmp_errqueue(cdata, fam)
            if e is None:
                self.stats.drop("icmp_host_error")
                continue
            etype, ecode, who = e
            seq = int.from_bytes(data[6:8], "big") if len(data) >= 8 else 0
            self.stats.drop("icmp_host_error_forwarded")
            d.stack.send_icmp_echo_error(fam, who or gdst, gsrc, gdst, gident, seq,
                                         bytes(data[8:]), etype, ecode, d.now())

    async def serve(self, task_status=trio.TASK_STATUS_IGNORED):
        await self.flows.serve(task_status)
