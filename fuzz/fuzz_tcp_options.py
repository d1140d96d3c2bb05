"""atheris harness: tcp_options parser. Invariant: parses or returns a drop reason, never raises."""

from __future__ import annotations

import atheris

with atheris.instrument_imports():
    from slirpy.stack import wire, tcp_options

from _harness import run


def TARGET(data: bytes) -> None:
    mv = memoryview(data)
    tcp_options.parse_tcp_options_untrusted(mv)


if __name__ == "__main__":
    run(TARGET)
