"""Command line: slirp4netns 1.2's flags, flag for flag, plus slirpy's own; builds the one Config.

Three forms:
  slirpy [OPTION]... PID [TAPNAME]
  slirpy [OPTION]... --netns-type=path PATH [TAPNAME]
  slirpy [OPTION]... -- CMD [ARG]...
Every user error is one line `slirpy: error: ...` on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import sys

from ._usage import HELP, version_text  # noqa: F401 - HELP: tests and callers read cli.HELP
from .config import MAX_MTU, MIN_MTU, Config
from .portspec import PortSpecError, parse_port_spec

MIN_TCP_MEM_BUDGET = 64 * 1024  # SLIRPY_TCP_MEM_BUDGET below this is refused

# Flags parsed and stored but not working yet: the daemon refuses them up front.
# Implementing one = deleting its line. Key: Config field; value: the flag as users type it.
NOT_IMPLEMENTED = {
}

_MAC_RE = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")


class UsageError(Exception):
    """One-line message for `slirpy: error: ...`."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse would print usage and exit 2
        raise UsageError(message)


def _build_parser() -> _Parser:
    p = _Parser(prog="slirpy", add_help=False, allow_abbrev=False)
    a = p.add_argument
    a("-c", "--configure", action="store_true")
    a("-e", "--exit-fd")
    a("-r", "--ready-fd")
    a("-m", "--mtu")
    a("-6", "--enable-ipv6", action="store_true")
    a("-a", "--api-socket")
    a("--cidr")
    a("--disable-host-loopback", action="store_true")
    a("--netns-type", default="pid")
    a("--userns-path")
    a("--enable-sandbox", action="store_true")
    a("--enable-seccomp", action="store_true")
    a("--outbound-addr")
    a("--outbound-addr6")
    a("--disable-dns", action="store_true")
    a("--macaddress")
    a("--target-type", default="netns")
    a("-p", "--port", action="append", default=[])
    a("--dns-upstream", action="append", default=[])
    a("--pcap")
    a("--pcap-max-bytes")
    a("--log-level", default="ERROR")
    a("-h", "--help", action="store_true")
    a("-v", "--version", action="store_true")
    a("positional", nargs="*")
    return p


def _fd(text: str, flag: str) -> int:
    try:
        n = int(text, 10)
    except ValueError:
        raise UsageError(f"{flag}: {text!r} is not a file descriptor number") from None
    if n < 0:
        raise UsageError(f"{flag}: {n} is not a file descriptor number")
    return n


def _dns_upstream(text: str) -> tuple[str, int]:
    port = 53
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise UsageError(f"--dns-upstream {text}: missing ']'")
        host, rest = text[1:end], text[end + 1:]
        if rest:
            if not rest.startswith(":") or not rest[1:].isdigit():
                raise UsageError(f"--dns-upstream {text}: expected [IPV6]:PORT")
            port = int(rest[1:])
    elif text.count(":") == 1:
        host, ps = text.split(":")
        if not ps.isdigit():
            raise UsageError(f"--dns-upstream {text}: port {ps!r} is not a number")
        port = int(ps)
    else:
        host = text
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError:
        raise UsageError(f"--dns-upstream {text}: {host!r} is not an IP address") from None
    if not 1 <= port <= 65535:
        raise UsageError(f"--dns-upstream {text}: port {port} out of range 1..65535")
    return host, port


def _interface_addr(name: str, family: int):
    """The first address of host interface ``name`` (as slirp4netns, which also takes a name)."""
    import socket
    try:
        socket.if_nametoindex(name)
    except OSError:
        return None
    from pyroute2 import IPRoute
    af = socket.AF_INET if family == 4 else socket.AF_INET6
    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=name)
        if not idx:
            return None
        addrs = [a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(family=af, index=idx[0])]
    addrs = [ipaddress.ip_address(a) for a in addrs if a]
    # prefer a global address to a link-local one (a link-local bind would need a scope id)
    addrs.sort(key=lambda a: a.is_link_local)
    return addrs[0] if addrs else None


