"""Command line: slirp4netns 1.2's flags, flag for flag, plus slirpy's own; builds the one Config.

Three forms:
  slirpy [OPTION]... PID [TAPNAME]
  slirpy [OPTION]... --netns-type=path PATH [TAPNAME]
  slirpy [OPTION]... -- CMD [ARG]...
Options are read as glibc's getopt_long reads slirp4netns's (`_getopt_long`): they may come
anywhere among the operands, long ones may be abbreviated to a unique prefix, short ones grouped
(`-c6m1500`). Values are checked in slirp4netns's order and, where it has words for the error,
with its words. Every user error is one line `slirpy: error: ...` on stderr and exit status 1.

Keep this module light to import: `--help` and `--version` are answered before anything heavy.
"""

from __future__ import annotations

import ipaddress
import os
import re
import sys

from ._usage import HELP, version_text  # noqa: F401 - tests and callers read cli.HELP
from ._usage import _git_commit  # noqa: F401 - tests read it here
from .config import MAX_MTU, MIN_MTU, Config
from .portspec import PortSpecError, parse_port_spec

MIN_TCP_MEM_BUDGET = 64 * 1024  # SLIRPY_TCP_MEM_BUDGET below this is refused

# getopt_long's tables. Short options as slirp4netns's "ce:r:m:a:6hv" plus slirpy's -p.
_SHORT = "ce:r:m:a:6hvp:"
# long name -> (takes a value, key); the key is the short letter where there is one
_LONG = {
    "configure": (False, "c"), "exit-fd": (True, "e"), "ready-fd": (True, "r"),
    "mtu": (True, "m"), "cidr": (True, "cidr"), "disable-host-loopback": (False, "dhl"),
    "netns-type": (True, "netns-type"), "userns-path": (True, "userns-path"),
    "api-socket": (True, "a"), "enable-ipv6": (False, "6"), "enable-sandbox": (False, "sandbox"),
    "enable-seccomp": (False, "seccomp"), "help": (False, "h"), "version": (False, "v"),
    "outbound-addr": (True, "outbound-addr"), "outbound-addr6": (True, "outbound-addr6"),
    "disable-dns": (False, "disable-dns"), "macaddress": (True, "macaddress"),
    "target-type": (True, "target-type"),
    # slirp4netns still takes these two (not in --help), with a warning
    "no-host-loopback": (False, "no-host-loopback"), "create-sandbox": (False, "create-sandbox"),
    # slirpy's own
    "port": (True, "p"), "dns-upstream": (True, "dns-upstream"), "pcap": (True, "pcap"),
    "pcap-max-bytes": (True, "pcap-max-bytes"), "log-level": (True, "log-level"),
    "allow": (True, "allow"), "deny": (True, "deny"), "default-deny": (False, "default-deny"),
    "disable-forward-splice": (False, "disable-forward-splice"),
}
_DEPRECATED = {"no-host-loopback": ("dhl", "--disable-host-loopback"),
               "create-sandbox": ("sandbox", "--enable-sandbox")}

_MAC_RE = re.compile(r"[0-9a-fA-F]{1,2}(:[0-9a-fA-F]{1,2}){5}")
_CIDR_RE = re.compile(r"(([0-9]{1,3}\.){3}[0-9]{1,3})/([0-9]{1,2})")  # slirp4netns's regex
_STRTOL_RE = re.compile(r"[ \t\n\v\f\r]*[+-]?[0-9]+")


class UsageError(Exception):
    """One-line message for `slirpy: error: ...`."""


