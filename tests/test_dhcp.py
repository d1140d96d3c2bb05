"""DHCP on the gateway (stack/dhcp.py) through the sans-IO Stack: frames built with scapy, `now`
advanced by hand, replies parsed with scapy as the oracle. The expected values are what
slirp4netns 1.2.0 / libslirp 4.7.0 answered to the same messages (measured; tests/test_e2e_dhcp.py
compares the two live), except where docs/dhcp.md lists a difference."""

from __future__ import annotations

import ipaddress
import struct

from hypothesis import given, settings, strategies as st
from scapy.layers.dhcp import BOOTP, DHCP
from scapy.layers.dhcp6 import (DHCP6_InfoRequest, DHCP6_Reply, DHCP6_Solicit, DHCP6OptClientId,
                                DHCP6OptElapsedTime, DHCP6OptIAAddress, DHCP6OptOptReq, DUID_LL)
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether

from slirpy.config import Config
from slirpy.stack import dhcp, events, wire
from slirpy.stack.stack import Stack
from slirpy.stack.stats import Stats

ROUTER_MAC = "52:55:0a:00:02:02"
MAC_A, MAC_B = "02:00:00:00:00:0a", "02:00:00:00:00:0b"
LIBSLIRP_OPTS = ["message-type", "server_id", "subnet_mask", "router", "name_server", "lease_time"]


def mac_n(i: int) -> str:
    return f"02:00:00:00:01:{i:02x}"


def frame(mac, opts, *, ciaddr="0.0.0.0", src="0.0.0.0", dst="255.255.255.255", xid=0x1234,
          op=1):
    return bytes(Ether(src=mac, dst="ff:ff:ff:ff:ff:ff") / IP(src=src, dst=dst)
                 / UDP(sport=68, dport=67)
                 / BOOTP(op=op, chaddr=bytes.fromhex(mac.replace(":", "")), xid=xid,
                         ciaddr=ciaddr)
                 / DHCP(options=opts + ["end"]))


def ask(s, mac, opts, now=1.0, **kw):
    """Send one DHCP message; -> the reply parsed by scapy, or None when nothing came."""
    s.receive_frame(frame(mac, opts, **kw), now)
    out = s.frames_to_send(now)
    if not out:
        return None
    assert len(out) == 1, out
    return Ether(bytes(out[0]))


def options(p) -> dict:
    return {o[0]: o[1] for o in p[DHCP].options if isinstance(o, tuple)}


def names(p) -> list:
    return [o[0] for o in p[DHCP].options if isinstance(o, tuple)]


def discover(mac, **kw):
    return [("message-type", "discover")] + [(k, v) for k, v in kw.items()]


def request(addr=None, **kw):
    o = [("message-type", "request")]
    if addr:
        o.append(("requested_addr", addr))
    return o + [(k, v) for k, v in kw.items()]


def lease(s, mac, now=1.0):
    p = ask(s, mac, discover(mac), now)
    addr = p[BOOTP].yiaddr
    q = ask(s, mac, request(addr), now)
    assert options(q)["message-type"] == 5
    return addr


# ------------------------------------------------------------------------------------- DHCPv4
def test_discover_gets_libslirps_offer():
    s = Stack(Config())
    p = ask(s, MAC_A, discover(MAC_A), xid=0xDEADBEEF)
    # addressing as libslirp: Ethernet and IP broadcast, from the gateway, TOS low delay
    assert p.dst == "ff:ff:ff:ff:ff:ff" and p.src == ROUTER_MAC
    assert (p[IP].src, p[IP].dst, p[IP].tos, p[IP].ttl) == ("10.0.2.2", "255.255.255.255", 0x10, 64)
    assert (p[UDP].sport, p[UDP].dport) == (67, 68)
    assert len(bytes(p[UDP].payload)) == 548 and p[IP].len == 576
    b = p[BOOTP]
    assert (b.op, b.xid, b.htype, b.hlen, b.flags) == (2, 0xDEADBEEF, 1, 6, 0)
    assert (b.yiaddr, b.siaddr, b.ciaddr, b.giaddr) == ("10.0.2.15", "10.0.2.2", "0.0.0.0",
                                                         "0.0.0.0")
    assert b.chaddr[:6] == bytes.fromhex("02000000000a") and not any(b.chaddr[6:])
    assert names(p) == LIBSLIRP_OPTS
    o = options(p)
    assert o["message-type"] == 2 and o["server_id"] == "10.0.2.2"
    assert o["subnet_mask"] == "255.255.255.0" and o["router"] == "10.0.2.2"
    assert o["name_server"] == "10.0.2.3" and o["lease_time"] == dhcp.LEASE_TIME == 86400
    # checksums the guest's kernel will check
    raw = bytes(p)
    del p[IP].chksum, p[UDP].chksum
    assert bytes(Ether(bytes(p))) == raw
    assert s.stats.dhcp["offers"] == 1 and s.stats.dhcp["leases"] == 0


