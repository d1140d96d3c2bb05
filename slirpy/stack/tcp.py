"""Sans-IO TCP engine: terminates the guest's TCP (RFC 9293 subset a NAT endpoint needs).

The contract between stack.py and the engine:

    engine = TcpEngine(config, emit, push_event, stats)
      emit(seg: TcpSegment) -> None   (family, src: bytes, sport, dst: bytes, dport, seq, ack,
          flags, window, options: bytes, payload: bytes | memoryview); stack.py builds the
          IP+TCP frame toward the guest (src = remote side, dst = guest).
      push_event(ev) -> None        appends to the stack's event queue (slirpy.stack.events)
      stats: slirpy.stack.stats.Stats

    engine.on_segment(family, src, sport, dst, dport, seq, ack, flags, window, options, payload, now)
          one checksum-verified segment from the guest; src/dst are packed addresses (bytes);
          options are the raw option bytes (parse with tcp_options.parse_tcp_options_untrusted);
          payload is a memoryview valid only during the call (copy what you keep).
    engine.get_timer() -> float | None ;  engine.handle_timer(now)
    engine.flush_pending(now)   called by Stack.frames_to_send(now) before draining, so the engine
          can emit coalesced ACKs and window updates once per batch of received frames.

  Glue calls (Stack delegates them to the engine):
    accept_tcp(flow, now); reject_tcp(flow, reason, now)   reason in {"refused","unreachable","timeout"}
    forget_syn(flow, reason, now): a refused SYN without an RST (Stack.refuse_tcp sends ICMP)
    send_tcp(flow, data, now) -> int (bytes taken); recv_tcp(flow, n, now) -> bytes
    send_room(flow) -> int (what send_tcp takes now); peek_tcp(flow) -> memoryview | None and
      consume_tcp(flow, n, now) (guest bytes leave the buffer only when the host took them)
    shutdown_tcp(flow, now) (host EOF -> FIN); reset_tcp(flow, now) (host RST -> RST)
    connect_tcp(family, src: str, sport, dst: str, dport, now) -> flow  (port forwarding: SYN to guest)
    flows() -> list[dict]  (for stats / list_flows)

Memory budget. `mem_bytes` is the exact number of bytes held in every flow's send buffer,
receive buffer and out-of-order queue, kept by an integer add at each point where one of them
changes (mem_recount() recomputes it from scratch for tests). All flows together hold at most
`mem_budget` bytes (config.tcp_mem_budget, default 128 MiB): a flow grows beyond its floor
(max(16 KiB, its MSS), capped by the per-flow buffer) only while the total is under 3/4 of the
budget, and up to its floor while the total is under the budget, so the last quarter keeps new
flows going. The budget shapes the window advertised to the guest (never retracting the right
edge already advertised) and how much send_tcp takes; guest data that would push the total past
the budget is dropped (`tcp_mem_drop`; only when the guest fills windows promised concurrently to
many flows). Flows cut short by the budget are remembered (_rwait, _swait) and woken from
flush_pending when bytes are freed: a window update, or TcpWritable. Bytes are accounted, not
flows: TIME_WAIT flows and flows with empty buffers cost nothing.
"""

from __future__ import annotations

import collections
import heapq
import ipaddress
import random
from typing import NamedTuple

from ..config import Config
from . import seq
from .events import (InternalError, TcpClosed, TcpConnected, TcpConnectRequest, TcpGuestEof,
                     TcpReadable, TcpReset, TcpWritable)
from .tcp_options import build_tcp_options, parse_tcp_options_untrusted
from .tcp_recovery import INIT_RTO, MAX_RETRIES, Recovery, retransmit_holes
from .tcp_state import (CONNECTED, FIN_UNACKED, GUEST_CLOSED, HANDSHAKE, HOST_CLOSED, RCV_OPEN,
                        SHOWN, SND_OPEN, TcpEvent, TcpState, move)

CLOSED, SYN_PENDING, SYN_SENT, SYN_RCVD = (TcpState.CLOSED, TcpState.SYN_PENDING,
                                           TcpState.SYN_SENT, TcpState.SYN_RCVD)
ESTABLISHED, DRAINING, TIME_WAIT = TcpState.ESTABLISHED, TcpState.DRAINING, TcpState.TIME_WAIT

# Our own bugs are loud in tests: tests/conftest.py (and the fuzz harnesses) set this, and an
# exception inside the engine is raised instead of resetting the flow it hit (_internal_error).
STRICT = False

FIN, SYN, RST, PSH, ACK, URG, ECE, CWR = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80
_MASK, _HALF = seq.MASK, seq.HALF  # for the per-segment window arithmetic

# The tuning values are Config fields (slirpy/config.py); these names are their defaults.
_DEFAULTS = Config()
BUF = _DEFAULTS.tcp_sndbuf  # per flow and direction
MEM_BUDGET = _DEFAULTS.tcp_mem_budget  # all flows' send + receive + out-of-order bytes together
MEM_FLOOR = 16 * 1024  # a flow may always hold max(MEM_FLOOR, its MSS) each way while under budget
WAKE_MISSES = 16  # a wake pass gives up after this many budget-limited flows it could not help
WAKE_RETRY = 0.2  # flows still wait while room is free (handed to flows that left it unused): retry
MAX_FLOWS = _DEFAULTS.max_tcp_flows
MAX_HALF_OPEN = _DEFAULTS.max_tcp_half_open
# At the half-open cap a new SYN evicts the oldest half-open flow only once that one is this old
# (a stale handshake: a guest that never ACKs, a host that never answers). While all are younger,
# the guest is opening connections faster than the loop completes them: its SYN is dropped and
# retransmitted (1 s, 3 s, ... later), so connects are admitted at the rate the loop serves them
# instead of resetting the ones nearly done.
HALF_OPEN_STALE = 3.0
# A lone in-order data segment is ACKed after at most this long, so that the host's answer can
# carry the ACK (one frame to the guest per request instead of two). Every second segment is
# ACKed at once, as are FINs, out-of-order data and window updates. Linux receivers wait 40 ms
# or more; slirp4netns does not wait at all. 1 ms bounds what a guest writing twice under Nagle
# before reading waits for the first ACK.
DELACK = _DEFAULTS.tcp_delack
MAX_OOO = 256  # out-of-order segments queued per flow (bytes are bounded by the window)
TIME_WAIT_LEN = 2.0  # seconds a closed flow answers late segments
PERSIST_MAX = 30.0


class TcpSegment(NamedTuple):
    """One segment toward the guest, as the engine hands it to `emit` (stack.py builds the IP+TCP
    frame). src/sport are the remote side, dst/dport the guest."""

    family: int
    src: bytes
    sport: int
    dst: bytes
    dport: int
    seq: int
    ack: int
    flags: int
    window: int  # as on the wire (already scaled down)
    options: bytes
    payload: bytes | memoryview


_new = tuple.__new__  # _new(TcpSegment, (...)): the namedtuple without its Python-level __new__


