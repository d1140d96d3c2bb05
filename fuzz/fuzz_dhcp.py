"""atheris harness: the gateway's DHCP server (stack/dhcp.py). Invariant: every input parses or
returns a drop reason, never raises; a reply is always libslirp's 548-byte BOOTP message; the
lease table never outgrows the pool. One server lives across inputs (time advancing), so
sequences of messages reach the lease states."""

from __future__ import annotations

import atheris

with atheris.instrument_imports():
    from slirpy.config import Config
    from slirpy.stack import dhcp
    from slirpy.stack.stats import Stats

from _harness import run

SERVER = dhcp.DhcpServer(Config(), Stats(), bytes.fromhex("fd000000000000000000000000000003"))
CLOCK = [0.0]


def TARGET(data: bytes) -> None:
    mv = memoryview(data)
    r = dhcp.parse_bootp_untrusted(mv)
    assert type(r) in (str, tuple)
    # the first byte picks how far time moves, so offers and leases expire now and then
    CLOCK[0] += (data[0] if data else 1) * 37.0
    r = SERVER.handle_untrusted(mv, b"\0\0\0\0", b"\x02\0\0\0\0\x01", CLOCK[0])
    assert r is None or type(r) is str or len(r.payload) == dhcp.BOOTP_HDR + dhcp.OPT_LEN
    assert len(SERVER.slots) == dhcp.POOL_SIZE and len(SERVER.leased) <= dhcp.POOL_SIZE
    r6 = SERVER.handle6_untrusted(mv)
    assert type(r6) in (str, bytes)


if __name__ == "__main__":
    run(TARGET)