def test_request_gets_ack_and_the_guest_is_reachable_at_once():
    s = Stack(Config())
    assert lease(s, MAC_A) == "10.0.2.15"
    assert s.stats.dhcp["acks"] == 1 and s.stats.dhcp["leases"] == 1
    # the ACK taught the stack the guest's MAC (libslirp: arp_table_add): a datagram for the
    # guest goes out at once, unicast, without an ARP round first
    s.send_udp(4, "198.51.100.7", 53, "10.0.2.15", 4000, b"answer", 2.0)
    (f,) = s.frames_to_send(2.0)
    p = Ether(bytes(f))
    assert p.dst == MAC_A and p[IP].dst == "10.0.2.15" and bytes(p[UDP].payload) == b"answer"
    # and the guest's traffic from its leased address is the guest's
    s.receive_frame(bytes(Ether(src=MAC_A, dst=ROUTER_MAC) / IP(src="10.0.2.15", dst="10.0.2.2")
                          / ICMP(id=1, seq=1)), 2.0)
    (f,) = s.frames_to_send(2.0)
    assert Ether(bytes(f))[IP].dst == "10.0.2.15" and Ether(bytes(f)).dst == MAC_A


def test_frames_for_a_leased_guest_with_unknown_mac_ask_for_its_address():
    s = Stack(Config())
    lease(s, MAC_A)
    s.guest_mac = wire.BROADCAST  # forget it (the stack tests identity: not known yet)
    s.send_udp(4, "198.51.100.7", 53, "10.0.2.15", 4000, b"x", 3.0)
    (arp,) = s.frames_to_send(3.0)
    assert Ether(bytes(arp)).pdst == "10.0.2.15"


def test_mtu_option_only_when_asked():
    s = Stack(Config(mtu=4000))
    p = ask(s, MAC_A, discover(MAC_A, param_req_list=[1, 3, 6, 26]))
    assert names(p) == LIBSLIRP_OPTS + ["interface-mtu"] and options(p)["interface-mtu"] == 4000
    p = ask(s, MAC_A, request("10.0.2.15", param_req_list=[1, 3, 6, 12, 15, 28, 42]))
    assert names(p) == LIBSLIRP_OPTS


def test_disable_dns_leaves_the_dns_option_out():
    s = Stack(Config(disable_dns=True))
    p = ask(s, MAC_A, discover(MAC_A))
    assert "name_server" not in options(p) and options(p)["router"] == "10.0.2.2"


def test_other_cidr():
    s = Stack(Config(cidr=ipaddress.IPv4Network("10.8.0.0/16")))
    p = ask(s, MAC_A, discover(MAC_A))
    assert p[BOOTP].yiaddr == "10.8.0.15" and p[IP].src == "10.8.0.2"
    o = options(p)
    assert (o["subnet_mask"], o["router"], o["name_server"], o["server_id"]) == (
        "255.255.0.0", "10.8.0.2", "10.8.0.3", "10.8.0.2")


def test_requested_address_inside_the_pool_is_honoured():
    s = Stack(Config())
    assert ask(s, MAC_A, discover(MAC_A, requested_addr="10.0.2.20"))[BOOTP].yiaddr == "10.0.2.20"
    p = ask(s, MAC_A, request("10.0.2.20"))
    assert options(p)["message-type"] == 5 and p[BOOTP].yiaddr == "10.0.2.20"
    # outside the pool: a DISCOVER gets a pool address anyway (libslirp)
    assert ask(s, MAC_B, discover(MAC_B, requested_addr="10.0.2.99"))[BOOTP].yiaddr == "10.0.2.15"


def test_nak_for_addresses_outside_the_pool_or_taken():
    s = Stack(Config())
    lease(s, MAC_A)
    for addr in ("10.0.2.99", "10.0.2.14", "10.0.2.31", "10.0.2.100", "192.0.2.1", "10.0.2.15"):
        p = ask(s, MAC_B, request(addr))
        assert p is not None, addr
        assert p.dst == "ff:ff:ff:ff:ff:ff" and p[IP].dst == "255.255.255.255"
        assert options(p)["message-type"] == 6, addr
        # libslirp's message; plus the server id RFC 2131 requires (udhcpc ignores a NAK without)
        assert names(p) == ["message-type", "server_id", "error_message"]
        assert options(p)["error_message"] == b"requested address not available"
        assert p[BOOTP].yiaddr == "0.0.0.0"
    assert s.stats.dhcp["naks"] == 6 and s.stats.dhcp["leases"] == 1
    # the last slot of the pool is still in it
    assert options(ask(s, MAC_B, request("10.0.2.30")))["message-type"] == 5


def test_request_without_address_gets_the_clients_lease_or_a_new_one():
    s = Stack(Config())
    lease(s, MAC_A)
    p = ask(s, MAC_A, request())
    assert options(p)["message-type"] == 5 and p[BOOTP].yiaddr == "10.0.2.15"
    p = ask(s, MAC_B, request())  # never assigned: libslirp's "Windows fix"
    assert options(p)["message-type"] == 5 and p[BOOTP].yiaddr == "10.0.2.16"


def test_renewal_unicast_to_the_gateway_with_ciaddr():
    s = Stack(Config())
    lease(s, MAC_A)
    s.receive_frame(bytes(Ether(src=MAC_A, dst=ROUTER_MAC) / IP(src="10.0.2.15", dst="10.0.2.2")
                          / UDP(sport=68, dport=67)
                          / BOOTP(chaddr=bytes.fromhex("02000000000a"), ciaddr="10.0.2.15", xid=9)
                          / DHCP(options=[("message-type", "request"), "end"])), 5000.0)
    (f,) = s.frames_to_send(5000.0)
    p = Ether(bytes(f))
    assert options(p)["message-type"] == 5 and p[BOOTP].yiaddr == "10.0.2.15"
    assert s.next_event() is None  # never a datagram for the host's port 67


