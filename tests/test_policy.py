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


# ---- the rule grammar's edges and its one-line errors (README "Egress policy", issue #23) ---
@pytest.mark.parametrize("text, message", [
    # the README's own example of an API error: the rule, then why
    ("10.0.0.0/40", "10.0.0.0/40: prefix length 40 out of range 0..32"),
    ("", ": empty rule"),
    ("tcp:", "tcp:: no address (ADDR, [IPV6], or one of private, any, host-loopback, dns)"),
    ("1.2.3.4:0", "1.2.3.4:0: port 0 out of range 1..65535"),
    ("1.2.3.4:65536", "1.2.3.4:65536: port 65536 out of range 1..65535"),
    ("1.2.3.4:80-65536", "1.2.3.4:80-65536: port 65536 out of range 1..65535"),
    ("1.2.3.4:0-80", "1.2.3.4:0-80: port 0 out of range 1..65535"),
    ("1.2.3.4:80-x", "1.2.3.4:80-x: port 'x' is not a number"),
    ("1.2.3.4:000080", "1.2.3.4:000080: port '000080' is not a number"),  # at most 5 digits
    ("1.2.3.4:90-80", "1.2.3.4:90-80: port range 90-80 is empty (the first port is larger)"),
    ("1.2.3.4/x", "1.2.3.4/x: prefix length 'x' is not a number"),
    ("[2001:db8::1", "[2001:db8::1: no ']' after the IPv6 address"),
    ("[]:80", "[]:80: '' is not an IPv6 address"),
    ("[2001:db8::1]]", "[2001:db8::1]]: expected /PREFIX or :PORT after ']'"),
    ("[2001:db8::/32]/1", "[2001:db8::/32]/1: two prefix lengths"),
    ("[2001:db8::]/32:1:2", "[2001:db8::]/32:1:2: port '1:2' is not a number"),
    ("[fe80::1%eth0]", "[fe80::1%eth0]: 'fe80::1%eth0' is not an IPv6 address"),
    ("fe80::1", "fe80::1: IPv6 addresses go in brackets: [ADDR]/PREFIX:PORT"),
    ("300.1.1.1", "300.1.1.1: '300.1.1.1' is not an IPv4 address, [IPv6] or one of private, any, "
                  "host-loopback, dns"),
    ("private/8", "private/8: the named set private takes no /PREFIX"),
    ("icmp:1.2.3.4:80", "icmp:1.2.3.4:80: icmp rules take no port (ICMP echo has none)"),
    ("127.0.0.1:80", "127.0.0.1:80: the guest's own loopback never reaches slirpy; the host's "
                     "loopback is host-loopback (the gateway address, e.g. 10.0.2.2)"),
    # not printable ASCII: shown as a Python literal, escaped, so the line stays one line
    ("a b", "'a b': only printable ASCII without spaces"),
    ("a\tb", "'a\\tb': only printable ASCII without spaces"),
    ("café", "'caf\\xe9': only printable ASCII without spaces"),
])
def test_bad_rules_exact_messages(text, message):
    with pytest.raises(RuleError) as e:
        parse_rule(text)
    assert str(e.value) == message


def test_a_long_rule_is_shown_cut_at_60_characters():
    with pytest.raises(RuleError) as e:
        parse_rule("x" * 60)
    assert str(e.value).startswith("x" * 60 + ": 'xxx")
    with pytest.raises(RuleError) as e:
        parse_rule("x" * 61)
    assert str(e.value).startswith("x" * 57 + "...: 'xxx")


def test_rule_length_cap_is_200_characters():
    # 200 characters are still parsed (here: not an address), 201 are refused by length
    with pytest.raises(RuleError) as e:
        parse_rule("x" * 200)
    assert "is not an IPv4 address" in str(e.value)
    with pytest.raises(RuleError) as e:
        parse_rule("x" * 201)
    assert str(e.value) == "x" * 57 + "...: rule longer than 200 characters"


def test_non_strings_are_one_message():
    with pytest.raises(RuleError) as e:
        parse_rule(None)
    assert str(e.value) == "a rule is a string"


def test_port_and_prefix_bounds_are_inclusive():
    assert parse_rule("1.2.3.4:1").ports == (1, 1)
    assert parse_rule("1.2.3.4:65535").ports == (65535, 65535)
    assert parse_rule("1.2.3.4:1-65535").ports == (1, 65535)
    assert parse_rule("1.2.3.4:00080").ports == (80, 80)  # five digits are still a port
    assert parse_rule("1.2.3.4/32").net.prefixlen == 32 and str(parse_rule("1.2.3.4/32")) == \
        "1.2.3.4"
    assert parse_rule("0.0.0.0/0").net.prefixlen == 0
    assert parse_rule("[2001:db8::1]/128").net.prefixlen == 128


