"""Egress policy: which destinations the guest may reach. Pure (rules in, a decision out).

A rule is ``[tcp|udp|icmp:]ADDR[/PREFIX][:PORT[-PORT]]``: IPv4 as it is, IPv6 in brackets
(``[2001:db8::]/32:443``, also ``[2001:db8::/32]:443``), or a named set:

- ``private``: RFC 1918 (10/8, 172.16/12, 192.168/16), CGNAT 100.64/10, link-local 169.254/16
  (with the cloud metadata address 169.254.169.254), ULA fc00::/7, link-local fe80::/10;
- ``host-loopback``: the gateway addresses the guest uses for the host's loopback (CIDR base + 2,
  fd00::2; addrmap maps them to 127.0.0.1 / ::1);
- ``dns``: the DNS forwarder's addresses (CIDR base + 3, fd00::3);
- ``any``: every address (0.0.0.0/0 and ::/0).

Addresses are the ones the guest uses (the destination of its packets, before addrmap maps the
gateway to the host's loopback): ``tcp:10.0.2.2:5432`` (or ``tcp:host-loopback:5432``) is
the host's 127.0.0.1:5432. A rule on 127.0.0.0/8 or ::1 would never match (the guest's own
loopback never reaches slirpy) and is refused with a pointer to ``host-loopback``. An IPv4-mapped
IPv6 destination (``::ffff:192.0.2.1``, which the host dials as IPv4) is matched by the IPv4 rules.

A rule without a protocol covers TCP, UDP and ICMP; with ports it covers TCP and UDP only
(ICMP echo has no port). First match wins; no match: allow, or deny with ``default_deny``.
DNS (TCP and UDP to the DNS address, port 53: slirpy's forwarder, not a destination of its own)
is a switch of its own: only rules naming the set ``dns`` decide for it (``--deny=dns``;
``--disable-dns`` turns the forwarder off), never an address rule, another set (``private``,
``any``, which contain the DNS address) or the default. Forwarded inbound connections never
pass here (they are not egress).

The check (``Policy.check``) is what ``AddressMap(config, policy=...)`` calls: only when a flow
is created (a TCP SYN, the first datagram of a UDP flow, the first echo of a ping flow), O(rules).
A denial is the verdict ``refuse("policy_rule_<id>", "admin")`` (ICMP administratively
prohibited; "policy_default_deny" for the default); the NATs count it per reason. Each rule
counts its hits. The table holds at most MAX_RULES rules (more: RuleError; counted in
``refused`` when it comes from the API).
"""

from __future__ import annotations

import ipaddress
from typing import Callable, NamedTuple

from . import addrmap
from ..config import IPV6_DNS, IPV6_GATEWAY

MAX_RULES = 256  # the rule table's cap (command line and API together)
MAX_RULE_TEXT = 200  # characters in one rule
PROTOS = ("tcp", "udp", "icmp")
ALLOW, DENY = "allow", "deny"

_V4 = ipaddress.IPv4Network
_V6 = ipaddress.IPv6Network
NAMED_FIXED = {
    "private": (_V4("10.0.0.0/8"), _V4("172.16.0.0/12"), _V4("192.168.0.0/16"),
                _V4("100.64.0.0/10"), _V4("169.254.0.0/16"), _V6("fc00::/7"), _V6("fe80::/10")),
    "any": (_V4("0.0.0.0/0"), _V6("::/0")),
}
NAMED_FROM_CONFIG = ("host-loopback", "dns")
NAMES = tuple(NAMED_FIXED) + NAMED_FROM_CONFIG
_LOOPBACK4 = _V4("127.0.0.0/8")
_MAPPED = (0xFFFF << 32, ((1 << 96) - 1) << 32)  # ::ffff:0:0/96 as (net, mask)


class RuleError(ValueError):
    """A rule that cannot be used; str() is one line for the user."""


