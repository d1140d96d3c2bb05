"""The daemon: one trio loop around the tap fd and the sans-IO stack; the hub glue plugs into.

`wire(daemon)` below builds every component and is the daemon's wiring diagram: what a component
needs is a constructor argument, what it offers is a method. What the components use of the
daemon (its `daemon` argument):
    daemon.config, daemon.stack, daemon.nursery, daemon.tap (the Observer's figures),
    daemon.sandbox_paths (set by sandbox.lockdown; DNS names them), daemon.compact()
    daemon.now() -> float                    trio.current_time() (the clock's own method)
    daemon.flush()                           after ANY call into the stack: write frames,
                                             dispatch events, re-arm the timer (re-entrant-safe)
    daemon.add_handler(event_type, fn)       fn(ev) synchronous
    daemon.add_hot_fd(fd, fn, mask) / remove_hot_fd(fd, closing=False)   fn(fd, events) runs in the pump when
                                             epoll reports fd (mask as for epoll.register; change
                                             it with daemon.hot_ep.modify); HOST_FDS_PER_ROUND
                                             per round, the others in later rounds, in order
                                             (events of a removed fd are forgotten); one flush
                                             per round
Every component wire() returns has async def serve(self, task_status), started before the pump
(launch.run wrote the ready byte before the loop; what it opened is in daemon.prebound).
"""

from __future__ import annotations

import collections
import logging
import math
import os
import select
import signal
import sys

from ._lazy import defer, known_libraries

defer("ssl", "hmac")  # trio imports them for TLS/DTLS, which slirpy never uses: ~5 MB of RSS
with known_libraries():  # no `ldconfig -p` for trio's find_library("pthread")
    import trio

from ._triowait import PumpWait
from .api_socket import ApiServer
from .dns import DnsForwarder
from .egress import Egress, log_denied
from .icmp_nat import IcmpNat
from .logutil import RateLimited
from .nat import TcpNat
from .observe import Observer
from .pcap import PcapWriter
from .portfwd import PortForwarder
from .splice import Splicer
from .stack.addrmap import AddressMap
from .stack.events import IcmpEchoRequest, InternalError, TcpConnectRequest, UdpDatagram
from .stack.policy import Policy
from .tap import MAX_READ_BATCH, Tap, TapGone
from .udp_nat import UdpNat

log = logging.getLogger(__name__)

MAX_DISPATCH = 100_000  # events per flush, a guard against a handler feeding itself forever
MAX_HOT_ROUNDS = 8  # busy pump rounds between checkpoints (trio's other tasks get their turn)
# Bounded work per round, so that no source takes every round (issue #20): the tap gives at most
# one batch (tap.MAX_READ_BATCH frames), and at most HOST_FDS_PER_ROUND host sockets are served;
# the others keep their events in the backlog, in order, for the next rounds.
HOST_FDS_PER_ROUND = 64
# The guest's tap queue is short (500 frames): during a burst (thousands of SYNs and ACKs) it
# overflowed while the stack worked, and dropped frames (pings, ACKs, RSTs) came back only as
# retransmissions, or never. The pump reads the tap ahead of the stack into its own queue
# (reading is cheap; bounded in frames and bytes, beyond that the tap keeps what waits) and
# gives the stack RX_PER_ROUND frames per round, RX_CHUNK at a time, each chunk flushed (its
# events dispatched: the NAT's host connects for SYNs) and the tap read again after it; so is the
# tap after every HOST_CHUNK host sockets served. A guest's burst of thousands of RSTs thus finds
# the tap read every few milliseconds.
# SYNs (new connections) wait in a queue of their own and get SYN_PER_ROUND per round after
# everything else: established flows, pings and the API first, connects at the rate the loop
# serves them (the engine's half-open cap defers the rest to the guest's retransmissions).
RX_QUEUE_FRAMES = 8192
RX_QUEUE_BYTES = 8 << 20
RX_PER_ROUND = 256
RX_CHUNK = 32
HOST_CHUNK = 16
SYN_PER_ROUND = 64
RX_SYN_QUEUE = 8192  # SYNs waiting beyond this are dropped (counted), the guest retransmits them
# (a second later, then 3, 7, ...: each drop costs a connect seconds); they never fill the queue
# that established traffic needs
BUSY_SLICE = 0.01  # busy rounds yield to trio's tasks (the API, DNS, UDP) at least this often (s)
# glibc gives the top of the heap back to the kernel once more than 128 KiB is free there, and
# every tap read of a 64 KiB frame (a fresh bytes object, freed a moment later) moved it across
# that line: a brk() to shrink the heap and one to grow it again, and fresh pages the kernel
# zeroes, for one guest->host frame in two. The daemon keeps this much free at the top instead.
HEAP_TRIM = 4 << 20
# Within a round the tap is read again (after each chunk fed, after HOST_CHUNK host sockets) only
# once this long has passed since a read found it empty: the re-read exists for long rounds (a
# burst), and in a short one (a request/response) it was a read that failed with EAGAIN, an
# exception, every time. The tap's own queue (500 frames) outlasts this at any rate a guest sends.
TAP_REREAD = 0.0005


