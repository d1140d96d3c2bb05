"""DHCP on the gateway, as libslirp 4.7 (bootp.c, dhcpv6.c): a DHCPv4 server handing out
base+15 .. base+30 and a stateless DHCPv6 server answering Information-Request with the DNS
server. Sans-IO: the Stack hands over the UDP payload and ``now``, gets back the reply payload
and where to send it.

What libslirp does, and slirpy with it (measured on slirp4netns 1.2.0 / libslirp 4.7.0):
- the pool is NB_BOOTP_CLIENTS = 16 addresses from base+15; DISCOVER -> OFFER, REQUEST ->
  ACK, a message without a DHCP message type (plain BOOTP) is taken as a REQUEST;
- OFFER/ACK carry, in this order: message type, server id (base+2), subnet mask, router
  (base+2), DNS (base+3), lease time (LEASE_TIME = 24 h); siaddr = base+2;
- a requested address (option 50, or ciaddr in a REQUEST) inside the pool and free or already
  this client's is honoured; a REQUEST for anything else gets a NAK with the message
  "requested address not available"; a REQUEST without an address gets the client's lease, or
  a new one (libslirp's "Windows fix");
- every reply goes to 255.255.255.255 and Ethernet broadcast, from base+2:67 to port 68, TOS
  0x10, as one 548-byte BOOTP message (236-byte header + 312 bytes of options, zero padded);
- DHCPv6: an Information-Request (type 11) to ff02::1:2 or fd00::2 port 547 gets a Reply
  (type 7) with the same transaction id, the client's Client Identifier echoed, and the DNS
  server fd00::3 when the Option Request option asks for it (23); a request carrying an IA
  Address option (5), a Client Identifier over 256 bytes, an odd-length Option Request option
  or an option running past the end is not answered.

Where slirpy differs on purpose (docs/dhcp.md): the NAK carries the server id (RFC 2131 says it
MUST; busybox udhcpc ignores a NAK without one) and yiaddr 0 (libslirp: 255.255.255.255); the
interface MTU (option 26) is sent when the client asks for it; no DNS option with
--disable-dns (libslirp still names base+3, where nothing answers); RELEASE frees the lease,
DECLINE takes the address out of the pool for DECLINE_HOLD, INFORM gets an ACK (libslirp
ignores all three); a client is offered its own address (libslirp may offer an earlier free
slot, a second address for the same MAC);
leases and offers expire (libslirp's never do), so the 16 slots are reused; the DHCPv6 reply
comes from port 547 (libslirp sends from 8962, its port number byte-swapped).

Bounded: the lease table is the pool (16 entries); options are walked at most MAX_OPTIONS
times; a malformed message is dropped and counted (``stats.dropped["dhcp_..."]``), never raised.
"""

from __future__ import annotations

import struct

LEASE_TIME = 24 * 3600  # libslirp's LEASE_TIME
POOL_START = 15  # base+15: slirp4netns's vdhcp_start
POOL_SIZE = 16  # libslirp's NB_BOOTP_CLIENTS
OFFER_HOLD = 60.0  # an offered, not yet requested address is kept for this client this long
DECLINE_HOLD = 600.0  # an address a client declined (in use) stays out of the pool this long
MAX_OPTIONS = 1024  # option walk bound (each step consumes at least one byte)
BOOTP_HDR = 236
OPT_LEN = 312  # libslirp's DHCP_OPT_LEN: every reply is 236 + 312 = 548 bytes
REPLY_TOS = 0x10  # IPTOS_LOWDELAY, as libslirp's udp_output
SERVER_PORT, CLIENT_PORT = 67, 68
COOKIE = b"\x63\x82\x53\x63"

DISCOVER, OFFER, REQUEST, DECLINE, ACK, NAK, RELEASE, INFORM = 1, 2, 3, 4, 5, 6, 7, 8
OPT_PAD, OPT_END = 0, 255
OPT_MASK, OPT_ROUTER, OPT_DNS, OPT_MTU = 1, 3, 6, 26
OPT_REQ_ADDR, OPT_LEASE, OPT_MSG_TYPE, OPT_SERVER_ID, OPT_PARAMS, OPT_MESSAGE = 50, 51, 53, 54, 55, 56
NAK_MESSAGE = b"requested address not available"

