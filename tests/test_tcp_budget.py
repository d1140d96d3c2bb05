"""Sans-IO tests of the TCP engine's global memory budget (stack/tcp.py): byte accounting that
never drifts, windows and send_tcp cut by the budget, wake-ups when room returns, no window
retraction, and TIME_WAIT / empty flows costing nothing. A model guest drives many flows."""
import hashlib

from hypothesis import given, settings, strategies as st

from slirpy.config import Config
from slirpy.stack import events as E
from slirpy.stack import seq
from slirpy.stack.stats import Stats
from slirpy.stack.tcp import ACK, FIN, PSH, RST, SYN, TcpEngine
from slirpy.stack.tcp_options import build_tcp_options
from slirpy.stack.tcp_state import CONNECTED, TcpState
from test_tcp_engine import well_formed

G = bytes([10, 0, 2, 100])
R = bytes([127, 0, 0, 9])
KIB = 1024
PAT = bytes(range(251)) * 1400  # byte i of a flow's stream: PAT[(i + salt) % 251] (up to 340 KiB a slice)
GISN = 2**32 - 5000  # the guest's ISN: sequence numbers wrap during the tests


def stream(salt, off, n):
    i = (off + salt) % 251
    assert n <= len(PAT) - i
    return PAT[i:i + n]


class Guest:
    """One flow as the guest sees it."""

    def __init__(self, port):
        self.port = port
        self.flow = None
        self.snd_nxt = seq.add(GISN, 1)  # next byte the guest sends
        self.sent = 0  # stream offset of snd_nxt
        self.ack = None  # our latest ACK number
        self.edge = None  # right edge of our latest window
        self.hrx = None  # next host byte the guest expects
        self.got = 0  # host bytes received in order
        self.wnd = 0  # the guest's window (scaled by 7)
        self.taken = 0  # bytes send_tcp took


class Net:
    def __init__(self, budget=1 << 20, isn=7000):
        self.out, self.ev = [], []
        self.stats = Stats()
        self.e = TcpEngine(Config(tcp_mem_budget=budget),
                           lambda seg: self.out.append(well_formed(seg)),
                           self.ev.append, self.stats)
        self.e.isn = lambda: isn
        self.e.delack = 0.0  # `now` stays 0 here: ACKs owed go out at the next flush_pending
        self.g: dict[int, Guest] = {}
        self.by_flow: dict[int, Guest] = {}
        self.read: dict[int, int] = {}  # flow -> guest bytes the host has read
        self.peak = 0
        self.checks = 0

    def check(self):
        e = self.e
        self.checks += 1
        if len(e._flows) < 300 or self.checks % 100 == 0:  # a recount is O(flows)
            assert e.mem_bytes == e.mem_recount()
        assert e.mem_bytes <= e.mem_budget
        self.peak = max(self.peak, e.mem_bytes)

    def seg(self, m, seqno, ackno, flags, payload=b"", window=None):
        self.e.on_segment(4, G, m.port, R, 80, seqno, ackno, flags,
                          m.wnd if window is None else window, b"", memoryview(payload), 0.0)
        self.pump()

    def pump(self):
        """Deliver what the engine emitted to the model guests; no right edge ever moves back."""
        while self.out:
            out, self.out = self.out, []
            for (_fam, _src, _sport, _dst, gport, seqno, ackno, flags, win, _opt, payload) in out:
                m = self.g.get(gport)
                if m is None or flags & RST:
                    continue
                if flags & SYN:
                    m.hrx = seq.add(seqno, 1)
                if flags & ACK:
                    edge = seq.add(ackno, win << (0 if flags & SYN else self.e._my_ws))
                    assert m.edge is None or seq.ge(edge, m.edge), "window retracted"
                    m.ack, m.edge = ackno, edge
                if payload and m.hrx is not None and seqno == m.hrx:
                    assert bytes(payload) == stream(m.port + 1, m.got, len(payload))
                    m.got += len(payload)
                    m.hrx = seq.add(m.hrx, len(payload))
        self.check()

    def open(self, port, wnd=0):
        m = Guest(port)
        self.g[port] = m
        opts = build_tcp_options(mss=1460, wscale=7, sack_perm=True)
        self.e.on_segment(4, G, port, R, 80, GISN, 0, SYN, 65535, opts, memoryview(b""), 0.0)
        req = self.ev[-1]
        assert isinstance(req, E.TcpConnectRequest)
        m.flow = req.flow
        self.by_flow[m.flow] = m
        self.read[m.flow] = 0
        self.e.accept_tcp(m.flow, 0.0)
        self.pump()
        m.wnd = wnd
        self.seg(m, m.snd_nxt, m.hrx, ACK)
        return m

    def fill(self, m, limit=10**9):
        """The guest sends 1460-byte segments up to the right edge we advertised (resending
        from our ACK what we did not take), then we flush our coalesced ACKs."""
        m.sent -= seq.sub(m.snd_nxt, m.ack)
        m.snd_nxt = m.ack
        n = 0
        while n < limit:
            room = seq.sub(m.edge, m.snd_nxt)
            if room <= 0:
                break
            k = min(1460, room, limit - n)
            self.seg(m, m.snd_nxt, m.hrx, ACK | PSH, stream(m.port, m.sent, k))
            m.snd_nxt = seq.add(m.snd_nxt, k)
            m.sent += k
            n += k
        self.e.flush_pending(0.0)
        self.pump()
        return n

    def host_read(self, m, n=1 << 30):
        data = self.e.recv_tcp(m.flow, n, 0.0)
        off = self.read[m.flow]
        assert bytes(data) == stream(m.port, off, len(data))
        self.read[m.flow] = off + len(data)
        self.pump()
        return len(data)

    def host_send(self, m, n):
        took = self.e.send_tcp(m.flow, stream(m.port + 1, m.taken, n), 0.0)
        m.taken += took
        self.pump()
        return took

    def guest_ack(self, m, wnd=65535):
        m.wnd = wnd
        self.seg(m, m.snd_nxt, m.hrx, ACK)

    def release(self, m, nbytes):
        """m's guest opens its window, takes what m sent and acknowledges nbytes of it."""
        h0 = m.hrx
        m.wnd = 65535
        self.seg(m, m.snd_nxt, h0, ACK)
        self.seg(m, m.snd_nxt, seq.add(h0, nbytes), ACK)

    def writable(self):
        ws = {ev.flow for ev in self.ev if isinstance(ev, E.TcpWritable)}
        self.ev[:] = [ev for ev in self.ev if not isinstance(ev, E.TcpWritable)]
        return ws