def wire(d: Daemon) -> list:
    """The daemon's wiring diagram: every component, what it needs, which events it serves.
    Returns the components whose serve() tasks run, in the order they start."""
    cfg, pre = d.config, d.prebound
    # the egress policy (stack/policy.py): --allow/--deny/--default-deny, changed by the API
    policy = Policy(cfg, cfg.egress_rules, cfg.default_deny, on_deny=log_denied)
    # where a guest's destination goes on the host (stack/addrmap.py), the policy asked first
    addrs = AddressMap(cfg, policy=policy.check)
    dns = DnsForwarder(d)  # UDP at .3:53 -> the upstreams
    tcp = TcpNat(d, addrs, dns)  # TCP flows <-> host sockets (hot fds of the pump)
    # loopback clients of TCP forwards: spliced in the kernel through the helper (splice.py)
    splicer = Splicer(d, d.connector)
    portfwd = PortForwarder(d, addrs, tcp, pre, splicer)  # listeners -> splicer or tcp, UDP
    udp = UdpNat(d, addrs, dns, intercept=portfwd.intercept_udp)  # UDP flows <-> host sockets
    icmp = IcmpNat(d, addrs)  # echo requests <-> ping sockets
    pcap = PcapWriter(cfg, pre, on_stop=d.stop_capture)
    egress = Egress(policy, tcp, udp, icmp)  # the API's rule changes; ends flows now denied
    observer = Observer(d, tcp_nat=tcp, udp_nat=udp, icmp_nat=icmp, portfwd=portfwd, dns=dns,
                        pcap=pcap, egress=egress)
    api = ApiServer(cfg, portfwd, observer, pre, egress=egress)

    for ev_type, fn in tcp.handlers().items():
        d.add_handler(ev_type, fn)
    d.add_handler(UdpDatagram, udp.handle)
    d.add_handler(IcmpEchoRequest, icmp.handle)
    d.pcap = pcap if pcap.active else None  # sees every frame
    return [observer, tcp, udp, icmp, splicer, portfwd, api, pcap]