def _getopt_long(argv, short=_SHORT, longopts=_LONG, permute=True):
    """glibc getopt_long over argv, lazily, so an error surfaces only after the options before
    it were handled (as in slirp4netns's loop). Yields ("opt", key, value or None) for each
    option and ("arg", text) for each operand, in argv order (operands are permuted to the end
    by glibc, which keeps their order). At the first `--` yields ("--", rest) and stops. Without
    ``permute`` (POSIXLY_CORRECT) the first operand ends the options. Errors: glibc's words."""
    i, n = 0, len(argv)
    while i < n:
        arg = argv[i]
        i += 1
        if arg == "--":
            yield ("--", argv[i:])
            return
        if arg.startswith("--"):
            name, eq, value = arg[2:].partition("=")
            full = name if name in longopts else None
            if full is None:
                cands = [k for k in longopts if k.startswith(name)]
                if not cands:
                    raise UsageError(f"unrecognized option '{arg}'")
                if len(cands) > 1:
                    raise UsageError(f"option '--{name}' is ambiguous; possibilities: "
                                     + " ".join(f"'--{c}'" for c in cands))
                full = cands[0]
            takes, key = longopts[full]
            if takes:
                if not eq:
                    if i >= n:
                        raise UsageError(f"option '--{full}' requires an argument")
                    value = argv[i]
                    i += 1
                yield ("opt", key, value)
            else:
                if eq:
                    raise UsageError(f"option '--{full}' doesn't allow an argument")
                yield ("opt", key, None)
        elif arg.startswith("-") and arg != "-":
            j = 1
            while j < len(arg):
                ch = arg[j]
                j += 1
                k = short.find(ch)
                if k < 0 or ch == ":":
                    raise UsageError(f"invalid option -- '{ch}'")
                if short[k + 1:k + 2] != ":":
                    yield ("opt", ch, None)
                    continue
                if j < len(arg):
                    value = arg[j:]
                elif i < n:
                    value = argv[i]
                    i += 1
                else:
                    raise UsageError(f"option requires an argument -- '{ch}'")
                yield ("opt", ch, value)
                break
        elif permute:
            yield ("arg", arg)
        else:
            for rest in argv[i - 1:]:
                yield ("arg", rest)
            return


def _strtol(text: str) -> int | None:
    """C strtol(text, &end, 10) with *end == '\0' and no ERANGE, else None."""
    if not _STRTOL_RE.fullmatch(text):
        return None
    v = int(text)
    return v if -(1 << 63) <= v < (1 << 63) else None


def _cidr(text: str) -> ipaddress.IPv4Network:
    """slirp4netns's parse_cidr: its checks in its order, its words."""
    m = _CIDR_RE.fullmatch(text)
    if m is None:
        raise UsageError(f"invalid CIDR: {text}")
    try:
        addr = ipaddress.IPv4Address(m.group(1))
    except ValueError:
        raise UsageError(f"invalid network address: {m.group(1)}") from None
    prefix = int(m.group(3))
    if not 1 <= prefix <= 25:
        raise UsageError("prefix length needs to be 1-25")
    net = ipaddress.IPv4Network((addr, prefix), strict=False)
    if net.network_address != addr:
        raise UsageError("CIDR needs to be a network address like 10.0.2.0/24, "
                         "not like 10.0.2.100/24")
    return net


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
    """--outbound-addr(6): an address of that family, or a host interface name that has one (as
    slirp4netns); it must also be a unicast address of this host (checked by binding a UDP socket
    to it): one clear error now instead of every later connection failing with EADDRNOTAVAIL."""
    import socket
    flag = "--outbound-addr" if family == 4 else "--outbound-addr6"
    cls = ipaddress.IPv4Address if family == 4 else ipaddress.IPv6Address
    try:
        addr = cls(text)
    except ValueError:
        addr = _interface_addr(text, family) if re.fullmatch(r"[^/\s]{1,15}", text) else None
        if addr is None:
            raise UsageError(f"{flag[2:]} has to be valid ipv{family} address or interface "
                             f"name: {text}") from None
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


def _egress_rules(rules: list[tuple[str, str]]) -> tuple:
    """--allow/--deny: each rule parsed (stack/policy.py), at most policy.MAX_RULES of them."""
    from .stack.policy import MAX_RULES, RuleError, parse_rule
    if len(rules) > MAX_RULES:
        raise UsageError(f"{len(rules)} --allow/--deny rules: at most {MAX_RULES}")
    out = []
    for action, text in rules:
        try:
            out.append((action, parse_rule(text)))
        except RuleError as e:
            raise UsageError(f"--{action}: {e}") from None
    return tuple(out)