def _flood(n, flows, each):
    """Nobody reads on the host and the guest never opens its window: each round the host
    offers each flow `each` bytes and the guest fills what it was promised. The total stays
    within the budget (Net.check, after every segment) and comes near it; windows and send_tcp
    are cut."""
    for rnd in range(3):
        for m in flows:
            n.host_send(m, each)
            n.fill(m)
    budget = n.e.mem_budget
    assert n.peak >= budget * 3 // 4 and n.e.mem_bytes <= budget
    d = n.stats.dropped
    assert d["tcp_mem_cap_window"] > 0 and d["tcp_mem_cap_send"] > 0


def _drain_and_all_progress(n, flows, more):
    """The readers drain (the host reads everything, the guest opens its window and acks):
    every flow moves again both ways, woken by the engine -- each gets guest bytes through and
    takes `more` host bytes beyond what it held."""
    before_in = {m.port: n.read[m.flow] + len(n.e._flows[m.flow].rcv.buf or b"") for m in flows}
    before_out = {m.port: m.taken for m in flows}
    for rnd in range(40):
        for m in flows:
            n.host_read(m)
            n.guest_ack(m)
        n.e.flush_pending(0.0)
        n.pump()
        for fid in n.writable():
            m = n.by_flow[fid]
            if m.taken < before_out[m.port] + more:
                n.host_send(m, more)
        if all(m.taken >= before_out[m.port] + more for m in flows):
            break
    for m in flows:
        n.fill(m)
        n.host_read(m)
    assert n.e.mem_bytes == n.e.mem_recount()
    assert all(n.read[m.flow] > before_in[m.port] for m in flows), "a flow got no guest data through"
    assert all(m.taken >= before_out[m.port] + more for m in flows), "a flow took no more host data"
    assert all(m.got >= before_out[m.port] for m in flows)


def test_hostile_guest_many_full_flows_stay_within_budget_then_all_progress():
    """200 flows, nobody reads on the host and the guest never opens its window: without the
    budget they would hold 200 x 512 KiB = 100 MiB; with a 1 MiB budget the total never exceeds
    1 MiB (checked after every segment against a recount). Then the readers drain and every
    flow moves again, both ways."""
    n = Net(1 << 20)
    flows = [n.open(30000 + i) for i in range(200)]
    _flood(n, flows, 300 * KIB)
    assert n.stats.dropped["tcp_mem_drop"] > 0
    assert n.e.mem_stats()["tcp_mem_bytes"] == n.e.mem_bytes
    _drain_and_all_progress(n, flows, 64 * KIB)