def _outbound(text: str, family: int):
    """--outbound-addr(6): an address of that family, or a host interface name; it must be an
    address of this host (checked by binding a UDP socket to it), else one clear error now
    instead of every later connection failing with EADDRNOTAVAIL."""
    import socket
    flag = "--outbound-addr" if family == 4 else "--outbound-addr6"
    cls = ipaddress.IPv4Address if family == 4 else ipaddress.IPv6Address
    try:
        addr = cls(text)
    except ValueError:
        try:
            ipaddress.ip_address(text)
            raise UsageError(f"{flag} {text!r}: not an IPv{family} address") from None
        except ValueError:
            pass
        addr = _interface_addr(text, family) if re.fullmatch(r"[^/\s]{1,15}", text) else None
        if addr is None:
            raise UsageError(f"{flag} {text!r}: neither an IPv{family} address nor a host "
                             f"interface with one") from None
    if addr.is_multicast or addr.is_unspecified or addr.is_link_local:
        raise UsageError(f"{flag} {addr}: must be a unicast, non-link-local address of this host")
    s = socket.socket(socket.AF_INET if family == 4 else socket.AF_INET6, socket.SOCK_DGRAM)
    try:
        s.bind((str(addr), 0))
    except OSError as e:
        raise UsageError(f"{flag} {addr}: cannot bind to it: {e.strerror}") from None
    finally:
        s.close()
    return addr


def parse_args(argv: list[str]) -> Config | str:
    """Return a Config, or "help"/"version". Raises UsageError on bad input."""
    command = None
    if "--" in argv:
        i = argv.index("--")
        argv, command = argv[:i], tuple(argv[i + 1:])
        if not command:
            raise UsageError("-- needs a command to run")
    ns = _build_parser().parse_args(argv)
    if ns.help:
        return "help"
    if ns.version:
        return "version"
    for pos in ns.positional:
        if pos.startswith("-") and len(pos) > 1:
            raise UsageError(f"unrecognized arguments: {pos}")
    if command is not None:
        if ns.positional:
            raise UsageError("PID|PATH cannot be combined with -- CMD")
        target, tap = None, "tap0"
    else:
        if not ns.positional:
            raise UsageError("missing PID|PATH (see --help)")
        if len(ns.positional) > 2:
            raise UsageError(f"too many arguments: {' '.join(ns.positional[2:])}")
        target = ns.positional[0]
        tap = ns.positional[1] if len(ns.positional) == 2 else "tap0"
    if not tap or len(tap.encode()) > 15 or "/" in tap or tap in (".", "..") or any(c.isspace() for c in tap):
        raise UsageError(f"invalid TAPNAME {tap!r} (1..15 bytes, no '/' or spaces)")

    if ns.netns_type not in ("pid", "path"):
        raise UsageError(f"--netns-type={ns.netns_type}: must be path or pid")
    if ns.target_type == "bess":
        raise UsageError("--target-type=bess is not supported by slirpy (only netns)")
    if ns.target_type != "netns":
        raise UsageError(f"--target-type={ns.target_type}: must be netns")
    if target is not None and ns.netns_type == "pid":
        if not target.isdigit() or int(target) <= 0:
            raise UsageError(f"PID {target!r} is not a process id (use --netns-type=path for a path)")

    mtu = 1500
    if ns.mtu is not None:
        try:
            mtu = int(ns.mtu, 10)
        except ValueError:
            raise UsageError(f"--mtu {ns.mtu!r}: not a number") from None
        if not MIN_MTU <= mtu <= MAX_MTU:
            raise UsageError(f"--mtu {mtu}: out of range {MIN_MTU}..{MAX_MTU}")

    kw: dict = {}
    if ns.cidr is not None:
        try:
            cidr = ipaddress.IPv4Network(ns.cidr, strict=False)
        except ValueError:
            raise UsageError(f"--cidr {ns.cidr!r}: not an IPv4 CIDR") from None
        if not 1 <= cidr.prefixlen <= 25:
            raise UsageError(f"--cidr {ns.cidr}: prefix must be /1../25 (room for .100)")
        kw["cidr"] = cidr
    if ns.macaddress is not None:
        if not _MAC_RE.match(ns.macaddress):
            raise UsageError(f"--macaddress {ns.macaddress!r}: not a MAC address (xx:xx:xx:xx:xx:xx)")
        if int(ns.macaddress[:2], 16) & 1:
            raise UsageError(f"--macaddress {ns.macaddress}: multicast MAC not allowed")
        kw["macaddress"] = ns.macaddress.lower()
    if ns.outbound_addr is not None:
        kw["outbound_addr"] = _outbound(ns.outbound_addr, 4)
    if ns.outbound_addr6 is not None:
        kw["outbound_addr6"] = _outbound(ns.outbound_addr6, 6)
    if ns.enable_ipv6 and mtu < 1280:
        raise UsageError(f"--mtu {mtu}: IPv6 (-6) needs an MTU of at least 1280")
    ports = []
    for spec in ns.port:
        try:
            ports.append(parse_port_spec(spec))
        except PortSpecError as e:
            raise UsageError(str(e)) from None
    pcap_max = None
    if ns.pcap_max_bytes is not None:
        if not ns.pcap_max_bytes.isdigit():
            raise UsageError(f"--pcap-max-bytes {ns.pcap_max_bytes!r}: not a number")
        pcap_max = int(ns.pcap_max_bytes)
        if ns.pcap is None:
            raise UsageError("--pcap-max-bytes needs --pcap=FILE")
    env_budget = os.environ.get("SLIRPY_TCP_MEM_BUDGET")
    if env_budget is not None:
        if not env_budget.isdigit() or not MIN_TCP_MEM_BUDGET <= int(env_budget) <= 1 << 40:
            raise UsageError(f"SLIRPY_TCP_MEM_BUDGET={env_budget!r}: bytes, "
                             f"{MIN_TCP_MEM_BUDGET}..{1 << 40}")
        kw["tcp_mem_budget"] = int(env_budget)
    level = ns.log_level.upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise UsageError(f"--log-level {ns.log_level!r}: one of DEBUG, INFO, WARNING, ERROR")

    return Config(
        target=target, tap_name=tap, netns_type=ns.netns_type, userns_path=ns.userns_path,
        command=command, configure=ns.configure or command is not None,
        exit_fd=_fd(ns.exit_fd, "--exit-fd") if ns.exit_fd is not None else None,
        ready_fd=_fd(ns.ready_fd, "--ready-fd") if ns.ready_fd is not None else None,
        mtu=mtu, enable_ipv6=ns.enable_ipv6, api_socket=ns.api_socket,
        disable_host_loopback=ns.disable_host_loopback, enable_sandbox=ns.enable_sandbox,
        enable_seccomp=ns.enable_seccomp, disable_dns=ns.disable_dns, ports=tuple(ports),
        dns_upstreams=tuple(_dns_upstream(d) for d in ns.dns_upstream), pcap=ns.pcap,
        pcap_max_bytes=pcap_max, log_level=level, **kw)