def test_plain_bootp_is_answered_as_a_request():
    s = Stack(Config())
    p = ask(s, MAC_A, [])
    assert options(p)["message-type"] == 5 and p[BOOTP].yiaddr == "10.0.2.15"


def test_pool_is_sixteen_and_offers_and_leases_expire():
    s = Stack(Config())
    got = [ask(s, mac_n(i), discover(mac_n(i)), 1.0)[BOOTP].yiaddr for i in range(16)]
    assert got == [f"10.0.2.{15 + i}" for i in range(16)]
    assert ask(s, mac_n(16), discover(mac_n(16)), 2.0) is None
    assert s.stats.dropped["dhcp_pool_exhausted"] == 1
    # an offer nobody requested is held OFFER_HOLD, then the slot is free again
    p = ask(s, mac_n(16), discover(mac_n(16)), 1.0 + dhcp.OFFER_HOLD)
    assert p[BOOTP].yiaddr == "10.0.2.15"
    # leases: all 16 taken; the 17th waits until one expires (LEASE_TIME), never beyond the pool
    s = Stack(Config())
    for i in range(16):
        lease(s, mac_n(i), 10.0)
    assert s.stats.dhcp["leases"] == 16 and len(s.dhcp.leased) == 16
    assert ask(s, mac_n(16), request(), 10.0 + dhcp.LEASE_TIME - 1) is None
    p = ask(s, mac_n(16), request(), 10.0 + dhcp.LEASE_TIME)
    assert options(p)["message-type"] == 5 and p[BOOTP].yiaddr == "10.0.2.15"
    assert s.stats.dhcp["leases"] == 16 and len(s.dhcp.slots) == 16 and len(s.dhcp.leased) == 16


def test_one_lease_per_client():
    s = Stack(Config())
    lease(s, MAC_A)
    assert ask(s, MAC_A, discover(MAC_A))[BOOTP].yiaddr == "10.0.2.15"
    lease(s, MAC_B)
    assert options(ask(s, MAC_A, request("10.0.2.20")))["message-type"] == 5
    assert s.stats.dhcp["leases"] == 2
    assert ask(s, mac_n(1), discover(mac_n(1)))[BOOTP].yiaddr == "10.0.2.15"  # A's old one


def test_release_frees_the_lease():
    s = Stack(Config())
    lease(s, MAC_A)
    assert ask(s, MAC_A, [("message-type", "release"), ("server_id", "10.0.2.2")],
               ciaddr="10.0.2.15", src="10.0.2.15", dst="10.0.2.2") is None
    assert s.stats.dhcp["releases"] == 1 and s.stats.dhcp["leases"] == 0
    assert s.dhcp.leased == {}
    assert options(ask(s, MAC_B, request("10.0.2.15")))["message-type"] == 5
    # releasing someone else's address does nothing
    assert ask(s, MAC_A, [("message-type", "release")], ciaddr="10.0.2.15") is None
    assert s.stats.dropped["dhcp_release_not_leased"] == 1 and s.stats.dhcp["leases"] == 1


def test_decline_takes_the_address_out_for_a_while():
    s = Stack(Config())
    lease(s, MAC_A)
    assert ask(s, MAC_A, [("message-type", "decline"), ("requested_addr", "10.0.2.15")]) is None
    assert s.stats.dhcp["declines"] == 1 and s.stats.dhcp["leases"] == 0
    assert ask(s, MAC_A, discover(MAC_A), 2.0)[BOOTP].yiaddr == "10.0.2.16"
    assert options(ask(s, MAC_B, request("10.0.2.15"), 2.0))["message-type"] == 6
    p = ask(s, MAC_B, discover(MAC_B), 1.0 + dhcp.DECLINE_HOLD)
    assert p[BOOTP].yiaddr == "10.0.2.15"


def test_inform_gets_an_ack_without_lease_unicast():
    s = Stack(Config())
    p = ask(s, MAC_A, [("message-type", "inform")], ciaddr="10.0.2.100", src="10.0.2.100",
            dst="10.0.2.2", xid=77)
    assert p.dst == MAC_A and p[IP].dst == "10.0.2.100" and p[UDP].dport == 68
    assert p[BOOTP].yiaddr == "0.0.0.0" and p[BOOTP].ciaddr == "10.0.2.100"
    assert names(p) == ["message-type", "server_id", "subnet_mask", "router", "name_server"]
    assert options(p)["message-type"] == 5
    assert s.stats.dhcp["informs"] == 1 and s.stats.dhcp["leases"] == 0


def test_dhcp_needs_port_67_and_the_gateway_or_broadcast():
    s = Stack(Config())
    # to the subnet broadcast and to .3: libslirp does not answer either
    assert ask(s, MAC_A, discover(MAC_A), dst="10.0.2.255") is None
    assert s.stats.dropped["ipv4_multicast_or_broadcast"] == 1
    # other broadcast UDP (NetBIOS, ...) is still dropped, never an event
    s.receive_frame(bytes(Ether(src=MAC_A, dst="ff:ff:ff:ff:ff:ff")
                          / IP(src="10.0.2.15", dst="255.255.255.255") / UDP(sport=137, dport=137)
                          / b"x"), 1.0)
    assert s.frames_to_send(1.0) == [] and s.next_event() is None
    assert s.stats.dropped["ipv4_multicast_or_broadcast"] == 2
    # a server's reply (op 2) is not a request
    assert ask(s, MAC_A, discover(MAC_A), op=2) is None
    assert s.stats.dropped["dhcp_not_request"] == 1