def test_budget_limited_window_opens_when_others_drain():
    """A flow whose window the budget closed gets a window update, unasked, when another flow's
    reader frees enough bytes (the wake-up); freeing a few bytes sends nothing."""
    n = Net(256 * KIB)
    a = n.open(30001)
    for _ in range(4):
        n.fill(a)
    assert n.e.mem_bytes == 192 * KIB  # 3/4: past its floor a flow takes no more
    b = n.open(30002)
    assert seq.sub(b.edge, b.ack) == 16 * KIB  # b's SYN-ACK offers its floor from the last quarter
    assert n.fill(b) == 16 * KIB
    fb = n.e._flows[b.flow]
    assert fb.rcv.limited and seq.sub(b.edge, b.ack) == 0  # b: zero window, waiting for the budget
    n.host_read(a, 10)
    n.e.flush_pending(0.0)
    assert n.out == []  # nothing worthwhile freed, nothing sent
    n.host_read(a, 40 * KIB)  # 168 KiB held: 24 KiB under 3/4
    n.e.flush_pending(0.0)
    ports = [x.dport for x in n.out]
    assert b.port in ports and len(ports) <= 2  # b's update (and a's own), no storm
    n.pump()
    w = seq.sub(b.edge, b.ack)
    assert w == (24 * KIB + 10) & ~7  # b may send again: what is under 3/4, in units of 8 bytes
    assert n.fill(b) == w and len(fb.rcv.buf) == 16 * KIB + w
    assert n.e.mem_bytes == 192 * KIB - 2


def test_time_wait_and_empty_flows_cost_nothing_bulk_flow_gets_full_window():
    """A budget shared by flow count would leave every window below one MSS after a burst of
    short connections. Bytes are accounted, not flows: 3000 closed flows in TIME_WAIT (and 200 open
    idle ones) hold nothing, and a bulk flow still gets the full 256 KiB each way, with a budget
    of only 1 MiB."""
    n = Net(1 << 20)
    for i in range(3000):
        m = n.open(20000 + i, wnd=65535)
        n.fill(m, 100)
        n.host_send(m, 100)
        n.host_read(m)
        n.guest_ack(m)
        n.e.shutdown_tcp(m.flow, 0.0)
        n.pump()
        n.seg(m, m.snd_nxt, m.hrx, ACK | FIN)
        m.snd_nxt = seq.add(m.snd_nxt, 1)
        n.host_read(m)
        n.seg(m, m.snd_nxt, seq.add(m.hrx, 1), ACK)
        assert n.e._flows[m.flow].state is TcpState.TIME_WAIT
    idle = [n.open(40000 + i, wnd=65535) for i in range(200)]
    for m in idle:
        n.fill(m, 1)
        n.host_read(m)
    assert n.e.mem_bytes == 0 and len(n.e._flows) == 3200
    bulk = n.open(50000)
    assert seq.sub(bulk.edge, bulk.ack) == 65535  # SYN-ACK: the largest unscaled window
    assert n.host_send(bulk, 300 * KIB) == 256 * KIB
    got = n.fill(bulk)
    for _ in range(3):
        got += n.fill(bulk)
    assert got == 256 * KIB  # the guest could send a full 256 KiB
    assert not n.e._rwait and not n.e._swait and "tcp_mem_cap_window" not in n.stats.dropped
    n.e.handle_timer(10.0)  # TIME_WAIT ends
    assert len(n.e._flows) == 201 and n.e.mem_bytes == 512 * KIB == n.e.mem_recount()


def test_no_window_retraction_when_the_budget_runs_out():
    """A flow that advertised a large window keeps its right edge when other flows use up the
    budget; its next windows end at that same edge (shrinking only as data arrives)."""
    n = Net(512 * KIB)
    a = n.open(30001)
    n.fill(a, 2920)
    edge0 = a.edge
    assert seq.sub(edge0, a.ack) >= 256 * KIB - 2920 - 8
    others = [n.open(31000 + i) for i in range(2)]
    assert [n.host_send(m, 256 * KIB) for m in others] == [256 * KIB, 128 * KIB - 2920]
    assert n.e.mem_bytes == 384 * KIB  # 3/4: windows only up to the floor from here
    n.fill(a, 1460)
    # not retracted, not grown (but for rounding up to the window scale, 8 bytes): budget spent
    assert 0 <= seq.sub(a.edge, edge0) < 1 << n.e._my_ws
    fa = n.e._flows[a.flow]
    assert fa.rcv.limited  # its window is cut by the budget: it waits for room
    n.fill(a)  # the guest may fill the whole window it was promised ...
    assert a.ack == edge0 or n.stats.dropped["tcp_mem_drop"] > 0  # ... or hits the hard cap
    assert n.e.mem_bytes <= 512 * KIB