# DHCPv6 (RFC 8415)
DHCP6_SERVER_PORT, DHCP6_CLIENT_PORT = 547, 546
DHCP6_INFO_REQUEST, DHCP6_REPLY = 11, 7
OPT6_CLIENTID, OPT6_IAADDR, OPT6_ORO, OPT6_DNS = 1, 5, 6, 23
DHCP6_MAX_CLIENT_ID = 256
ALL_DHCP6 = bytes.fromhex("ff020000000000000000000000010002")  # ff02::1:2

_HDR = struct.Struct("!BBBBIHH4s4s4s4s16s")  # op htype hlen hops xid secs flags ci yi si gi chaddr
_OPT6 = struct.Struct("!HH")

ZERO4 = b"\0\0\0\0"
BCAST4 = b"\xff\xff\xff\xff"

# counters shown in get_stats under "dhcp"
COUNTERS = ("discovers", "requests", "offers", "acks", "naks", "informs", "releases",
            "declines", "leases", "v6_replies")


def parse_bootp_untrusted(buf):
    """A BOOTP/DHCP message from a client.

    -> (xid, flags, ciaddr, chaddr6, msg_type, options dict {tag: bytes}) or a drop reason.
    msg_type is 0 for a plain BOOTP request (no cookie or no option 53), as libslirp. Options
    repeated take the last value, as libslirp. Never raises."""
    n = len(buf)
    if n < BOOTP_HDR:
        return "dhcp_truncated"
    op, _htype, _hlen, _hops, xid, _secs, flags, ciaddr, _yi, _si, _gi, chaddr = \
        _HDR.unpack_from(buf, 0)
    if op != 1:
        return "dhcp_not_request"
    opts = {}
    if n >= BOOTP_HDR + 4 and bytes(buf[BOOTP_HDR:BOOTP_HDR + 4]) == COOKIE:
        off = BOOTP_HDR + 4
        for _ in range(MAX_OPTIONS):
            if off >= n:
                break  # no END: libslirp stops at the end of the datagram too
            tag = buf[off]
            if tag == OPT_PAD:
                off += 1
                continue
            if tag == OPT_END:
                break
            if off + 2 > n:
                return "dhcp_option_truncated"
            ln = buf[off + 1]
            if off + 2 + ln > n:
                return "dhcp_option_truncated"
            opts[tag] = bytes(buf[off + 2:off + 2 + ln])
            off += 2 + ln
        else:
            return "dhcp_too_many_options"
    mt = opts.get(OPT_MSG_TYPE)
    if mt is None:
        msg_type = 0
    elif len(mt) != 1:
        return "dhcp_bad_option"
    else:
        msg_type = mt[0]
    ra = opts.get(OPT_REQ_ADDR)
    if ra is not None and len(ra) != 4:
        return "dhcp_bad_option"
    return xid, flags, bytes(ciaddr), bytes(chaddr[:6]), msg_type, opts


class Reply:
    """What the Stack sends: ``payload`` (the BOOTP message) from the gateway port 67 to
    ``dst_ip`` port 68 in an Ethernet frame to ``dst_mac``; ``bound`` = (client MAC, address)
    when an ACK gave the client an address (the Stack then knows the guest by it)."""

    __slots__ = ("payload", "dst_mac", "dst_ip", "bound")

    def __init__(self, payload, dst_mac, dst_ip, bound=None):
        self.payload, self.dst_mac, self.dst_ip, self.bound = payload, dst_mac, dst_ip, bound


