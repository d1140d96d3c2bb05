"""atheris harness: reassembly fed a stream of (key, offset, more, data, dt) records.
Invariants: never raises; entries <= cap; bytes held <= cap and equals the pieces' sum;
every completed datagram is <= 65535 bytes."""

from __future__ import annotations

import atheris

with atheris.instrument_imports():
    from slirpy.stack.reassembly import Reassembler
    from slirpy.stack.stats import Stats

from _harness import run


def TARGET(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    r = Reassembler(Stats(), max_entries=8, max_bytes=4096)
    now = 0.0
    for _ in range(fdp.ConsumeIntInRange(0, 64)):
        key = fdp.ConsumeIntInRange(0, 9)
        off = fdp.ConsumeIntInRange(0, 8200) * 8
        more = fdp.ConsumeBool()
        chunk = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 600))
        now += fdp.ConsumeIntInRange(0, 20)
        out = r.insert(key, off, more, chunk, now)
        assert out is None or len(out) <= 65535
        assert len(r) <= 8 and 0 <= r.bytes_held <= 4096
        assert r.bytes_held == sum(e.size for e in r._t.values())


if __name__ == "__main__":
    run(TARGET)