def test_send_budget_floor_and_writable_when_room_returns():
    """send_tcp takes less once the budget is spent, but every flow may hold its floor
    (16 KiB here) while the total is under the budget; a flow cut short gets TcpWritable when
    the guest acknowledges another flow's data."""
    n = Net(256 * KIB)
    a = n.open(30001)
    assert n.host_send(a, 256 * KIB) == 192 * KIB  # 3/4 of the budget: the rest is for floors
    fl = [n.open(30002 + i) for i in range(5)]
    took = [n.host_send(m, 100 * KIB) for m in fl]
    assert took == [16 * KIB] * 4 + [0]
    assert n.e.mem_bytes == 256 * KIB and n.stats.dropped["tcp_mem_cap_send"] == 6
    assert n.writable() == set()
    n.guest_ack(a)  # the guest opens its window: a's data goes out and is acknowledged
    for _ in range(10):
        n.guest_ack(a)
    n.e.flush_pending(0.0)
    n.pump()
    woken = n.writable()
    assert fl[4].flow in woken and a.flow in woken
    assert n.host_send(fl[4], 100 * KIB) >= 16 * KIB


ops = st.lists(st.tuples(st.sampled_from(["fill", "ooo", "dup", "read", "send", "gack", "gwin0",
                                          "gfin", "hfin", "hrst", "grst", "timer", "open", "flush",
                                          "peek", "room"]),
                         st.integers(0, 3), st.integers(1, 70000)),
               min_size=1, max_size=60)


@settings(max_examples=150, deadline=None)
@given(ops)
def test_running_total_never_drifts(plan):
    """Random guest and host operations on four flows under a small budget: after every one,
    the running total equals a recount and stays within the budget."""
    n = Net(64 * KIB)  # 48 KiB to grow in, 16 KiB floors
    now = 0.0
    ms = [n.open(30000 + i, wnd=65535) for i in range(4)]
    for op, i, k in plan:
        m = ms[i]
        f = n.e._flows.get(m.flow)
        if op == "open":
            if f is None or f.state is TcpState.TIME_WAIT:
                n.g.pop(m.port)
                ms[i] = n.open(30000 + i + 4 * (k % 1000 + 1), wnd=65535)
        elif f is None or f.state not in CONNECTED:
            pass
        elif op == "fill":
            n.fill(m, k)
        elif op == "ooo" and m.edge is not None:
            gap = k % 5000 + 1
            s = seq.add(m.ack, gap)
            ln = max(0, min(k % 3000 + 1, seq.sub(m.edge, s)))
            if ln:
                n.seg(m, s, m.hrx, ACK, bytes(ln))
        elif op == "dup" and m.ack is not None:
            n.seg(m, seq.sub(m.ack, k % 2000) & seq.MASK, m.hrx, ACK, bytes(k % 1500))
        elif op == "read":
            n.e.recv_tcp(m.flow, k, now)
            n.pump()
        elif op == "peek":  # the glue's way: send from the buffer, then let go of what went
            v = n.e.peek_tcp(m.flow)
            if v is not None:
                took = min(k, len(v))
                v.release()
                n.e.consume_tcp(m.flow, took, now)
                n.pump()
        elif op == "room":  # send_tcp takes all that send_room offers (0: TcpWritable later)
            room = n.e.send_room(m.flow)
            if room:
                assert n.host_send(m, min(room, k)) == min(room, k)
        elif op == "send":
            n.host_send(m, k)
        elif op == "gack":
            n.guest_ack(m, 65535)
        elif op == "gwin0":
            n.guest_ack(m, 0)
        elif op == "gfin":
            n.seg(m, m.snd_nxt, m.hrx, ACK | FIN)
        elif op == "hfin":
            n.e.shutdown_tcp(m.flow, now)
            n.pump()
        elif op == "hrst":
            n.e.reset_tcp(m.flow, now)
            n.pump()
        elif op == "grst":
            n.seg(m, m.snd_nxt, 0, RST)
        if op == "timer":
            now += k / 10000
            n.e.handle_timer(now)
            n.pump()
        if op == "flush":
            n.e.flush_pending(now)
            n.pump()
        n.check()
    for m in ms:
        n.e.reset_tcp(m.flow, now)
    n.e.handle_timer(now + 100)
    assert n.e.mem_bytes == 0 == n.e.mem_recount() and not n.e._rwait and not n.e._swait


def test_stream_integrity_under_budget_pressure():
    """12 flows share 512 KiB while only half of them are read: data through budget-cut
    windows and hard-cap drops arrives intact and in order, the readers' flows keep moving
    (guest segments arrive in a different flow order each round), and once everything is read
    every byte acknowledged has reached the host."""
    n = Net(512 * KIB)  # 6 unread flows past 3/4 leave the last quarter for the others' floors
    ms = [n.open(30000 + i) for i in range(12)]
    for r in range(30):
        for m in ms[r % 12:] + ms[:r % 12]:
            n.fill(m, 40 * KIB)
        for m in ms[::2]:
            n.host_read(m)
        n.e.flush_pending(0.0)
        n.pump()
    assert all(n.read[m.flow] >= 300 * KIB for m in ms[::2])
    assert n.e.mem_bytes <= 512 * KIB
    for _ in range(10):
        for m in ms:
            n.host_read(m)
            n.fill(m, 40 * KIB)
    for m in ms:
        n.host_read(m)
        assert n.read[m.flow] == seq.sub(m.ack, seq.add(GISN, 1)) > 0
    assert n.e.mem_bytes == 0 == n.e.mem_recount()