def test_a_named_set_has_no_network():
    r = parse_rule("tcp:private:443")
    assert (r.proto, r.name, r.net, r.ports) == ("tcp", "private", None, (443, 443))


# ---- the table as the API shows it (README: list_rules) -----------------------------------
def test_stats_and_rules_have_the_readme_shape():
    p = Policy(Config())
    assert p.stats() == {"default": "allow", "default_hits": 0, "rules": [], "max_rules": 256,
                         "refused": 0}
    p.add("deny", "tcp:192.0.2.0/24:22")
    p.check("tcp", 4, "192.0.2.9", 22)
    assert p.stats() == {"default": "allow", "default_hits": 0, "max_rules": 256, "refused": 0,
                         "rules": [{"id": 1, "action": "deny", "rule": "tcp:192.0.2.0/24:22",
                                    "hits": 1}]}
    assert Policy(Config(), default_deny=True).stats()["default"] == "deny"


def test_insert_at_the_end_by_index_and_remove_names_the_id():
    p = _p(("deny", "192.0.2.1"))
    assert p.add("allow", "192.0.2.2", index=1) == 2  # index == len: append
    assert [r["rule"] for r in p.rules()] == ["192.0.2.1", "192.0.2.2"]
    with pytest.raises(KeyError) as e:
        p.remove(99)
    assert e.value.args == (99,)


# ---- the default (no rule matched) and what counts as DNS --------------------------------
def test_default_deny_without_any_rule_denies_and_counts():
    seen = []
    p = Policy(Config(), default_deny=True, on_deny=lambda *a: seen.append(a))
    v = p.check("tcp", 4, "192.0.2.9", 80)
    assert (v.kind, v.reason, v.unreach) == (addrmap.REFUSE, "policy_default_deny", "admin")
    assert seen == [(None, "default", "tcp", 4, "192.0.2.9", 80)]
    assert p.check("udp", 4, "10.0.2.3", 53) is None  # DNS: never the default's
    assert p.stats()["default_hits"] == 1
    assert p.denies("tcp", 4, "192.0.2.9", 80) and not p.denies("udp", 4, "10.0.2.3", 53)
    assert not p.denies("tcp", 6, "fd00::3", 53)
    assert p.denies("udp", 4, "10.0.2.3", 54) and p.denies("icmp", 4, "10.0.2.3", 53)


def test_default_hits_count_every_unmatched_flow_but_dns():
    p = Policy(Config())  # no rules, default allow
    for _ in range(3):
        assert p.check("tcp", 4, "192.0.2.9", 80) is None
    assert p.check("udp", 4, "10.0.2.3", 53) is None
    assert p.check("tcp", 6, "fd00::3", 53) is None
    assert p.stats()["default_hits"] == 3
    assert p.check("icmp", 4, "10.0.2.3", 53) is None  # ICMP is never DNS, whatever its id
    assert p.stats()["default_hits"] == 4
    q = _p(("deny", "192.0.2.1"))
    for _ in range(2):
        q.check("udp", 4, "198.51.100.1", 53)
    q.check("icmp", 4, "10.0.2.3", 53)
    q.check("udp", 4, "10.0.2.3", 53)
    assert q.stats()["default_hits"] == 3


def test_icmp_is_never_dns_and_never_meets_a_port_rule():
    """DNS is TCP and UDP to the DNS address port 53; an ICMP flow (whatever number it carries
    as its 'port') is decided by address rules, and rules with ports never cover ICMP."""
    p = _p(("deny", "10.0.2.3"), ("deny", "192.0.2.0/24:1-65535"))
    assert p.check("icmp", 4, "10.0.2.3", 53).reason == "policy_rule_1"
    assert p.check("udp", 4, "10.0.2.3", 53) is None
    for port in (0, 1, 53, 1000, 65535):
        assert p.check("icmp", 4, "192.0.2.1", port) is None
    assert p.check("tcp", 4, "192.0.2.1", 1).reason == "policy_rule_2"


def test_a_dns_rule_with_a_port_range_covers_port_53():
    p = _p(("deny", "udp:dns:50-60"), default_deny=True)
    assert p.check("udp", 4, "10.0.2.3", 53).reason == "policy_rule_1"
    assert p.check("tcp", 4, "10.0.2.3", 53) is None
    q = _p(("deny", "dns:54-60"))
    assert q.check("udp", 4, "10.0.2.3", 53) is None