def not_implemented(config: Config) -> str | None:
    """The first flag in NOT_IMPLEMENTED that this config uses, or None."""
    default = Config()
    for field, flag in NOT_IMPLEMENTED.items():
        if getattr(config, field) != getattr(default, field):
            return flag
    return None


def fail(msg: str) -> int:
    sys.stderr.write(f"slirpy: error: {msg}\n")
    sys.stderr.flush()
    return 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg = parse_args(argv)
    except UsageError as e:
        return fail(str(e))
    if cfg == "help":
        sys.stdout.write(HELP)
        return 0
    if cfg == "version":
        sys.stdout.write(version_text())
        return 0
    flag = not_implemented(cfg)
    if flag is not None:
        return fail(f"{flag}: not implemented yet")
    from .logutil import setup_logging
    setup_logging(cfg.log_level)
    from .launch import start
    started = start(cfg)  # forks the helper before the heavy imports below
    if isinstance(started, int):
        return started
    from .launch import run  # ready, then the loop (daemon.py) once trio is imported
    try:
        return run(started)
    except BaseException as e:  # a component's startup error (maybe inside an ExceptionGroup)
        msg = _startup_error(e)
        if msg is None:
            raise
        return fail(msg)


def _startup_error(e: BaseException) -> str | None:
    from .portfwd import StartupError
    if isinstance(e, StartupError):
        return str(e)
    if isinstance(e, BaseExceptionGroup):
        for sub in e.exceptions:
            m = _startup_error(sub)
            if m is not None:
                return m
    return None


if __name__ == "__main__":
    sys.exit(main())
