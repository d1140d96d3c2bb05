"""Parsing of `-p/--port [HOSTADDR:]HOSTPORT:GUESTPORT[/tcp|/udp]` (IPv6 HOSTADDR in brackets)."""

from __future__ import annotations

import ipaddress

from .config import PortForward


class PortSpecError(ValueError):
    pass


def _port(text: str, what: str, spec: str) -> int:
    if not text.isdigit():
        raise PortSpecError(f"--port {spec}: {what} {text!r} is not a number")
    n = int(text)
    if not 1 <= n <= 65535:
        raise PortSpecError(f"--port {spec}: {what} {n} is out of range 1..65535")
    return n


def parse_port_spec(spec: str) -> PortForward:
    rest, proto = spec, "tcp"
    if "/" in spec:
        rest, proto = spec.rsplit("/", 1)
        proto = proto.lower()
        if proto not in ("tcp", "udp"):
            raise PortSpecError(f"--port {spec}: protocol must be tcp or udp, not {proto!r}")
    host_addr = "0.0.0.0"
    if rest.startswith("["):
        end = rest.find("]")
        if end < 0 or rest[end + 1 : end + 2] != ":":
            raise PortSpecError(f"--port {spec}: expected [IPV6]:HOSTPORT:GUESTPORT")
        host_addr, rest = rest[1:end], rest[end + 2 :]
        parts = rest.split(":")
        if len(parts) != 2:
            raise PortSpecError(f"--port {spec}: expected [IPV6]:HOSTPORT:GUESTPORT")
    else:
        parts = rest.split(":")
        if len(parts) == 3:
            host_addr, parts = parts[0], parts[1:]
        elif len(parts) != 2:
            raise PortSpecError(f"--port {spec}: expected [HOSTADDR:]HOSTPORT:GUESTPORT[/tcp|/udp]")
    try:
        host_addr = str(ipaddress.ip_address(host_addr))
    except ValueError:
        raise PortSpecError(f"--port {spec}: {host_addr!r} is not an IP address") from None
    return PortForward(proto=proto, host_addr=host_addr,
                       host_port=_port(parts[0], "host port", spec),
                       guest_port=_port(parts[1], "guest port", spec))