def test_small_mtu_fragments_the_reply():
    s = Stack(Config(mtu=400))
    s.receive_frame(frame(MAC_A, discover(MAC_A)), 1.0)
    out = [Ether(bytes(f)) for f in s.frames_to_send(1.0)]
    assert len(out) == 2 and all(len(f) - 14 <= 400 for f in out)
    assert out[0][IP].flags == "MF" and out[1][IP].frag > 0
    assert all(f.dst == "ff:ff:ff:ff:ff:ff" and f[IP].dst == "255.255.255.255" for f in out)


def test_malformed_messages_are_counted_drops():
    s = Stack(Config())
    good = frame(MAC_A, discover(MAC_A))
    cases = {
        "dhcp_truncated": lambda: bytes(Ether(src=MAC_A, dst="ff:ff:ff:ff:ff:ff")
                                        / IP(src="0.0.0.0", dst="255.255.255.255")
                                        / UDP(sport=68, dport=67) / (b"\x01" * 100)),
        "dhcp_option_truncated": lambda: _with_options(b"\x35\x01\x01\x32\x04\x0a\x00"),
        "dhcp_bad_option": lambda: _with_options(b"\x35\x00\xff"),
        "dhcp_too_many_options": lambda: _with_options(b"\x00" * 1100),
    }
    for reason, build in cases.items():
        s.receive_frame(build(), 1.0)
        assert s.frames_to_send(1.0) == [], reason
        assert s.stats.dropped[reason] == 1, (reason, dict(s.stats.dropped))
    s.receive_frame(_with_options(b"\x35\x01\x01\x32\x02\x0a\x00\xff"), 1.0)
    assert s.stats.dropped["dhcp_bad_option"] == 2
    s.receive_frame(_with_options(b"\x35\x01\x09\xff"), 1.0)  # FORCERENEW: a server's message
    assert s.stats.dropped["dhcp_unsupported_type"] == 1
    assert s.stats.dhcp["leases"] == 0 and s.stats.dhcp["offers"] == 0
    s.receive_frame(good, 1.0)
    assert len(s.frames_to_send(1.0)) == 1


def _with_options(opts: bytes) -> bytes:
    msg = bytes(BOOTP(chaddr=bytes.fromhex("02000000000a"), xid=1)) + dhcp.COOKIE + opts
    assert msg[236:240] == dhcp.COOKIE
    return bytes(Ether(src=MAC_A, dst="ff:ff:ff:ff:ff:ff") / IP(src="0.0.0.0", dst="255.255.255.255")
                 / UDP(sport=68, dport=67) / msg)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=700), st.floats(0, 1e6))
def test_any_payload_parses_or_is_dropped(data, now):
    s = Stack(Config(enable_ipv6=True))
    srv = s.dhcp
    for payload in (data, dhcp.COOKIE.rjust(240, b"\x01") + data):
        r = srv.handle_untrusted(payload, b"\0\0\0\0", b"\x02" * 6, now)
        assert r is None or type(r) is str or len(r.payload) == 548
        r6 = srv.handle6_untrusted(payload)
        assert type(r6) in (str, bytes)
    assert sum(1 for e in srv.slots if e is not None) <= dhcp.POOL_SIZE and len(srv.slots) == 16


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=8)), max_size=12),
       st.integers(0, 40), st.integers(0, 3))
def test_any_option_list_and_client_keep_the_table_bounded(opts, client, t):
    s = Stack(Config())
    body = b"".join(bytes((k, len(v))) + v for k, v in opts if k not in (0, 255)) + b"\xff"
    msg = bytearray(bytes(BOOTP(chaddr=bytes((2, 0, 0, 0, 1, client)), xid=1)) + dhcp.COOKIE + body)
    for i in range(3):
        r = s.dhcp.handle_untrusted(bytes(msg), b"\0\0\0\0", b"\x02" * 6, t * 50000.0 + i)
        assert r is None or type(r) is str or len(r.payload) == 548
    assert len(s.dhcp.leased) <= 16 and s.stats.dhcp["leases"] <= 16


# ------------------------------------------------------------------------------------- DHCPv6
def ask6(s, msg, dst="ff02::1:2", src="fe80::aa", dport=547):
    s.receive_frame(bytes(Ether(src=MAC_A, dst="33:33:00:01:00:02") / IPv6(src=src, dst=dst)
                          / UDP(sport=546, dport=dport) / msg), 1.0)
    out = s.frames_to_send(1.0)
    return [Ether(bytes(f)) for f in out]


def test_information_request_gets_dns_as_libslirp():
    s = Stack(Config(enable_ipv6=True))
    (p,) = ask6(s, DHCP6_InfoRequest(trid=0x123456) / DHCP6OptClientId(duid=DUID_LL(lladdr=MAC_A))
                / DHCP6OptOptReq(reqopts=[23, 24]))
    assert p.dst == MAC_A and p[IPv6].src == "fd00::2" and p[IPv6].dst == "fe80::aa"
    assert (p[UDP].sport, p[UDP].dport) == (547, 546)
    # byte for byte what slirp4netns 1.2.0 answered to this request (its source port aside)
    assert bytes(p[UDP].payload).hex() == ("071234560001000a0003000102000000000a"
                                           "00170010fd000000000000000000000000000003")
    r = p[DHCP6_Reply]
    assert r.trid == 0x123456
    raw = bytes(p)
    del p[UDP].chksum
    assert bytes(Ether(bytes(p))) == raw
    # no DNS asked: an empty reply; unicast to fd00::2 works too
    (p,) = ask6(s, DHCP6_InfoRequest(trid=7) / DHCP6OptElapsedTime() / DHCP6OptOptReq(reqopts=[24]))
    assert bytes(p[UDP].payload) == b"\x07\x00\x00\x07"
    (p,) = ask6(s, DHCP6_InfoRequest(trid=8) / DHCP6OptOptReq(reqopts=[23]), dst="fd00::2",
                src="fd00::100")
    assert bytes(p[UDP].payload).hex() == "0700000800170010fd000000000000000000000000000003"
    assert p[IPv6].dst == "fd00::100"
    assert s.stats.dhcp["v6_replies"] == 3 and s.next_event() is None