class DhcpServer:
    """The DHCPv4 lease table and reply builder, plus the stateless DHCPv6 reply."""

    def __init__(self, config, stats, dns6: bytes):
        self.stats = stats
        net = int(config.cidr.network_address)
        self.start = net + POOL_START
        self.size = POOL_SIZE
        self.gw = config.gateway.packed
        self.mask = config.cidr.netmask.packed
        self.dns = None if config.disable_dns else config.dns.packed
        self.dns6 = None if config.disable_dns else dns6
        self.mtu = config.mtu
        # slot i (address start+i) -> [mac or None (declined), expires, acked]
        self.slots: list = [None] * POOL_SIZE
        # address (4 bytes) -> MAC, for every slot a client was ACKed (the guest's addresses)
        self.leased: dict = {}
        for k in COUNTERS:
            stats.dhcp[k] = 0

    # ----------------------------------------------------------------------- lease table
    def _addr(self, i: int) -> bytes:
        return (self.start + i).to_bytes(4, "big")

    def _slot_of(self, addr: bytes):
        i = int.from_bytes(addr, "big") - self.start
        return i if 0 <= i < self.size else None

    def _usable(self, i: int, mac: bytes, now: float) -> bool:
        e = self.slots[i]
        return e is None or e[1] <= now or e[0] == mac

    def _free(self, i: int) -> None:
        self.slots[i] = None
        self.leased.pop(self._addr(i), None)

    def _bind(self, i: int, mac: bytes, expires: float, acked: bool) -> None:
        for j, e in enumerate(self.slots):  # one lease per client
            if j != i and e is not None and e[0] == mac:
                self._free(j)
        old = self.slots[i]
        if old is not None and old[0] != mac:
            self.leased.pop(self._addr(i), None)
        if old is not None and old[0] == mac and not acked:
            # an OFFER to a client that holds the lease does not shorten it
            expires, acked = max(expires, old[1]), old[2]
        self.slots[i] = [mac, expires, acked]
        if acked:
            self.leased[self._addr(i)] = mac
        self._count_leases()

    def _count_leases(self):
        self.stats.dhcp["leases"] = sum(1 for e in self.slots if e is not None and e[2])

    def _find(self, mac: bytes):
        for i, e in enumerate(self.slots):
            if e is not None and e[0] == mac:
                return i
        return None

    def _new(self, mac: bytes, now: float):
        i = self._find(mac)
        if i is not None:
            return i
        for i in range(self.size):
            if self._usable(i, mac, now):
                return i
        return None

    def _requested(self, addr: bytes, mac: bytes, now: float):
        i = self._slot_of(addr)
        if i is not None and self._usable(i, mac, now):
            return i
        return None

    # ------------------------------------------------------------------------------ DHCPv4
    def handle_untrusted(self, payload, src_ip: bytes, smac: bytes, now: float):
        """One datagram to port 67. -> Reply, None (nothing to answer) or a drop reason."""
        m = parse_bootp_untrusted(payload)
        if type(m) is str:
            return m
        xid, _flags, ciaddr, mac, msg_type, opts = m
        c = self.stats.dhcp
        if msg_type == 0:
            msg_type = REQUEST  # plain BOOTP, as libslirp
        req = opts.get(OPT_REQ_ADDR, ZERO4)
        if msg_type == DISCOVER:
            c["discovers"] += 1
            i = self._requested(req, mac, now) if req != ZERO4 else None
            if i is None:
                i = self._new(mac, now)
            if i is None:
                return "dhcp_pool_exhausted"
            self._bind(i, mac, now + OFFER_HOLD, False)
            c["offers"] += 1
            return self._reply(xid, mac, OFFER, self._addr(i), opts)
        if msg_type == REQUEST:
            c["requests"] += 1
            if req == ZERO4:
                req = ciaddr
            if req != ZERO4:
                i = self._requested(req, mac, now)
                if i is None:
                    c["naks"] += 1
                    return self._nak(xid, mac)
            else:
                i = self._new(mac, now)  # libslirp: never assigned -> a new address
                if i is None:
                    return "dhcp_pool_exhausted"
            self._bind(i, mac, now + LEASE_TIME, True)
            c["acks"] += 1
            addr = self._addr(i)
            r = self._reply(xid, mac, ACK, addr, opts)
            if mac[0] & 1 == 0:
                r.bound = (mac, addr)
            return r
        if msg_type == RELEASE:
            i = self._slot_of(ciaddr)
            if i is None or self.slots[i] is None or self.slots[i][0] != mac:
                return "dhcp_release_not_leased"
            self._free(i)
            self._count_leases()
            c["releases"] += 1
            return None
        if msg_type == DECLINE:
            i = self._slot_of(req)
            if i is None or self.slots[i] is None or self.slots[i][0] != mac:
                return "dhcp_decline_not_leased"
            self._free(i)
            self.slots[i] = [None, now + DECLINE_HOLD, False]
            self._count_leases()
            c["declines"] += 1
            return None
        if msg_type == INFORM:
            c["informs"] += 1
            # RFC 2131 4.3.5: ACK without lease to the client's address, yiaddr 0
            dst = ciaddr if ciaddr != ZERO4 else bytes(src_ip)
            r = self._reply(xid, mac, ACK, ZERO4, opts, inform_ciaddr=ciaddr)
            if dst != ZERO4 and smac[0] & 1 == 0:
                r.dst_ip, r.dst_mac = dst, bytes(smac)
            return r
        return "dhcp_unsupported_type"

    def _message(self, xid, mac, yiaddr, ciaddr=ZERO4) -> bytearray:
        out = bytearray(BOOTP_HDR + OPT_LEN)
        _HDR.pack_into(out, 0, 2, 1, 6, 0, xid, 0, 0, ciaddr, yiaddr, self.gw, ZERO4,
                       mac + bytes(10))
        out[BOOTP_HDR:BOOTP_HDR + 4] = COOKIE
        return out

    def _reply(self, xid, mac, typ, yiaddr, opts, inform_ciaddr=None) -> Reply:
        out = self._message(xid, mac, yiaddr, inform_ciaddr or ZERO4)
        o = [bytes((OPT_MSG_TYPE, 1, typ)), bytes((OPT_SERVER_ID, 4)) + self.gw,
             bytes((OPT_MASK, 4)) + self.mask, bytes((OPT_ROUTER, 4)) + self.gw]
        if self.dns is not None:
            o.append(bytes((OPT_DNS, 4)) + self.dns)
        if inform_ciaddr is None:
            o.append(bytes((OPT_LEASE, 4)) + LEASE_TIME.to_bytes(4, "big"))
        if OPT_MTU in opts.get(OPT_PARAMS, b""):
            o.append(bytes((OPT_MTU, 2)) + self.mtu.to_bytes(2, "big"))
        o.append(bytes((OPT_END,)))
        body = b"".join(o)
        out[BOOTP_HDR + 4:BOOTP_HDR + 4 + len(body)] = body
        return Reply(out, b"\xff" * 6, BCAST4)

    def _nak(self, xid, mac) -> Reply:
        out = self._message(xid, mac, ZERO4)
        body = (bytes((OPT_MSG_TYPE, 1, NAK, OPT_SERVER_ID, 4)) + self.gw
                + bytes((OPT_MESSAGE, len(NAK_MESSAGE))) + NAK_MESSAGE + bytes((OPT_END,)))
        out[BOOTP_HDR + 4:BOOTP_HDR + 4 + len(body)] = body
        return Reply(out, b"\xff" * 6, BCAST4)

    # ------------------------------------------------------------------------------ DHCPv6
    def handle6_untrusted(self, payload):
        """One datagram to port 547. -> the Reply message (bytes) or a drop reason."""
        r = parse_dhcp6_info_request_untrusted(payload)
        if type(r) is str:
            return r
        xid, client_id, want_dns = r
        out = bytearray((DHCP6_REPLY,)) + xid
        if client_id is not None:
            out += _OPT6.pack(OPT6_CLIENTID, len(client_id)) + client_id
        if want_dns and self.dns6 is not None:
            out += _OPT6.pack(OPT6_DNS, 16) + self.dns6
        self.stats.dhcp["v6_replies"] += 1
        return bytes(out)