def test_room_left_unused_by_a_woken_flow_reaches_the_next_one_after_a_retry():
    """Freed room goes to the longest-waiting flow first, and is handed out once per pass; if
    that flow's glue never uses it (its host peer had nothing more to send), the next waiting
    flow is woken by a retry pass from the timer (0.2 s later), not left waiting for bytes to
    be freed again."""
    n = Net(256 * KIB)
    c = n.open(30001)
    assert n.host_send(c, 192 * KIB) == 192 * KIB  # 3/4 of the budget, all c asked for
    a, b = n.open(30002), n.open(30003)
    assert n.host_send(a, 100 * KIB) == n.host_send(b, 100 * KIB) == 16 * KIB  # floors
    assert list(n.e._swait) == [a.flow, b.flow]
    n.release(c, 64 * KIB)  # 64 KiB acknowledged: 32 KiB under 3/4
    assert c.got == 192 * KIB
    n.e.flush_pending(0.0)
    n.pump()
    assert n.writable() == {a.flow}  # the room goes to a only (a's turn: it waited longest)
    assert list(n.e._swait) == [b.flow]
    t = n.e.get_timer()
    assert t is not None and abs(t - 0.2) < 1e-9
    n.e.flush_pending(0.1)  # nothing freed since: no pass before the retry
    n.pump()
    assert n.writable() == set() and list(n.e._swait) == [b.flow]
    n.e.handle_timer(0.2)  # a's glue took nothing: the retry hands the room to b
    n.pump()
    assert n.writable() == {b.flow} and not n.e._swait
    assert n.host_send(b, 100 * KIB) == 32 * KIB
    assert n.host_send(a, 100 * KIB) == 0 and set(n.e._swait) == {a.flow, b.flow}


def test_compact_keeps_live_timers_and_tables_drops_the_rest():
    """The memory trim after a crowd of flows closed (issue #20): compact() leaves the timer
    heap with only live entries and the tables with the same contents."""
    n = Net(1 << 20)
    ms = [n.open(30000 + i, wnd=65535) for i in range(40)]
    for m in ms[:30]:
        n.e.reset_tcp(m.flow, 0.0)
    n.pump()
    for m in ms[30:]:
        n.host_send(m, 100)  # armed: an RTO each
    before = {fid: f for fid, f in n.e._flows.items()}
    t = n.e.get_timer()
    n.e.compact()
    assert n.e._flows == before and set(n.e._by_key.values()) == set(before.values())
    assert {e[1] for e in n.e._heap} <= set(before) and len(n.e._heap) == 10
    assert n.e.get_timer() == t
    assert n.e.mem_bytes == n.e.mem_recount()


def test_full_flows_stay_within_budget_then_all_progress_small():
    """The 200-flow test above at a twentieth of the size (the mutation runner leaves the big
    one out): 12 flows against a 96 KiB budget, nobody reads; the total never passes the
    budget, windows and send_tcp are cut; once the readers drain, every flow moves again both
    ways (woken by the engine, not by being asked)."""
    n = Net(96 * KIB)
    flows = [n.open(31000 + i) for i in range(12)]
    _flood(n, flows, 48 * KIB)
    _drain_and_all_progress(n, flows, 16 * KIB)


def test_one_pass_serves_every_waiting_sender_while_the_room_lasts_then_no_retry():
    """Freed room goes to all the flows waiting for it in one pass (not one flow per freed
    batch of bytes) while it lasts; when none is left waiting there is no retry pass."""
    n = Net(1 << 20)
    cs = [n.open(30001 + i) for i in range(3)]
    a, b = n.open(30010), n.open(30011)
    for c in cs:
        assert n.host_send(c, 256 * KIB) == 256 * KIB  # 768 KiB: 3/4 of the budget
    assert n.host_send(a, 300 * KIB) == n.host_send(b, 300 * KIB) == 16 * KIB  # floors
    assert list(n.e._swait) == [a.flow, b.flow] and not n.e._rwait
    for c in cs:
        n.release(c, 256 * KIB)
    n.e.flush_pending(0.0)
    n.pump()
    assert n.writable() == {a.flow, b.flow} and not n.e._swait
    assert n.e._wake_at is None  # nobody waits: no retry pass
    assert n.host_send(a, 300 * KIB) == n.host_send(b, 300 * KIB) == 240 * KIB