def parse_args(argv: list[str], warnings: list[str] | None = None) -> Config | str:
    """Return a Config, or "help"/"version". Raises UsageError on bad input. Warnings that do
    not stop slirp4netns (too many operands, a deprecated flag) are appended to ``warnings``
    (without the "WARNING: " that main() prints before each)."""
    warn = warnings.append if warnings is not None else (lambda _w: None)
    o: dict = {}
    ports: list[str] = []
    upstreams: list[str] = []
    rules: list[tuple[str, str]] = []  # --allow/--deny, in argv order across both
    operands: list[str] = []
    command = None
    permute = "POSIXLY_CORRECT" not in os.environ
    # 1. the options, in argv order: what slirp4netns checks inside its getopt loop, there
    for item in _getopt_long(argv, permute=permute):
        if item[0] == "arg":
            operands.append(item[1])
            continue
        if item[0] == "--":
            if operands:  # `PID -- TAP`: getopt's end of options, the rest are operands
                operands += item[1]
            else:
                command = tuple(item[1])
                if not command:
                    raise UsageError("-- needs a command to run")
            break
        _, key, value = item
        if key == "h":
            return "help"
        if key == "v":
            return "version"
        if key in ("e", "r"):
            fd = _strtol(value)
            if fd is None or not 0 <= fd < 1 << 31:  # an int, as in slirp4netns's options
                raise UsageError(("exit-fd" if key == "e" else "ready-fd")
                                 + " must be a non-negative integer")
            o[key] = fd
        elif key == "m":
            mtu = _strtol(value)
            if mtu is None or not 0 < mtu <= MAX_MTU:
                raise UsageError(f"MTU must be a positive integer (< {MAX_MTU + 1})")
            o[key] = mtu
        elif key == "userns-path":
            if not os.access(value, os.F_OK):
                raise UsageError(f"userns path doesn't exist: {value}")
            o[key] = value
        elif key in _DEPRECATED:
            key, instead = _DEPRECATED[key]
            warn(f"--{item[1]} is deprecated and will be removed in future releases, "
                 f"please use {instead} instead.")
            o[key] = True
        elif key == "p":
            ports.append(value)
        elif key == "dns-upstream":
            upstreams.append(value)
        elif key in ("allow", "deny"):
            rules.append((key, value))
        else:
            o[key] = True if value is None else value
    configure = "c" in o or command is not None
    # 2. after the loop, slirp4netns's order: --macaddress needs -c, the target type, operands
    if "macaddress" in o and not configure:
        raise UsageError("--macaddress cannot be specified when --configure or -c is not "
                         "specified")
    target_type = o.get("target-type", "netns")
    if target_type == "bess":
        raise UsageError("--target-type=bess is not supported by slirpy (only netns)")
    if target_type != "netns":
        raise UsageError('--target-type must be either "netns" or "bess"')
    netns_type = o.get("netns-type", "pid")
    if netns_type not in ("pid", "path"):
        raise UsageError(f"--netns-type={netns_type}: must be path or pid")
    if command is not None:
        if operands:
            raise UsageError("PID|PATH cannot be combined with -- CMD")
        target, tap = None, "tap0"
    else:
        if not operands:
            raise UsageError("missing PID|PATH (see --help)")
        if len(operands) > 2:  # not an error for slirp4netns either, "for compatibility"
            warn("too many arguments")
        target = operands[0]
        tap = operands[1] if len(operands) >= 2 else "tap0"
        if netns_type == "pid":
            pid = _strtol(target)
            if pid is None or pid <= 0:
                raise UsageError("PID must be a positive integer")
        else:
            try:
                os.stat(target)
            except OSError as e:
                raise UsageError(f"existing path expected when --netns-type=path: "
                                 f"{e.strerror}") from None
    if not tap or len(tap.encode()) > 15 or "/" in tap or tap in (".", "..") or any(c.isspace() for c in tap):
        raise UsageError(f"invalid TAPNAME {tap!r} (1..15 bytes, no '/' or spaces)")

    # 3. the values slirp4netns checks when it builds its configuration, in its order
    kw: dict = {}
    if "cidr" in o:
        kw["cidr"] = _cidr(o["cidr"])
    if "outbound-addr" in o:
        kw["outbound_addr"] = _outbound(o["outbound-addr"], 4)
    if "outbound-addr6" in o:
        kw["outbound_addr6"] = _outbound(o["outbound-addr6"], 6)
    if "macaddress" in o:
        mac = o["macaddress"]
        if not _MAC_RE.fullmatch(mac):
            raise UsageError(f'"{mac}" is an invalid MAC address (hex string, 6 bytes, each byte '
                             "separated by a ':')")
        mac = ":".join(f"{int(b, 16):02x}" for b in mac.split(":"))
        if int(mac[:2], 16) & 1:
            raise UsageError(f"--macaddress {mac}: multicast MAC not allowed")
        kw["macaddress"] = mac

    # 4. what only slirpy checks
    mtu = o.get("m", 1500)
    if mtu < MIN_MTU:
        raise UsageError(f"MTU must be at least {MIN_MTU} (IPv4's minimum)")
    if "6" in o and mtu < 1280:
        raise UsageError(f"--mtu {mtu}: IPv6 (-6) needs an MTU of at least 1280")
    parsed_ports = []
    for spec in ports:
        try:
            parsed_ports.append(parse_port_spec(spec))
        except PortSpecError as e:
            raise UsageError(str(e)) from None
    pcap, pcap_max = o.get("pcap"), None
    if "pcap-max-bytes" in o:
        text = o["pcap-max-bytes"]
        if not text.isdigit():
            raise UsageError(f"--pcap-max-bytes {text!r}: not a number")
        pcap_max = int(text)
        if pcap is None:
            raise UsageError("--pcap-max-bytes needs --pcap=FILE")
    egress = _egress_rules(rules)
    env_budget = os.environ.get("SLIRPY_TCP_MEM_BUDGET")
    if env_budget is not None:
        if not env_budget.isdigit() or not MIN_TCP_MEM_BUDGET <= int(env_budget) <= 1 << 40:
            raise UsageError(f"SLIRPY_TCP_MEM_BUDGET={env_budget!r}: bytes, "
                             f"{MIN_TCP_MEM_BUDGET}..{1 << 40}")
        kw["tcp_mem_budget"] = int(env_budget)
    log_level = o.get("log-level", "ERROR")
    level = log_level.upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise UsageError(f"--log-level {log_level!r}: one of DEBUG, INFO, WARNING, ERROR")

    return Config(
        target=target, tap_name=tap, netns_type=netns_type, userns_path=o.get("userns-path"),
        command=command, configure=configure, exit_fd=o.get("e"), ready_fd=o.get("r"),
        mtu=mtu, enable_ipv6="6" in o, api_socket=o.get("a"), disable_host_loopback="dhl" in o,
        enable_sandbox="sandbox" in o, enable_seccomp="seccomp" in o,
        disable_dns="disable-dns" in o, ports=tuple(parsed_ports),
        dns_upstreams=tuple(_dns_upstream(d) for d in upstreams), pcap=pcap,
        pcap_max_bytes=pcap_max, log_level=level, egress_rules=egress,
        default_deny="default-deny" in o,
        disable_forward_splice="disable-forward-splice" in o, **kw)


def fail(msg: str) -> int:
    sys.stderr.write(f"slirpy: error: {msg}\n")
    sys.stderr.flush()
    return 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    warnings: list[str] = []
    try:
        cfg = parse_args(argv, warnings)
    except UsageError as e:
        return fail(str(e))
    if cfg == "help":
        sys.stdout.write(HELP)
        return 0
    if cfg == "version":
        sys.stdout.write(version_text())
        return 0
    if warnings:  # slirp4netns prints its warnings on stdout
        sys.stdout.write("".join(f"WARNING: {w}\n" for w in warnings))
        sys.stdout.flush()
    from .logutil import setup_logging
    setup_logging(cfg.log_level)
    from .launch import start
    started = start(cfg)  # forks the helper before the heavy imports below
    if isinstance(started, int):
        return started
    from .launch import run, startup_error  # ready, then the loop (daemon.py) once trio is imported
    try:
        return run(started)
    except BaseException as e:  # a component's startup error (maybe inside an ExceptionGroup)
        msg = startup_error(e)
        if msg is None:
            raise
        return fail(msg)


if __name__ == "__main__":
    sys.exit(main())