class Rule(NamedTuple):
    """One parsed rule (without its action). ``name``: a named set (then ``net`` is None)."""
    proto: str | None
    name: str | None
    net: ipaddress.IPv4Network | ipaddress.IPv6Network | None
    ports: tuple[int, int] | None

    def __str__(self) -> str:
        out = f"{self.proto}:" if self.proto else ""
        if self.name is not None:
            out += self.name
        elif self.net.version == 6:
            out += f"[{self.net.network_address}]"
            if self.net.prefixlen != 128:
                out += f"/{self.net.prefixlen}"
        else:
            out += str(self.net.network_address)
            if self.net.prefixlen != 32:
                out += f"/{self.net.prefixlen}"
        if self.ports is not None:
            lo, hi = self.ports
            out += f":{lo}" if lo == hi else f":{lo}-{hi}"
        return out


def _number(text: str, what: str, lo: int, hi: int) -> int:
    if not text or not text.isdigit() or not text.isascii() or len(text) > 5:
        raise RuleError(f"{what} {text!r} is not a number")
    v = int(text)
    if not lo <= v <= hi:
        raise RuleError(f"{what} {v} out of range {lo}..{hi}")
    return v


def _ports(text: str) -> tuple[int, int]:
    a, dash, b = text.partition("-")
    lo = _number(a, "port", 1, 65535)
    hi = _number(b, "port", 1, 65535) if dash else lo
    if hi < lo:
        raise RuleError(f"port range {lo}-{hi} is empty (the first port is larger)")
    return lo, hi


def parse_rule(text) -> Rule:
    """``[tcp|udp|icmp:]ADDR[/PREFIX][:PORT[-PORT]]`` -> Rule. Raises RuleError (one line,
    the rule first)."""
    if not isinstance(text, str):
        raise RuleError("a rule is a string")
    try:
        return _parse(text)
    except RuleError as e:
        shown = text if text.isascii() and text.isprintable() and " " not in text else \
            repr(text).encode("ascii", "backslashreplace").decode()
        raise RuleError(f"{shown if len(shown) <= 60 else shown[:57] + '...'}: {e}") from None


def _parse(text: str) -> Rule:
    if not isinstance(text, str):
        raise RuleError("a rule is a string")
    if not text:
        raise RuleError("empty rule")
    if len(text) > MAX_RULE_TEXT:
        raise RuleError(f"rule longer than {MAX_RULE_TEXT} characters")
    if not text.isascii() or not text.isprintable() or any(c.isspace() for c in text):
        raise RuleError("only printable ASCII without spaces")
    rest, proto = text, None
    head, sep, tail = text.partition(":")
    if sep and head.lower() in PROTOS:
        proto, rest = head.lower(), tail
    if not rest:
        raise RuleError(f"no address (ADDR, [IPV6], or one of {', '.join(NAMES)})")
    plen_text = None
    if rest.startswith("["):
        end = rest.find("]")
        if end < 0:
            raise RuleError("no ']' after the IPv6 address")
        addr_text, rest = rest[1:end], rest[end + 1:]
        addr_text, slash, inner_plen = addr_text.partition("/")
        if slash:
            plen_text = inner_plen
        if rest.startswith("/"):
            if slash:
                raise RuleError("two prefix lengths")
            plen_text, _, port_text = rest[1:].partition(":")
            has_port = ":" in rest
        else:
            if rest and not rest.startswith(":"):
                raise RuleError("expected /PREFIX or :PORT after ']'")
            port_text, has_port = rest[1:], bool(rest)
        try:
            if "%" in addr_text:
                raise ValueError("a scope")
            addr = ipaddress.IPv6Address(addr_text)
        except ValueError:
            raise RuleError(f"{addr_text!r} is not an IPv6 address") from None
        name = None
    else:
        if rest.count(":") > 1:
            raise RuleError("IPv6 addresses go in brackets: [ADDR]/PREFIX:PORT")
        addr_text, has_port_sep, port_text = rest.partition(":")
        has_port = bool(has_port_sep)
        addr_text, slash, plen = addr_text.partition("/")
        if slash:
            plen_text = plen
        name = addr_text.lower() if addr_text.lower() in NAMES else None
        addr = None
        if name is None:
            try:
                addr = ipaddress.IPv4Address(addr_text)
            except ValueError:
                raise RuleError(f"{addr_text!r} is not an IPv4 address, [IPv6] or one of "
                                f"{', '.join(NAMES)}") from None
        elif plen_text is not None:
            raise RuleError(f"the named set {name} takes no /PREFIX")
    net = None
    if name is None:
        bits = addr.max_prefixlen
        plen = bits if plen_text is None else _number(plen_text, "prefix length", 0, bits)
        net = ipaddress.ip_network((addr, plen), strict=False)
        if (net.version == 4 and net.subnet_of(_LOOPBACK4)) or (
                net.version == 6 and net.prefixlen == 128 and net.network_address.is_loopback):
            raise RuleError("the guest's own loopback never reaches slirpy; the host's "
                            "loopback is host-loopback (the gateway address, e.g. 10.0.2.2)")
    ports = None
    if has_port:
        if proto == "icmp":
            raise RuleError("icmp rules take no port (ICMP echo has none)")
        ports = _ports(port_text)
    return Rule(proto, name, net, ports)