def test_a_waiting_flow_whose_guest_closed_leaves_the_queue_and_the_next_one_is_served():
    """A flow the budget held to a zero window whose guest then sent its FIN needs no window
    any more: the wake pass drops it from the queue and goes on to the next waiting flow,
    whose update names our next sequence number and the guest's next byte."""
    n = Net(256 * KIB)
    a = n.open(30001)
    for _ in range(4):
        n.fill(a)
    assert n.e.mem_bytes == 192 * KIB
    b, c = n.open(30002), n.open(30003)
    assert n.fill(b) == 16 * KIB and n.fill(c) == 16 * KIB
    assert list(n.e._rwait) == [a.flow, b.flow, c.flow]
    n.seg(b, b.snd_nxt, b.hrx, ACK | FIN)  # b's guest is done sending
    assert n.e._flows[b.flow].state.name == "CLOSE_WAIT"
    n.out.clear()
    n.host_read(a, 40 * KIB)
    n.e.flush_pending(0.0)
    upd = [x for x in n.out if x.dport == c.port]
    assert len(upd) == 1 and upd[0].flags == ACK
    fc = n.e._flows[c.flow]
    assert upd[0].seq == fc.snd.nxt and upd[0].ack == fc.rcv.nxt and upd[0].window > 0
    assert b.flow not in n.e._rwait and not n.e._flows[b.flow].rcv.limited


def test_the_recount_catches_each_kind_of_drift():
    """mem_recount is what every budget test leans on: it must fail, with a message that names
    the fault, on a wrong out-of-order count, a wait flag out of step with its queue (either
    side), and a removed flow left in a queue."""
    import pytest
    n = Net(1 << 20)
    a, b = n.open(30001), n.open(30002)
    fa = n.e._flows[a.flow]
    assert n.e.mem_recount() == 0
    fa.rcv.ooo_bytes = 5
    with pytest.raises(AssertionError, match=f"flow {a.flow}: ooo_bytes 5 != 0"):
        n.e.mem_recount()
    fa.rcv.ooo_bytes = 0
    fa.rcv.limited = True
    with pytest.raises(AssertionError, match="budget wait flags out of step"):
        n.e.mem_recount()
    fa.rcv.limited = False
    fa.snd.limited = True
    with pytest.raises(AssertionError, match="budget wait flags out of step"):
        n.e.mem_recount()
    fa.snd.limited = False
    n.e._swait[999] = fa
    with pytest.raises(AssertionError, match="^a removed flow is still waiting for the budget$"):
        n.e.mem_recount()
    del n.e._swait[999]
    n.e._rwait[999] = fa
    with pytest.raises(AssertionError, match="^a removed flow is still waiting for the budget$"):
        n.e.mem_recount()


def test_a_reset_flow_leaves_every_queue_and_timer():
    """Flows reset while they waited for the budget (both ways) or owed a delayed ACK leave
    no trace: not in the wait queues, no delayed-ACK timer, bytes back to the budget."""
    n = Net(256 * KIB)
    d = n.open(30003)  # offered its window while the budget was free
    a = n.open(30001)
    for _ in range(4):
        n.fill(a)
    b = n.open(30002)
    n.fill(b)  # b's window: cut by the budget
    assert n.host_send(b, 100 * KIB) < 100 * KIB  # b's sending: cut too
    fb, fd = n.e._flows[b.flow], n.e._flows[d.flow]
    assert fb.rcv.limited and fb.snd.limited
    n.seg(d, d.snd_nxt, d.hrx, ACK | PSH, b"x" * 100)  # a lone segment: its ACK is delayed
    assert list(n.e._ack_set) == [d.flow]
    for m in (b, d, a):
        n.e.reset_tcp(m.flow, 0.0)
    n.pump()
    assert not n.e._rwait and not n.e._swait and not n.e._ack_set
    assert n.e.get_timer() is None
    assert n.e.mem_bytes == 0 == n.e.mem_recount()
    assert not fb.snd.limited and not fb.rcv.limited


def test_a_flow_whose_guest_closed_is_not_held_to_the_budget_window():
    """After the guest's FIN no more data will come: the window we advertise is not cut by the
    budget any more (nor is the flow queued for a window update, or counted as cut)."""
    n = Net(256 * KIB)
    a = n.open(30001)
    for _ in range(4):
        n.fill(a)
    b = n.open(30002)
    n.fill(b)
    assert n.e._flows[b.flow].rcv.limited
    cut = n.stats.dropped["tcp_mem_cap_window"]
    n.seg(b, b.snd_nxt, b.hrx, ACK | FIN)
    fb = n.e._flows[b.flow]
    n.e._rwnd(fb)
    assert fb.state.name == "CLOSE_WAIT" and n.stats.dropped["tcp_mem_cap_window"] == cut
    n.e.flush_pending(0.0)
    n.pump()
    c = n.open(30003)  # the budget is still spent: c's window is cut, b's is not
    assert n.e._rwnd(fb) == n.e.rcvbuf - len(fb.rcv.buf)
    assert n.e._flows[c.flow].rcv.limited


