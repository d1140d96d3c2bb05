"""atheris harness: the TCP engine driven through whole conversations.

A FuzzedDataProvider stream picks operations: guest segments (any flag byte, sequence/ack numbers
taken from the flow's real state +- a delta or fully random, window, options, payload), the glue's
calls (accept/reject a connect request, send_tcp, recv_tcp, shutdown_tcp, reset_tcp, connect_tcp
for a port forward) and time jumps that fire timers. Invariants: no exception inside the engine
(STRICT: raised, not counted as ``tcp_internal_error``), buffers and the out-of-order queue
stay within their caps, flows never exceed the flow cap, and the memory budget's running total
(small here, so it binds) equals a recount and never exceeds the budget."""

from __future__ import annotations

import atheris

with atheris.instrument_imports():
    from slirpy.config import Config
    from slirpy.stack import events as E
    from slirpy.stack.stats import Stats
    from slirpy.stack.tcp import TcpEngine

from _harness import run

from slirpy.stack import tcp as _tcp  # noqa: E402

_tcp.STRICT = True  # an exception inside the engine is a crash with its traceback

G = bytes([10, 0, 2, 100])
R = bytes([198, 51, 100, 7])
CFG = Config(tcp_mem_budget=300_000)


def TARGET(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    out, evs = [], []
    st = Stats()
    e = TcpEngine(CFG, out.append, evs.append, st)
    e.max_flows = 4
    now = 0.0
    known: list = []
    for _ in range(fdp.ConsumeIntInRange(1, 64)):
        op = fdp.ConsumeIntInRange(0, 9)
        sport = 40000 + fdp.ConsumeIntInRange(0, 3)
        if op <= 3:  # a guest segment
            f = e._by_key.get((4, G, sport, R, 80))
            mode = fdp.ConsumeIntInRange(0, 3)
            base_s = f.rcv.nxt if f is not None else 1000
            base_a = f.snd.nxt if f is not None else 0
            if mode == 0:
                s, a = base_s, base_a
            elif mode == 1:
                s = base_s + fdp.ConsumeIntInRange(-70000, 70000)
                a = base_a + fdp.ConsumeIntInRange(-70000, 70000)
            else:
                s, a = fdp.ConsumeIntInRange(0, 2**32 - 1), fdp.ConsumeIntInRange(0, 2**32 - 1)
            flags = fdp.ConsumeIntInRange(0, 255)
            win = fdp.ConsumeIntInRange(0, 65535)
            opts = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 40))
            n = fdp.ConsumeIntInRange(0, 70000)
            payload = bytes(n) if fdp.ConsumeBool() else fdp.ConsumeBytes(min(n, 64))
            e.on_segment(4, G, sport, R, 80, s & 0xFFFFFFFF, a & 0xFFFFFFFF, flags, win, opts,
                         memoryview(payload), now)
        elif op == 4:  # the glue answers connect requests
            for ev in evs:
                if isinstance(ev, E.TcpConnectRequest):
                    if fdp.ConsumeBool():
                        e.accept_tcp(ev.flow, now)
                    else:
                        e.reject_tcp(ev.flow, ["refused", "unreachable", "timeout"][
                            fdp.ConsumeIntInRange(0, 2)], now)
                    known.append(ev.flow)
            evs.clear()
        elif op == 5 and known:
            fl = known[fdp.ConsumeIntInRange(0, len(known) - 1)]
            k = fdp.ConsumeIntInRange(0, 3)
            if k == 0:
                e.send_tcp(fl, bytes(fdp.ConsumeIntInRange(0, 300000)), now)
            elif k == 1:
                e.recv_tcp(fl, fdp.ConsumeIntInRange(0, 300000), now)
            elif k == 2:
                e.shutdown_tcp(fl, now)
            else:
                e.reset_tcp(fl, now)
        elif op == 6:  # a port forward toward the guest
            fl = e.connect_tcp(4, "198.51.100.7", sport, "10.0.2.100", 80, now)
            if fl is not None:
                known.append(fl)
        elif op == 7:
            now += fdp.ConsumeIntInRange(0, 100000) / 100.0
            t = e.get_timer()
            if t is not None and t <= now:
                e.handle_timer(now)
        else:
            e.flush_pending(now)
        assert "tcp_internal_error" not in st.dropped, "exception inside the TCP engine"
        assert len(e._flows) <= 4
        assert e.mem_bytes == e.mem_recount() <= e.mem_budget, "budget total drifted"
        for f in e._flows.values():
            assert f.snd.buf is None or len(f.snd.buf) <= e.sndbuf
            assert f.rcv.buf is None or len(f.rcv.buf) <= e.rcvbuf
            if f.rcv.ooo:
                assert len(f.rcv.ooo) <= 64
                assert sum(len(b) for b, _ in f.rcv.ooo.values()) <= e.rcvbuf
        out.clear()


if __name__ == "__main__":
    run(TARGET)
