"""Sans-IO TCP engine: terminates the guest's TCP (RFC 9293 subset a NAT endpoint needs).

The contract between stack.py and the engine, fixed here so both can be built side by side:

    engine = TcpEngine(config, emit, push_event, stats)
      emit(family, src: bytes, sport, dst: bytes, dport, seq, ack, flags, window,
           options: bytes, payload: bytes | memoryview) -> None
          stack.py builds the IP+TCP frame toward the guest (src = remote side, dst = guest).
      push_event(ev) -> None        appends to the stack's event queue (slirpy.stack.events)
      stats: slirpy.stack.stats.Stats

    engine.on_segment(family, src, sport, dst, dport, seq, ack, flags, window, options, payload, now)
          one checksum-verified segment from the guest; src/dst are packed addresses (bytes);
          options are the raw option bytes (parse with tcp_options.parse_tcp_options_untrusted);
          payload is a memoryview valid only during the call (copy what you keep).
    engine.get_timer() -> float | None ;  engine.handle_timer(now)
    engine.flush_pending(now)   called by Stack.frames_to_send() before draining, so the engine
          can emit coalesced ACKs and window updates once per batch of received frames.

  Glue calls (Stack delegates them to the engine):
    accept_tcp(flow, now); reject_tcp(flow, reason, now)   reason in {"refused","unreachable","timeout"}
    send_tcp(flow, data, now) -> int (bytes taken); recv_tcp(flow, n, now) -> bytes
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

from . import seq
from .events import (TcpClosed, TcpConnected, TcpConnectRequest, TcpGuestEof, TcpReadable,
                     TcpReset, TcpWritable)
from .tcp_options import build_tcp_options, parse_tcp_options_untrusted

FIN, SYN, RST, PSH, ACK, URG, ECE, CWR = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80
_MASK, _HALF = seq.MASK, seq.HALF  # for the per-segment window arithmetic

BUF = 256 * 1024
MEM_BUDGET = 128 * 1024 * 1024  # all flows' send + receive + out-of-order bytes together
MEM_FLOOR = 16 * 1024  # a flow may always hold max(MEM_FLOOR, its MSS) each way while under budget
WAKE_MISSES = 16  # a wake pass gives up after this many budget-limited flows it could not help
WAKE_RETRY = 0.2  # flows still wait while room is free (handed to flows that left it unused): retry
MAX_FLOWS = 10000
MAX_HALF_OPEN = 1024
MIN_RTO, MAX_RTO, INIT_RTO = 0.2, 60.0, 1.0
MAX_RETRIES = 8
# A lone in-order data segment is ACKed after at most this long, so that the host's answer can
# carry the ACK (one frame to the guest per request instead of two). Every second segment is
# ACKed at once, as are FINs, out-of-order data and window updates. Linux receivers wait 40 ms
# or more; slirp4netns does not wait at all. 1 ms bounds what a guest writing twice under Nagle
# before reading waits for the first ACK.
DELACK = 0.001
MAX_OOO = 256  # out-of-order segments queued per flow (bytes are bounded by the window)
TIME_WAIT = 2.0
PERSIST_MAX = 30.0
# The catch-alls around on_segment and the timers count our own bugs as tcp_internal_error so a
# guest can never crash the daemon; tests/conftest.py sets STRICT so the tests see them raise.
STRICT = False


class _Flow:
    __slots__ = ("id", "family", "key", "raddr", "rport", "gaddr", "gport", "state", "iss",
                 "snd_una", "snd_nxt", "snd_wnd", "snd_ws", "rcv_ws", "rcv_nxt", "mss",
                 "sbuf", "rbuf", "ooo", "fin_pending", "fin_seq", "fin_acked", "their_fin",
                 "eof_pushed", "rto", "srtt", "rttvar", "retries", "rtt_seq", "rtt_t", "dupacks",
                 "ack_pending", "unacked", "gen", "deadline", "want_writable", "bytes_in",
                 "bytes_out", "sack_ok", "last_adv", "retransmitted", "snd_max", "recover",
                 "rexmit_hi", "sacked", "last_ooo", "ooo_bytes", "rcv_edge", "rlim", "slim")

    def __init__(self, fid, family, key, raddr, rport, gaddr, gport):
        self.id, self.family, self.key = fid, family, key
        self.raddr, self.rport, self.gaddr, self.gport = raddr, rport, gaddr, gport
        self.state = "CLOSED"
        self.iss = self.snd_una = self.snd_nxt = self.rcv_nxt = 0
        self.snd_wnd = 0
        self.snd_ws = self.rcv_ws = 0
        self.mss = 536
        self.sbuf = None  # bytearray, allocated lazily
        self.rbuf = None
        self.ooo = None  # dict seq -> bytes
        self.fin_pending = False
        self.fin_seq = None
        self.fin_acked = False
        self.their_fin = False
        self.eof_pushed = False
        self.rto, self.srtt, self.rttvar = INIT_RTO, None, 0.0
        self.retries = 0
        self.rtt_seq = self.rtt_t = None
        self.dupacks = 0
        self.ack_pending = False
        self.unacked = 0
        self.gen = 0
        self.deadline = None
        self.want_writable = False
        self.bytes_in = self.bytes_out = 0
        self.sack_ok = False
        self.last_adv = 0
        self.retransmitted = False
        self.snd_max = 0  # highest sequence number sent (snd_nxt goes back on RTO; this never)
        self.recover = None  # fast recovery until snd_una reaches this (RFC 6582)
        self.rexmit_hi = 0  # highest byte retransmitted in this recovery
        self.sacked = ()  # the guest's latest SACK blocks within (snd_una, snd_max]
        self.last_ooo = None  # seq of the most recent out-of-order segment (first SACK block)
        self.ooo_bytes = 0  # bytes held in ooo
        self.rcv_edge = 0  # right edge of the window advertised (never moves back): set with rcv_nxt
        self.rlim = False  # the last window advertised was cut by the memory budget (in _rwait)
        self.slim = False  # send_tcp was cut short by the memory budget (in _swait)


class TcpEngine:
    def __init__(self, config, emit, push_event, stats):
        self.config = config
        self._emit = emit
        self._push = push_event
        self.stats = stats
        self.sndbuf = getattr(config, "tcp_sndbuf", BUF)
        self.rcvbuf = getattr(config, "tcp_rcvbuf", BUF)
        self.max_flows = getattr(config, "max_tcp_flows", MAX_FLOWS)
        self.mem_budget = getattr(config, "tcp_mem_budget", MEM_BUDGET)
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
        self.delack = getattr(config, "tcp_delack", DELACK)
        self.seg_max = 0  # > mss: the stack can hand the guest GSO segments this large (TSO)
        # half-open flows (SYN_PENDING, SYN_RCVD, SYN_SENT) oldest first: a SYN flood evicts these
        self._half_open: dict[int, _Flow] = {}
        self.max_half_open = getattr(config, "max_tcp_half_open", MAX_HALF_OPEN)
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
        return self._allow((len(f.rbuf) if f.rbuf else 0) + f.ooo_bytes, n,
                           min(self.rcvbuf, max(MEM_FLOOR, f.mss)))

    def _rwnd(self, f):
        """The receive window (bytes) the budget lets this flow offer now: the room in its
        buffer, cut by the budget (then the flow is flagged for a wake-up)."""
        rl = len(f.rbuf) if f.rbuf else 0
        target = self.rcvbuf - rl
        if target <= 0 or f.their_fin or f.state == "TIME_WAIT":  # no more data will be taken
            return max(target, 0)
        w = self._allow(rl + f.ooo_bytes, target, min(self.rcvbuf, max(MEM_FLOOR, f.mss)))
        if w < target:
            if not f.rlim:
                f.rlim = True
                self._rwait[f.id] = f
                self.stats.drop("tcp_mem_cap_window")
        elif f.rlim:
            f.rlim = False
            self._rwait.pop(f.id, None)
        return w

    def _update_due(self, f, new_adv):
        """Receiver SWS avoidance (RFC 1122 4.2.3.3): is a window update worth a segment?"""
        return (new_adv - f.last_adv >= min(f.mss, self.rcvbuf // 2)
                or (f.last_adv < f.mss and new_adv >= f.mss))

    def _send(self, f, seqno, flags, payload=b"", options=b""):
        # SACK blocks ride on segments without data only: with them a full-sized segment (mss
        # assumes no options) would exceed the MTU, or at MTU 65520 the 16-bit IP length
        if f.ooo and f.sack_ok and not options and not payload and flags & ACK and not flags & SYN:
            options = build_tcp_options(sack_blocks=self._sack_blocks(f))
        rb = f.rbuf
        w = self.rcvbuf - (len(rb) if rb else 0)
        if w <= 0 or f.rlim or self.mem_bytes + w > self._soft_lim:
            w = self._rwnd(f)  # the budget may cut it (the common case needs no more than this)
        if flags & SYN:  # RFC 7323: the window of a SYN is never scaled
            if f.state == "SYN_SENT":  # the guest's ISN is unknown: anchored on its SYN-ACK
                w = max(w, f.last_adv)
            else:
                w = max(w, seq.sub(f.rcv_edge, f.rcv_nxt))
            w = min(w, 0xFFFF)
            f.last_adv = w
            if f.state != "SYN_SENT":
                f.rcv_edge = seq.add(f.rcv_nxt, w)
        else:  # per segment: kept to integer operations
            ws = f.rcv_ws
            wire = w >> ws
            nxt = f.rcv_nxt
            p = (f.rcv_edge - nxt) & _MASK  # never move the right edge back (RFC 9293 3.8.6)
            if (wire << ws) < p < _HALF:
                wire = (p + (1 << ws) - 1) >> ws
            if wire > 0xFFFF:
                wire = 0xFFFF
            w = wire
            adv = f.last_adv = wire << ws
            f.rcv_edge = (nxt + adv) & _MASK  # >= the old edge, by the rounding up
        if flags & ACK:
            f.ack_pending = False
            f.unacked = 0
            self._ack_set.pop(f.id, None)
        self._emit(f.family, f.raddr, f.rport, f.gaddr, f.gport, seqno, f.rcv_nxt if flags & ACK else 0,
                   flags, w, options, payload)

    def _sack_blocks(self, f):
        """RFC 2018: the block holding the most recent out-of-order segment first, then the
        others in sequence order; contiguous queued segments merge into one block."""
        base = f.rcv_nxt
        spans = sorted((seq.sub(s, base), seq.sub(s, base) + len(b)) for s, (b, _) in f.ooo.items())
        merged = []
        for lo, hi in spans:
            if lo <= 0 and hi <= 0:
                continue
            if merged and lo <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], hi)
            else:
                merged.append([lo, hi])
        if f.last_ooo is not None:
            k = seq.sub(f.last_ooo, base)
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
        f.state = "CLOSED"
        self._release(f)
        for ev in events:
            self._push(ev)

    def _release(self, f):
        """Drop the flow's buffers and give their bytes back to the budget."""
        n = (len(f.sbuf) if f.sbuf else 0) + (len(f.rbuf) if f.rbuf else 0) + f.ooo_bytes
        if n:
            self.mem_bytes -= n
            self._mem_freed += n
        f.sbuf = f.rbuf = f.ooo = None
        f.ooo_bytes = 0
        if f.rlim:
            f.rlim = False
            self._rwait.pop(f.id, None)
        if f.slim:
            f.slim = False
            self._swait.pop(f.id, None)

    def _abort(self, f, now, reason):
        self.stats.drop(reason)
        self._send(f, f.snd_nxt, RST | ACK)
        self._remove(f, (TcpReset(f.id), TcpClosed(f.id)))

    def _rst_for(self, family, src, sport, dst, dport, seqno, ackno, flags, plen):
        if flags & RST:
            return
        if flags & ACK:
            self._emit(family, dst, dport, src, sport, ackno, 0, RST, 0, b"", b"")
        else:
            n = plen + (1 if flags & SYN else 0) + (1 if flags & FIN else 0)
            self._emit(family, dst, dport, src, sport, 0, seq.add(seqno, n), RST | ACK, 0, b"", b"")

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
        try:
            self._on_segment(family, bytes(src), sport, bytes(dst), dport, seqno, ackno, flags,
                             window, options, payload, now)
        except Exception:  # guest bytes never make us raise
            if STRICT:
                raise
            self.stats.drop("tcp_internal_error")

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
                    # SYN flood: the oldest half-open flow makes room (RST to it, glue told)
                    old = next(iter(self._half_open.values()))
                    self.stats.drop("tcp_half_open_evicted")
                    self.reset_tcp(old.id, now)
                opts = parse_tcp_options_untrusted(options)
                if isinstance(opts, str):
                    self.stats.drop(opts)
                    return
                f = self._new_flow(family, src, sport, dst, dport)
                f.state = "SYN_PENDING"
                self._half_open[f.id] = f
                f.rcv_nxt = f.rcv_edge = seq.add(seqno, 1)
                f.mss = min(opts.mss or 536, self._mss_for(family))
                if opts.wscale is not None:
                    f.snd_ws, f.rcv_ws = opts.wscale, self._my_ws
                f.sack_ok = opts.sack_perm
                f.snd_wnd = window
                self._push(TcpConnectRequest(f.id, family, str(ipaddress.ip_address(src)), sport,
                                             str(ipaddress.ip_address(dst)), dport))
                return
            self.stats.drop("tcp_no_flow")
            self._rst_for(family, src, sport, dst, dport, seqno, ackno, flags, plen)
            return
        st = f.state
        if st == "SYN_PENDING":
            if flags & RST and seqno == f.rcv_nxt:  # the guest gave up: cancel the host connect
                self._remove(f, (TcpReset(f.id), TcpClosed(f.id)))
            return  # retransmitted SYN (or anything else) while the host connect is pending
        if st == "SYN_SENT":
            if flags & ACK and ackno != seq.add(f.iss, 1):
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
                    f.snd_ws, f.rcv_ws = opts.wscale, self._my_ws
                f.sack_ok = opts.sack_perm
                f.rcv_nxt = seq.add(seqno, 1)
                f.rcv_edge = seq.add(f.rcv_nxt, f.last_adv)  # the window our SYN offered
                f.snd_una = f.snd_nxt = f.snd_max = seq.add(f.iss, 1)
                f.snd_wnd = window  # RFC 7323: the window of a <SYN,ACK> is never scaled
                f.state = "ESTABLISHED"
                f.retries = 0
                self._half_open.pop(f.id, None)
                self._arm(f, None)
                self._send(f, f.snd_nxt, ACK)
                self._push(TcpConnected(f.id))
                self._output(f, now)
            return
        # synchronized states (and SYN_RCVD)
        wnd = self.rcvbuf >> 0
        in_window = seq.between(f.rcv_nxt, seqno, seq.add(f.rcv_nxt, max(wnd, 1))) or seqno == f.rcv_nxt
        if flags & RST:
            if seqno == f.rcv_nxt:
                if st != "TIME_WAIT" and f.their_fin and f.fin_acked:
                    # both FINs are exchanged and acknowledged: the guest, closed already, answers
                    # a duplicate ACK with RST. Resetting the host side now would throw away the
                    # guest's last bytes still on their way to the host socket.
                    self.stats.drop("tcp_rst_after_close")
                    return
                self._remove(f, () if st == "TIME_WAIT" else (TcpReset(f.id), TcpClosed(f.id)))
            elif in_window:
                self._send(f, f.snd_nxt, ACK)  # RFC 5961 challenge ACK
            return
        if st == "TIME_WAIT":
            if (flags & (SYN | ACK)) == SYN and seq.gt(seqno, f.rcv_nxt):
                self._remove(f)  # RFC 9293 3.10.7.4 / 6191: a new incarnation of the 4-tuple
                self._on_segment(family, src, sport, dst, dport, seqno, ackno, flags, window,
                                 options, payload, now)
                return
            if flags & FIN:
                self._send(f, f.snd_nxt, ACK)
            return
        if flags & SYN:
            if st == "SYN_RCVD" and seqno == seq.sub(f.rcv_nxt, 1) and not flags & ACK:
                self._send(f, f.iss, SYN | ACK, options=self._syn_options(f, f.rcv_ws or f.snd_ws))
                return
            self._send(f, f.snd_nxt, ACK)  # challenge ACK
            return
        if not flags & ACK:
            return
        if st == "SYN_RCVD":
            if ackno != seq.add(f.iss, 1):
                self._rst_for(family, src, sport, dst, dport, seqno, ackno, flags, plen)
                return
            f.state = "ESTABLISHED"
            f.snd_una = f.snd_nxt = f.snd_max = ackno
            self._half_open.pop(f.id, None)
            f.retries = 0
            f.snd_wnd = window << f.snd_ws
            self._arm(f, None)
        self._process_ack(f, ackno, window, options, plen, flags, now)
        if f.state == "CLOSED":
            return
        if plen or flags & FIN:
            self._process_data(f, seqno, payload, flags, now)
        if f.state != "CLOSED":
            self._output(f, now)
            self._maybe_done(f, now)

    def _process_ack(self, f, ackno, window, options, plen, flags, now):
        if seq.gt(ackno, f.snd_max):
            self.stats.drop("tcp_ack_future")
            self._send(f, f.snd_nxt, ACK)
            return
        if seq.gt(ackno, f.snd_nxt):  # after a go-back-N: the guest already had these bytes
            f.snd_nxt = ackno
        new_wnd = window << f.snd_ws
        blocks = ()
        if f.sack_ok and options and f.snd_una != f.snd_max:
            opts = parse_tcp_options_untrusted(options)
            if not isinstance(opts, str) and opts.sack_blocks:
                blocks = tuple((l, r) for l, r in opts.sack_blocks
                               if seq.lt(l, r) and seq.gt(l, ackno) and seq.le(r, f.snd_max))
                f.sacked = blocks
        if seq.gt(ackno, f.snd_una):
            n = seq.sub(ackno, f.snd_una)
            data_n = min(n, len(f.sbuf) if f.sbuf else 0)
            if data_n:
                del f.sbuf[:data_n]
                self.mem_bytes -= data_n
                self._mem_freed += data_n
            if f.fin_seq is not None and seq.gt(ackno, f.fin_seq):
                f.fin_acked = True
            f.snd_una = ackno
            f.dupacks = 0
            f.retries = 0
            if f.rtt_seq is not None and seq.ge(ackno, f.rtt_seq):
                r = now - f.rtt_t
                if f.srtt is None:
                    f.srtt, f.rttvar = r, r / 2
                else:
                    f.rttvar = 0.75 * f.rttvar + 0.25 * abs(f.srtt - r)
                    f.srtt = 0.875 * f.srtt + 0.125 * r
                f.rto = min(MAX_RTO, max(MIN_RTO, f.srtt + 4 * f.rttvar))
                f.rtt_seq = None
            f.snd_wnd = new_wnd
            if f.snd_una == f.snd_max:
                f.sacked = ()
            if f.recover is not None:
                if seq.ge(ackno, f.recover):
                    f.recover = None
                else:  # partial ACK: the next hole is lost too (RFC 6582), no need to wait
                    self._retransmit_holes(f, now)
            if f.snd_una == f.snd_nxt and not avail_unsent(f):
                self._arm(f, None)
            else:
                self._arm(f, now + f.rto)
            if f.want_writable:
                self._writable(f)
        elif ackno == f.snd_una:
            if plen == 0 and not flags & FIN and f.snd_una != f.snd_max and new_wnd and (
                    new_wnd == f.snd_wnd or blocks):
                f.dupacks += 1
                if f.dupacks == 3 and f.recover is None:
                    f.recover = f.snd_max
                    f.rexmit_hi = f.snd_una
                    f.rtt_seq = None
                    self._retransmit_holes(f, now)
                elif f.dupacks > 3 and f.recover is not None and blocks:
                    self._retransmit_holes(f, now)  # SACK moved on: newly revealed holes
            if f.snd_wnd == 0 and new_wnd:
                f.retries = 0
            f.snd_wnd = new_wnd

    def _retransmit_holes(self, f, now, budget=16):
        """Resend what the guest has not SACKed between max(snd_una, rexmit_hi) and its highest
        SACKed byte (or the one segment at snd_una without SACK), each hole once per recovery."""
        start = f.snd_una if seq.ge(f.snd_una, f.rexmit_hi) else f.rexmit_hi
        blocks = sorted((b for b in f.sacked if seq.gt(b[1], start)), key=lambda b: seq.sub(b[0], start))
        if not blocks:
            if start == f.snd_una:
                self._resend_range(f, start, f.mss)
                f.rexmit_hi = seq.add(start, f.mss)
            return
        cur = start
        for l, r in blocks:
            while seq.lt(cur, l) and budget > 0:
                n = min(f.mss, seq.sub(l, cur))
                if not self._resend_range(f, cur, n):
                    return
                budget -= 1
                cur = seq.add(cur, n)
                f.rexmit_hi = cur
            if seq.gt(r, cur):
                cur = r
            if budget <= 0:
                return

    def _resend_range(self, f, start, n):
        off = seq.sub(start, f.snd_una)
        blen = len(f.sbuf) if f.sbuf else 0
        if off < 0:
            return False
        if off < blen:
            chunk = bytes(f.sbuf[off:off + min(n, f.mss)])
            fl = ACK | PSH
            if f.fin_seq is not None and seq.add(start, len(chunk)) == f.fin_seq and off + len(chunk) == blen:
                fl |= FIN
            self._send(f, start, fl, chunk)
            return True
        if f.fin_seq is not None and start == f.fin_seq:
            self._send(f, start, ACK | FIN)
            return True
        return False

    def _process_data(self, f, seqno, payload, flags, now):
        if f.their_fin:
            if plen_or_fin(payload, flags):
                self._send(f, f.snd_nxt, ACK)
            return
        data = payload
        off = seq.sub(f.rcv_nxt, seqno)
        fin = bool(flags & FIN)
        if off > 0:
            if off >= len(data) + (1 if fin else 0):
                self._send(f, f.snd_nxt, ACK)  # duplicate
                return
            if off >= len(data):
                data = b""
            else:
                data = data[off:]
            seqno = f.rcv_nxt
        room = self.rcvbuf - (len(f.rbuf) if f.rbuf else 0)
        if seqno != f.rcv_nxt:
            ahead = seq.sub(seqno, f.rcv_nxt)
            if ahead + len(data) > room:
                self.stats.drop("tcp_beyond_window")
            elif self._rcv_allow(f, len(data)) < len(data):
                self.stats.drop("tcp_mem_drop")
            elif f.ooo is None or (len(f.ooo) < MAX_OOO and  # overlapping copies count too
                                   f.ooo_bytes + len(data) <= self.rcvbuf):
                if f.ooo is None:
                    f.ooo = {}
                old = f.ooo.get(seqno)
                if old is None or len(old[0]) < len(data):
                    f.ooo[seqno] = (bytes(data), fin)
                    d = len(data) - (len(old[0]) if old is not None else 0)
                    f.ooo_bytes += d
                    self.mem_bytes += d
                f.last_ooo = seqno
            else:
                self.stats.drop("tcp_ooo_cap")
            self._send(f, f.snd_nxt, ACK)
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
        was_empty = not f.rbuf
        self._accept(f, data, fin)
        while f.ooo:
            hit = f.ooo.pop(f.rcv_nxt, None)
            if hit is None:
                for s in list(f.ooo):
                    d = seq.sub(f.rcv_nxt, s)
                    b, fn = f.ooo[s]
                    if d >= 0:
                        del f.ooo[s]
                        f.ooo_bytes -= len(b)
                        self.mem_bytes -= len(b)
                        if d < len(b) or (fn and d == len(b)):
                            hit = (b[d:], fn)
                            break
            else:
                f.ooo_bytes -= len(hit[0])
                self.mem_bytes -= len(hit[0])
            if hit is None:
                break
            room = self.rcvbuf - len(f.rbuf or b"")
            self._accept(f, hit[0][:room], hit[1] and len(hit[0]) <= room)
        if not f.ooo:
            f.ooo = None
        if was_empty and f.rbuf:
            self._push(TcpReadable(f.id))
        if fin and (f.fin_pending or f.ooo):  # closing both ways / a hole: ACK the FIN now
            self._send(f, f.snd_nxt, ACK)
        else:  # a FIN before ours is ACKed late too, so that our FIN (the host closing) carries it
            f.unacked += 1
            if f.unacked >= 2:
                self._send(f, f.snd_nxt, ACK)
            else:
                f.ack_pending = True
                if not self._ack_set:
                    self._delack_at = now + self.delack
                self._ack_set[f.id] = f
        if f.their_fin and not f.rbuf and not f.eof_pushed:
            f.eof_pushed = True
            self._push(TcpGuestEof(f.id))

    def _accept(self, f, data, fin):
        n = len(data)
        if n:
            if f.rbuf is None:
                f.rbuf = bytearray(data)
            else:
                f.rbuf += data
            self.mem_bytes += n
            f.rcv_nxt = (f.rcv_nxt + n) & _MASK
            f.bytes_in += n
        if fin:
            f.their_fin = True
            f.rcv_nxt = seq.add(f.rcv_nxt, 1)

    # ------------------------------------------------------------------ output
    def _output(self, f, now):
        if f.state not in ("ESTABLISHED",):
            return
        blen = len(f.sbuf) if f.sbuf else 0
        while True:
            off = seq.sub(f.snd_nxt, f.snd_una)
            if f.fin_seq is not None and seq.gt(f.snd_nxt, f.fin_seq):
                break
            avail = blen - off
            win_room = f.snd_wnd - off
            if avail > 0 and win_room > 0:
                seg = f.mss
                if self.seg_max > seg:
                    seg = self.seg_max - self.seg_max % seg
                n = min(avail, win_room, seg)
                chunk = f.sbuf[off:off + n]
                fl = ACK | PSH
                fin_now = f.fin_pending and off + n == blen
                if fin_now:
                    fl |= FIN
                    f.fin_seq = seq.add(f.snd_nxt, n)
                self._send(f, f.snd_nxt, fl, chunk)
                if f.rtt_seq is None and f.snd_nxt == f.snd_max:
                    f.rtt_seq, f.rtt_t = seq.add(f.snd_nxt, n), now
                if f.deadline is None or f.snd_una == f.snd_nxt:
                    self._arm(f, now + f.rto)
                f.snd_nxt = seq.add(f.snd_nxt, n + (1 if fin_now else 0))
                if seq.gt(f.snd_nxt, f.snd_max):
                    f.bytes_out += seq.sub(f.snd_nxt, f.snd_max) - (1 if fin_now else 0)
                    f.snd_max = f.snd_nxt
                continue
            if avail <= 0 and f.fin_pending and (f.fin_seq is None or f.snd_nxt == f.fin_seq):
                f.fin_seq = f.snd_nxt
                self._send(f, f.snd_nxt, ACK | FIN)
                if f.deadline is None or f.snd_una == f.snd_nxt:
                    self._arm(f, now + f.rto)
                f.snd_nxt = seq.add(f.snd_nxt, 1)
                f.snd_max = seq.max_seq(f.snd_max, f.snd_nxt)
            break
        if avail_unsent(f) and f.snd_una == f.snd_nxt and f.snd_wnd == 0 and f.deadline is None:
            self._arm(f, now + f.rto)  # persist timer

    def _maybe_done(self, f, now):
        if f.state == "ESTABLISHED" and f.fin_acked and f.their_fin and f.eof_pushed:
            f.state = "TIME_WAIT"
            self._release(f)
            self._arm(f, now + TIME_WAIT)
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
            except Exception:
                if STRICT:
                    raise
                self.stats.drop("tcp_internal_error")

    def _fire(self, f, now):
        if f.state == "TIME_WAIT":
            self._remove(f)
            return
        if f.state in ("SYN_SENT", "SYN_RCVD"):
            f.retries += 1
            if f.retries > MAX_RETRIES // 2 + 1:
                self._abort(f, now, "tcp_handshake_timeout")
                return
            if f.state == "SYN_SENT":
                self._send(f, f.iss, SYN, options=self._syn_options(f))
            else:
                self._send(f, f.iss, SYN | ACK, options=self._syn_options(f, f.rcv_ws or f.snd_ws))
            f.rto = min(MAX_RTO, f.rto * 2)
            self._arm(f, now + f.rto)
            return
        if f.state != "ESTABLISHED":
            return
        if f.snd_wnd == 0 and avail_unsent(f) and seq.sub(f.snd_max, f.snd_una) <= 1:
            # zero-window probe: one byte past the edge; its ACK is accepted if the guest takes it
            self._send(f, f.snd_una, ACK, bytes(f.sbuf[:1]))
            f.snd_max = seq.add(f.snd_una, 1)
            f.retries = min(f.retries + 1, 16)
            self._arm(f, now + min(PERSIST_MAX, f.rto * (1 << f.retries)))
            return
        if f.snd_una == f.snd_max:
            if avail_unsent(f):
                self._output(f, now)
            return
        f.retries += 1
        if f.retries > MAX_RETRIES and f.snd_wnd != 0:
            self._abort(f, now, "tcp_retransmit_timeout")
            return
        f.rtt_seq = None
        f.rto = min(MAX_RTO, f.rto * 2)
        # go back N: resend from snd_una (the guest's ACKs move snd_nxt past what it holds)
        f.snd_nxt = f.snd_una
        f.recover = None
        f.dupacks = 0
        f.sacked = ()
        self._arm(f, None)
        self._output(f, now)
        if f.deadline is None:
            self._arm(f, now + f.rto)

    def flush_pending(self, now):
        if self._ack_set and now >= self._delack_at:
            for f in list(self._ack_set.values()):
                if f.ack_pending and f.state != "CLOSED":
                    self._send(f, f.snd_nxt, ACK)
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
                        if f.state != "ESTABLISHED" or f.their_fin:
                            f.rlim = False
                            del waiting[f.id]
                            continue
                        if self._update_due(f, self._rwnd(f)):
                            old = f.rcv_edge if seq.gt(f.rcv_edge, f.rcv_nxt) else f.rcv_nxt
                            self._send(f, f.snd_nxt, ACK)
                            self._handed(max(0, seq.sub(f.rcv_edge, old)))
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
        sl = len(f.sbuf) if f.sbuf else 0
        return self._allow(sl, want, min(self.sndbuf, max(MEM_FLOOR, f.mss)))

    def _writable(self, f):
        """f.want_writable: push TcpWritable if the flow has worthwhile room (its buffer and the
        budget); return that room, or 0 (then the flow waits in _swait for freed bytes)."""
        room = self.sndbuf - (len(f.sbuf) if f.sbuf else 0)
        if room <= 0 or f.state not in ("ESTABLISHED", "SYN_RCVD", "SYN_SENT") or f.fin_pending:
            if f.slim:
                f.slim = False
                self._swait.pop(f.id, None)
            return 0
        r = self._send_allow(f, room)
        if r < room and r < f.mss:  # the budget leaves less than a segment: wait for more
            if not f.slim:
                f.slim = True
                self._swait[f.id] = f
            return 0
        if f.slim:
            f.slim = False
            self._swait.pop(f.id, None)
        f.want_writable = False
        self._push(TcpWritable(f.id))
        return r

    def mem_recount(self):
        """The bytes held in every flow's buffers, recounted from scratch (tests: == mem_bytes)."""
        total = 0
        for f in self._flows.values():
            ob = sum(len(v[0]) for v in f.ooo.values()) if f.ooo else 0
            if ob != f.ooo_bytes:
                raise AssertionError(f"flow {f.id}: ooo_bytes {f.ooo_bytes} != {ob}")
            if f.rlim != (f.id in self._rwait) or f.slim != (f.id in self._swait):
                raise AssertionError(f"flow {f.id}: budget wait flags out of step")
            total += (len(f.sbuf) if f.sbuf else 0) + (len(f.rbuf) if f.rbuf else 0) + ob
        if any(fid not in self._flows for fid in (*self._rwait, *self._swait)):
            raise AssertionError("a removed flow is still waiting for the budget")
        return total

    def mem_stats(self):
        return {"tcp_mem_bytes": self.mem_bytes, "tcp_mem_budget": self.mem_budget,
                "tcp_mem_window_limited": len(self._rwait), "tcp_mem_send_limited": len(self._swait)}

    # ------------------------------------------------------------------ glue API
    def accept_tcp(self, flow, now):
        f = self._flows.get(flow)
        if f is None or f.state != "SYN_PENDING":
            return
        f.iss = self.isn() & seq.MASK
        f.snd_una = f.iss
        f.snd_nxt = f.snd_max = seq.add(f.iss, 1)
        f.state = "SYN_RCVD"
        self._send(f, f.iss, SYN | ACK, options=self._syn_options(f, f.rcv_ws != 0 or f.snd_ws != 0))
        self._arm(f, now + INIT_RTO)

    def reject_tcp(self, flow, reason, now):
        f = self._flows.get(flow)
        if f is None:
            return
        self.stats.drop("tcp_connect_" + str(reason))
        if f.state == "SYN_PENDING":
            self._emit(f.family, f.raddr, f.rport, f.gaddr, f.gport, 0, f.rcv_nxt, RST | ACK, 0, b"", b"")
        else:
            self._send(f, f.snd_nxt, RST | ACK)
        self._remove(f, (TcpClosed(f.id),))

    def send_tcp(self, flow, data, now):
        f = self._flows.get(flow)
        if f is None or f.fin_pending or f.state not in ("ESTABLISHED", "SYN_RCVD", "SYN_SENT"):
            return 0
        if f.sbuf is None:
            f.sbuf = bytearray()
        want = min(self.sndbuf - len(f.sbuf), len(data))
        n = want
        if want > 0 and self.mem_bytes + want > self._soft_lim:
            n = self._send_allow(f, want)
        if n < len(data):
            f.want_writable = True
            if n < want and not f.slim:  # the budget, not the buffer, cut it: wake it later
                f.slim = True
                self._swait[f.id] = f
                self.stats.drop("tcp_mem_cap_send")
        if n > 0:
            f.sbuf += data if n == len(data) else memoryview(data)[:n]
            self.mem_bytes += n
            self._output(f, now)
        return n

    def recv_tcp(self, flow, n, now):
        f = self._flows.get(flow)
        if f is None or not f.rbuf:
            return b""
        rb = f.rbuf
        if n >= len(rb):
            out, f.rbuf = rb, None  # all of it: hand the buffer over, no copy
        else:
            out = rb[:n]
            del rb[:n]
        self.mem_bytes -= len(out)
        self._mem_freed += len(out)
        # a window update goes at once when the guest may be short of window; otherwise an ACK
        # already owed (sent within DELACK, or carried by the answer) brings the new window
        if f.state == "ESTABLISHED" and not f.their_fin and not (
                f.ack_pending and f.last_adv >= f.mss) and self._update_due(f, self._rwnd(f)):
            self._send(f, f.snd_nxt, ACK)
        if not f.rbuf:
            f.rbuf = None
            if f.their_fin and not f.eof_pushed:
                f.eof_pushed = True
                self._push(TcpGuestEof(f.id))
                self._maybe_done(f, now)
        return out

    def shutdown_tcp(self, flow, now):
        f = self._flows.get(flow)
        if f is None or f.fin_pending:
            return
        f.fin_pending = True
        self._output(f, now)
        self._maybe_done(f, now)

    def reset_tcp(self, flow, now):
        f = self._flows.get(flow)
        if f is None:
            return
        if f.state == "SYN_PENDING":
            self._emit(f.family, f.raddr, f.rport, f.gaddr, f.gport, 0, f.rcv_nxt, RST | ACK, 0, b"", b"")
        elif f.state != "TIME_WAIT":
            self._send(f, f.snd_nxt, RST | ACK)
        self._remove(f, () if f.state == "TIME_WAIT" else (TcpClosed(f.id),))

    def connect_tcp(self, family, src, sport, dst, dport, now):
        raddr = ipaddress.ip_address(src).packed
        gaddr = ipaddress.ip_address(dst).packed
        old = self._by_key.get((family, gaddr, dport, raddr, sport))
        if old is not None and old.state == "TIME_WAIT":
            # the host reuses a port whose last flow we still hold in TIME_WAIT (Linux does so
            # at once on loopback, tcp_tw_reuse=2): the new connection wins, as RFC 6191 allows
            self._remove(old, ())
            self.stats.drop("tcp_time_wait_recycled")
        if len(self._flows) >= self.max_flows or (family, gaddr, dport, raddr, sport) in self._by_key:
            self.stats.drop("tcp_flow_cap")
            return None
        f = self._new_flow(family, gaddr, dport, raddr, sport)
        f.state = "SYN_SENT"
        self._half_open[f.id] = f
        f.mss = self._mss_for(family)
        f.iss = self.isn() & seq.MASK
        f.snd_una = f.iss
        f.snd_nxt = f.snd_max = seq.add(f.iss, 1)
        self._send(f, f.iss, SYN, options=self._syn_options(f))
        self._arm(f, now + INIT_RTO)
        return f.id

    def flows(self):
        out = []
        for f in self._flows.values():
            out.append({"id": f.id, "family": f.family,
                        "src": str(ipaddress.ip_address(f.gaddr)), "sport": f.gport,
                        "dst": str(ipaddress.ip_address(f.raddr)), "dport": f.rport,
                        "state": f.state, "bytes_in": f.bytes_in, "bytes_out": f.bytes_out})
        return out


def plen_or_fin(payload, flags):
    return len(payload) or flags & FIN


def avail_unsent(f):
    return f.sbuf is not None and len(f.sbuf) > seq.sub(f.snd_nxt, f.snd_una)