class Daemon:
    def __init__(self, config, tap_fd: int, stack=None, offload: int = -1, wiring=wire):
        """wiring: builds the components (tests give a bare daemon: lambda d: [])."""
        self.config = config
        self._wiring = wiring
        self.tap_fd = tap_fd
        self.offload = offload  # TUN_F_* flags the tap accepted; -1: no virtio-net header
        self.stack = stack
        self.nursery = None
        self.components: list = []
        self._handlers: dict = {InternalError: self._internal_error}
        self._bug_log = RateLimited(log, logging.ERROR)  # InternalError: one line per kind
        self._hot: dict = {}  # fd -> fn(fd, events), served by the pump
        # fd -> events epoll reported that the pump has not served yet (HOST_FDS_PER_ROUND)
        self._backlog: collections.OrderedDict = collections.OrderedDict()
        self._rx: collections.deque = collections.deque()  # frames read, not yet given the stack
        self._rx_syn: collections.deque = collections.deque()  # ... of them, the guest's SYNs
        self._rx_bytes = 0
        self._tap_dry_at = -math.inf  # when a read last found the tap empty (EAGAIN)
        self.hot_ep = select.epoll()
        self._flushing = False
        self._wait: PumpWait | None = None  # the pump's idle wait (_triowait.py)
        self._write_wakeup = trio.Event()
        self.tap: Tap | None = None
        self.pcap = None  # slirpy.pcap.PcapWriter when --pcap is given: sees every frame
        self.exit_message: str | None = None
        self._main_cancel: trio.CancelScope | None = None
        self.exit_code = 0
        self.prebound = None  # listeners.Prebound: host sockets opened before ready (launch.run)
        self.target_pidfd: int | None = None  # PID form: the target's pidfd, opened before ready
        self.exit_fd_handoff = None  # launch: ends its SIGIO watch of the exit fd
        self.sandbox_paths = None  # sandbox.lockdown: what the sandbox holds (DNS's messages)
        self.connector = None  # (pid, socket): the helper as the splice connector (launch.run)

    # -------------------------------------------------------------------------- contract
    def now(self) -> float:  # main() replaces it with the running clock's bound method
        return trio.current_time()

    def add_handler(self, event_type, fn) -> None:
        self._handlers[event_type] = fn

    def add_hot_fd(self, fd: int, fn, mask: int = select.EPOLLIN) -> None:
        self.hot_ep.register(fd, mask)
        self._hot[fd] = fn

    def remove_hot_fd(self, fd: int, closing: bool = False) -> None:
        """closing: the caller closes the fd next, its only one, which takes it out of the
        epoll set by itself (an epoll_ctl saved per connection)."""
        self._backlog.pop(fd, None)  # the number may come back for another socket
        if self._hot.pop(fd, None) is not None and not closing:
            try:
                self.hot_ep.unregister(fd)
            except (OSError, ValueError):
                pass

    def stop_capture(self) -> None:
        """The pcap writer stopped (cap reached, write failed, exit)."""
        self.pcap = None

    def compact(self) -> None:
        """After a crowd of flows closed (the Observer's trim): the hot-fd table and the
        backlog at their present size (in place: the pump holds them)."""
        for d in (self._hot, self._backlog):
            items = list(d.items())
            d.clear()
            d.update(items)

    def flush(self) -> None:
        if self._flushing:
            return
        self._flushing = True
        try:
            stack = self.stack
            now = self.now()
            for _ in range(MAX_DISPATCH):
                frames = stack.frames_to_send(now)
                if frames:
                    if self.pcap is not None:
                        self._capture(frames)
                    try:
                        self.tap.write_frames(frames)
                    except TapGone as e:  # flush runs in any task: end cleanly, not with a traceback
                        self._tap_gone(e)
                        return
                    if self.tap.queue:
                        self._write_wakeup.set()
                ev = stack.next_event()
                if ev is None:
                    break
                self._dispatch(ev)
            # the pump's trio wait (plain mode) ends at the stack's timer: a timer that only
            # ever moves earlier here. A later or cancelled one (an RTO pushed back by every
            # ACK) leaves the wakeup where it was and the pump looks again when it comes.
            w = self._wait
            ts = w.scope if w is not None else None
            if ts is not None:
                t = stack.get_timer()
                if t is not None and t < ts.deadline:
                    ts.deadline = t
        finally:
            self._flushing = False

    def _capture(self, frames) -> None:
        h = self.stack.vnet_hdr_len  # the capture holds Ethernet frames, never virtio-net headers
        self.pcap.write([f[h:] for f in frames] if h else frames)

    def _internal_error(self, ev) -> None:
        """A bug inside the stack: it reset the flow and counted it; one line per kind, limited."""
        self._bug_log.log((ev.component, ev.error.partition(":")[0]),
                          "internal error in %s (flow %s), flow reset: %s",
                          ev.component, ev.flow, ev.error)

    def _dispatch(self, ev) -> None:
        fn = self._handlers.get(type(ev))
        if fn is not None:
            fn(ev)
            return
        self.stack.stats.drop(f"no_handler_{type(ev).__name__}")
        if isinstance(ev, TcpConnectRequest):
            self.stack.reject_tcp(ev.flow, "refused", self.now())

    # ----------------------------------------------------------------------------- tasks
    def _drain_tap(self) -> None:
        """Read the tap ahead of the stack into the rx queues, until EAGAIN or their caps."""
        tap, q, sq = self.tap, self._rx, self._rx_syn
        opens = self.stack.opens_tcp
        while len(q) < RX_QUEUE_FRAMES and self._rx_bytes < RX_QUEUE_BYTES:
            frames = tap.read_batch()
            for f in frames:
                if opens(f):
                    if len(sq) >= RX_SYN_QUEUE:
                        self.stack.stats.drop("tcp_syn_queue_full")
                        continue
                    sq.append(f)
                else:
                    q.append(f)
                self._rx_bytes += len(f)
            if len(frames) < MAX_READ_BATCH:  # EAGAIN: empty
                self._tap_dry_at = self.now()
                return
        self._tap_dry_at = -math.inf  # stopped at our caps: frames wait in the tap

    def _reread_tap(self) -> None:
        """The tap again within a round, unless it was found empty a moment ago (TAP_REREAD)."""
        if self.now() - self._tap_dry_at >= TAP_REREAD:
            self._drain_tap()

    def _read_tap(self, deadline: float = math.inf) -> None:
        """One round's share of the rx queues to the stack, RX_CHUNK frames at a time, each
        chunk flushed and the tap read again after it: up to RX_PER_ROUND frames, then up to
        SYN_PER_ROUND SYNs; past the deadline (the busy slice) one chunk of each."""
        now = self.now
        for q, chunks in ((self._rx, RX_PER_ROUND // RX_CHUNK),
                          (self._rx_syn, SYN_PER_ROUND // RX_CHUNK)):
            for k in range(chunks):
                if not q or (k and now() >= deadline):
                    break
                self._feed(q)

    def _feed(self, q) -> bool:
        """RX_CHUNK frames (or fewer) of q to the stack, flushed, the tap read again."""
        stack = self.stack
        n = len(q)
        if not n:
            return False
        if n <= RX_CHUNK:
            frames = list(q)
            q.clear()
        else:
            pop = q.popleft
            frames = [pop() for _ in range(RX_CHUNK)]
        for f in frames:
            self._rx_bytes -= len(f)
        now = self.now()
        if self.pcap is not None:
            self._capture(frames)
        for f in frames:
            stack.receive_frame(f, now)
        self.flush()
        self._reread_tap()
        return True

    def _timer_due(self) -> float | None:
        """Run the stack's timer if it is due; return when it is next due (None: never)."""
        stack = self.stack
        t = stack.get_timer()
        if t is not None:
            now = self.now()
            if now >= t:
                stack.handle_timer(now)
                self.flush()
                t = stack.get_timer()
        return t

    async def _pump(self):
        """The hot path: one epoll set holds the tap and the components' hot fds (every host
        socket of the TCP, UDP and ICMP NATs). Each round reads the tap ahead into the rx
        queues, gives the stack up to RX_PER_ROUND frames and SYN_PER_ROUND SYNs, serves up to
        HOST_FDS_PER_ROUND ready host sockets, oldest events first (the rest wait in the
        backlog: one busy guest's thousands of flows cannot make a round long), then flushes. Busy rounds yield to trio
        every MAX_HOT_ROUNDS rounds or BUSY_SLICE seconds, and at once when trio's fd is ready;
        past the slice a round takes one chunk of each kind and yields, so trio's tasks (the
        API) get a turn every few milliseconds under any flood. The pump also runs the stack's
        timer (when idle, and whenever it yields).

        With the trio runner at hand, trio's own epoll fd is in the set too. Going idle with no
        other task scheduled, the pump sleeps in its set until the stack's timer or trio's next
        deadline; whenever trio's fd is ready (something another task waits for), it yields.
        That saves trio's per-wait registration, scheduling and deadline bookkeeping (a third
        of the daemon's CPU on a request/response) without starving the other tasks. The idle
        wait and both its modes are _triowait.PumpWait's."""
        ep, hot, tap_fd = self.hot_ep, self._hot, self.tap_fd
        poll = ep.poll
        ep.register(tap_fd, select.EPOLLIN)
        self._wait = waiter = PumpWait(ep, self.now)
        await waiter.start()
        wait, pending, trio_fd = waiter.wait, waiter.pending, waiter.trio_fd
        log.info("pump: %s", "sleeps in its own epoll set" if waiter.fast else
                 "waits through trio (no trio runner with an epoll backend at hand)")
        timer_due, now = self._timer_due, self.now
        read_tap, drain_tap, reread_tap = self._read_tap, self._drain_tap, self._reread_tap
        backlog, rx, rx_syn = self._backlog, self._rx, self._rx_syn
        popitem = backlog.popitem
        rounds = 0
        slice_end = now() + BUSY_SLICE
        try:
            while True:
                # (a poll(0) first, not the idle wait at once: on a request/response the
                # answer is mostly there already, and the wait's bookkeeping, the stack's timer
                # and trio's deadlines, costs more than the syscall)
                events = poll(0)
                if not events and not backlog and not rx and not rx_syn:
                    rounds = 0
                    events = await wait(timer_due())
                    if not events:
                        continue
                    slice_end = now() + BUSY_SLICE
                trio_ready = tap_ready = False
                for fd, mask in events:
                    if fd == tap_fd:
                        tap_ready = True
                    elif fd == trio_fd:
                        trio_ready = True
                    else:
                        backlog[fd] = backlog.get(fd, 0) | mask  # a new edge keeps its place
                if tap_ready:
                    drain_tap()
                if rx or rx_syn:
                    read_tap(slice_end)  # a burst of the guest's ACKs, then one answer
                served = False  # a host socket's handler ran since the last flush
                for i in range(HOST_FDS_PER_ROUND):
                    if not backlog:
                        break
                    fd, mask = popitem(last=False)
                    fn = hot.get(fd)
                    if fn is not None:
                        fn(fd, mask)
                        served = True
                    if i % HOST_CHUNK == HOST_CHUNK - 1:
                        self.flush()
                        served = False
                        reread_tap()
                        if now() >= slice_end:  # the slice is spent: trio's turn
                            break
                if served:  # (the rx chunks flushed themselves)
                    self.flush()
                rounds += 1
                if trio_ready or rounds >= MAX_HOT_ROUNDS or pending() or now() >= slice_end:
                    rounds = 0
                    timer_due()
                    await trio.lowlevel.checkpoint()
                    slice_end = now() + BUSY_SLICE
        finally:
            waiter.close()

    async def _writer(self):
        while True:
            await self._write_wakeup.wait()
            self._write_wakeup = trio.Event()
            while not self.tap.drain():
                await trio.lowlevel.wait_writable(self.tap_fd)

    async def _watch_exit_fd(self, fd: int, cancel: trio.CancelScope):
        handoff, self.exit_fd_handoff = self.exit_fd_handoff, None
        if handoff is not None:
            handoff()  # launch's SIGIO watch stops: from here on this task sees the EOF
        os.set_blocking(fd, False)
        while True:
            try:
                b = os.read(fd, 4096)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(fd)
                continue
            except OSError:
                break
            if not b:
                break
        log.info("exit fd closed")
        cancel.cancel()

    async def _watch_signals(self, cancel: trio.CancelScope, task_status=trio.TASK_STATUS_IGNORED):
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
            task_status.started()
            async for s in sigs:
                log.info("signal %s", s)
                cancel.cancel()
                return

    async def _watch_child(self, pid: int, cancel: trio.CancelScope):
        from .netns import exit_status
        pidfd = os.pidfd_open(pid)
        try:
            await trio.lowlevel.wait_readable(pidfd)
        finally:
            os.close(pidfd)
        _, status = os.waitpid(pid, 0)
        self.child_status = exit_status(status)
        cancel.cancel()

    async def _watch_target(self, pid: int, cancel: trio.CancelScope):
        """PID form: our tap fd pins the netns, so the tap never errors; the target dying is the
        sign that the guest network is gone. The pidfd was opened before ready when
        launch.run() started us (self.target_pidfd): the target may be gone, and reaped, by
        the time the loop runs."""
        pidfd, self.target_pidfd = self.target_pidfd, None
        if pidfd is None:
            try:
                pidfd = os.pidfd_open(pid)
            except OSError:
                return
        try:
            await trio.lowlevel.wait_readable(pidfd)
        finally:
            os.close(pidfd)
        self.exit_message = f"target process {pid} exited (guest network namespace gone)"
        self.exit_code = 1
        cancel.cancel()

    def _tap_gone(self, e) -> None:
        if self.exit_message is None:
            self.exit_message = str(e)
        self.exit_code = 1
        if self._main_cancel is not None:
            self._main_cancel.cancel()

    async def _guard(self, fn, cancel):
        try:
            await fn()
        except TapGone as e:
            self._tap_gone(e)
            cancel.cancel()

    async def main(self, child_pid: int | None = None, go_fd: int | None = None,
                   ready_written: bool = False):
        """ready_written: launch.run() wrote the ready (and go) byte before the loop existed."""
        # trio.current_time() looks the runner up on every call, a few times per frame
        self.now = trio.lowlevel.current_clock().current_time
        if self.stack is None:
            from .stack.stack import Stack
            self.stack = Stack(self.config, trio.current_time(), offload=self.offload)
        self.tap = Tap(self.tap_fd, self.stack.stats)
        self.child_status = None
        with trio.CancelScope() as cancel:
            self._main_cancel = cancel
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                await nursery.start(self._watch_signals, cancel)
                self.components = self._wiring(self)
                for comp in self.components:
                    await nursery.start(comp.serve)
                if self.config.enable_sandbox or self.config.enable_seccomp:
                    # everything is open now (tap, API socket, listeners, pcap): lock down
                    # before the first guest frame is read
                    from .sandbox import lockdown
                    lockdown(self)
                nursery.start_soon(self._guard, self._pump, cancel)
                nursery.start_soon(self._guard, self._writer, cancel)
                self.flush()
                if self.config.exit_fd is not None:
                    nursery.start_soon(self._watch_exit_fd, self.config.exit_fd, cancel)
                if child_pid is not None:
                    nursery.start_soon(self._watch_child, child_pid, cancel)
                elif self.config.netns_type == "pid" and self.config.target:
                    nursery.start_soon(self._watch_target, int(self.config.target), cancel)
                if self.config.ready_fd is not None and not ready_written:
                    _write_ready(self.config.ready_fd)
                log.info("ready: %d components, guest %s via tap %s", len(self.components),
                         self.config.guest, self.config.tap_name)
                if go_fd is not None:
                    os.write(go_fd, b"1")
                    os.close(go_fd)
        if child_pid is not None and self.child_status is None:
            # the tap died or a signal came: the command's namespace is gone or going; reap it
            if self.exit_message is None:
                try:
                    os.kill(child_pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
            _, status = os.waitpid(child_pid, 0)
            from .netns import exit_status
            self.child_status = exit_status(status)
            self.exit_message = None
        return self.exit_code


def _write_ready(fd: int) -> None:
    from .launch import write_ready
    write_ready(fd)


def _keep_heap_top() -> bool:
    """mallopt(M_TRIM_THRESHOLD, HEAP_TRIM) (glibc; elsewhere nothing changes). -> done."""
    import ctypes  # imported already (_lazy.known_libraries)
    try:
        return ctypes.CDLL(None).mallopt(-1, HEAP_TRIM) == 1  # -1: M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        return False


def run_loop(config, tap_fd: int, offload: int, prebound, child_pid: int | None,
             target_pidfd: int | None = None, exit_fd_handoff=None, connector=None) -> int:
    """The loop, once launch.run() has the tap fd, has opened the host sockets (``prebound``,
    listeners.Prebound) and has written the ready byte. -> exit status."""
    log.info("tap %s: %s", config.tap_name, "plain frames" if offload < 0 else
             f"virtio-net header, offload flags {offload:#x}")
    _keep_heap_top()
    d = Daemon(config, tap_fd, offload=offload)
    d.prebound = prebound
    d.target_pidfd = target_pidfd
    d.exit_fd_handoff = exit_fd_handoff
    d.connector = connector
    code = trio.run(d.main, child_pid, None, True)
    prebound.close()  # whatever no component took
    if d.exit_message:
        sys.stderr.write(f"slirpy: error: {d.exit_message}\n")
    if child_pid is not None:
        return d.child_status if d.child_status is not None else 1
    return code
