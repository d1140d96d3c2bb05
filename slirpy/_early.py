"""The helper forked before the command line's full parse, so that the tap exists, configured,
~20 ms sooner (cli.py's imports: argparse, the Config dataclass, ipaddress, re).

early_helper(argv) reads only the common, unambiguous forms of the flags the helper needs
(target, TAPNAME, -c, --netns-type, --userns-path, --mtu, --macaddress, --cidr, -6), and only
when every other argument is a known flag of HELP (the option list of record) with a plausible
value, every option before the operands (as Podman and RootlessKit pass them); anything else
(the `--` form, an unknown or doubtful argument, a value slirpy would refuse) means no early helper and the ordinary start. The early helper's parameters are then
compared with the Config cli.py builds (launch.start): used only when they are the same, else
abandoned (its tap goes with it) and the ordinary helper forked.
"""

from __future__ import annotations

import os

from ._usage import HELP

MIN_MTU, MAX_MTU = 68, 65521  # config.py's (not imported here: its dataclass costs ~5 ms)
# flags whose values need the full parser (a bind, an address parser): none of them comes from
# Podman or RootlessKit, which add forwards through the API socket
# (an egress rule, --allow/--deny, is parsed by stack/policy.py only; --default-deny, a plain
# flag, is read here and changes nothing the helper does)
DOUBTFUL = {"port", "dns-upstream", "outbound-addr", "outbound-addr6", "pcap-max-bytes", "allow",
            "deny"}


def _options() -> dict[str, tuple[str, bool]]:
    """{'-e': ('exit-fd', True), '--exit-fd': ('exit-fd', True), '-c': ('configure', False)...}
    from HELP's option lines: `=` after the long name means it takes a value."""
    out = {}
    for line in HELP.splitlines():
        if not line.startswith("-"):
            continue
        head = line.split()[0:2]
        short = None
        if head[0].endswith(",") and len(head[0]) == 3:
            short, long_ = head[0][:2], head[1]
        else:
            long_ = head[0]
        if not long_.startswith("--"):
            continue
        takes = "=" in long_
        name = long_[2:].split("=")[0]
        out["--" + name] = (name, takes)
        if short:
            out[short] = (name, takes)
    return out


class _Addr:
    """The IPv4Address bits the helper uses: .packed and str()."""

    def __init__(self, n: int):
        self.packed = n.to_bytes(4, "big")

    def __str__(self):
        return ".".join(str(b) for b in self.packed)


class EarlyConfig:
    """What helper.py reads of a Config."""

    def __init__(self, target, tap_name, netns_type, userns_path, configure, mtu, macaddress,
                 net: int, prefixlen: int, enable_ipv6, enable_sandbox=False,
                 enable_seccomp=False, api_socket=None, disable_dns=False,
                 disable_forward_splice=False):
        self.target, self.tap_name, self.netns_type = target, tap_name, netns_type
        self.userns_path, self.configure, self.mtu = userns_path, configure, mtu
        self.macaddress, self.enable_ipv6, self.prefixlen = macaddress, enable_ipv6, prefixlen
        self.net = net
        self.gateway, self.guest = _Addr(net + 2), _Addr(net + 100)
        # what _probe.LockdownProbe (sandbox.plan) reads; --dns-upstream never gets here
        self.enable_sandbox, self.enable_seccomp = enable_sandbox, enable_seccomp
        self.api_socket, self.disable_dns, self.dns_upstreams = api_socket, disable_dns, ()
        self.disable_forward_splice = disable_forward_splice  # helper.splice_wanted reads it

    def probe_key(self) -> tuple:
        return (self.enable_sandbox, self.enable_seccomp, self.api_socket, self.disable_dns, ())

    def key(self) -> tuple:
        return (self.target, self.tap_name, self.netns_type, self.userns_path, self.configure,
                self.mtu, self.macaddress, f"{_Addr(self.net)}/{self.prefixlen}",
                self.enable_ipv6, _stays(self))


def _stays(config) -> bool:
    """Whether the helper stays as the forward splice connector (helper.splice_wanted)."""
    from .helper import splice_wanted
    return splice_wanted(config)


def probe_key(config) -> tuple:
    return (config.enable_sandbox, config.enable_seccomp, config.api_socket, config.disable_dns,
            tuple(config.dns_upstreams))


def config_key(config) -> tuple:
    """The same key of a full Config."""
    return (config.target, config.tap_name, config.netns_type, config.userns_path,
            config.configure, config.mtu, config.macaddress, str(config.cidr), config.enable_ipv6,
            _stays(config))


def _cidr(text: str) -> tuple[int, int] | None:
    addr, sep, plen = text.partition("/")
    parts = addr.split(".")
    if not sep or not plen.isdigit() or len(parts) != 4 or not all(
            p.isdigit() and len(p) <= 3 and int(p) <= 255 and (p == "0" or p[0] != "0")
            for p in parts):
        return None
    n, pl = int.from_bytes(bytes(int(p) for p in parts), "big"), int(plen)
    if not 1 <= pl <= 25 or n & ((1 << (32 - pl)) - 1):
        return None
    return n, pl


def _mac(text: str) -> str | None:
    parts = text.split(":")
    hexdigits = "0123456789abcdefABCDEF"
    if len(parts) != 6 or not all(len(p) == 2 and p[0] in hexdigits and p[1] in hexdigits
                                  for p in parts):
        return None
    if int(parts[0], 16) & 1:
        return None
    return text.lower()