def parse_action(action) -> str:
    if action not in (ALLOW, DENY):
        raise RuleError(f"action {action!r}: allow or deny")
    return action


class _Entry:
    __slots__ = ("id", "action", "rule", "proto", "ports", "nets4", "nets6", "hits", "verdict")

    def __init__(self, rid: int, action: str, rule: Rule, nets):
        self.id, self.action, self.rule, self.hits = rid, action, rule, 0
        self.proto, self.ports = rule.proto, rule.ports
        self.nets4 = tuple((int(n.network_address), int(n.netmask)) for n in nets if n.version == 4)
        self.nets6 = tuple((int(n.network_address), int(n.netmask)) for n in nets if n.version == 6)
        self.verdict = addrmap.refuse(f"policy_rule_{rid}", "admin") if action == DENY else None

    def as_dict(self) -> dict:
        return {"id": self.id, "action": self.action, "rule": str(self.rule), "hits": self.hits}


DEFAULT_DENIED = addrmap.refuse("policy_default_deny", "admin")
_DEFAULT = object()  # _match: no rule matched

# on_deny(rule id or None for the default, rule text or "default", proto, family, dst, dport)
DenyHook = Callable[[int | None, str, str, int, str, int], None]


class Policy:
    """The rule table of one daemon: ``check`` for AddressMap, add/remove/rules for the API.

    ``config``: what the named sets host-loopback and dns resolve to (its CIDR). ``rules``:
    [(action, Rule or rule text)] in order. ``on_deny``: called for every denial (the glue logs
    it, rate-limited).
    ``default_hits``: the flows no rule matched (DNS apart).
    """

    def __init__(self, config, rules=(), default_deny: bool = False,
                 on_deny: DenyHook | None = None, max_rules: int = MAX_RULES):
        self.default_deny = default_deny
        self.on_deny = on_deny
        self.max_rules = max_rules
        self._named = dict(NAMED_FIXED)
        self._named["host-loopback"] = (_V4(f"{config.gateway}/32"), _V6(f"{IPV6_GATEWAY}/128"))
        self._named["dns"] = (_V4(f"{config.dns}/32"), _V6(f"{IPV6_DNS}/128"))
        self._dns4, self._dns6 = str(config.dns), str(IPV6_DNS)
        self._entries: list[_Entry] = []
        self._flat: list[tuple] = []  # _rebuild(): the entries as tuples for the check's loop
        self._next_id = 1
        self.default_hits = 0
        self.refused = 0  # rules the API could not add: the table was full
        for action, rule in rules:
            self.add(action, rule)

    # ------------------------------------------------------------------ the table
    def add(self, action: str, rule, index: int | None = None) -> int:
        """Insert a rule (at ``index``, 0 = first; None: last); returns its id. RuleError for a
        bad rule or a full table."""
        parse_action(action)
        if not isinstance(rule, Rule):
            rule = parse_rule(rule)
        if len(self._entries) >= self.max_rules:
            raise RuleError(f"rule table full ({self.max_rules} rules)")
        if index is not None and not (type(index) is int and 0 <= index <= len(self._entries)):
            raise RuleError(f"index {index!r} out of range 0..{len(self._entries)}")
        nets = self._named[rule.name] if rule.name is not None else (rule.net,)
        e = _Entry(self._next_id, action, rule, nets)
        self._next_id += 1
        self._entries.insert(len(self._entries) if index is None else index, e)
        self._rebuild()
        return e.id

    def remove(self, rid: int) -> None:
        """KeyError: no rule with this id."""
        for i, e in enumerate(self._entries):
            if e.id == rid:
                del self._entries[i]
                self._rebuild()
                return
        raise KeyError(rid)

    def rules(self) -> list[dict]:
        return [e.as_dict() for e in self._entries]

    def stats(self) -> dict:
        return {"default": DENY if self.default_deny else ALLOW, "default_hits": self.default_hits,
                "rules": self.rules(), "max_rules": self.max_rules, "refused": self.refused}

    def __len__(self) -> int:
        return len(self._entries)

    # ------------------------------------------------------------------ the check
    def _match(self, proto: str, family: int, dst: str, dport: int):
        """The first entry that covers this destination, or _DEFAULT."""
        try:
            a = int(ipaddress.ip_address(dst))
        except ValueError:
            return _DEFAULT
        if family == 6 and a & _MAPPED[1] == _MAPPED[0]:  # ::ffff:a.b.c.d: the host dials IPv4
            family, a = 4, a & 0xFFFFFFFF
        if self._is_dns(proto, dst, dport):  # DNS is its own switch: only rules naming it
            for e in self._entries:
                if e.rule.name == "dns" and (e.proto is None or e.proto == proto) and (
                        e.ports is None or e.ports[0] <= dport <= e.ports[1]):
                    return e
            return _DEFAULT
        if proto == "icmp":
            dport = -1  # no port rule covers ICMP
        v4 = family == 4
        # one flat tuple per rule (no attribute lookups in the loop): ~60 ns a rule
        for rproto, lo, hi, n4, n6, e in self._flat:
            if (rproto is None or rproto == proto) and lo <= dport <= hi:
                for net, mask in (n4 if v4 else n6):
                    if a & mask == net:
                        return e
        return _DEFAULT

    def _rebuild(self) -> None:
        self._flat = [(e.proto, *(e.ports or (-1, 65535)), e.nets4, e.nets6, e)
                      for e in self._entries]

    def _is_dns(self, proto: str, dst: str, dport: int) -> bool:
        return dport == 53 and proto != "icmp" and (dst == self._dns4 or dst == self._dns6)

    def check(self, proto: str, family: int, dst: str, dport: int) -> addrmap.Verdict | None:
        """AddressMap's policy hook: a REFUSE verdict, or None (go on). Counts the hit."""
        if not self._entries and not self.default_deny:
            if not self._is_dns(proto, dst, dport):
                self.default_hits += 1
            return None
        e = self._match(proto, family, dst, dport)
        if e is _DEFAULT:
            if self._is_dns(proto, dst, dport):
                return None  # the forwarder: not the default's to decide
            self.default_hits += 1
            if not self.default_deny:
                return None
            if self.on_deny is not None:
                self.on_deny(None, "default", proto, family, dst, dport)
            return DEFAULT_DENIED
        e.hits += 1
        if e.verdict is not None and self.on_deny is not None:
            self.on_deny(e.id, f"{e.action} {e.rule}", proto, family, dst, dport)
        return e.verdict

    def denies(self, proto: str, family: int, dst: str, dport: int) -> bool:
        """Would a new flow to this destination be denied now? (no hit counted; for the flows
        open when the rules change)"""
        e = self._match(proto, family, dst, dport)
        if e is _DEFAULT:
            return self.default_deny and not self._is_dns(proto, dst, dport)
        return e.verdict is not None