def test_information_request_refusals_are_counted():
    s = Stack(Config(enable_ipv6=True))
    cases = [
        (DHCP6_InfoRequest(trid=1) / DHCP6OptIAAddress(), "dhcp6_ia_address"),
        (DHCP6_InfoRequest(trid=1) / b"\x00\x06\x00\x03abc", "dhcp6_bad_option_request"),
        (DHCP6_InfoRequest(trid=1) / b"\x00\x17\x00\x09abc", "dhcp6_option_truncated"),
        (DHCP6_InfoRequest(trid=1) / b"\x00\x01\x01\x01" / (b"x" * 257), "dhcp6_client_id_too_long"),
        (DHCP6_Solicit(trid=1), "dhcp6_unsupported_type"),
        (b"\x0b\x00", "dhcp6_truncated"),
    ]
    for msg, reason in cases:
        assert ask6(s, msg) == [], reason
        assert s.stats.dropped[reason] == 1, (reason, dict(s.stats.dropped))
    assert s.stats.dhcp["v6_replies"] == 0


def test_dhcpv6_without_dns_and_without_ipv6():
    s = Stack(Config(enable_ipv6=True, disable_dns=True))
    (p,) = ask6(s, DHCP6_InfoRequest(trid=5) / DHCP6OptOptReq(reqopts=[23]))
    assert bytes(p[UDP].payload) == b"\x07\x00\x00\x05"
    s = Stack(Config())
    assert ask6(s, DHCP6_InfoRequest(trid=5) / DHCP6OptOptReq(reqopts=[23])) == []
    assert s.stats.dropped["ipv6_disabled"] == 1
    # other multicast UDP stays dropped
    s = Stack(Config(enable_ipv6=True))
    assert ask6(s, b"x", dst="ff02::fb", dport=5353) == []
    assert s.stats.dropped["ipv6_multicast"] == 1 and s.next_event() is None


def test_stats_show_dhcp():
    s = Stack(Config())
    lease(s, MAC_A)
    d = s.stats.as_dict()["dhcp"]
    assert d["offers"] == 1 and d["acks"] == 1 and d["naks"] == 0 and d["leases"] == 1
    assert set(d) == set(dhcp.COUNTERS)
    # get_stats and slirpy-api stats show them
    from slirpy.api_client import format_stats
    from test_observe import FakeDaemon, observer
    fake = FakeDaemon()
    fake.stack = s
    got = observer(fake).stats()
    assert got["dhcp"]["leases"] == 1 and got["dhcp"]["offers"] == 1
    assert "dhcp        discovers=1 requests=1 offers=1 acks=1 naks=0" in format_stats(got)


def test_minus_c_guest_is_untouched():
    """With -c the guest is base+100: DHCP changes nothing for it."""
    s = Stack(Config())
    s.receive_frame(bytes(Ether(src=MAC_A, dst=ROUTER_MAC) / IP(src="10.0.2.100", dst="198.51.100.7")
                          / UDP(sport=5000, dport=67) / b"q"), 1.0)
    ev = s.next_event()
    assert isinstance(ev, events.UdpDatagram) and ev.dst == "198.51.100.7" and ev.dport == 67
    assert s.frames_to_send(1.0) == [] and s.guest_mac == bytes.fromhex("02000000000a")


# ---- the server alone (DhcpServer), raw messages: RFC 2131 / RFC 2132 / RFC 8415 rules ------
MA, MB = bytes.fromhex("52540012340a"), bytes.fromhex("52540012340b")
POOL0 = bytes([10, 0, 2, 15])  # the first pool address


def _srv():
    return dhcp.DhcpServer(Config(), Stats(), bytes(16))


def _msg(mac, opts=b"", *, ciaddr=b"\0\0\0\0", cookie=True, xid=7, chaddr_tail=bytes(10),
         vend=b""):
    """A client's BOOTP message: op 1, htype 1, hlen 6; options after the magic cookie."""
    hdr = struct.pack("!BBBBIHH4s4s4s4s16s", 1, 1, 6, 0, xid, 0, 0, ciaddr, bytes(4), bytes(4),
                      bytes(4), mac + chaddr_tail) + bytes(192)  # sname, file
    return hdr + bytes(64) + vend if not cookie else hdr + dhcp.COOKIE + opts


def _t(typ, *more):
    return bytes((53, 1, typ)) + b"".join(more) + b"\xff"


def _req_addr(a):
    return bytes((50, 4)) + a


def _yi(reply):
    return bytes(reply.payload[16:20])


def test_header_only_bootp_is_a_request_and_one_byte_less_is_truncated():
    # RFC 951: a BOOTP request; without the DHCP cookie it is plain BOOTP (answered as REQUEST)
    m = dhcp.parse_bootp_untrusted(_msg(MA)[:236])
    assert m[4] == 0 and m[3] == MA
    assert dhcp.parse_bootp_untrusted(_msg(MA)[:235]) == "dhcp_truncated"


