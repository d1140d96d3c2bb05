"""atheris harness: ipv4 parser. Invariant: parses or returns a drop reason, never raises."""

from __future__ import annotations

import atheris

with atheris.instrument_imports():
    from slirpy.stack import wire, tcp_options

from _harness import run


def TARGET(data: bytes) -> None:
    mv = memoryview(data)
    r = wire.parse_ipv4_untrusted(mv)
    assert isinstance(r, (str, tuple))
    if isinstance(r, tuple):
        assert len(r[7]) <= len(data)


if __name__ == "__main__":
    run(TARGET)
