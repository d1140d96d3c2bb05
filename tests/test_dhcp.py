"""DHCP on the gateway (stack/dhcp.py) through the sans-IO Stack: frames built with scapy, `now`
advanced by hand, replies parsed with scapy as the oracle. The expected values are what
slirp4netns 1.2.0 / libslirp 4.7.0 answered to the same messages (measured; tests/test_e2e_dhcp.py
compares the two live), except where docs/dhcp.md lists a difference."""

from __future__ import annotations

import ipaddress

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