def test_options_count_only_after_the_magic_cookie():
    # RFC 2132 2: the vendor area holds options only when it starts with 99.130.83.99
    m = dhcp.parse_bootp_untrusted(_msg(MA, cookie=False, vend=b"\x35\x01\x01\xff"))
    assert m[4] == 0 and m[5] == {}


def test_pad_options_are_skipped():
    # RFC 2132 3.1: the pad option is one byte, no length
    m = dhcp.parse_bootp_untrusted(_msg(MA, b"\0\0\0" + _t(1)))
    assert m[4] == dhcp.DISCOVER


def test_option_ending_exactly_at_the_datagram_end_without_end_option():
    # libslirp (and RFC 2131 clients that omit END) stop at the datagram end: an option that
    # fills the message exactly is whole, here a zero-length one (Rapid Commit, RFC 4039)
    m = dhcp.parse_bootp_untrusted(_msg(MA, bytes((53, 1, 1, 80, 0))))
    assert m[4] == dhcp.DISCOVER and m[5][80] == b""
    m = dhcp.parse_bootp_untrusted(_msg(MA, bytes((53, 1, 1, 12, 3)) + b"abc"))
    assert m[5][12] == b"abc"
    assert dhcp.parse_bootp_untrusted(_msg(MA, bytes((53, 1, 1, 12)))) == "dhcp_option_truncated"
    assert dhcp.parse_bootp_untrusted(_msg(MA, bytes((53, 1, 1, 12, 4)) + b"abc")) == \
        "dhcp_option_truncated"


def test_the_client_mac_is_the_first_hlen_bytes_of_chaddr():
    # RFC 2131 2: chaddr is 16 bytes, the hardware address its first hlen (6) of them
    s = _srv()
    r = s.handle_untrusted(_msg(MA, _t(3), chaddr_tail=b"\xee" * 10), b"\0" * 4, MA, 1.0)
    assert r.bound == (MA, POOL0)
    assert bytes(r.payload[28:44]) == MA + bytes(10)


def test_reply_header_fields_and_broadcast_destination():
    # RFC 2131 table 3: the server's op 2, htype 1, hlen 6, hops 0, secs 0, xid of the client
    s = _srv()
    r = s.handle_untrusted(_msg(MA, _t(1), xid=0x01020304), b"\0" * 4, MA, 1.0)
    p = bytes(r.payload)
    assert p[:4] == b"\x02\x01\x06\x00" and p[4:8] == b"\x01\x02\x03\x04" and p[8:10] == b"\0\0"
    assert r.dst_mac == b"\xff" * 6 and r.dst_ip == b"\xff" * 4
    n = s.handle_untrusted(_msg(MA, _t(3, _req_addr(bytes([10, 0, 2, 99])))), b"\0" * 4, MA, 1.0)
    assert n.dst_mac == b"\xff" * 6 and n.dst_ip == b"\xff" * 4 and bytes(n.payload[3:4]) == b"\0"


def test_a_discover_does_not_shorten_a_held_lease():
    # RFC 2131 4.3.1: the server offers the client its current binding; the binding itself
    # (ACKed, 24 h) is not replaced by the 60 s hold of an offer
    s = _srv()
    ack = s.handle_untrusted(_msg(MA, _t(3)), b"\0" * 4, MA, 1.0)
    assert _yi(ack) == POOL0 and s.leased == {POOL0: MA}
    off = s.handle_untrusted(_msg(MA, _t(1)), b"\0" * 4, MA, 2.0)
    assert _yi(off) == POOL0
    assert s.stats.dhcp["leases"] == 1 and s.leased == {POOL0: MA}
    # long after the offer's hold, the address is still the client's: another gets a NAK
    nak = s.handle_untrusted(_msg(MB, _t(3, _req_addr(POOL0))), b"\0" * 4, MB, 1000.0)
    assert bytes(nak.payload[240:243]) == bytes((53, 1, dhcp.NAK))


def test_an_expired_lease_offered_to_another_client_is_no_longer_the_first_ones():
    s = _srv()
    s.handle_untrusted(_msg(MA, _t(3)), b"\0" * 4, MA, 1.0)
    later = 1.0 + dhcp.LEASE_TIME + 1
    off = s.handle_untrusted(_msg(MB, _t(1, _req_addr(POOL0))), b"\0" * 4, MB, later)
    assert _yi(off) == POOL0
    assert s.leased == {} and s.stats.dhcp["leases"] == 0  # offered, not bound


def test_a_client_is_offered_the_address_it_holds_not_the_first_free_one():
    s = _srv()
    second = bytes([10, 0, 2, 16])
    s.handle_untrusted(_msg(MA, _t(3, _req_addr(second))), b"\0" * 4, MA, 1.0)
    off = s.handle_untrusted(_msg(MA, _t(1)), b"\0" * 4, MA, 2.0)
    assert _yi(off) == second
    ack = s.handle_untrusted(_msg(MA, _t(3)), b"\0" * 4, MA, 3.0)  # REQUEST without address
    assert _yi(ack) == second


