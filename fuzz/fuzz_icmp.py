"""atheris harness: icmp parser. Invariant: parses or returns a drop reason, never raises."""

from __future__ import annotations

import atheris

with atheris.instrument_imports():
    from slirpy.stack import wire, tcp_options

from _harness import run


def TARGET(data: bytes) -> None:
    mv = memoryview(data)
    wire.parse_icmp_untrusted(mv)
    wire.parse_icmp_untrusted(mv, 0xABCD)


if __name__ == "__main__":
    run(TARGET)
