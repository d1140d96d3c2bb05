"""UDP NAT: guest datagrams out through host UDP sockets, replies back through the stack.

One host socket per guest (src, sport, dst, dport) flow, connected to the destination (so the
kernel filters replies for us and reports ICMP errors through IP_RECVERR), with one small reader
task per flow.

Table policy (``FlowTable``, pure and clock-free so tests drive ``now`` by hand):
- idle expiry: 60 s, 10 s for DNS (dport 53); the deadline moves on every datagram either way;
  expiry uses a heap of deadlines with lazy deletion (no scan of all flows).
- a cap (4096 flows): when full, the least recently used flow is evicted (counted
  ``udp_flow_evicted``); new flows are never refused, so a guest can always make progress.

Where a datagram goes (the gateway's host loopback, the DNS forwarder at .3:53, refusals and
their ICMP answer) is stack/addrmap.py's verdict. A host socket that cannot be opened toward the
destination gets libslirp's ICMP net unreachable (ICMPv6 no route; host / address unreachable
for EHOSTUNREACH).
"""

from __future__ import annotations

import collections
import errno
import heapq
import ipaddress
import logging
import socket
import struct
from typing import Any, Callable, Hashable

import trio

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

# Linux constants (not all exported by the socket module)
IP_RECVERR = getattr(socket, "IP_RECVERR", 11)
IPV6_RECVERR = getattr(socket, "IPV6_RECVERR", 25)
MSG_ERRQUEUE = getattr(socket, "MSG_ERRQUEUE", 0x2000)
SO_EE_ORIGIN_ICMP = 2
SO_EE_ORIGIN_ICMP6 = 3
_EXT_ERR = struct.Struct("=IBBBBII")  # struct sock_extended_err

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


class FlowTable:
    """A bounded table of idle-expiring entries. Knows nothing of sockets or clocks.

    ``on_remove(key, value)`` is called for every entry leaving the table (expired or evicted).
    """

    def __init__(self, cap: int, on_remove: Callable[[Hashable, Any], None] | None = None,
                 stats=None, name: str = "flow"):
        if cap < 1:
            raise ValueError("cap must be >= 1")
        self.cap = cap
        self._on_remove = on_remove
        self._stats = stats
        self._name = name
        # key -> [value, deadline, timeout]; order = least recently used first
        self._entries: collections.OrderedDict = collections.OrderedDict()
        self._heap: list[tuple[float, int, Hashable]] = []
        self._tiebreak = 0
        self.evicted = 0
        self.expired = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key) -> bool:
        return key in self._entries

    def values(self):
        return [e[0] for e in self._entries.values()]

    def items(self):
        """[(key, value, deadline, timeout)] for introspection (list_flows)."""
        return [(k, e[0], e[1], e[2]) for k, e in self._entries.items()]

    def get(self, key, now: float | None = None):
        """The value for key (None if absent); with ``now``, also refreshes its deadline."""
        e = self._entries.get(key)
        if e is None:
            return None
        if now is not None:
            e[1] = now + e[2]
            self._entries.move_to_end(key)
        return e[0]

    def add(self, key, value, now: float, timeout: float) -> None:
        if key in self._entries:
            raise KeyError(f"{key!r} already in table")
        while len(self._entries) >= self.cap:
            old_key, old = self._entries.popitem(last=False)
            self.evicted += 1
            if self._stats is not None:
                self._stats.drop(f"{self._name}_evicted")
            if self._on_remove is not None:
                self._on_remove(old_key, old[0])
        deadline = now + timeout
        self._entries[key] = [value, deadline, timeout]
        self._push(deadline, key)

    def remove(self, key) -> None:
        e = self._entries.pop(key, None)
        if e is not None and self._on_remove is not None:
            self._on_remove(key, e[0])

    def _push(self, deadline: float, key) -> None:
        self._tiebreak += 1
        heapq.heappush(self._heap, (deadline, self._tiebreak, key))

    def next_deadline(self) -> float | None:
        while self._heap:
            deadline, _, key = self._heap[0]
            e = self._entries.get(key)
            if e is None:
                heapq.heappop(self._heap)  # lazily deleted
                continue
            if e[1] > deadline:  # refreshed since pushed: re-push at the real deadline
                heapq.heapreplace(self._heap, (e[1], self._tiebreak + 1, key))
                self._tiebreak += 1
                continue
            return deadline
        return None

    def expire(self, now: float) -> int:
        """Remove every entry whose deadline is <= now; returns how many."""
        n = 0
        while True:
            d = self.next_deadline()
            if d is None or d > now:
                break
            _, _, key = heapq.heappop(self._heap)
            e = self._entries.pop(key)
            n += 1
            if self._on_remove is not None:
                self._on_remove(key, e[0])
        self.expired += n
        # the heap may hold many stale entries for keys re-added after removal; compact it
        if len(self._heap) > 4 * len(self._entries) + 64:
            self._heap = [(e[1], i, k) for i, (k, e) in enumerate(self._entries.items())]
            heapq.heapify(self._heap)
            self._tiebreak = len(self._heap)
        return n


