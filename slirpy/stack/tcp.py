"""Sans-IO TCP engine (STUB: answers every SYN with RST until the real engine lands).

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
"""

from __future__ import annotations

from . import seq

FIN, SYN, RST, PSH, ACK, URG, ECE, CWR = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80


class TcpEngine:
    def __init__(self, config, emit, push_event, stats):
        self.config = config
        self._emit = emit
        self._push = push_event
        self.stats = stats

    def on_segment(self, family, src, sport, dst, dport, seqno, ackno, flags, window, options,
                   payload, now):
        if flags & RST:
            return
        # RFC 9293 3.10.7.1 reset generation for a segment to a closed port.
        if flags & ACK:
            self._emit(family, dst, dport, src, sport, ackno, 0, RST, 0, b"", b"")
        else:
            n = len(payload) + (1 if flags & SYN else 0) + (1 if flags & FIN else 0)
            self._emit(family, dst, dport, src, sport, 0, seq.add(seqno, n), RST | ACK, 0, b"", b"")
        self.stats.drop("tcp_not_implemented")

    def get_timer(self):
        return None

    def handle_timer(self, now):
        pass

    def flush_pending(self, now):
        pass

    def flows(self):
        return []