def _queue_behind_closed(closed):
    """`closed` send-waiting flows whose host side then closed (nothing to wake them for), and
    behind them one flow that can use freed room; then 192 KiB of room is freed."""
    n = Net(256 * KIB)
    c = n.open(30001)
    fl = [n.open(30010 + i) for i in range(4)]
    dead = [n.open(30100 + i) for i in range(closed)]
    x = n.open(30200)
    assert n.host_send(c, 192 * KIB) == 192 * KIB
    for m in fl:
        assert n.host_send(m, 16 * KIB) == 16 * KIB  # floors: the budget is spent
    for m in dead + [x]:
        assert n.host_send(m, 50 * KIB) == 0
    assert list(n.e._swait) == [m.flow for m in dead + [x]]
    for m in dead:
        n.e.shutdown_tcp(m.flow, 0.0)
    n.release(c, 192 * KIB)
    n.e.flush_pending(0.0)
    n.pump()
    return n, x


def test_a_wake_pass_gives_up_after_wake_misses_flows_it_could_not_help():
    """A pass costs O(flows woken + WAKE_MISSES): WAKE_MISSES - 1 flows that cannot use room
    do not keep the one behind them from being woken in the same pass; WAKE_MISSES of them end
    the pass, and the retry pass (WAKE_RETRY later) wakes it."""
    from slirpy.stack.tcp import WAKE_MISSES, WAKE_RETRY
    n, x = _queue_behind_closed(WAKE_MISSES - 1)
    assert n.writable() == {x.flow} and not n.e._swait
    n, x = _queue_behind_closed(WAKE_MISSES)
    assert n.writable() == set() and list(n.e._swait) == [x.flow]
    assert n.e.get_timer() == WAKE_RETRY  # before the other flows' timers (a second away)
    for fid in [f for f in n.e._flows if f != x.flow]:
        n.e.reset_tcp(fid, 0.0)
    n.pump()
    assert n.e.get_timer() == WAKE_RETRY  # the only timer left
    n.e.handle_timer(WAKE_RETRY)
    n.pump()
    assert n.writable() == {x.flow} and not n.e._swait
    assert n.host_send(x, 50 * KIB) == 50 * KIB


def test_the_budget_rule_at_its_edges():
    """The rule of _allow as send_tcp sees it: past 3/4 of the budget a flow at its floor may
    take exactly what is left under 3/4 (down to a single byte); a flow below its floor may
    fill up to its floor from the last quarter -- the floor minus what it holds, never more."""
    n = Net(256 * KIB)
    a = n.open(30001)
    c = n.open(30002)
    assert n.host_send(a, 16 * KIB) == 16 * KIB  # a at its floor
    assert n.host_send(c, 192 * KIB - 16 * KIB - 1) == 192 * KIB - 16 * KIB - 1
    assert n.host_send(a, 100) == 1  # one byte left under 3/4
    assert n.host_send(a, 100) == 0
    n2 = Net(256 * KIB)
    a2, c2 = n2.open(30001), n2.open(30002)
    others = [n2.open(30003 + i) for i in range(3)]
    assert n2.host_send(a2, 10 * KIB) == 10 * KIB  # a2 below its floor
    assert n2.host_send(c2, 182 * KIB) == 182 * KIB  # 3/4 reached
    for m, k in zip(others, (16, 16, 12)):
        assert n2.host_send(m, k * KIB) == k * KIB  # floors from the last quarter
    assert n2.e.mem_bytes == 236 * KIB  # 20 KiB left under the budget
    assert n2.host_send(a2, 100 * KIB) == 6 * KIB  # its floor (16) minus what it holds (10)


