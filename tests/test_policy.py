"""The egress policy (stack/policy.py), sans-IO: rule parsing, first match wins, the named sets,
the default and its DNS exception, the table cap, hits; and the NATs asking only for new flows."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slirpy.config import Config
from slirpy.stack import addrmap, events
from slirpy.stack.addrmap import AddressMap
from slirpy.stack.policy import (MAX_RULES, Policy, Rule, RuleError, parse_rule)
from slirpy.stack.stack import Stack

from test_stack import learned


@pytest.mark.parametrize("text, canon, proto, ports", [
    ("192.0.2.1", "192.0.2.1", None, None),
    ("tcp:192.0.2.0/24:22", "tcp:192.0.2.0/24:22", "tcp", (22, 22)),
    ("UDP:192.0.2.0/24:1000-2000", "udp:192.0.2.0/24:1000-2000", "udp", (1000, 2000)),
    ("icmp:0.0.0.0/0", "icmp:0.0.0.0/0", "icmp", None),
    ("[2001:db8::]/32:443", "[2001:db8::]/32:443", None, (443, 443)),
    ("[2001:db8::/32]:443", "[2001:db8::]/32:443", None, (443, 443)),
    ("tcp:[2001:db8::1]:80", "tcp:[2001:db8::1]:80", "tcp", (80, 80)),
    ("[2001:db8::1]", "[2001:db8::1]", None, None),
    ("private", "private", None, None),
    ("tcp:host-loopback:5432", "tcp:host-loopback:5432", "tcp", (5432, 5432)),
    ("dns", "dns", None, None),
    ("any:443", "any:443", None, (443, 443)),
    ("192.0.2.77/24", "192.0.2.0/24", None, None),  # host bits are the network's
])
def test_parse_good_rules(text, canon, proto, ports):
    r = parse_rule(text)
    assert (str(r), r.proto, r.ports) == (canon, proto, ports)
    assert parse_rule(str(r)) == r


@pytest.mark.parametrize("text, words", [
    ("", "empty"), ("tcp:", "no address"), ("2001:db8::1", "brackets"),
    ("[2001:db8::1", "no ']'"), ("[192.0.2.1]", "not an IPv6"), ("300.1.1.1", "not an IPv4"),
    ("192.0.2.0/33", "out of range"), ("192.0.2.0/x", "not a number"), ("1.2.3.4:0", "out of range"),
    ("1.2.3.4:70000", "out of range"), ("1.2.3.4:90-80", "empty"), ("icmp:1.2.3.4:80", "no port"),
    ("private/8", "no /PREFIX"), ("127.0.0.1:80", "host-loopback"), ("[::1]:80", "host-loopback"),
    ("[2001:db8::]/32/1", "not a number"), ("[2001:db8::/32]/1", "two prefix"), ("[2001:db8::]x", "expected"), ("a b", "spaces"),
    ("x" * 300, "longer"), ("[fe80::1%eth0]", "not an IPv6"), ("sctp:1.2.3.4", "not an IPv4"),
])
def test_parse_bad_rules_one_clear_line(text, words):
    with pytest.raises(RuleError) as e:
        parse_rule(text)
    assert words in str(e.value) and "\n" not in str(e.value)


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.text(max_size=60),
                 st.from_regex(r"((tcp|udp|icmp|x):)?(\[[0-9a-f:/]{0,20}\]|[0-9./a-z-]{0,20})"
                               r"(/[0-9]{0,4})?(:[0-9-]{0,12})?", fullmatch=True)))
def test_parser_never_crashes(text):
    """Any text parses to a Rule that parses back to itself, or is one RuleError line."""
    try:
        r = parse_rule(text)
    except RuleError as e:
        assert str(e) and "\n" not in str(e)
        return
    assert isinstance(r, Rule) and parse_rule(str(r)) == r


@given(st.one_of(st.none(), st.integers(), st.binary(), st.lists(st.text())))
def test_parser_refuses_non_strings(obj):
    with pytest.raises(RuleError):
        parse_rule(obj)


def _p(*rules, default_deny=False, cfg=None):
    return Policy(cfg or Config(), rules, default_deny)


def test_first_match_wins_and_hits_count():
    p = _p(("allow", "tcp:192.0.2.2:80"), ("deny", "192.0.2.0/24"))
    assert p.check("tcp", 4, "192.0.2.2", 80) is None
    v = p.check("tcp", 4, "192.0.2.2", 81)
    assert (v.kind, v.reason, v.unreach) == (addrmap.REFUSE, "policy_rule_2", "admin")
    assert p.check("udp", 4, "192.0.2.2", 80).reason == "policy_rule_2"  # tcp only: udp falls through
    assert p.check("icmp", 4, "192.0.2.9", 0).reason == "policy_rule_2"
    assert p.check("tcp", 4, "198.51.100.1", 80) is None  # default allow
    assert [(r["id"], r["hits"]) for r in p.rules()] == [(1, 1), (2, 3)]
    assert p.stats()["default_hits"] == 1


def test_ports_rules_skip_icmp_and_ranges_are_inclusive():
    p = _p(("deny", "192.0.2.0/24:1000-1002"))
    assert p.check("icmp", 4, "192.0.2.1", 0) is None
    assert [p.check("udp", 4, "192.0.2.1", port) is None for port in (999, 1000, 1002, 1003)] == \
        [True, False, False, True]


def test_ipv6_rules_and_families_apart():
    p = _p(("deny", "[2001:db8::]/32:443"), ("deny", "0.0.0.0/0:22"))
    assert p.check("tcp", 6, "2001:db8:1::2", 443).reason == "policy_rule_1"
    assert p.check("tcp", 6, "2001:db9::2", 443) is None
    assert p.check("tcp", 6, "2001:db8:1::2", 22) is None  # an IPv4 rule never covers IPv6
    assert p.check("tcp", 4, "192.0.2.2", 22).reason == "policy_rule_2"


def test_ipv4_mapped_destination_meets_the_ipv4_rules():
    """::ffff:192.0.2.2 is dialled as IPv4 by the host: the IPv4 rule covers it (no bypass)."""
    p = _p(("deny", "192.0.2.0/24"))
    assert p.check("tcp", 6, "::ffff:192.0.2.2", 80).reason == "policy_rule_1"


@pytest.mark.parametrize("dst", ["10.1.2.3", "172.31.0.1", "192.168.1.1", "100.64.0.1",
                                 "169.254.169.254", "fd12::1", "fe80::1"])
def test_private_set(dst):
    p = _p(("deny", "private"))
    assert p.check("tcp", 6 if ":" in dst else 4, dst, 80).reason == "policy_rule_1"


@pytest.mark.parametrize("dst", ["192.0.2.2", "100.128.0.1", "172.32.0.1", "2001:db8::1", "8.8.8.8"])
def test_not_private(dst):
    assert _p(("deny", "private")).check("tcp", 6 if ":" in dst else 4, dst, 80) is None


def test_host_loopback_and_dns_follow_the_cidr():
    cfg = Config(cidr=__import__("ipaddress").ip_network("10.9.0.0/16"))
    p = _p(("allow", "tcp:host-loopback:5432"), ("deny", "host-loopback"), ("deny", "dns"),
           cfg=cfg)
    assert p.check("tcp", 4, "10.9.0.2", 5432) is None
    assert p.check("tcp", 4, "10.9.0.2", 80).reason == "policy_rule_2"
    assert p.check("tcp", 6, "fd00::2", 80).reason == "policy_rule_2"
    assert p.check("udp", 4, "10.9.0.3", 53).reason == "policy_rule_3"
    assert p.check("udp", 6, "fd00::3", 53).reason == "policy_rule_3"
    assert p.check("tcp", 4, "10.0.2.2", 80) is None  # not this config's gateway


def test_default_deny_spares_dns_unless_a_rule_says_so():
    p = _p(("allow", "tcp:192.0.2.2:80"), default_deny=True)
    assert p.check("tcp", 4, "192.0.2.2", 80) is None
    assert p.check("tcp", 4, "192.0.2.2", 81).reason == "policy_default_deny"
    assert p.check("udp", 4, "10.0.2.3", 53) is None and p.check("tcp", 6, "fd00::3", 53) is None
    assert p.check("udp", 4, "10.0.2.3", 54).reason == "policy_default_deny"
    assert p.check("tcp", 4, "10.0.2.2", 22).reason == "policy_default_deny"  # host loopback too
    p.add("deny", "dns", index=0)
    assert p.check("udp", 4, "10.0.2.3", 53).reason == "policy_rule_2"


def test_dns_is_decided_only_by_rules_naming_it():
    """DNS at base+3:53 is the forwarder: address rules and other sets containing it (private,
    any, 10.0.2.0/24) do not cover it; a rule on the set dns does."""
    p = _p(("deny", "private"), ("deny", "any"), ("deny", "10.0.2.3"), default_deny=True)
    assert p.check("udp", 4, "10.0.2.3", 53) is None and p.check("tcp", 6, "fd00::3", 53) is None
    assert p.check("udp", 4, "10.0.2.3", 54).reason == "policy_rule_1"  # not DNS: an address
    p.add("deny", "udp:dns:53")
    assert p.check("udp", 4, "10.0.2.3", 53).reason == "policy_rule_4"
    assert p.check("tcp", 4, "10.0.2.3", 53) is None


def test_table_is_capped_and_ids_stay():
    p = Policy(Config(), max_rules=3)
    ids = [p.add("deny", f"192.0.2.{i}") for i in range(3)]
    with pytest.raises(RuleError, match="full"):
        p.add("deny", "192.0.2.9")
    p.remove(ids[1])
    with pytest.raises(KeyError):
        p.remove(ids[1])
    assert p.add("allow", "192.0.2.9", index=0) == 4
    assert [r["id"] for r in p.rules()] == [4, 1, 3]
    p.remove(4)
    with pytest.raises(RuleError, match="index"):
        p.add("allow", "192.0.2.10", index=9)
    with pytest.raises(RuleError, match="action"):
        p.add("maybe", "192.0.2.10")
    assert MAX_RULES == Policy(Config()).max_rules


def test_on_deny_hook_and_denies_without_counting():
    seen = []
    p = Policy(Config(), [("deny", "tcp:192.0.2.0/24")], default_deny=False,
               on_deny=lambda *a: seen.append(a))
    assert p.denies("tcp", 4, "192.0.2.5", 1) and not p.denies("udp", 4, "192.0.2.5", 1)
    assert p.rules()[0]["hits"] == 0
    p.check("tcp", 4, "192.0.2.5", 1)
    assert seen == [(1, "deny tcp:192.0.2.0/24", "tcp", 4, "192.0.2.5", 1)]


def test_through_addrmap_the_gateway_rule_is_on_the_guest_address():
    """The policy sees the guest's destination before the gateway becomes the host's loopback."""
    p = _p(("allow", "tcp:10.0.2.2:5432"), default_deny=True)
    a = AddressMap(Config(), policy=p.check)
    assert a.outbound("tcp", 4, "10.0.2.2", 5432) == addrmap.dial("127.0.0.1", 5432)
    assert a.outbound("tcp", 4, "10.0.2.2", 5433).reason == "policy_default_deny"
    assert a.outbound("udp", 4, "10.0.2.3", 53) == addrmap.TO_DNS


# ---- the NATs ask the policy once per flow, not per packet --------------------------------
class _Counting:
    def __init__(self):
        self.calls = 0

    def __call__(self, proto, family, dst, dport):
        self.calls += 1
        return None


def _daemon(stack):
    return SimpleNamespace(config=stack.config, stack=stack, now=lambda: 1.0, flush=lambda: None,
                           hot_ep=None, nursery=None, add_hot_fd=lambda *a: None,
                           remove_hot_fd=lambda *a: None)


def test_udp_and_icmp_nats_check_only_new_flows(monkeypatch):
    import socket

    from slirpy import icmp_nat, udp_nat
    s = learned(Stack(Config()))
    d = _daemon(s)
    pol = _Counting()
    addrs = AddressMap(s.config, policy=pol)
    socks = []

    def fake_socket(*_a, **_k):
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        socks.extend((a, b))
        return a
    monkeypatch.setattr(udp_nat, "open_udp_socket", fake_socket)
    monkeypatch.setattr(icmp_nat.IcmpNat, "_open", lambda self, fam, dst: fake_socket())
    u = udp_nat.UdpNat(d, addrs, None)
    for _ in range(3):
        u.handle(events.UdpDatagram(4, "10.0.2.100", 5000, "192.0.2.9", 9, b"x"))
    assert pol.calls == 1
    i = icmp_nat.IcmpNat(d, addrs)
    for seq in range(3):
        i.handle(events.IcmpEchoRequest(4, "10.0.2.100", "192.0.2.9", 7, seq, b"ping"))
    assert pol.calls == 2
    for sk in socks:
        sk.close()