def test_a_declined_address_is_not_offered_even_when_asked_for():
    # RFC 2131 4.3.3: on DHCPDECLINE the server MUST mark the address as not available
    s = _srv()
    s.handle_untrusted(_msg(MA, _t(3)), b"\0" * 4, MA, 1.0)
    assert s.handle_untrusted(_msg(MA, _t(4, _req_addr(POOL0))), b"\0" * 4, MA, 2.0) is None
    off = s.handle_untrusted(_msg(MB, _t(1, _req_addr(POOL0))), b"\0" * 4, MB, 3.0)
    assert _yi(off) == bytes([10, 0, 2, 16])
    nak = s.handle_untrusted(_msg(MB, _t(3, _req_addr(POOL0))), b"\0" * 4, MB, 4.0)
    assert bytes(nak.payload[240:243]) == bytes((53, 1, dhcp.NAK))


def test_release_and_decline_of_what_the_client_does_not_hold_are_drops():
    s = _srv()
    outside = bytes([10, 0, 2, 200])
    assert s.handle_untrusted(_msg(MA, _t(7), ciaddr=outside), b"\0" * 4, MA, 1.0) == \
        "dhcp_release_not_leased"
    assert s.handle_untrusted(_msg(MA, _t(7), ciaddr=POOL0), b"\0" * 4, MA, 1.0) == \
        "dhcp_release_not_leased"
    assert s.handle_untrusted(_msg(MA, _t(4, _req_addr(outside))), b"\0" * 4, MA, 1.0) == \
        "dhcp_decline_not_leased"
    assert s.handle_untrusted(_msg(MA, _t(4, _req_addr(POOL0))), b"\0" * 4, MA, 1.0) == \
        "dhcp_decline_not_leased"


def test_release_of_an_offered_address_frees_it():
    # RFC 2131 4.3.4: DHCPRELEASE: the server marks the address as not allocated
    s = _srv()
    s.handle_untrusted(_msg(MA, _t(1)), b"\0" * 4, MA, 1.0)
    assert s.handle_untrusted(_msg(MA, _t(7), ciaddr=POOL0), b"\0" * 4, MA, 2.0) is None
    assert s.slots[0] is None and s.stats.dhcp["releases"] == 1


def test_counters_count_every_message():
    s = _srv()
    for t in (1.0, 2.0):
        s.handle_untrusted(_msg(MA, _t(1)), b"\0" * 4, MA, t)
        s.handle_untrusted(_msg(MA, _t(3)), b"\0" * 4, MA, t)
        s.handle_untrusted(_msg(MA, _t(8), ciaddr=POOL0), POOL0, MA, t)
    s.handle_untrusted(_msg(MA, _t(7), ciaddr=POOL0), b"\0" * 4, MA, 3.0)
    s.handle_untrusted(_msg(MA, _t(3)), b"\0" * 4, MA, 4.0)
    s.handle_untrusted(_msg(MA, _t(7), ciaddr=POOL0), b"\0" * 4, MA, 5.0)
    s.handle_untrusted(_msg(MA, _t(3)), b"\0" * 4, MA, 6.0)
    s.handle_untrusted(_msg(MA, _t(4, _req_addr(POOL0))), b"\0" * 4, MA, 7.0)
    s.handle_untrusted(_msg(MA, _t(3)), b"\0" * 4, MA, 8.0)
    s.handle_untrusted(_msg(MA, _t(4, _req_addr(bytes([10, 0, 2, 16])))), b"\0" * 4, MA, 9.0)
    c = s.stats.dhcp
    # an INFORM's ACK counts as an inform, "acks" are the lease ACKs
    assert (c["discovers"], c["offers"], c["requests"], c["acks"], c["informs"]) == \
        (2, 2, 5, 5, 2)
    assert (c["releases"], c["declines"], c["naks"]) == (2, 2, 0)


def test_a_request_from_the_17th_client_without_address_finds_the_pool_exhausted():
    s = _srv()
    for i in range(dhcp.POOL_SIZE):
        mac = bytes([0x52, 0x54, 0, 0, 1, i])
        assert s.handle_untrusted(_msg(mac, _t(3)), b"\0" * 4, mac, 1.0).bound[0] == mac
    mac = bytes([0x52, 0x54, 0, 0, 2, 0])
    assert s.handle_untrusted(_msg(mac, _t(3)), b"\0" * 4, mac, 1.0) == "dhcp_pool_exhausted"
    assert s.handle_untrusted(_msg(mac, _t(1)), b"\0" * 4, mac, 1.0) == "dhcp_pool_exhausted"


def test_a_unicast_mac_is_bound_whatever_its_other_bytes():
    # the I/G bit is the lowest bit of the FIRST octet (IEEE 802): 02:03:... is unicast
    s = _srv()
    mac = bytes.fromhex("020300000001")
    assert s.handle_untrusted(_msg(mac, _t(3)), b"\0" * 4, mac, 1.0).bound == (mac, POOL0)
    group = bytes.fromhex("030000000001")
    assert s.handle_untrusted(_msg(group, _t(3)), b"\0" * 4, group, 1.0).bound is None


def test_inform_ack_goes_to_ciaddr_or_the_source():
    # RFC 2131 4.3.5: DHCPACK to the address in ciaddr (unicast), no lease, yiaddr 0
    s = _srv()
    here = bytes([10, 0, 2, 100])
    r = s.handle_untrusted(_msg(MA, _t(8), ciaddr=here), bytes([10, 0, 2, 101]), MA, 1.0)
    assert (r.dst_ip, r.dst_mac, _yi(r)) == (here, MA, b"\0" * 4)
    assert bytes(r.payload[12:16]) == here
    r = s.handle_untrusted(_msg(MA, _t(8)), here, MA, 1.0)  # no ciaddr: the IP source
    assert (r.dst_ip, r.dst_mac) == (here, MA)
    r = s.handle_untrusted(_msg(MA, _t(8)), b"\0" * 4, MA, 1.0)  # nothing known: broadcast
    assert (r.dst_ip, r.dst_mac) == (b"\xff" * 4, b"\xff" * 6)
    odd2 = bytes.fromhex("020300000001")  # unicast source MAC with an odd second byte
    r = s.handle_untrusted(_msg(odd2, _t(8), ciaddr=here), here, odd2, 1.0)
    assert r.dst_mac == odd2