def test_a_wake_pass_hands_a_flow_only_the_room_its_buffer_has():
    """A waiting flow whose own buffer has little room left is offered that room, not more, so
    the rest of the freed bytes reach the next waiting flow in the same pass."""
    n = Net(1 << 20)
    a, b = n.open(30001), n.open(30002)
    cs = [n.open(30003 + i) for i in range(3)]
    assert n.host_send(a, 246 * KIB) == 246 * KIB  # 10 KiB of room left in a's buffer
    for c in cs[:2]:
        assert n.host_send(c, 256 * KIB) == 256 * KIB
    assert n.host_send(cs[2], 10 * KIB) == 10 * KIB  # 768 KiB held: 3/4 of the budget
    assert n.host_send(b, 16 * KIB) == 16 * KIB  # b's floor
    assert n.host_send(a, 20 * KIB) == 0  # a waits (past its floor) ...
    assert n.host_send(b, 100 * KIB) == 0  # ... then b
    assert list(n.e._swait) == [a.flow, b.flow]
    c = cs[0]
    n.release(c, 64 * KIB)
    n.e.flush_pending(0.0)
    n.pump()
    assert n.writable() == {a.flow, b.flow}
    assert n.host_send(a, 20 * KIB) == 10 * KIB
    assert n.host_send(b, 100 * KIB) == 48 * KIB - 10 * KIB


def test_a_guest_reset_leaves_no_delayed_ack_timer_behind():
    n = Net(1 << 20)
    d = n.open(30001)
    n.seg(d, d.snd_nxt, d.hrx, ACK | PSH, b"x" * 100)  # a lone segment: its ACK is delayed
    assert list(n.e._ack_set) == [d.flow]
    n.seg(d, seq.add(d.snd_nxt, 100), d.hrx, RST)
    assert d.flow not in n.e._flows and not n.e._ack_set and n.e.get_timer() is None


def test_send_room_says_what_the_budget_lets_the_host_side_take():
    """send_room (what the glue may read from a host socket) under the budget: past 3/4, what is
    left there when that is at least a segment -- exactly one segment included -- or 0 when it
    is less (the flow then waits, counted once, and is woken when room returns, even a flow that
    never held a byte); a flow below its floor gets its floor's worth even past 3/4."""
    n = Net(256 * KIB)
    a, c = n.open(30001), n.open(30002)
    fresh = n.open(30003)
    assert n.host_send(a, 16 * KIB) == 16 * KIB  # a at its floor
    mss = n.e._flows[a.flow].mss
    assert n.host_send(c, 192 * KIB - 16 * KIB - mss) == 192 * KIB - 16 * KIB - mss
    assert n.e.send_room(a.flow) == mss  # exactly one segment: offered
    assert n.host_send(c, 1) == 1
    cut = n.stats.dropped["tcp_mem_cap_send"]
    assert n.e.send_room(a.flow) == 0  # one byte short of a segment: 0, and a waits
    assert n.e.send_room(a.flow) == 0
    assert list(n.e._swait) == [a.flow] and n.e._flows[a.flow].snd.limited
    assert n.stats.dropped["tcp_mem_cap_send"] == cut + 1  # counted once per wait
    assert n.e.send_room(fresh.flow) == 16 * KIB  # below its floor: the floor, from the last quarter
    assert n.host_send(fresh, 16 * KIB) == 16 * KIB
    assert n.e.send_room(fresh.flow) == 0 and list(n.e._swait) == [a.flow, fresh.flow]
    n.release(c, 192 * KIB - 16 * KIB - mss + 1)
    n.e.flush_pending(0.0)
    n.pump()
    assert a.flow in n.writable()  # the room goes to the longest waiting first
    n2 = Net(1 << 20)
    full = n2.open(30001)
    others = [n2.open(30002 + i) for i in range(2)]
    assert n2.host_send(full, 256 * KIB - 1) == 256 * KIB - 1  # one byte of buffer room left
    for m in others:
        assert n2.host_send(m, 256 * KIB) == 256 * KIB
    last = n2.open(30010)
    assert n2.host_send(last, 1) == 1  # 768 KiB: exactly 3/4 of the budget
    assert n2.e.send_room(full.flow) == 0  # that one byte is past 3/4: not offered
    n3 = Net(256 * KIB)
    big, low = n3.open(30001), n3.open(30002)
    assert n3.host_send(big, 100 * KIB) == 100 * KIB
    assert n3.e.send_room(low.flow) == 92 * KIB  # under 3/4 but less than its buffer's room


def test_a_flow_cut_before_it_ever_held_a_byte_is_woken_too():
    """The glue asks send_room before it reads anything: a flow the budget cut then (no send
    buffer yet) is woken like any other when bytes are freed."""
    n = Net(256 * KIB)
    c = n.open(30001)
    assert n.host_send(c, 192 * KIB) == 192 * KIB
    fl = [n.open(30002 + i) for i in range(4)]
    for m in fl:
        assert n.host_send(m, 16 * KIB) == 16 * KIB  # the whole budget held
    fresh = n.open(30010)
    assert n.e.send_room(fresh.flow) == 0 and n.e._flows[fresh.flow].snd.buf is None
    n.release(c, 64 * KIB)
    n.e.flush_pending(0.0)
    n.pump()
    assert fresh.flow in n.writable() and n.e.send_room(fresh.flow) > 0