class _SendSide:
    """Host -> guest: what we send, how far the guest acknowledged it, the guest's window."""

    __slots__ = ("iss", "una", "nxt", "max", "wnd", "ws", "buf", "fin_seq", "want_writable",
                 "limited", "bytes")

    def __init__(self):
        self.iss = self.una = self.nxt = 0
        self.max = 0  # highest sequence number sent (nxt goes back on RTO; this never)
        self.wnd = 0  # the guest's window, scaled
        self.ws = 0  # the guest's window scale
        self.buf = None  # bytearray from the host, from una on (allocated lazily)
        self.fin_seq = None  # our FIN's sequence number, once sent
        self.want_writable = False  # send_tcp came up short: TcpWritable when there is room
        self.limited = False  # send_tcp was cut short by the memory budget (in _swait)
        self.bytes = 0  # bytes sent to the guest (list_flows' bytes_out)


class _RecvSide:
    """Guest -> host: what the guest sent us, the window we offer, the ACKs we owe."""

    __slots__ = ("nxt", "ws", "edge", "last_adv", "buf", "ooo", "ooo_bytes", "last_ooo",
                 "ack_pending", "unacked", "limited", "bytes")

    def __init__(self):
        self.nxt = 0
        self.ws = 0  # our window scale (0 unless the guest offered scaling)
        self.edge = 0  # right edge of the window advertised (never moves back): set with nxt
        self.last_adv = 0  # the window last advertised, bytes
        self.buf = None  # bytearray of guest bytes the host has not taken (allocated lazily)
        self.ooo = None  # dict seq -> (bytes, fin): out-of-order segments
        self.ooo_bytes = 0  # bytes held in ooo
        self.last_ooo = None  # seq of the most recent out-of-order segment (first SACK block)
        self.ack_pending = False  # a delayed ACK is owed (in the engine's _ack_set)
        self.unacked = 0  # in-order segments taken since our last ACK
        self.limited = False  # the last window advertised was cut by the memory budget (_rwait)
        self.bytes = 0  # bytes taken from the guest (list_flows' bytes_in)


class _Flow:
    """One connection: its addresses, its state (tcp_state.py), and three parts: snd (host to
    guest), rcv (guest to host), rec (RTT and loss recovery, tcp_recovery.py)."""

    __slots__ = ("id", "family", "key", "raddr", "rport", "gaddr", "gport", "state",
                 "close_queued", "eof_pushed", "mss", "sack_ok", "gen", "deadline", "born",
                 "snd", "rcv", "rec")

    def __init__(self, fid, family, key, raddr, rport, gaddr, gport):
        self.id, self.family, self.key = fid, family, key
        self.raddr, self.rport, self.gaddr, self.gport = raddr, rport, gaddr, gport
        self.state = CLOSED  # changed only by tcp_state.move
        self.close_queued = False  # the host closed during the handshake (tcp_state.py)
        self.eof_pushed = False  # TcpGuestEof pushed: the host has every guest byte
        self.mss = 536
        self.sack_ok = False
        self.gen = 0  # timer generation: heap entries of an older one are stale
        self.deadline = None  # the flow's one timer (RTO, persist, handshake, TIME_WAIT)
        self.born = 0.0  # when the flow's first SYN came or went
        self.snd = _SendSide()
        self.rcv = _RecvSide()
        self.rec = Recovery()