# ---- DHCPv6 Information-Request (RFC 8415) ------------------------------------------------
def _ir(*opts):
    return bytes((11, 1, 2, 3)) + b"".join(struct.pack("!HH", c, len(v)) + v for c, v in opts)


def test_dhcp6_option_framing():
    P = dhcp.parse_dhcp6_info_request_untrusted
    # RFC 8415 21.1: code and length, 2 bytes each; a zero-length option (Rapid Commit, 14) at
    # the very end is whole
    assert P(_ir((14, b""))) == (b"\1\2\3", None, False)
    for tail in (b"\0", b"\0\0", b"\0\0\0"):
        assert P(_ir() + tail) == "dhcp6_option_truncated"
    assert P(_ir() + b"\0\1\0\5ab") == "dhcp6_option_truncated"
    assert P(_ir(*[(14, b"")] * (dhcp.MAX_OPTIONS + 1))) == "dhcp6_too_many_options"


def test_dhcp6_client_id_up_to_256_bytes():
    P = dhcp.parse_dhcp6_info_request_untrusted
    assert P(_ir((1, b"d" * 256)))[1] == b"d" * 256
    assert P(_ir((1, b"d" * 257))) == "dhcp6_client_id_too_long"


def test_dhcp6_option_request_codes_are_16_bit_and_only_the_oros_own():
    # RFC 8415 21.7: the ORO is a list of 16-bit option codes
    P = dhcp.parse_dhcp6_info_request_untrusted
    assert P(_ir((6, b"\x00\x18\x00\x17")))[2] is True  # DNS (23) as the second code
    assert P(_ir((6, b"\x00\x00\x17\x00")))[2] is False  # codes 0 and 0x1700, not 23
    # a client id ending in the bytes 00 17 is not a request for DNS
    assert P(_ir((1, b"\x00\x03\x00\x01\x00\x17"), (6, b"\x00\x18")))[2] is False


def test_inform_without_ciaddr_is_answered_to_its_ip_source():
    # RFC 2131 4.3.5 / 4.4.3: the client sends INFORM from its address; with ciaddr left 0 the
    # ACK goes to the IP source (libslirp-era clients do that), unicast to its MAC
    s = Stack(Config())
    p = ask(s, MAC_A, [("message-type", "inform")], src="10.0.2.100", dst="10.0.2.2", xid=78)
    assert p.dst == MAC_A and p[IP].dst == "10.0.2.100" and p[BOOTP].yiaddr == "0.0.0.0"


def test_information_request_from_the_unspecified_address_is_dropped():
    # RFC 8415 13.1 / 18.2.6: a client uses a link-local source; there is nowhere to answer ::
    s = Stack(Config(enable_ipv6=True))
    assert ask6(s, DHCP6_InfoRequest(trid=9) / DHCP6OptOptReq(reqopts=[23]), src="::") == []
    assert s.stats.dropped["dhcp6_unspecified_source"] == 1
    assert s.stats.dhcp["v6_replies"] == 0  # nothing was answered, so nothing is counted


def test_dhcpv6_reply_goes_to_the_requests_link_layer_source():
    """RFC 8415 18.3: the Reply goes to the client's source address; on the link that is the
    sender of the frame (even one the stack has not taken as the guest), never a group MAC
    (IEEE 802.3 3.2.3: a source address is an individual one)."""
    s = Stack(Config(enable_ipv6=True))
    ask6(s, DHCP6_InfoRequest(trid=1))  # the guest (MAC_A, fe80::aa) known
    other = "02:ab:00:00:00:01"
    s.receive_frame(bytes(Ether(src=other, dst="33:33:00:01:00:02")
                          / IPv6(src="2001:db8::5", dst="ff02::1:2") / UDP(sport=546, dport=547)
                          / DHCP6_InfoRequest(trid=2)), 1.0)
    (p,) = [Ether(bytes(f)) for f in s.frames_to_send(1.0)]
    assert p.dst == other and p[IPv6].dst == "2001:db8::5"
    s.receive_frame(bytes(Ether(src="03:ab:00:00:00:01", dst="33:33:00:01:00:02")
                          / IPv6(src="2001:db8::6", dst="ff02::1:2") / UDP(sport=546, dport=547)
                          / DHCP6_InfoRequest(trid=3)), 1.0)
    (p,) = [Ether(bytes(f)) for f in s.frames_to_send(1.0)]
    assert p.dst == MAC_A and p[IPv6].dst == "2001:db8::6"


def test_broadcast_inform_is_answered_unicast_to_ciaddr():
    # RFC 2131 4.4.3 / 4.3.5: an INFORM may be broadcast; the ACK goes to ciaddr, unicast
    s = Stack(Config())
    p = ask(s, MAC_A, [("message-type", "inform")], ciaddr="10.0.2.100", src="10.0.2.100",
            xid=79)
    assert p.dst == MAC_A and p[IP].dst == "10.0.2.100"
