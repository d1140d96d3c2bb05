"""UDP NAT: guest datagrams out through host UDP sockets, replies back through the stack.

One host socket per guest (src, sport, dst, dport) flow, connected to the destination (so the
kernel filters replies for us and reports ICMP errors through IP_RECVERR). No task per flow:
every socket is a hot fd of the daemon's pump (hostsock.SocketFlows), as every TCP socket is.

Table policy (hostsock.FlowTable): idle expiry 60 s, 10 s for DNS (dport 53), the deadline
moved by every datagram either way; a cap (4096 flows), the least recently used flow evicted
when full (counted ``udp_flow_evicted``).

Where a datagram goes (the gateway's host loopback, the DNS forwarder at .3:53, refusals and
their ICMP answer) is stack/addrmap.py's verdict. A host socket that cannot be opened toward the
destination gets libslirp's ICMP net unreachable (ICMPv6 no route; host / address unreachable
for EHOSTUNREACH).
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import select
import socket
from typing import Callable

import trio

from slirpy.hostsock import (EXT_ERR, SO_EE_ORIGIN_ICMP, SO_EE_ORIGIN_ICMP6, SocketFlows,
                             drain_errqueue, enable_recverr)
from slirpy.logutil import RateLimited
from slirpy.stack import addrmap
from slirpy.stack.events import UdpDatagram

log = logging.getLogger(__name__)
_debug = RateLimited(log, logging.DEBUG, interval=10.0)  # per-datagram failures

UDP_IDLE_TIMEOUT = 60.0
DNS_IDLE_TIMEOUT = 10.0
UDP_MAX_FLOWS = 4096
RECV_BUFSIZE = 65535
QUOTE_BYTES = 64  # first bytes of the guest's last datagram kept to quote in ICMP errors

# ICMP destination-unreachable codes handed to stack.send_udp_unreachable
ICMP_NET_UNREACH = 0
ICMP_HOST_UNREACH = 1
ICMP_PORT_UNREACH = 3
ICMP6_NO_ROUTE = 0
ICMP6_ADDR_UNREACH = 3
ICMP6_PORT_UNREACH = 4
# an error from a host socket's send/recv without an ICMP report: the guest's code (IPv4, IPv6)
_ERRNO_CODES = {errno.ECONNREFUSED: (ICMP_PORT_UNREACH, ICMP6_PORT_UNREACH),
                errno.EHOSTUNREACH: (ICMP_HOST_UNREACH, ICMP6_ADDR_UNREACH),
                errno.ENETUNREACH: (ICMP_NET_UNREACH, ICMP6_NO_ROUTE)}


def parse_errqueue(data: bytes, family: int) -> tuple[int, int] | None:
    """(errno, icmp-code for the guest) from a sock_extended_err cmsg, or None if not ICMP."""
    if len(data) < EXT_ERR.size:
        return None
    ee_errno, origin, typ, code, _pad, _info, _data = EXT_ERR.unpack_from(data)
    if origin == SO_EE_ORIGIN_ICMP and typ == 3:
        return ee_errno, (ICMP_PORT_UNREACH if code == 3 else ICMP_HOST_UNREACH)
    if origin == SO_EE_ORIGIN_ICMP6 and typ == 1:
        return ee_errno, (ICMP6_PORT_UNREACH if code == 4 else ICMP6_ADDR_UNREACH)
    return None


def read_errqueue(sock: socket.socket) -> list[tuple[int, int]]:
    """Drain a socket's error queue: [(errno, guest icmp code)] for ICMP unreachables."""
    out = []
    for _data, cdata in drain_errqueue(sock, RECV_BUFSIZE):
        r = parse_errqueue(cdata, sock.family)
        if r is not None:
            out.append(r)
    return out


def open_udp_socket(family: int, dst: str, dport: int, bind_addr: str | None) -> socket.socket:
    af = socket.AF_INET if family == 4 else socket.AF_INET6
    s = socket.socket(af, socket.SOCK_DGRAM)
    try:
        s.setblocking(False)
        enable_recverr(s, family)
        if bind_addr:
            s.bind((bind_addr, 0))
        s.connect((dst, dport))
    except BaseException:
        s.close()
        raise
    return s


class _Flow:
    __slots__ = ("key", "sock", "quote", "host_dst", "bytes_in", "bytes_out")

    def __init__(self, key, sock, host_dst):
        self.key = key
        self.bytes_in = self.bytes_out = 0  # payload bytes from / to the guest (list_flows)
        self.sock = sock
        self.host_dst = host_dst
        self.quote = b""


