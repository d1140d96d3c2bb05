"""Host datagram sockets of the UDP and ICMP NATs: one socket per flow, in a bounded table of
idle-expiring flows, each socket a hot fd of the daemon's pump (as every TCP socket is), and
their IP_RECVERR error queues.

``FlowTable`` is pure and clock-free (tests drive ``now`` by hand):
- idle expiry: each entry has its timeout; the deadline moves on every use (``get(key, now)``);
  expiry uses a heap of deadlines with lazy deletion (no scan of all flows).
- a cap: when full, the least recently used entry is evicted (counted ``<name>_evicted``); new
  flows are never refused, so a guest can always make progress.

``SocketFlows`` puts a FlowTable's flows (objects with ``.sock``) on the pump: ``add()``
registers the socket as a hot fd, level-triggered, so a socket with more waiting than one call
reads is reported again in the next round; ``on_ready(flow, mask)`` runs in the pump, which
flushes after its round. A flow leaving the table (expired, evicted, removed) leaves the pump
and its socket is closed.
"""

from __future__ import annotations

import collections
import heapq
import logging
import select
import socket
import struct
from typing import Any, Callable, Hashable

import trio

from . import errors

log = logging.getLogger(__name__)

# Linux constants (not all exported by the socket module)
IP_RECVERR = getattr(socket, "IP_RECVERR", 11)
IPV6_RECVERR = getattr(socket, "IPV6_RECVERR", 25)
MSG_ERRQUEUE = getattr(socket, "MSG_ERRQUEUE", 0x2000)
SO_EE_ORIGIN_ICMP = 2
SO_EE_ORIGIN_ICMP6 = 3
EXT_ERR = struct.Struct("=IBBBBII")  # struct sock_extended_err
_RECVERR_CMSGS = ((socket.IPPROTO_IP, IP_RECVERR), (socket.IPPROTO_IPV6, IPV6_RECVERR))
ERRQUEUE_BATCH = 16  # error-queue entries read per call
_READY = select.EPOLLIN


def enable_recverr(sock: socket.socket, family: int) -> None:
    """ICMP errors about what the socket sent arrive on its error queue (and as EPOLLERR)."""
    if family == 4:
        sock.setsockopt(socket.IPPROTO_IP, IP_RECVERR, 1)
    else:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVERR, 1)


def drain_errqueue(sock: socket.socket, bufsize: int = 65535) -> list[tuple[bytes, bytes]]:
    """Up to ERRQUEUE_BATCH entries of the socket's error queue: [(the offending datagram as
    the socket sent it, the sock_extended_err cmsg (with the offender's address after it))]."""
    out = []
    for _ in range(ERRQUEUE_BATCH):
        try:
            data, anc, _flags, _addr = sock.recvmsg(bufsize, 512, MSG_ERRQUEUE)
        except OSError:  # BlockingIOError: empty
            break
        for level, typ, cdata in anc:
            if (level, typ) in _RECVERR_CMSGS:
                out.append((data, cdata))
    return out


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


class SocketFlows:
    """A FlowTable of flows that each own a host socket (``flow.sock``), served by the pump.

    needs: the daemon (add_hot_fd/remove_hot_fd, now), ``on_ready(flow, mask)`` (the socket is
    readable, or has an error: EPOLLERR in mask), the table's cap, stats and counter name."""

    def __init__(self, daemon, on_ready: Callable[[Any, int], None], cap: int, stats, name: str):
        self.daemon = daemon
        self.on_ready = on_ready
        self.stats = stats
        self.name = name
        self.table = FlowTable(cap, self._removed, stats, name)
        self._by_fd: dict[int, Any] = {}

    def add(self, key, flow, now: float, timeout: float) -> None:
        self.table.add(key, flow, now, timeout)  # may evict (and close) the oldest first
        fd = flow.sock.fileno()
        self._by_fd[fd] = flow
        self.daemon.add_hot_fd(fd, self._ready, _READY)

    def _ready(self, fd: int, mask: int) -> None:
        flow = self._by_fd.get(fd)
        if flow is None:
            return
        try:
            self.on_ready(flow, mask)
        except Exception:  # our bug: this flow goes, the pump and the other flows stay
            if errors.STRICT:
                raise
            log.exception("%s %r", self.name, flow.key)
            self.stats.drop(f"{self.name}_glue_error")
            self.table.remove(flow.key)

    def _removed(self, _key, flow) -> None:
        fd = flow.sock.fileno()
        if self._by_fd.get(fd) is flow:
            del self._by_fd[fd]
            self.daemon.remove_hot_fd(fd)
        flow.sock.close()

    async def serve(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Expire idle flows once a second; close every flow on the way out."""
        task_status.started()
        try:
            while True:
                await trio.sleep(1.0)
                self.table.expire(self.daemon.now())
        finally:
            for flow in self.table.values():
                self._removed(flow.key, flow)