class TcpEngine:
    def __init__(self, config, emit, push_event, stats):
        self.config = config
        self._emit = emit
        self._push = push_event
        self.stats = stats
        self.sndbuf = config.tcp_sndbuf
        self.rcvbuf = config.tcp_rcvbuf
        self.max_flows = config.max_tcp_flows
        self.mem_budget = config.tcp_mem_budget
        self._soft = self.mem_budget - self.mem_budget // 4
        # the limits in force: _soft and mem_budget, less what a wake pass has handed out
        self._soft_lim, self._hard_lim = self._soft, self.mem_budget
        self.mem_bytes = 0  # exact: every flow's sbuf + rbuf + ooo bytes
        self._mem_freed = 0  # bytes freed since the last wake pass
        self._wake_at = None  # deadline of a retry pass (see WAKE_RETRY)
        # flows whose window / send_tcp the budget cut, longest waiting first (O(1) rotation)
        self._rwait: collections.OrderedDict[int, _Flow] = collections.OrderedDict()
        self._swait: collections.OrderedDict[int, _Flow] = collections.OrderedDict()
        self.isn = lambda: random.getrandbits(32)
        self._flows: dict[int, _Flow] = {}
        self._by_key: dict = {}
        self._next_id = 1
        self._heap: list = []
        self._ack_set: dict[int, _Flow] = {}  # flows owing the guest a delayed ACK
        self._delack_at = 0.0  # when the oldest of those is due
        self.delack = config.tcp_delack
        self.seg_max = 0  # > mss: the stack can hand the guest GSO segments this large (TSO)
        # half-open flows (SYN_PENDING, SYN_RCVD, SYN_SENT) oldest first: a SYN flood evicts these
        self._half_open: dict[int, _Flow] = {}
        self.max_half_open = config.max_tcp_half_open
        ws = 0
        while (self.rcvbuf >> ws) > 0xFFFF and ws < 14:
            ws += 1
        self._my_ws = ws

    # ------------------------------------------------------------------ helpers
    def _mss_for(self, family):
        return self.config.mss if family == 4 else self.config.mss6

    def _allow(self, held, want, floor):
        """How many of `want` more bytes a flow holding `held` bytes (one direction) may take
        now: anything while the total stays under 3/4 of the budget, up to `floor` while it
        stays under the budget. O(1)."""
        mem = self.mem_bytes
        g = self._soft_lim - mem
        if g >= want:
            return want
        if held < floor:
            h = self._hard_lim - mem
            if h > floor - held:
                h = floor - held
            if h > g:
                g = h
            if g >= want:
                return want
        return g if g > 0 else 0

    def _rcv_allow(self, f, n):
        """How many of n bytes of guest data the budget lets this flow take (the same rule as
        for windows, so flows past their floor never eat into the last quarter)."""
        return self._allow((len(f.rcv.buf) if f.rcv.buf else 0) + f.rcv.ooo_bytes, n,
                           min(self.rcvbuf, max(MEM_FLOOR, f.mss)))

    def _rwnd(self, f):
        """The receive window (bytes) the budget lets this flow offer now: the room in its
        buffer, cut by the budget (then the flow is flagged for a wake-up)."""
        rcv = f.rcv
        rl = len(rcv.buf) if rcv.buf else 0
        target = self.rcvbuf - rl
        if target <= 0 or f.state in GUEST_CLOSED:  # no more data will be taken
            return max(target, 0)
        w = self._allow(rl + rcv.ooo_bytes, target, min(self.rcvbuf, max(MEM_FLOOR, f.mss)))
        if w < target:
            if not rcv.limited:
                rcv.limited = True
                self._rwait[f.id] = f
                self.stats.drop("tcp_mem_cap_window")
        elif rcv.limited:
            rcv.limited = False
            self._rwait.pop(f.id, None)
        return w

    def _update_due(self, f, new_adv):
        """Receiver SWS avoidance (RFC 1122 4.2.3.3): is a window update worth a segment?"""
        return (new_adv - f.rcv.last_adv >= min(f.mss, self.rcvbuf // 2)
                or (f.rcv.last_adv < f.mss and new_adv >= f.mss))

    def _send(self, f, seqno, flags, payload=b"", options=b""):
        rcv = f.rcv
        # SACK blocks ride on segments without data only: with them a full-sized segment (mss
        # assumes no options) would exceed the MTU, or at MTU 65520 the 16-bit IP length
        if rcv.ooo and f.sack_ok and not options and not payload and flags & ACK and not flags & SYN:
            options = build_tcp_options(sack_blocks=self._sack_blocks(f))
        rb = rcv.buf
        w = self.rcvbuf - (len(rb) if rb else 0)
        if w <= 0 or rcv.limited or self.mem_bytes + w > self._soft_lim:
            w = self._rwnd(f)  # the budget may cut it (the common case needs no more than this)
        if flags & SYN:  # RFC 7323: the window of a SYN is never scaled
            if f.state is SYN_SENT:  # the guest's ISN is unknown: anchored on its SYN-ACK
                w = max(w, rcv.last_adv)
            else:
                w = max(w, seq.sub(rcv.edge, rcv.nxt))
            w = min(w, 0xFFFF)
            rcv.last_adv = w
            if f.state is not SYN_SENT:
                rcv.edge = seq.add(rcv.nxt, w)
        else:  # per segment: kept to integer operations
            ws = rcv.ws
            wire = w >> ws
            nxt = rcv.nxt
            p = (rcv.edge - nxt) & _MASK  # never move the right edge back (RFC 9293 3.8.6)
            if (wire << ws) < p < _HALF:
                wire = (p + (1 << ws) - 1) >> ws
            if wire > 0xFFFF:
                wire = 0xFFFF
            w = wire
            adv = rcv.last_adv = wire << ws
            rcv.edge = (nxt + adv) & _MASK  # >= the old edge, by the rounding up
        if flags & ACK:
            rcv.ack_pending = False
            rcv.unacked = 0
            self._ack_set.pop(f.id, None)
        self._emit(_new(TcpSegment, (f.family, f.raddr, f.rport, f.gaddr, f.gport, seqno,
                                     rcv.nxt if flags & ACK else 0, flags, w, options, payload)))

    def _sack_blocks(self, f):
        """RFC 2018: the block holding the most recent out-of-order segment first, then the
        others in sequence order; contiguous queued segments merge into one block."""
        rcv = f.rcv
        base = rcv.nxt
        spans = sorted((seq.sub(s, base), seq.sub(s, base) + len(b)) for s, (b, _) in rcv.ooo.items())
        merged = []
        for lo, hi in spans:
            if lo <= 0 and hi <= 0:
                continue
            if merged and lo <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], hi)
            else:
                merged.append([lo, hi])
        if rcv.last_ooo is not None:
            k = seq.sub(rcv.last_ooo, base)
            merged.sort(key=lambda m: not (m[0] <= k < m[1]))
        return [(seq.add(base, lo), seq.add(base, hi)) for lo, hi in merged[:4]]

    def _arm(self, f, deadline):
        f.gen += 1
        f.deadline = deadline
        if deadline is not None:
            heapq.heappush(self._heap, (deadline, f.id, f.gen))

    def _syn_options(self, f, peer_ws_ok=True):
        return build_tcp_options(mss=self._mss_for(f.family), wscale=self._my_ws if peer_ws_ok else None,
                                 sack_perm=True)

    def _remove(self, f, events=()):
        self._flows.pop(f.id, None)
        self._by_key.pop(f.key, None)
        self._ack_set.pop(f.id, None)
        self._half_open.pop(f.id, None)
        f.gen += 1
        move(f, TcpEvent.CLOSE)
        self._release(f)
        for ev in events:
            self._push(ev)

    def _release(self, f):
        """Drop the flow's buffers and give their bytes back to the budget."""
        snd, rcv = f.snd, f.rcv
        n = (len(snd.buf) if snd.buf else 0) + (len(rcv.buf) if rcv.buf else 0) + rcv.ooo_bytes
        if n:
            self.mem_bytes -= n
            self._mem_freed += n
        snd.buf = rcv.buf = rcv.ooo = None
        rcv.ooo_bytes = 0
        if rcv.limited:
            rcv.limited = False
            self._rwait.pop(f.id, None)
        if snd.limited:
            snd.limited = False
            self._swait.pop(f.id, None)

    def _abort(self, f, now, reason):
        self.stats.drop(reason)
        self._send(f, f.snd.nxt, RST | ACK)
        self._remove(f, (TcpReset(f.id), TcpClosed(f.id)))

    def _rst_pending(self, f):
        """RST to a SYN still waiting for the host connect (no ISN of ours chosen yet)."""
        self._emit(TcpSegment(f.family, f.raddr, f.rport, f.gaddr, f.gport, 0, f.rcv.nxt, RST | ACK,
                              0, b"", b""))

    def _rst_for(self, family, src, sport, dst, dport, seqno, ackno, flags, plen):
        if flags & RST:
            return
        if flags & ACK:
            self._emit(TcpSegment(family, dst, dport, src, sport, ackno, 0, RST, 0, b"", b""))
        else:
            n = plen + (1 if flags & SYN else 0) + (1 if flags & FIN else 0)
            self._emit(TcpSegment(family, dst, dport, src, sport, 0, seq.add(seqno, n), RST | ACK,
                                  0, b"", b""))

    def _new_flow(self, family, gaddr, gport, raddr, rport):
        fid = self._next_id
        self._next_id += 1
        key = (family, gaddr, gport, raddr, rport)
        f = _Flow(fid, family, key, raddr, rport, gaddr, gport)
        self._flows[fid] = f
        self._by_key[key] = f
        return f

    # ------------------------------------------------------------------ guest segments
    def on_segment(self, family, src, sport, dst, dport, seqno, ackno, flags, window, options,
                   payload, now):
        src, dst = bytes(src), bytes(dst)
        try:
            self._on_segment(family, src, sport, dst, dport, seqno, ackno, flags, window,
                             options, payload, now)
        except Exception as exc:  # guest bytes never make us raise: this is a bug of ours
            self._internal_error(self._by_key.get((family, src, sport, dst, dport)), exc, now)

    def _on_segment(self, family, src, sport, dst, dport, seqno, ackno, flags, window, options,
                    payload, now):
        f = self._by_key.get((family, src, sport, dst, dport))
        plen = len(payload)
        if f is None:
            if (flags & (SYN | ACK | RST)) == SYN:
                if len(self._flows) >= self.max_flows or len(self._half_open) >= self.max_half_open:
                    if not self._half_open:
                        self.stats.drop("tcp_flow_cap")
                        self._rst_for(family, src, sport, dst, dport, seqno, ackno, flags, plen)
                        return
                    # SYN flood: the oldest half-open flow makes room (RST to it, glue told),
                    # if it is stale; a burst of young ones is served first (HALF_OPEN_STALE)
                    old = next(iter(self._half_open.values()))
                    if now - old.born < HALF_OPEN_STALE:
                        self.stats.drop("tcp_syn_deferred")
                        return
                    self.stats.drop("tcp_half_open_evicted")
                    self.reset_tcp(old.id, now)
                opts = parse_tcp_options_untrusted(options)
                if isinstance(opts, str):
                    self.stats.drop(opts)
                    return
                f = self._new_flow(family, src, sport, dst, dport)
                move(f, TcpEvent.GUEST_SYN)
                f.born = now
                self._half_open[f.id] = f
                f.rcv.nxt = f.rcv.edge = seq.add(seqno, 1)
                f.mss = min(opts.mss or 536, self._mss_for(family))
                if opts.wscale is not None:
                    f.snd.ws, f.rcv.ws = opts.wscale, self._my_ws
                f.sack_ok = opts.sack_perm
                f.snd.wnd = window
                self._push(TcpConnectRequest(f.id, family, str(ipaddress.ip_address(src)), sport,
                                             str(ipaddress.ip_address(dst)), dport))
                return
            self.stats.drop("tcp_no_flow")
            self._rst_for(family, src, sport, dst, dport, seqno, ackno, flags, plen)
            return
        st = f.state
        if st is SYN_PENDING:
            if flags & RST and seqno == f.rcv.nxt:  # the guest gave up: cancel the host connect
                self._remove(f, (TcpReset(f.id), TcpClosed(f.id)))
            return  # retransmitted SYN (or anything else) while the host connect is pending
        if st is SYN_SENT:
            if flags & ACK and ackno != seq.add(f.snd.iss, 1):
                if not flags & RST:
                    self._rst_for(family, src, sport, dst, dport, seqno, ackno, flags, plen)
                return
            if flags & RST:
                if flags & ACK:
                    self._remove(f, (TcpReset(f.id), TcpClosed(f.id)))
                return
            if flags & SYN and flags & ACK:
                opts = parse_tcp_options_untrusted(options)
                if isinstance(opts, str):
                    opts = parse_tcp_options_untrusted(b"")
                f.mss = min(opts.mss or 536, self._mss_for(family))
                if opts.wscale is not None:
                    f.snd.ws, f.rcv.ws = opts.wscale, self._my_ws
                f.sack_ok = opts.sack_perm
                f.rcv.nxt = seq.add(seqno, 1)
                f.rcv.edge = seq.add(f.rcv.nxt, f.rcv.last_adv)  # the window our SYN offered
                f.snd.una = f.snd.nxt = f.snd.max = seq.add(f.snd.iss, 1)
                f.snd.wnd = window  # RFC 7323: the window of a <SYN,ACK> is never scaled
                self._established(f)
                f.rec.retries = 0
                self._half_open.pop(f.id, None)
                self._arm(f, None)
                self._send(f, f.snd.nxt, ACK)
                self._push(TcpConnected(f.id))
                self._output(f, now)
            return
        # synchronized states (and SYN_RCVD)
        snd, rnxt = f.snd, f.rcv.nxt
        if flags & RST:
            if seqno == rnxt:
                if st is DRAINING:
                    # both FINs are exchanged and acknowledged: the guest, closed already, answers
                    # a duplicate ACK with RST. Resetting the host side now would throw away the
                    # guest's last bytes still on their way to the host socket.
                    self.stats.drop("tcp_rst_after_close")
                    return
                self._remove(f, () if st is TIME_WAIT else (TcpReset(f.id), TcpClosed(f.id)))
            elif seq.between(rnxt, seqno, seq.add(rnxt, max(self.rcvbuf, 1))):
                self._send(f, snd.nxt, ACK)  # RFC 5961 challenge ACK
            return
        if st is TIME_WAIT:
            if (flags & (SYN | ACK)) == SYN and seq.gt(seqno, rnxt):
                self._remove(f)  # RFC 9293 3.10.7.4 / 6191: a new incarnation of the 4-tuple
                self._on_segment(family, src, sport, dst, dport, seqno, ackno, flags, window,
                                 options, payload, now)
                return
            if flags & FIN:
                self._send(f, snd.nxt, ACK)
            return
        if flags & SYN:
            if st is SYN_RCVD and seqno == seq.add(rnxt, -1) and not flags & ACK:
                self._send(f, snd.iss, SYN | ACK,
                           options=self._syn_options(f, f.rcv.ws or snd.ws))
                return
            self._send(f, snd.nxt, ACK)  # challenge ACK
            return
        if not flags & ACK:
            return
        if st is SYN_RCVD:
            if ackno != seq.add(snd.iss, 1):
                self._rst_for(family, src, sport, dst, dport, seqno, ackno, flags, plen)
                return
            snd.una = snd.nxt = snd.max = ackno
            self._half_open.pop(f.id, None)
            f.rec.retries = 0
            snd.wnd = window << snd.ws
            self._arm(f, None)
            self._established(f)
        if not self._process_ack(f, ackno, window, options, plen, flags, now):
            return  # it acknowledged what we never sent: dropped, payload, FIN and all
        if f.state is CLOSED:
            return
        if plen or flags & FIN:
            self._process_data(f, seqno, payload, flags, now)
        if f.state is not CLOSED:
            self._output(f, now)
            self._maybe_done(f, now)

    def _process_ack(self, f, ackno, window, options, plen, flags, now):
        """False: the segment must be dropped (RFC 9293 3.10.7.4, RFC 5961 5.2: an ACK of data
        never sent, or older than anything ever in flight, is answered with an ACK, and the
        segment, payload and FIN, goes no further)."""
        snd, rec = f.snd, f.rec
        if seq.gt(ackno, snd.max):
            self.stats.drop("tcp_ack_future")
            self._send(f, snd.nxt, ACK)
            return False
        if seq.gt(ackno, snd.nxt):  # after a go-back-N: the guest already had these bytes
            snd.nxt = ackno
        new_wnd = window << snd.ws
        blocks = ()
        if f.sack_ok and options and snd.una != snd.max:
            opts = parse_tcp_options_untrusted(options)
            if not isinstance(opts, str) and opts.sack_blocks:
                blocks = tuple((l, r) for l, r in opts.sack_blocks
                               if seq.lt(l, r) and seq.gt(l, ackno) and seq.le(r, snd.max))
                rec.sacked = blocks
        if seq.gt(ackno, snd.una):
            n = seq.sub(ackno, snd.una)
            data_n = min(n, len(snd.buf) if snd.buf else 0)
            if data_n:
                del snd.buf[:data_n]
                self.mem_bytes -= data_n
                self._mem_freed += data_n
            if snd.fin_seq is not None and f.state in FIN_UNACKED and seq.gt(ackno, snd.fin_seq):
                move(f, TcpEvent.FIN_ACKED)
            snd.una = ackno
            if rec.rtt_seq is not None and seq.ge(ackno, rec.rtt_seq):
                rec.rtt_sample(now - rec.rtt_t)
            snd.wnd = new_wnd
            if snd.una == snd.max:
                rec.sacked = ()
            if rec.on_new_ack(ackno):  # partial ACK: the next hole is lost too (RFC 6582)
                self._retransmit_holes(f)
            if snd.una == snd.nxt and not avail_unsent(snd):
                self._arm(f, None)
            else:
                self._arm(f, now + rec.rto)
            if snd.want_writable:
                self._writable(f)
        elif ackno == snd.una:
            if plen == 0 and not flags & FIN and snd.una != snd.max and new_wnd and (
                    new_wnd == snd.wnd or blocks):
                if rec.on_dupack(snd.una, snd.max, bool(blocks)):
                    self._retransmit_holes(f)
            if snd.wnd == 0 and new_wnd:
                rec.retries = 0
            snd.wnd = new_wnd
        elif seq.sub(snd.una, ackno) > self.sndbuf + 1:
            # older than anything that was ever in flight (RFC 5961 5.2 bounds it by the peer's
            # largest window; never more than our send buffer and a FIN here): a blind guess
            self.stats.drop("tcp_ack_too_old")
            self._send(f, snd.nxt, ACK)
            return False
        return True

    def _retransmit_holes(self, f):
        retransmit_holes(f.rec, f.snd.una, f.mss, lambda start, n: self._resend_range(f, start, n))

    def _resend_range(self, f, start, n):
        snd = f.snd
        off = seq.sub(start, snd.una)
        blen = len(snd.buf) if snd.buf else 0
        if off < 0:
            return False
        if off < blen:
            chunk = bytes(snd.buf[off:off + min(n, f.mss)])
            fl = ACK | PSH
            if snd.fin_seq is not None and seq.add(start, len(chunk)) == snd.fin_seq and off + len(chunk) == blen:
                fl |= FIN
            self._send(f, start, fl, chunk)
            return True
        if snd.fin_seq is not None and start == snd.fin_seq:
            self._send(f, start, ACK | FIN)
            return True
        return False

    def _process_data(self, f, seqno, payload, flags, now):
        snd, rcv = f.snd, f.rcv
        if f.state not in RCV_OPEN:  # the guest's FIN came already
            if plen_or_fin(payload, flags):
                self._send(f, snd.nxt, ACK)
            return
        data = payload
        off = seq.sub(rcv.nxt, seqno)
        fin = bool(flags & FIN)
        if off > 0:
            if off >= len(data) + (1 if fin else 0):
                self._send(f, snd.nxt, ACK)  # duplicate
                return
            if off >= len(data):
                data = b""
            else:
                data = data[off:]
            seqno = rcv.nxt
        room = self.rcvbuf - (len(rcv.buf) if rcv.buf else 0)
        if seqno != rcv.nxt:
            ahead = seq.sub(seqno, rcv.nxt)
            if ahead + len(data) > room:
                self.stats.drop("tcp_beyond_window")
            elif self._rcv_allow(f, len(data)) < len(data):
                self.stats.drop("tcp_mem_drop")
            elif rcv.ooo is None or (len(rcv.ooo) < MAX_OOO and  # overlapping copies count too
                                   rcv.ooo_bytes + len(data) <= self.rcvbuf):
                if rcv.ooo is None:
                    rcv.ooo = {}
                old = rcv.ooo.get(seqno)
                if old is None or len(old[0]) < len(data):
                    rcv.ooo[seqno] = (bytes(data), fin)
                    d = len(data) - (len(old[0]) if old is not None else 0)
                    rcv.ooo_bytes += d
                    self.mem_bytes += d
                rcv.last_ooo = seqno
            else:
                self.stats.drop("tcp_ooo_cap")
            self._send(f, snd.nxt, ACK)
            return
        if len(data) > room:
            data = data[:room]
            fin = False
            self.stats.drop("tcp_beyond_window")
        if data and self.mem_bytes + len(data) > self._soft:
            n = self._rcv_allow(f, len(data))  # windows promised to many flows at once
            if n < len(data):
                data = data[:n]
                fin = False
                self.stats.drop("tcp_mem_drop")
        was_empty = not rcv.buf
        self._accept(f, data, fin)
        while rcv.ooo and f.state in RCV_OPEN:  # the stream ends at the FIN: nothing past it
            hit = rcv.ooo.pop(rcv.nxt, None)
            if hit is None:
                for s in list(rcv.ooo):
                    d = seq.sub(rcv.nxt, s)
                    b, fn = rcv.ooo[s]
                    if d >= 0:
                        del rcv.ooo[s]
                        rcv.ooo_bytes -= len(b)
                        self.mem_bytes -= len(b)
                        if d < len(b) or (fn and d == len(b)):
                            hit = (b[d:], fn)
                            break
            else:
                rcv.ooo_bytes -= len(hit[0])
                self.mem_bytes -= len(hit[0])
            if hit is None:
                break
            room = self.rcvbuf - len(rcv.buf or b"")
            self._accept(f, hit[0][:room], hit[1] and len(hit[0]) <= room)
        if rcv.ooo and f.state not in RCV_OPEN:  # queued bytes beyond the FIN: never delivered
            self.stats.drop("tcp_data_after_fin")
            self.mem_bytes -= rcv.ooo_bytes
            self._mem_freed += rcv.ooo_bytes
            rcv.ooo_bytes = 0
            rcv.ooo = None
        if not rcv.ooo:
            rcv.ooo = None
        if was_empty and rcv.buf:
            self._push(TcpReadable(f.id))
        if fin and (f.state in HOST_CLOSED or rcv.ooo):  # closing both ways / a hole: ACK now
            self._send(f, snd.nxt, ACK)
        else:  # a FIN before ours is ACKed late too, so that our FIN (the host closing) carries it
            rcv.unacked += 1
            if rcv.unacked >= 2:
                self._send(f, snd.nxt, ACK)
            else:
                rcv.ack_pending = True
                if not self._ack_set:
                    self._delack_at = now + self.delack
                self._ack_set[f.id] = f
        if not rcv.buf and not f.eof_pushed and f.state in GUEST_CLOSED:
            f.eof_pushed = True
            self._push(TcpGuestEof(f.id))

    def _accept(self, f, data, fin):
        rcv = f.rcv
        n = len(data)
        if n:
            if rcv.buf is None:
                rcv.buf = bytearray(data)
            else:
                rcv.buf += data
            self.mem_bytes += n
            rcv.nxt = (rcv.nxt + n) & _MASK
            rcv.bytes += n
        if fin:
            move(f, TcpEvent.GUEST_FIN)
            rcv.nxt = seq.add(rcv.nxt, 1)

    # ------------------------------------------------------------------ output
    def _output(self, f, now):
        snd = f.snd
        if f.state not in CONNECTED:
            return
        closing = f.state in HOST_CLOSED
        blen = len(snd.buf) if snd.buf else 0
        while True:
            off = seq.sub(snd.nxt, snd.una)
            if snd.fin_seq is not None and seq.gt(snd.nxt, snd.fin_seq):
                break
            avail = blen - off
            win_room = snd.wnd - off
            if avail > 0 and win_room > 0:
                seg = f.mss
                if self.seg_max > seg:
                    seg = self.seg_max - self.seg_max % seg
                n = min(avail, win_room, seg)
                chunk = snd.buf[off:off + n]
                fl = ACK | PSH
                fin_now = closing and off + n == blen
                if fin_now:
                    fl |= FIN
                    snd.fin_seq = seq.add(snd.nxt, n)
                self._send(f, snd.nxt, fl, chunk)
                if f.rec.rtt_seq is None and snd.nxt == snd.max:
                    f.rec.rtt_seq, f.rec.rtt_t = seq.add(snd.nxt, n), now
                if f.deadline is None or snd.una == snd.nxt:
                    self._arm(f, now + f.rec.rto)
                snd.nxt = seq.add(snd.nxt, n + (1 if fin_now else 0))
                if seq.gt(snd.nxt, snd.max):
                    snd.bytes += seq.sub(snd.nxt, snd.max) - (1 if fin_now else 0)
                    snd.max = snd.nxt
                continue
            if avail <= 0 and closing and (snd.fin_seq is None or snd.nxt == snd.fin_seq):
                snd.fin_seq = snd.nxt
                self._send(f, snd.nxt, ACK | FIN)
                if f.deadline is None or snd.una == snd.nxt:
                    self._arm(f, now + f.rec.rto)
                snd.nxt = seq.add(snd.nxt, 1)
                snd.max = seq.max_seq(snd.max, snd.nxt)
            break
        if snd.wnd == 0 and f.deadline is None and snd.una == snd.nxt and avail_unsent(snd):
            self._arm(f, now + f.rec.rto)  # persist timer

    def _established(self, f):
        move(f, TcpEvent.ESTABLISHED)
        if f.close_queued:  # the host closed during the handshake (RFC 9293 3.10.4)
            f.close_queued = False
            move(f, TcpEvent.HOST_CLOSE)

    def _maybe_done(self, f, now):
        if f.state is DRAINING and f.eof_pushed:
            move(f, TcpEvent.DRAINED)
            self._release(f)
            self._arm(f, now + TIME_WAIT_LEN)
            self._push(TcpClosed(f.id))

    # ------------------------------------------------------------------ timers
    def get_timer(self):
        h = self._heap
        t = None
        while h:
            d, fid, gen = h[0]
            f = self._flows.get(fid)
            if f is None or f.gen != gen:
                heapq.heappop(h)
                continue
            t = d
            break
        if self._ack_set and (t is None or self._delack_at < t):
            t = self._delack_at
        w = self._wake_at
        if w is not None and (t is None or w < t):
            t = w
        return t

    def handle_timer(self, now):
        if self._wake_at is not None and self._wake_at <= now:
            self._wake_at = None
            if self._rwait or self._swait:
                self._wake(now)
        h = self._heap
        while h and h[0][0] <= now:
            d, fid, gen = heapq.heappop(h)
            f = self._flows.get(fid)
            if f is None or f.gen != gen:
                continue
            f.deadline = None
            try:
                self._fire(f, now)
            except Exception as exc:
                self._internal_error(f, exc, now)

    def _internal_error(self, f, exc, now):
        """An exception inside the engine, a bug of ours (guest bytes are answered or counted,
        never raised). Under tests (STRICT) it is raised; in production the flow it hit is reset
        (RST to the guest, TcpReset + TcpClosed to the glue), the error counted
        (`tcp_internal_error`) and handed to the glue (InternalError) to log, rate-limited."""
        if STRICT:
            raise exc
        self.stats.drop("tcp_internal_error")
        self._push(InternalError("tcp", f.id if f is not None else None,
                                 f"{type(exc).__name__}: {exc}"))
        if f is None or self._flows.get(f.id) is not f:
            return
        st = f.state
        try:
            if st is SYN_PENDING:
                self._rst_pending(f)
            elif st is SYN_SENT:
                self._send(f, f.snd.nxt, RST)
            elif st is not TIME_WAIT:
                self._send(f, f.snd.nxt, RST | ACK)
        except Exception:  # the flow's state is what broke: it goes without an RST
            pass
        try:
            self._remove(f, () if st is TIME_WAIT else (TcpReset(f.id), TcpClosed(f.id)))
        except Exception:  # never leave a flow the engine cannot handle in its tables
            for d in (self._flows, self._ack_set, self._half_open, self._rwait, self._swait):
                d.pop(f.id, None)
            self._by_key.pop(f.key, None)
            if st is not TIME_WAIT:
                self._push(TcpReset(f.id))
                self._push(TcpClosed(f.id))

    def _fire(self, f, now):
        st, snd, rec = f.state, f.snd, f.rec
        if st is TIME_WAIT:
            self._remove(f)
            return
        if st is SYN_SENT or st is SYN_RCVD:
            rec.retries += 1
            if rec.retries > MAX_RETRIES // 2 + 1:
                self._abort(f, now, "tcp_handshake_timeout")
                return
            if st is SYN_SENT:
                self._send(f, snd.iss, SYN, options=self._syn_options(f))
            else:
                self._send(f, snd.iss, SYN | ACK, options=self._syn_options(f, f.rcv.ws or snd.ws))
            rec.backoff()
            self._arm(f, now + rec.rto)
            return
        if st not in CONNECTED:
            return
        if snd.wnd == 0 and avail_unsent(snd) and seq.sub(snd.max, snd.una) <= 1:
            # zero-window probe: one byte past the edge; its ACK is accepted if the guest takes it
            self._send(f, snd.una, ACK, bytes(snd.buf[:1]))
            snd.max = seq.add(snd.una, 1)
            rec.retries = min(rec.retries + 1, 16)
            self._arm(f, now + min(PERSIST_MAX, rec.rto * (1 << rec.retries)))
            return
        if snd.una == snd.max:
            if avail_unsent(snd):
                self._output(f, now)
            return
        rec.retries += 1
        if rec.retries > MAX_RETRIES and snd.wnd != 0:
            self._abort(f, now, "tcp_retransmit_timeout")
            return
        rec.go_back_n()
        # go back N: resend from snd_una (the guest's ACKs move snd_nxt past what it holds)
        snd.nxt = snd.una
        self._arm(f, None)
        if snd.wnd == 0 and snd.buf:
            # the window shut with data in flight: _output would send nothing, so probe with
            # the first byte (RFC 9293 3.8.6.1: keep retransmitting while the window is zero;
            # the probe's ACK brings the window back if the guest's own update was lost)
            self._send(f, snd.una, ACK, bytes(snd.buf[:1]))
            snd.nxt = seq.add(snd.una, 1)
            self._arm(f, now + rec.rto)
            return
        self._output(f, now)
        if f.deadline is None:
            self._arm(f, now + rec.rto)

    def flush_pending(self, now):
        if self._ack_set and now >= self._delack_at:
            for f in list(self._ack_set.values()):
                if f.rcv.ack_pending and f.state is not CLOSED:
                    self._send(f, f.snd.nxt, ACK)
            self._ack_set.clear()
        if self._mem_freed and (self._rwait or self._swait):
            self._wake(now)

    def _wake(self, now):
        """Bytes were freed: window updates to flows whose window the budget cut, TcpWritable
        to flows whose send_tcp it cut, longest waiting first, while the room lasts. Room handed
        out is taken off the limits in force so the same bytes are not offered twice in one pass.
        Each flow looked at goes to the back; WAKE_MISSES flows that could not be given a
        worthwhile update end the pass (the next freed bytes start another), so a pass costs
        O(flows woken + WAKE_MISSES), not O(flows waiting)."""
        self._mem_freed = 0
        try:
            for waiting, rcv in ((self._rwait, True), (self._swait, False)):
                misses = 0
                for _ in range(len(waiting)):
                    if not waiting or misses >= WAKE_MISSES or self.mem_bytes >= self._hard_lim:
                        break
                    f = next(iter(waiting.values()))
                    waiting.move_to_end(f.id)  # served or not, its turn is over
                    if rcv:
                        if f.state not in RCV_OPEN:
                            f.rcv.limited = False
                            del waiting[f.id]
                            continue
                        if self._update_due(f, self._rwnd(f)):
                            old = f.rcv.edge if seq.gt(f.rcv.edge, f.rcv.nxt) else f.rcv.nxt
                            self._send(f, f.snd.nxt, ACK)
                            self._handed(max(0, seq.sub(f.rcv.edge, old)))
                            continue
                    else:
                        r = self._writable(f)
                        if r:
                            self._handed(r)
                            continue
                    misses += 1
        finally:
            self._soft_lim, self._hard_lim = self._soft, self.mem_budget
        # room that flows were offered but left unused would otherwise wait for the next bytes
        # freed, which may never come: look again a little later
        self._wake_at = (now + WAKE_RETRY if (self._rwait or self._swait)
                         and self.mem_bytes < self.mem_budget else None)

    def _handed(self, n):
        self._soft_lim -= n
        self._hard_lim -= n

    def _send_allow(self, f, want):
        sl = len(f.snd.buf) if f.snd.buf else 0
        return self._allow(sl, want, min(self.sndbuf, max(MEM_FLOOR, f.mss)))

    def _writable(self, f):
        """f.snd.want_writable: push TcpWritable if the flow has worthwhile room (its buffer and the
        budget); return that room, or 0 (then the flow waits in _swait for freed bytes)."""
        snd = f.snd
        room = self.sndbuf - (len(snd.buf) if snd.buf else 0)
        if room <= 0 or f.state not in SND_OPEN or f.close_queued:
            if snd.limited:
                snd.limited = False
                self._swait.pop(f.id, None)
            return 0
        r = self._send_allow(f, room)
        if r < room and r < f.mss:  # the budget leaves less than a segment: wait for more
            if not snd.limited:
                snd.limited = True
                self._swait[f.id] = f
            return 0
        if snd.limited:
            snd.limited = False
            self._swait.pop(f.id, None)
        snd.want_writable = False
        self._push(TcpWritable(f.id))
        return r

    def compact(self):
        """After a crowd of flows closed (the glue's memory trim): the timer heap without the
        stale entries of flows gone, and the tables rebuilt at their present size (a dict never
        shrinks by deleting)."""
        flows = self._flows
        self._heap[:] = [e for e in self._heap
                         if (f := flows.get(e[1])) is not None and f.gen == e[2]]
        heapq.heapify(self._heap)
        for d in (flows, self._by_key, self._ack_set, self._half_open, self._rwait, self._swait):
            _rebuild(d)

    def mem_recount(self):
        """The bytes held in every flow's buffers, recounted from scratch (tests: == mem_bytes)."""
        total = 0
        for f in self._flows.values():
            ob = sum(len(v[0]) for v in f.rcv.ooo.values()) if f.rcv.ooo else 0
            if ob != f.rcv.ooo_bytes:
                raise AssertionError(f"flow {f.id}: ooo_bytes {f.rcv.ooo_bytes} != {ob}")
            if f.rcv.limited != (f.id in self._rwait) or f.snd.limited != (f.id in self._swait):
                raise AssertionError(f"flow {f.id}: budget wait flags out of step")
            sb, rb = f.snd.buf, f.rcv.buf
            total += (len(sb) if sb else 0) + (len(rb) if rb else 0) + ob
        if any(fid not in self._flows for fid in (*self._rwait, *self._swait)):
            raise AssertionError("a removed flow is still waiting for the budget")
        return total

    def tally(self):
        """For get_stats: (flows per state as list_flows shows it, bytes in the send buffers,
        in the receive buffers, in the out-of-order queues). O(flows)."""
        states = collections.Counter()
        sbuf = rbuf = ooo = 0
        for f in self._flows.values():
            states[SHOWN[f.state]] += 1
            b = f.snd.buf
            sbuf += len(b) if b is not None else 0
            b = f.rcv.buf
            rbuf += len(b) if b is not None else 0
            ooo += f.rcv.ooo_bytes
        return states, sbuf, rbuf, ooo

    def mem_stats(self):
        return {"tcp_mem_bytes": self.mem_bytes, "tcp_mem_budget": self.mem_budget,
                "tcp_mem_window_limited": len(self._rwait), "tcp_mem_send_limited": len(self._swait)}

    # ------------------------------------------------------------------ glue API
    def accept_tcp(self, flow, now):
        f = self._flows.get(flow)
        if f is None or f.state is not SYN_PENDING:
            return
        f.snd.iss = self.isn() & seq.MASK
        f.snd.una = f.snd.iss
        f.snd.nxt = f.snd.max = seq.add(f.snd.iss, 1)
        move(f, TcpEvent.ACCEPT)
        self._send(f, f.snd.iss, SYN | ACK,
                   options=self._syn_options(f, f.rcv.ws != 0 or f.snd.ws != 0))
        self._arm(f, now + INIT_RTO)

    def reject_tcp(self, flow, reason, now):
        f = self._flows.get(flow)
        if f is None:
            return
        self.stats.drop("tcp_connect_" + str(reason))
        if f.state is SYN_PENDING:
            self._rst_pending(f)
        else:
            self._send(f, f.snd.nxt, RST | ACK)
        self._remove(f, (TcpClosed(f.id),))

    def forget_syn(self, flow, reason, now):
        """The glue refuses a guest's SYN with no TCP answer (the stack answers with ICMP, or not
        at all): the pending flow goes without an RST. -> (family, guest, gport, remote, rport,
        isn) of the SYN, or None when the flow is gone or past its SYN (then reset as reject_tcp)."""
        f = self._flows.get(flow)
        if f is None:
            return None
        if f.state is not SYN_PENDING:
            self.reject_tcp(flow, reason, now)
            return None
        self.stats.drop("tcp_connect_" + str(reason))
        syn = (f.family, f.gaddr, f.gport, f.raddr, f.rport, seq.add(f.rcv.nxt, -1))
        self._remove(f, (TcpClosed(f.id),))
        return syn

    def send_tcp(self, flow, data, now):
        f = self._flows.get(flow)
        if f is None or f.state not in SND_OPEN or f.close_queued:
            return 0
        snd = f.snd
        if snd.buf is None:
            snd.buf = bytearray()
        want = min(self.sndbuf - len(snd.buf), len(data))
        n = want
        if want > 0 and self.mem_bytes + want > self._soft_lim:
            n = self._send_allow(f, want)
        if n < len(data):
            snd.want_writable = True
            if n < want and not snd.limited:  # the budget, not the buffer, cut it: wake it later
                snd.limited = True
                self._swait[f.id] = f
                self.stats.drop("tcp_mem_cap_send")
        if n > 0:
            snd.buf += data if n == len(data) else memoryview(data)[:n]
            self.mem_bytes += n
            self._output(f, now)
        return n

    def send_room(self, flow):
        """How many bytes send_tcp would take now (the glue reads no more than that from the
        host, so no host byte waits outside the budget). 0: TcpWritable comes when there is
        worthwhile room (a segment, or the whole buffer), as after a short send_tcp."""
        f = self._flows.get(flow)
        if f is None or f.state not in SND_OPEN or f.close_queued:
            return 0
        snd = f.snd
        room = self.sndbuf - (len(snd.buf) if snd.buf else 0)
        if room > 0 and self.mem_bytes + room > self._soft_lim:
            n = self._send_allow(f, room)
            if n < room and n < f.mss:  # less than a segment: wait for more (as _writable does)
                if not snd.limited:
                    snd.limited = True
                    self._swait[f.id] = f
                    self.stats.drop("tcp_mem_cap_send")
                n = 0
            room = n
        if room <= 0:
            snd.want_writable = True
            return 0
        return room

    def peek_tcp(self, flow):
        """The guest bytes waiting for the host, as a memoryview over the receive buffer
        (release it before the next call into the engine), or None. They stay in the buffer,
        counted in the budget and keeping the window shut, until consume_tcp."""
        f = self._flows.get(flow)
        if f is None or not f.rcv.buf:
            return None
        return memoryview(f.rcv.buf)

    def consume_tcp(self, flow, n, now):
        """The host took n of the bytes peek_tcp showed."""
        f = self._flows.get(flow)
        if f is None or not f.rcv.buf or n <= 0:
            return
        rb = f.rcv.buf
        if n >= len(rb):
            n = len(rb)
            f.rcv.buf = None
        else:
            del rb[:n]
        self._consumed(f, n, now)

    def recv_tcp(self, flow, n, now):
        f = self._flows.get(flow)
        if f is None or not f.rcv.buf:
            return b""
        rb = f.rcv.buf
        if n >= len(rb):
            out, f.rcv.buf = rb, None  # all of it: hand the buffer over, no copy
        else:
            out = rb[:n]
            del rb[:n]
        self._consumed(f, len(out), now)
        return out

    def _consumed(self, f, n, now):
        rcv = f.rcv
        self.mem_bytes -= n
        self._mem_freed += n
        # a window update goes at once when the guest may be short of window; otherwise an ACK
        # already owed (sent within DELACK, or carried by the answer) brings the new window
        if f.state in RCV_OPEN and not (
                rcv.ack_pending and rcv.last_adv >= f.mss) and self._update_due(f, self._rwnd(f)):
            self._send(f, f.snd.nxt, ACK)
        if not rcv.buf:
            rcv.buf = None
            if f.state in GUEST_CLOSED and not f.eof_pushed:
                f.eof_pushed = True
                self._push(TcpGuestEof(f.id))
                self._maybe_done(f, now)

    def shutdown_tcp(self, flow, now):
        f = self._flows.get(flow)
        if f is None or f.close_queued or f.state in HOST_CLOSED:
            return
        if f.state in HANDSHAKE:
            f.close_queued = True  # the FIN follows the handshake (and the data before it)
        move(f, TcpEvent.HOST_CLOSE)
        self._output(f, now)
        self._maybe_done(f, now)

    def reset_tcp(self, flow, now):
        f = self._flows.get(flow)
        if f is None:
            return
        st = f.state
        if st is SYN_PENDING:
            self._rst_pending(f)
        elif st is SYN_SENT:  # the guest's ISN is unknown: a bare RST at our SYN's end
            self._send(f, f.snd.nxt, RST)
        elif st is not TIME_WAIT:
            self._send(f, f.snd.nxt, RST | ACK)
        self._remove(f, () if st is TIME_WAIT else (TcpClosed(f.id),))

    def connect_tcp(self, family, src, sport, dst, dport, now):
        raddr = ipaddress.ip_address(src).packed
        gaddr = ipaddress.ip_address(dst).packed
        old = self._by_key.get((family, gaddr, dport, raddr, sport))
        if old is not None and old.state is TIME_WAIT:
            # the host reuses a port whose last flow we still hold in TIME_WAIT (Linux does so
            # at once on loopback, tcp_tw_reuse=2): the new connection wins, as RFC 6191 allows
            self._remove(old, ())
            self.stats.drop("tcp_time_wait_recycled")
        if len(self._flows) >= self.max_flows or (family, gaddr, dport, raddr, sport) in self._by_key:
            self.stats.drop("tcp_flow_cap")
            return None
        f = self._new_flow(family, gaddr, dport, raddr, sport)
        move(f, TcpEvent.CONNECT)
        f.born = now
        self._half_open[f.id] = f
        f.mss = self._mss_for(family)
        f.snd.iss = self.isn() & seq.MASK
        f.snd.una = f.snd.iss
        f.snd.nxt = f.snd.max = seq.add(f.snd.iss, 1)
        self._send(f, f.snd.iss, SYN, options=self._syn_options(f))
        self._arm(f, now + INIT_RTO)
        return f.id

    def flows(self):
        out = []
        for f in self._flows.values():
            out.append({"id": f.id, "family": f.family,
                        "src": str(ipaddress.ip_address(f.gaddr)), "sport": f.gport,
                        "dst": str(ipaddress.ip_address(f.raddr)), "dport": f.rport,
                        "state": SHOWN[f.state], "bytes_in": f.rcv.bytes, "bytes_out": f.snd.bytes})
        return out


def _rebuild(d):
    """d again, in a table of its present size (in place: others hold references to it)."""
    items = list(d.items())
    d.clear()
    d.update(items)


def plen_or_fin(payload, flags):
    return len(payload) or flags & FIN


def avail_unsent(snd):
    """The send side holds bytes not yet sent (from nxt on)."""
    b = snd.buf
    return b is not None and len(b) > seq.sub(snd.nxt, snd.una)