def parse_errqueue(data: bytes, family: int) -> tuple[int, int] | None:
    """(errno, icmp-code for the guest) from a sock_extended_err cmsg, or None if not ICMP."""
    if len(data) < _EXT_ERR.size:
        return None
    ee_errno, origin, typ, code, _pad, _info, _data = _EXT_ERR.unpack_from(data)
    if origin == SO_EE_ORIGIN_ICMP and typ == 3:
        return ee_errno, (ICMP_PORT_UNREACH if code == 3 else ICMP_HOST_UNREACH)
    if origin == SO_EE_ORIGIN_ICMP6 and typ == 1:
        return ee_errno, (ICMP6_PORT_UNREACH if code == 4 else ICMP6_ADDR_UNREACH)
    return None


def read_errqueue(sock: socket.socket) -> list[tuple[int, int]]:
    """Drain a socket's error queue: [(errno, guest icmp code)] for ICMP unreachables."""
    out = []
    for _ in range(16):
        try:
            _data, anc, _flags, _addr = sock.recvmsg(RECV_BUFSIZE, 512, MSG_ERRQUEUE)
        except (BlockingIOError, InterruptedError):
            break
        except OSError:
            break
        for level, typ, cdata in anc:
            if (level, typ) in ((socket.IPPROTO_IP, IP_RECVERR), (socket.IPPROTO_IPV6, IPV6_RECVERR)):
                r = parse_errqueue(cdata, sock.family)
                if r is not None:
                    out.append(r)
    return out


def open_udp_socket(family: int, dst: str, dport: int, bind_addr: str | None) -> socket.socket:
    af = socket.AF_INET if family == 4 else socket.AF_INET6
    s = socket.socket(af, socket.SOCK_DGRAM)
    try:
        s.setblocking(False)
        if family == 4:
            s.setsockopt(socket.IPPROTO_IP, IP_RECVERR, 1)
        else:
            s.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVERR, 1)
        if bind_addr:
            s.bind((bind_addr, 0))
        s.connect((dst, dport))
    except BaseException:
        s.close()
        raise
    return s


def close_socket_flow(_key, flow) -> None:
    """FlowTable's eviction/expiry callback for a flow that owns `.sock` and `.cancel` (the
    cancel scope of its reader task): used by the UDP and the ICMP NAT."""
    flow.cancel.cancel()
    try:
        trio.lowlevel.notify_closing(flow.sock)
    except Exception:
        pass
    flow.sock.close()


async def serve_expiry(table: FlowTable, now: Callable[[], float], task_status) -> None:
    """A component's serve(): expire idle flows once a second; close every flow on the way out."""
    task_status.started()
    try:
        while True:
            await trio.sleep(1.0)
            table.expire(now())
    finally:
        for flow in table.values():
            close_socket_flow(flow.key, flow)


class _Flow:
    __slots__ = ("key", "sock", "quote", "cancel", "host_dst", "bytes_in", "bytes_out")

    def __init__(self, key, sock, host_dst):
        self.key = key
        self.bytes_in = self.bytes_out = 0  # payload bytes from / to the guest (list_flows)
        self.sock = sock
        self.host_dst = host_dst
        self.quote = b""
        self.cancel = trio.CancelScope()


class UdpNat:
    """needs: the daemon (stack, flush, nursery), the address rules, the DNS forwarder (queries
    to .3:53), ``intercept(ev) -> bool`` (port forwarding's replies to its clients; True: taken).
    offers: handle(UdpDatagram), the flow table (get_stats, list_flows)."""

    def __init__(self, daemon, addrs, dns, intercept: Callable[[UdpDatagram], bool] | None = None,
                 max_flows: int = UDP_MAX_FLOWS):
        self.daemon = daemon
        self.stats = daemon.stack.stats
        self.addrs = addrs
        self.dns = dns
        self.intercept = intercept
        self.table = FlowTable(max_flows, close_socket_flow, self.stats, "udp_flow")
        self.fds_logged = False

    # ---- guest -> host ----------------------------------------------------------------------
    def handle(self, ev: UdpDatagram) -> None:
        d = self.daemon
        if self.intercept is not None and self.intercept(ev):
            return
        cfg = d.config
        now = d.now()
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
        key = (ev.family, ev.src, ev.sport, ev.dst, ev.dport)
        flow = self.table.get(key, now)
        if flow is None:
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
            self.table.add(key, flow, now, timeout)
            d.nursery.start_soon(self._reader, flow)
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
    async def _reader(self, flow: _Flow) -> None:
        fam, gsrc, gsport, gdst, gdport = flow.key
        d = self.daemon
        with flow.cancel:
            while True:
                if flow.sock.fileno() < 0:
                    return
                try:
                    await trio.lowlevel.wait_readable(flow.sock)
                except (trio.ClosedResourceError, trio.BusyResourceError, OSError):
                    return
                sent = False
                for _ in range(64):  # drain a batch before yielding
                    try:
                        data = flow.sock.recv(RECV_BUFSIZE)
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError as e:
                        self._on_error(flow, e)
                        sent = True
                        continue
                    if self.table.get(flow.key, d.now()) is not flow:
                        return
                    d.stack.send_udp(fam, gdst, gdport, gsrc, gsport, data, d.now())
                    flow.bytes_out += len(data)
                    sent = True
                if sent:
                    d.flush()

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
        await serve_expiry(self.table, self.daemon.now, task_status)