class UdpNat:
    """needs: the daemon (stack, flush, hot fds), the address rules, the DNS forwarder (queries
    to .3:53), ``intercept(ev) -> bool`` (port forwarding's replies to its clients; True: taken).
    offers: handle(UdpDatagram), the flow table (get_stats, list_flows)."""

    def __init__(self, daemon, addrs, dns, intercept: Callable[[UdpDatagram], bool] | None = None,
                 max_flows: int = UDP_MAX_FLOWS):
        self.daemon = daemon
        self.stats = daemon.stack.stats
        self.addrs = addrs
        self.dns = dns
        self.intercept = intercept
        self.flows = SocketFlows(daemon, self._host_ready, max_flows, self.stats, "udp_flow")
        self.table = self.flows.table
        self.fds_logged = False

    # ---- guest -> host ----------------------------------------------------------------------
    def handle(self, ev: UdpDatagram) -> None:
        d = self.daemon
        if self.intercept is not None and self.intercept(ev):
            return
        cfg = d.config
        now = d.now()
        key = (ev.family, ev.src, ev.sport, ev.dst, ev.dport)
        flow = self.table.get(key, now)
        if flow is None:  # the address rules (and an egress policy) decide once, for a new flow
            v = self.addrs.outbound("udp", ev.family, ev.dst, ev.dport)
            if v.kind != addrmap.DIAL:
                if v.kind == addrmap.DNS:
                    self.dns.handle_query(ev)
                    return
                self.stats.drop("udp_" + v.reason)  # silence for --disable-dns, as slirp4netns
                if v.unreach is not None:
                    self._unreachable(ev, addrmap.unreach_code(v.unreach, ev.family))
                return
            host_dst = v.host
            if not self._allowed(ev.family, host_dst, ev.dport):
                self.stats.drop("udp_bad_destination")
                return
            bind = None
            if ev.family == 4 and cfg.outbound_addr is not None:
                bind = str(cfg.outbound_addr)
            elif ev.family == 6 and cfg.outbound_addr6 is not None:
                bind = str(cfg.outbound_addr6)
            try:
                sock = open_udp_socket(ev.family, host_dst, ev.dport, bind)
            except OSError as e:
                _debug.log(("socket", e.errno), "udp socket to %s:%d failed: %s", host_dst, ev.dport, e)
                self.stats.drop("udp_socket_failed")
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self.stats.drop("udp_socket_no_fds")
                    if not self.fds_logged:
                        self.fds_logged = True
                        log.warning("udp: cannot open a host socket (%s); new flows are dropped "
                                    "until descriptors free up (counted udp_socket_no_fds)", e)
                elif e.errno == errno.EHOSTUNREACH:
                    self._unreachable(ev, addrmap.unreach_code("host", ev.family))
                else:  # ENETUNREACH, EADDRNOTAVAIL, EACCES...: libslirp's net unreachable
                    self._unreachable(ev, addrmap.unreach_code("net", ev.family))
                return
            flow = _Flow(key, sock, host_dst)
            timeout = DNS_IDLE_TIMEOUT if ev.dport == 53 else UDP_IDLE_TIMEOUT
            self.flows.add(key, flow, now, timeout)
        flow.quote = ev.payload[:QUOTE_BYTES]
        flow.bytes_in += len(ev.payload)
        try:
            flow.sock.send(ev.payload)
        except BlockingIOError:
            self.stats.drop("udp_host_send_full")
        except OSError as e:
            self._on_error(flow, e)

    @staticmethod
    def _allowed(family: int, dst: str, dport: int) -> bool:
        if dport == 0:
            return False
        try:
            a = ipaddress.ip_address(dst)
        except ValueError:
            return False
        return not (a.is_multicast or a.is_unspecified or (family == 4 and dst == "255.255.255.255"))

    def _unreachable(self, ev: UdpDatagram, code: int) -> None:
        d = self.daemon
        d.stack.send_udp_unreachable(ev.family, ev.src, ev.sport, ev.dst, ev.dport,
                                     ev.payload[:QUOTE_BYTES], code, d.now())
        d.flush()

    # ---- host -> guest ----------------------------------------------------------------------
    def _host_ready(self, flow: _Flow, mask: int) -> None:
        """The pump found the flow's socket readable (or with an error): up to a batch of
        replies to the guest (the pump flushes after its round; what is left is reported again
        in the next round)."""
        fam, gsrc, gsport, gdst, gdport = flow.key
        d = self.daemon
        st, sock, now = d.stack, flow.sock, d.now()
        error = False
        for _ in range(64):
            try:
                data = sock.recv(RECV_BUFSIZE)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                self._on_error(flow, e)
                error = True
                continue
            self.table.get(flow.key, now)  # the reply keeps the flow alive
            st.send_udp(fam, gdst, gdport, gsrc, gsport, data, now)
            flow.bytes_out += len(data)
        if mask & select.EPOLLERR and not error:
            self._errors(flow)  # an error report that recv did not raise: still the guest's

    def _errors(self, flow: _Flow) -> None:
        fam, gsrc, gsport, gdst, gdport = flow.key
        d = self.daemon
        for _err, code in read_errqueue(flow.sock)[:1]:
            self.stats.drop("udp_host_unreachable")
            d.stack.send_udp_unreachable(fam, gsrc, gsport, gdst, gdport, flow.quote, code, d.now())

    def _on_error(self, flow: _Flow, exc: OSError) -> None:
        fam, gsrc, gsport, gdst, gdport = flow.key
        errs = read_errqueue(flow.sock)
        if not errs and exc.errno in _ERRNO_CODES:
            errs = [(exc.errno, _ERRNO_CODES[exc.errno][fam == 6])]
        d = self.daemon
        for _err, code in errs[:1]:
            self.stats.drop("udp_host_unreachable")
            d.stack.send_udp_unreachable(fam, gsrc, gsport, gdst, gdport, flow.quote, code, d.now())
        if not errs:
            self.stats.drop("udp_host_error")

    async def serve(self, task_status=trio.TASK_STATUS_IGNORED):
        await self.flows.serve(task_status)
