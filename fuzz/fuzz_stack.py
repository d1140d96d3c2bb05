"""atheris harness: whole frames into a fresh Stack (IPv6 on and off).
Invariants: never raises; queues and reassembly stay within their caps."""

from __future__ import annotations

import atheris

with atheris.instrument_imports():
    from slirpy.config import Config
    from slirpy.stack import stack as stack_mod
    from slirpy.stack.stack import Stack

from _harness import run

from slirpy.stack import tcp as _tcp  # noqa: E402

_tcp.STRICT = True  # an exception inside the engine is a crash with its traceback

CFG4, CFG6 = Config(), Config(enable_ipv6=True)


def TARGET(data: bytes) -> None:
    # format: 1 flag byte (bit 0: IPv6 on), then records [u16 len][u8 dt seconds][frame]
    if not data:
        return
    s = Stack(CFG6 if data[0] & 1 else CFG4)
    now = 0.0
    off = 1
    for _ in range(16):
        if off + 3 > len(data):
            break
        n = int.from_bytes(data[off:off + 2], "big")
        now += data[off + 2]
        frame = data[off + 3:off + 3 + n]
        off += 3 + n
        s.receive_frame(frame, now)
        t = s.get_timer()
        if t is not None and t <= now:
            s.handle_timer(now)
    assert len(s._out) <= stack_mod.MAX_OUT_FRAMES
    s.frames_to_send(now)
    while s.next_event() is not None:
        pass
    assert len(s._reass) <= 64 and s._reass.bytes_held <= 1 << 20
    # the TCP engine turns its own exceptions into this counter: for the fuzzer it is a crash
    assert "tcp_internal_error" not in s.stats.dropped, "exception inside the TCP engine"


if __name__ == "__main__":
    run(TARGET)