def parse_dhcp6_info_request_untrusted(buf):
    """An Information-Request. -> (transaction id (3 bytes), client id bytes or None,
    DNS asked for) or a drop reason (libslirp's refusals included). Never raises."""
    n = len(buf)
    if n < 4:
        return "dhcp6_truncated"
    if buf[0] != DHCP6_INFO_REQUEST:
        return "dhcp6_unsupported_type"
    xid = bytes(buf[1:4])
    client_id = None
    want_dns = False
    off = 4
    for _ in range(MAX_OPTIONS):
        if off == n:
            return xid, client_id, want_dns
        if off + 4 > n:
            return "dhcp6_option_truncated"
        code, ln = _OPT6.unpack_from(buf, off)
        end = off + 4 + ln
        if end > n:
            return "dhcp6_option_truncated"
        if code == OPT6_IAADDR:
            return "dhcp6_ia_address"  # RFC 3315: an Information-Request with one is discarded
        if code == OPT6_CLIENTID:
            if ln > DHCP6_MAX_CLIENT_ID:
                return "dhcp6_client_id_too_long"
            client_id = bytes(buf[off + 4:end])
        elif code == OPT6_ORO:
            if ln & 1:
                return "dhcp6_bad_option_request"
            for k in range(off + 4, end, 2):
                if buf[k] == 0 and buf[k + 1] == OPT6_DNS:
                    want_dns = True
        off = end
    return "dhcp6_too_many_options"