def parse(argv: list[str]) -> EarlyConfig | None:
    """The helper's parameters, or None: not sure (the ordinary start will decide)."""
    opts = _options()
    seen: dict[str, str | None] = {}
    pos: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        i += 1
        if a == "--":
            return None  # the command form: spawn_command first, the ordinary way
        if a.startswith("--"):
            name, eq, val = a.partition("=")
            if name not in opts:
                return None
            key, takes = opts[name]
            if takes and not eq:
                if i >= len(argv):
                    return None
                val, i = argv[i], i + 1
            elif not takes and eq:
                return None
        elif a.startswith("-") and len(a) > 1:
            name, val = a[:2], a[2:]
            if name not in opts:
                return None
            key, takes = opts[name]
            if takes and not val:
                if i >= len(argv):
                    return None
                val, i = argv[i], i + 1
            elif not takes and val:
                return None  # -c6 and the like: leave it to the parser
        else:
            pos.append(a)
            continue
        if pos:
            return None  # an option after an operand: only the usual order is read here
        if key in seen and key not in ("port", "dns-upstream"):
            return None  # given twice: the parser knows which one wins
        if takes and (val is None or val.startswith("-") and key not in ("userns-path",)):
            return None
        seen[key] = val if takes else None
    if "help" in seen or "version" in seen or not 1 <= len(pos) <= 2:
        return None
    if DOUBTFUL & seen.keys() or os.environ.get("SLIRPY_TCP_MEM_BUDGET") is not None:
        return None  # values only the full parser checks: no tap before it has
    if seen.get("log-level", "ERROR").upper() not in ("DEBUG", "INFO", "WARNING", "ERROR",
                                                       "CRITICAL"):
        return None
    if seen.get("target-type", "netns") != "netns":
        return None
    for fd_flag in ("exit-fd", "ready-fd"):
        if fd_flag in seen:
            v = seen[fd_flag]
            if not v.isdigit():
                return None
            try:
                os.fstat(int(v))
            except OSError:
                return None
    netns_type = seen.get("netns-type", "pid")
    target = pos[0]
    tap = pos[1] if len(pos) == 2 else "tap0"
    if netns_type == "pid":
        if not target.isdigit() or int(target) <= 0:
            return None
    elif netns_type != "path" or not target:
        return None
    else:
        try:
            os.stat(target)  # cli.py refuses a path that does not exist
        except OSError:
            return None
    if "userns-path" in seen and not os.access(seen["userns-path"], os.F_OK):
        return None  # cli.py: "userns path doesn't exist"
    if not tap or len(tap.encode()) > 15 or "/" in tap or tap in (".", "..") or \
            any(c.isspace() for c in tap):
        return None
    mtu = 1500
    if "mtu" in seen:
        if not seen["mtu"].isdigit():
            return None
        mtu = int(seen["mtu"])
        if not MIN_MTU <= mtu <= MAX_MTU:
            return None
    ipv6 = "enable-ipv6" in seen
    if ipv6 and mtu < 1280:
        return None
    net, plen = 0x0A000200, 24
    if "cidr" in seen:
        c = _cidr(seen["cidr"])
        if c is None:
            return None
        net, plen = c
    mac = None
    if "macaddress" in seen:
        mac = _mac(seen["macaddress"])
        if mac is None:
            return None
    return EarlyConfig(target, tap, netns_type, seen.get("userns-path"), "configure" in seen,
                       mtu, mac, net, plen, ipv6, "enable-sandbox" in seen,
                       "enable-seccomp" in seen, seen.get("api-socket"), "disable-dns" in seen,
                       "disable-forward-splice" in seen)


def early_helper(argv: list[str]):
    """-> (PendingTap, key, probe or None, probe key) or None. Never raises: any doubt is
    None. With --enable-sandbox/--enable-seccomp the lockdown probe (_probe.py) is forked too."""
    if os.environ.get("SLIRPY_NO_EARLY_HELPER"):
        return None
    try:
        cfg = parse(argv)
    except Exception:  # noqa: BLE001 - a doubt, not an error: the full parse decides
        return None
    if cfg is None:
        return None
    from .helper import start_helper
    try:
        pending = start_helper(cfg)
    except Exception:  # noqa: BLE001 - the fork failed: the ordinary start will say why
        return None
    probe = None
    if cfg.enable_sandbox or cfg.enable_seccomp:
        from ._probe import LockdownProbe
        try:
            probe = LockdownProbe(cfg)
        except Exception:  # noqa: BLE001 - launch.run forks one
            probe = None
    return pending, cfg.key(), probe, cfg.probe_key()


def take(config):
    """launch.start(): the early helper's PendingTap when it was forked for exactly this
    config; one forked for anything else is abandoned (its tap goes). None: fork one now."""
    early = globals().pop("_pending", None)
    if early is None:
        return None
    pending, key = early
    if key == config_key(config):
        return pending
    pending.abandon()
    return None


def take_probe(config):
    """launch.run(): the early lockdown probe when it was forked for this config, else None
    (one forked for another is waited for and dropped)."""
    early = globals().pop("_probe", None)
    if early is None:
        return None
    probe, key = early
    if key == probe_key(config):
        return probe
    probe.wait()
    return None


def start(argv: list[str]) -> None:
    """__main__: fork the early helper when the command line allows it."""
    got = early_helper(argv)
    if got is not None:
        pending, key, probe, pkey = got
        globals()["_pending"] = (pending, key)
        if probe is not None:
            globals()["_probe"] = (probe, pkey)
