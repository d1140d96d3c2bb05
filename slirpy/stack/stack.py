"""The Stack: dispatches guest frames to ARP/ICMP/UDP/TCP and builds frames toward the guest.

The guest's MAC is learned from any IPv4/IPv6/ARP frame whose source address is the guest's.
Before it is known (a port forward can be the first traffic), frames toward the guest are held in
a bounded queue and the guest is asked (ARP who-has for IPv4, a neighbour solicitation for IPv6,
at most once a second); its answer releases them. Broadcasting instead does not work: Linux TCP
discards segments that did not arrive as PACKET_HOST.
"""

from __future__ import annotations

import collections
import ipaddress

import struct

from . import dhcp, wire
from .addrmap import AddressMap, unreach_code
from .checksum import ones_sum
from .events import IcmpEchoRequest, UdpDatagram
from .reassembly import Reassembler
from .stats import Stats
from .tcp import TcpEngine

MAX_OUT_FRAMES = 4096
MAX_UNRESOLVED = 256  # frames held while the guest's MAC is being resolved
SOLICIT_INTERVAL = 1.0
MAX_EVENTS = 4096
RA_INTERVAL = 60.0  # periodic router advertisements (router lifetime 1800 s)
RA_INITIAL = (0.0, 1.0, 3.0)  # plus a few early ones after start (RFC 4861 6.2.4)
MAX_GUEST6 = 16  # IPv6 addresses of the guest remembered (fd00::/64 only)
_LL6 = b"\xfe\x80" + b"\x00" * 6
_ADDR_CACHE_MAX = 1024
# Ethernet + IPv4 without options + TCP, one unpack: the common frame (see Stack._tcp4_fast)
_ETH_IP4_TCP = struct.Struct("!6s6sHBBHHHBBH4s4sHHIIBBHHH")


class Stack:
    def __init__(self, config, now: float = 0.0, offload: int = -1):
        """``offload``: -1 for plain Ethernet frames on the tap; otherwise every frame in and out
        starts with a virtio-net header (IFF_VNET_HDR) and the value is the TUN_F_* flags the
        tap accepted. Then TCP toward the guest goes out as GSO frames of up to 64 KiB with the
        checksum left to the kernel, and guest checksums the kernel vouches for are not redone."""
        self.config = config
        self.vnet = offload >= 0
        self.vnet_hdr_len = wire.VNET_LEN if self.vnet else 0
        self._gso4, self._gso6 = config.mss, config.mss6  # GSO segment sizes (properties: once)
        self._csum_trusted = False  # the frame being parsed had NEEDS_CSUM or DATA_VALID
        self.stats = Stats()
        self._out = collections.deque()
        self._events = collections.deque()
        self._last_now = now
        self.router_mac = config.router_mac
        self.guest_mac = wire.BROADCAST  # BROADCAST = not known yet
        self._unresolved = collections.deque()
        self._solicit_at = -1.0
        self.addrs = addrs = AddressMap(config)
        self.gw4 = addrs.gateway4_packed
        self.dns4 = addrs.dns4_packed
        self.guest4 = config.guest.packed
        self._net4 = int(config.cidr.network_address)
        self._mask4 = int(config.cidr.netmask)
        self._local4 = {self.gw4, self.dns4}
        self.gw6 = addrs.gateway6_packed
        self.dns6 = addrs.dns6_packed
        self.ll6 = addrs.link_local6_packed
        self._local6 = {self.gw6, self.dns6, self.ll6}
        self.prefix6 = self.gw6[:8]
        # the guest's addresses in fd00::/64, learned from its traffic and NDP; last = the one
        # it most recently used as a source (see guest_ipv6)
        self._guest6: collections.OrderedDict = collections.OrderedDict()
        self._last_src6 = None
        self._ra_count = 0
        self._reass = Reassembler(self.stats)
        self.dhcp = dhcp.DhcpServer(config, self.stats, self.dns6)
        self._leased4 = self.dhcp.leased  # addresses the DHCP server gave the guest
        self._ident = 0
        self._next_ra = now
        self._s2p: dict = {}
        self._p2s: dict = {}
        self.tcp = TcpEngine(config, self._emit_tcp, self._push_event, self.stats)
        t = self.tcp
        if self.vnet:
            t.seg_max = wire.GSO_MAX_PAYLOAD
        # the engine's calls for the glue, as the stack's own
        self.accept_tcp, self.reject_tcp, self.send_tcp = t.accept_tcp, t.reject_tcp, t.send_tcp
        self.recv_tcp, self.shutdown_tcp, self.reset_tcp = t.recv_tcp, t.shutdown_tcp, t.reset_tcp
        self.connect_tcp, self.flows, self.send_room = t.connect_tcp, t.flows, t.send_room
        self.peek_tcp, self.consume_tcp = t.peek_tcp, t.consume_tcp

    # ------------------------------------------------------------------------ address cache
    def _str(self, packed: bytes) -> str:
        s = self._p2s.get(packed)
        if s is None:
            s = str(ipaddress.ip_address(packed))
            if len(self._p2s) >= _ADDR_CACHE_MAX:
                self._p2s.clear()
            self._p2s[packed] = s
        return s

    def _packed(self, s: str) -> bytes:
        p = self._s2p.get(s)
        if p is None:
            p = ipaddress.ip_address(s).packed
            if len(self._s2p) >= _ADDR_CACHE_MAX:
                self._s2p.clear()
            self._s2p[s] = p
        return p

    # ------------------------------------------------------------------------------ queues
    def _push_event(self, ev):
        if len(self._events) >= MAX_EVENTS:
            self._events.popleft()
            self.stats.drop("event_queue_full")
        self._events.append(ev)

    def _send(self, frame):
        if self.vnet:
            frame = wire.VNET_NONE + frame
        if len(self._out) >= MAX_OUT_FRAMES:
            self._out.popleft()
            self.stats.drop("out_queue_full")
        self._out.append(frame)

    def _learn_mac(self, smac):
        self.guest_mac = smac
        q = self._unresolved
        while q:
            self._send(smac + q.popleft()[6:])

    def _hold(self, frame):
        """Keep a frame for the guest until its MAC is known (bounded, oldest dropped)."""
        if len(self._unresolved) >= MAX_UNRESOLVED:
            self._unresolved.popleft()
            self.stats.drop("guest_mac_unresolved")
        self._unresolved.append(frame)

    def _solicit(self, family, dst):
        now = self._last_now
        if now < self._solicit_at:
            return
        self._solicit_at = now + SOLICIT_INTERVAL
        if family == 4:
            tpa = dst if dst in self._leased4 else self.guest4
            self._send(wire.build_arp(wire.BROADCAST, self.router_mac, 1, self.router_mac,
                                      self.gw4, b"\0" * 6, tpa))
        else:
            snm = bytes.fromhex("ff0200000000000000000001ff") + dst[13:]
            ns = wire.icmp6_message(self.ll6, snm, 135, 0, 0,
                                    dst + b"\x01\x01" + self.router_mac)
            for f in wire.fragment_ipv6(b"\x33\x33" + snm[12:], self.router_mac, self.ll6, snm,
                                        58, ns, 0, self.config.mtu, 255):
                self._send(f)

    def frames_to_send(self, now) -> list:
        self.tcp.flush_pending(now)
        if not self._out:
            return []
        out = list(self._out)
        self._out.clear()
        self.stats.frames_out += len(out)
        self.stats.bytes_out += sum(map(len, out)) - self.vnet_hdr_len * len(out)
        return out

    def next_event(self):
        return self._events.popleft() if self._events else None

    def get_timer(self):
        t = self.tcp.get_timer()
        r = self._reass.get_timer()
        if r is not None and (t is None or r < t):
            t = r
        if self.config.enable_ipv6 and (t is None or self._next_ra < t):
            t = self._next_ra
        return t

    def handle_timer(self, now):
        self._last_now = now
        self._reass.expire(now)
        self.tcp.handle_timer(now)
        if self.config.enable_ipv6 and now >= self._next_ra:
            self._ra_count += 1
            if self._ra_count < len(RA_INITIAL):
                self._next_ra = now + RA_INITIAL[self._ra_count] - RA_INITIAL[self._ra_count - 1]
            else:
                self._next_ra = now + RA_INTERVAL
            self._send_ra(wire.ALL_NODES_MAC, wire.ALL_NODES6)

    # ------------------------------------------------------------------ guest IPv6 addresses
    def guest_addrs6(self) -> list:
        """The guest's learned fd00::/64 addresses, most recently used as a source last."""
        return [self._str(a) for a in self._guest6]

    def guest_ipv6(self, preferred: str | None = None) -> str | None:
        """Where to open a connection into the guest over IPv6: ``preferred`` (fd00::100, what
        -c makes SLAAC produce) when the guest has used it or no address is known yet, else
        the address the guest most recently used as a source."""
        if not self._guest6:
            return preferred
        if preferred is not None and self._packed(preferred) in self._guest6:
            return preferred
        return self._str(next(reversed(self._guest6)))

    def _learn6(self, addr: bytes) -> None:
        if addr[:8] != self.prefix6 or addr in self._local6:
            return
        g = self._guest6
        if addr in g:
            g.move_to_end(addr)
            return
        if len(g) >= MAX_GUEST6:
            g.popitem(last=False)
            self.stats.drop("guest6_addr_forgotten")
        g[addr] = True

    def _note_src6(self, smac, src: bytes) -> None:
        """Slow path, taken when the source address or MAC differs from the last frame's."""
        self._last_src6 = src
        if smac[0] & 1:
            return
        if src[:8] == self.prefix6:
            if src in self._local6:
                return
            self._learn6(src)
        elif src[:8] != _LL6 or src in self._local6:
            return
        if smac != self.guest_mac:
            self._learn_mac(smac)

    def _dst6_untrusted(self, dst: bytes):
        """Destinations that must never be dialled on the host: our own prefix (only fd00::2
        and ::3 exist in it), link-local, ::, ::1, v4-mapped/compatible (a way around
        --disable-host-loopback). None = fine."""
        if dst in self._local6:
            return None
        if dst[:8] == self.prefix6:
            return "ipv6_dst_in_guest_prefix"
        if dst[0] == 0xFE and dst[1] & 0xC0 == 0x80:
            return "ipv6_dst_link_local"
        if dst[0] == 0 and not any(dst[1:10]):
            return "ipv6_dst_reserved"  # ::, ::1, ::ffff:a.b.c.d, ::a.b.c.d
        return None

    # ----------------------------------------------------------------------------- input
    def opens_tcp(self, buf) -> bool:
        """Is this frame a TCP SYN (no ACK), a guest opening a connection? A cheap look at
        fixed offsets (IPv4 with any IHL, IPv6 without extension headers), for the glue to serve
        established traffic first; never raises, anything odd is 'no'."""
        h = self.vnet_hdr_len + 14
        try:
            et = buf[h - 2:h]
            if et == b"\x08\x00":
                if buf[h + 9] != 6:
                    return False
                t = h + (buf[h] & 15) * 4
            elif et == b"\x86\xdd":
                if buf[h + 6] != 6:
                    return False
                t = h + 40
            else:
                return False
            return buf[t + 13] & 0x12 == 0x02  # SYN without ACK
        except IndexError:
            return False

    def receive_frame(self, buf, now):
        self._last_now = now
        self.stats.frames_in += 1
        mv = memoryview(buf)
        if self.vnet:
            if len(mv) < wire.VNET_LEN:
                self.stats.drop("vnet_truncated")
                return
            # NEEDS_CSUM: the guest's kernel left the L4 checksum to us (offload), it was never
            # computed; DATA_VALID: already verified. Either way there is nothing to check.
            self._csum_trusted = mv[0] & (wire.VNET_F_NEEDS_CSUM | wire.VNET_F_DATA_VALID) != 0
            mv = mv[wire.VNET_LEN:]
        n = len(mv)
        self.stats.bytes_in += n  # Ethernet bytes
        if n >= 54 and self._tcp4_fast(mv, n, now):
            return
        r = self._receive_untrusted(mv, now)
        if r is not None:
            self.stats.drop(r)

    def _tcp4_fast(self, mv, n, now) -> bool:
        """The common frame in one unpack: IPv4 without options or fragmentation, TCP, from the
        guest's known MAC, to an address the general path would let through. True: handed to
        the engine exactly as the general path (_receive_untrusted) would have; False: anything
        else, which the general path then parses, answers or drops and counts as ever."""
        (_dmac, smac, et, vihl, _tos, total, _ident, ff, _ttl, proto, _ck, src, dst, sport,
         dport, seqno, ackno, doff, flags, win, _tck, _urg) = _ETH_IP4_TCP.unpack_from(mv, 0)
        if (et != 0x0800 or vihl != 0x45 or proto != 6 or ff & 0xBFFF or total > n - 14
                or smac != self.guest_mac):
            return False  # not IPv4/TCP, options, a fragment or reserved flag, odd lengths, MAC
        d = int.from_bytes(dst, "big")
        m = self._mask4
        if (dst[0] >= 224 or d | m == 0xFFFFFFFF or dst[0] == 127 or dst[0] == 0
                or (d & m == self._net4 and dst not in self._local4)):
            return False  # multicast, broadcast, martian, virtual network: counted there
        hl = (doff >> 4) * 4
        if hl < 20 or hl > total - 20 or ones_sum(mv[14:34]) != 0xFFFF:
            return False
        seg = mv[34:14 + total]
        if not self._csum_trusted and ones_sum(seg, wire.pseudo_sum(4, src, dst, 6,
                                                                    total - 20)) != 0xFFFF:
            return False
        self.tcp.on_segment(4, src, sport, dst, dport, seqno, ackno, flags, win,
                            bytes(seg[20:hl]) if hl > 20 else b"", seg[hl:], now)
        return True

    def _receive_untrusted(self, mv, now):
        eth = wire.parse_ethernet_untrusted(mv)
        if type(eth) is str:
            return eth
        _dmac, smac, et, payload = eth
        if et == wire.ETH_IPV4:
            return self._ipv4_untrusted(smac, payload, now)
        if et == wire.ETH_ARP:
            return self._arp_untrusted(smac, payload)
        if et == wire.ETH_IPV6:
            if not self.config.enable_ipv6:
                return "ipv6_disabled"
            return self._ipv6_untrusted(smac, payload, now)
        return "eth_unknown_type"

    def _arp_untrusted(self, smac, payload):
        a = wire.parse_arp_untrusted(payload)
        if type(a) is str:
            return a
        op, sha, spa, _tha, tpa = a
        if (spa == self.guest4 or spa in self._leased4) and smac[0] & 1 == 0:
            self._learn_mac(smac)
        if op != 1:
            return "arp_not_request" if op != 2 else None
        if tpa not in self._local4:
            return "arp_not_for_us"
        self._send(wire.build_arp(sha, self.router_mac, 2, self.router_mac, tpa, sha, spa))
        return None

    def _ipv4_untrusted(self, smac, payload, now):
        ip = wire.parse_ipv4_untrusted(payload)
        if type(ip) is str:
            return ip
        src, dst, proto, _ttl, ident, foff, more, data = ip
        if smac != self.guest_mac and smac[0] & 1 == 0 and (src == self.guest4
                                                            or src in self._leased4):
            self._learn_mac(smac)
        if foff or more:
            whole = self._reass.insert((4, bytes(src), bytes(dst), proto, ident), foff, more,
                                       data, now)
            if whole is None:
                return None
            data = memoryview(whole)
        if dst[0] >= 224 or int.from_bytes(dst, "big") | self._mask4 == 0xFFFFFFFF:
            if dst == dhcp.BCAST4 and proto == wire.PROTO_UDP:  # DHCP, from 0.0.0.0 or not
                return self._udp_untrusted(4, src, dst, data, smac, now)
            return "ipv4_multicast_or_broadcast"  # mDNS, IGMP...: never leave the stack
        bad = self._bad_dst4(dst)
        if bad:
            return bad
        if proto == wire.PROTO_TCP:
            return self._tcp_untrusted(4, src, dst, data, now)
        if proto == wire.PROTO_UDP:
            return self._udp_untrusted(4, src, dst, data, smac, now)
        if proto == wire.PROTO_ICMP:
            return self._icmp4_untrusted(src, dst, data)
        return "ipv4_unknown_proto"

    def _bad_dst4(self, dst):
        """Destinations a guest frame may never reach the host with: loopback and 0/8 (they would
        bypass --disable-host-loopback) and virtual-network addresses other than .2/.3 (no one
        is there; they must not leak to a same-numbered host network). Guests ARP for on-link
        addresses and get no answer, so only crafted frames come here."""
        if dst[0] == 127 or dst[0] == 0:
            return "ipv4_dst_martian"
        if int.from_bytes(dst, "big") & self._mask4 == self._net4 and dst not in self._local4:
            return "ipv4_dst_virtual_net"
        return None

    def _tcp_untrusted(self, family, src, dst, data, now):
        t = wire.parse_tcp_untrusted(data, None if self._csum_trusted else
                                     wire.pseudo_sum(family, src, dst, 6, len(data)))
        if type(t) is str:
            return t
        sport, dport, seqno, ackno, flags, win, opts, pl = t
        self.tcp.on_segment(family, bytes(src), sport, bytes(dst), dport, seqno, ackno, flags,
                            win, bytes(opts), pl, now)
        return None

    def _udp_untrusted(self, family, src, dst, data, smac, now):
        u = wire.parse_udp_untrusted(data, None if self._csum_trusted else
                                     wire.pseudo_sum(family, src, dst, 17, len(data)), family)
        if type(u) is str:
            return u
        sport, dport, pl = u
        if family == 4:
            if dport == dhcp.SERVER_PORT and (dst == self.gw4 or dst == dhcp.BCAST4):
                return self._dhcp4_untrusted(src, smac, pl, now)
            if dst == dhcp.BCAST4:
                return "ipv4_multicast_or_broadcast"
        elif dport == dhcp.DHCP6_SERVER_PORT and (dst == self.gw6 or dst == dhcp.ALL_DHCP6):
            return self._dhcp6_untrusted(src, sport, smac, pl)
        elif dst[0] == 0xFF:
            return "ipv6_multicast"
        self._push_event(UdpDatagram(family, self._str(bytes(src)), sport,
                                     self._str(bytes(dst)), dport, bytes(pl)))
        return None

    def _dhcp4_untrusted(self, src, smac, payload, now):
        r = self.dhcp.handle_untrusted(payload, src, smac, now)
        if r is None or type(r) is str:
            return r
        if r.bound is not None and r.bound[0] != self.guest_mac:
            self._learn_mac(r.bound[0])  # as libslirp's arp_table_add for the ACKed address
        for f in wire.fragment_ipv4(r.dst_mac, self.router_mac, self.gw4, r.dst_ip,
                                    wire.PROTO_UDP,
                                    wire.udp_datagram(4, self.gw4, r.dst_ip, dhcp.SERVER_PORT,
                                                      dhcp.CLIENT_PORT, r.payload),
                                    self._next_ident(), self.config.mtu, tos=dhcp.REPLY_TOS):
            self._send(f)
        return None

    def _dhcp6_untrusted(self, src, sport, smac, payload):
        src = bytes(src)
        if not any(src):  # before the server counts a reply that could never be sent
            return "dhcp6_unspecified_source"
        r = self.dhcp.handle6_untrusted(payload)
        if type(r) is str:
            return r
        mac = bytes(smac) if smac[0] & 1 == 0 else None
        self._send_ip6(self.gw6, src, wire.PROTO_UDP,
                       wire.udp_datagram(6, self.gw6, src, dhcp.DHCP6_SERVER_PORT, sport, r),
                       dst_mac=mac)
        return None

    def _icmp4_untrusted(self, src, dst, data):
        m = wire.parse_icmp_untrusted(data)
        if type(m) is str:
            return m
        typ, code, rest, body = m
        if typ != 8:
            return "icmp_unhandled_type"
        if code != 0:
            return "icmp_bad_code"
        if dst in self._local4:
            self._send_ip4(dst, src, wire.PROTO_ICMP, wire.icmp_message(0, 0, rest, body))
            return None
        self._push_event(IcmpEchoRequest(4, self._str(bytes(src)), self._str(bytes(dst)),
                                         rest >> 16, rest & 0xFFFF, bytes(body)))
        return None

    def _ipv6_untrusted(self, smac, payload, now):
        ip = wire.parse_ipv6_untrusted(payload)
        if type(ip) is str:
            return ip
        src, dst, nh, hlim, frag, data = ip
        if src != self._last_src6 or smac != self.guest_mac:
            self._note_src6(smac, src)
        if frag is not None:
            ident, off, more, _ = frag
            if off == 0 and not more:
                pass  # atomic fragment
            else:
                whole = self._reass.insert((6, bytes(src), bytes(dst), ident), off, more, data,
                                           now)
                if whole is None:
                    return None
                data = memoryview(whole)
        if dst[0] == 0xFF:
            if nh != wire.PROTO_ICMP6 and (nh != wire.PROTO_UDP or dst != dhcp.ALL_DHCP6):
                return "ipv6_multicast"
        elif dst[0] in (0xFD, 0xFE, 0):
            r = self._dst6_untrusted(dst)
            if r is not None:
                return r
        if nh == wire.PROTO_TCP:
            return self._tcp_untrusted(6, src, dst, data, now)
        if nh == wire.PROTO_UDP:
            return self._udp_untrusted(6, src, dst, data, smac, now)
        if nh == wire.PROTO_ICMP6:
            return self._icmp6_untrusted(smac, src, dst, hlim, data)
        return "ipv6_unknown_next_header"

    def _icmp6_untrusted(self, smac, src, dst, hlim, data):
        m = wire.parse_icmp_untrusted(data, wire.pseudo_sum(6, src, dst, 58, len(data)))
        if type(m) is str:
            return m
        typ, code, rest, body = m
        src, dst = bytes(src), bytes(dst)
        if typ == 128:
            if dst[0] == 0xFF:
                return "icmp6_echo_multicast"
            if dst in self._local6:
                self._send_ip6(dst, src, 58, wire.icmp6_message(dst, src, 129, 0, rest, body))
                return None
            self._push_event(IcmpEchoRequest(6, self._str(src), self._str(dst), rest >> 16,
                                             rest & 0xFFFF, bytes(body)))
            return None
        if typ == 135:  # neighbour solicitation
            ns = wire.parse_ndp_ns_untrusted(code, hlim, body)
            if type(ns) is str:
                return ns
            target, opts = ns
            if target not in self._local6:
                if not any(src):
                    self._learn6(target)  # the guest's DAD probe for its new address
                return "ndp_not_for_us"
            mac = opts.get(1, b"")[:6]
            if len(mac) != 6:
                mac = bytes(smac)
            if any(src):
                na = wire.build_ndp_na(target, src, target, self.router_mac,
                                       wire.NA_ROUTER | wire.NA_SOLICITED | wire.NA_OVERRIDE)
                self._send_ip6(target, src, 58, na, dst_mac=mac, hlim=255)
            else:  # DAD probe from "::": answer to all-nodes, unsolicited
                na = wire.build_ndp_na(target, wire.ALL_NODES6, target, self.router_mac,
                                       wire.NA_ROUTER | wire.NA_OVERRIDE)
                self._send_ip6(target, wire.ALL_NODES6, 58, na, dst_mac=wire.ALL_NODES_MAC,
                               hlim=255)
            return None
        if typ == 133:  # router solicitation
            rs = wire.parse_ndp_rs_untrusted(code, hlim, body)
            if type(rs) is str:
                return rs
            if any(src):
                self._send_ra(bytes(smac), src)
            else:
                self._send_ra(wire.ALL_NODES_MAC, wire.ALL_NODES6)
            return None
        if typ == 136:  # neighbour advertisement: the guest answering our NS, or announcing
            na = wire.parse_ndp_na_untrusted(code, hlim, body)
            if type(na) is str:
                return na
            self._learn6(na[0])
            return None
        if typ in (130, 131, 132, 143):
            return "icmp6_mld"  # multicast listener reports: nothing to do on this link
        return "icmp6_unhandled_type"

    def _send_ra(self, dmac, dst):
        msg = wire.build_ndp_ra(self.ll6, dst, self.router_mac, self.config.mtu,
                                bytes(self.prefix6) + b"\x00" * 8, rdnss=self.dns6)
        self._send_ip6(self.ll6, dst, 58, msg, dst_mac=dmac, hlim=255)

    # ---------------------------------------------------------------------------- output
    def _next_ident(self):
        self._ident = (self._ident + 1) & 0xFFFFFFFF
        return self._ident

    def _send_ip4(self, src, dst, proto, l4):
        mac = self.guest_mac
        unknown = mac is wire.BROADCAST
        out = self._hold if unknown else self._send
        for f in wire.fragment_ipv4(mac, self.router_mac, bytes(src), bytes(dst),
                                    proto, l4, self._next_ident(), self.config.mtu):
            out(f)
        if unknown:
            self._solicit(4, bytes(dst))

    def _send_ip6(self, src, dst, nh, l4, dst_mac=None, hlim=64):
        mac = dst_mac if dst_mac is not None else self.guest_mac
        unknown = mac is wire.BROADCAST
        out = self._hold if unknown else self._send
        for f in wire.fragment_ipv6(mac, self.router_mac, bytes(src), bytes(dst), nh, l4,
                                    self._next_ident(), self.config.mtu, hlim):
            out(f)
        if unknown:
            self._solicit(6, bytes(dst))

    def _emit_tcp(self, seg):
        family, src, sport, dst, dport, seqno, ackno, flags, window, options, payload = seg
        if self.vnet and self.guest_mac is not wire.BROADCAST:
            self._ident = ident = (self._ident + 1) & 0xFFFFFFFF  # (_next_ident, inlined)
            frame = wire.build_tcp_vnet(self.guest_mac, self.router_mac, family, src, dst, sport,
                                        dport, seqno, ackno, flags, window, options, payload,
                                        ident, self._gso4 if family == 4 else self._gso6)
            if len(self._out) >= MAX_OUT_FRAMES:
                self._out.popleft()
                self.stats.drop("out_queue_full")
            self._out.append(frame)
            return
        seg = wire.tcp_segment(family, src, dst, sport, dport, seqno, ackno, flags, window,
                               options, payload)
        if family == 4:
            self._send_ip4(src, dst, wire.PROTO_TCP, seg)
        else:
            self._send_ip6(src, dst, wire.PROTO_TCP, seg)

    def send_udp(self, family, src: str, sport, dst: str, dport, payload, now):
        self._last_now = now
        s, d = self._packed(src), self._packed(dst)
        dg = wire.udp_datagram(family, s, d, sport, dport, payload)
        if family == 4:
            self._send_ip4(s, d, wire.PROTO_UDP, dg)
        else:
            self._send_ip6(s, d, wire.PROTO_UDP, dg)

    def send_icmp_echo_reply(self, family, src: str, dst: str, ident, seq, payload, now):
        self._last_now = now
        s, d = self._packed(src), self._packed(dst)
        rest = ((ident & 0xFFFF) << 16) | (seq & 0xFFFF)
        if family == 4:
            self._send_ip4(s, d, wire.PROTO_ICMP, wire.icmp_message(0, 0, rest, payload))
        else:
            self._send_ip6(s, d, 58, wire.icmp6_message(s, d, 129, 0, rest, payload))

    def send_udp_unreachable(self, family, src, sport, dst, dport, payload, code, now):
        """ICMP(v6) destination unreachable to the guest ``src`` about its datagram to dst:dport,
        from the gateway 10.0.2.2 (IPv6: fe80::2, as libslirp sends its ICMPv6 errors).

        The quoted datagram is rebuilt guest->remote and truncated (576/1280 byte limits)."""
        self._last_now = now
        s, d = self._packed(src), self._packed(dst)
        dg = wire.udp_datagram(family, s, d, sport, dport, payload)
        if family == 4:
            orig = wire.build_ipv4(b"\0" * 6, b"\0" * 6, s, d, wire.PROTO_UDP, dg)[14:]
            self._send_ip4(self.gw4, s, wire.PROTO_ICMP, wire.build_icmp4_error(3, code, orig))
        else:
            orig = wire.build_ipv6(b"\0" * 6, b"\0" * 6, s, d, wire.PROTO_UDP, dg)[14:]
            self._send_ip6(self.ll6, s, 58, wire.build_icmp6_error(self.ll6, s, 1, code, orig))

    def refuse_tcp(self, flow, unreach, reason, now):
        """Refuse the guest's pending SYN as libslirp does when its connect() fails other than
        with ECONNREFUSED: ICMP destination unreachable (``unreach``, addrmap.UNREACH_CODES:
        "net": net unreachable / ICMPv6 no route; "host": host / address unreachable; "admin":
        administratively prohibited) quoting the SYN, from the gateway
        10.0.2.2 (IPv6: fe80::2, libslirp's source for ICMPv6 errors); the guest's connect()
        fails at once (ENETUNREACH / EHOSTUNREACH). ``unreach`` None: no answer at all (the
        guest times out). No RST either way. Counted as ``tcp_connect_<reason>``."""
        self._last_now = now
        syn = self.tcp.forget_syn(flow, reason, now)
        if syn is None or unreach is None:
            return
        family, guest, gport, remote, rport, isn = syn
        code = unreach_code(unreach, family)
        seg = wire.tcp_segment(family, guest, remote, gport, rport, isn, 0, 0x02, 0, b"", b"")
        if family == 4:
            orig = wire.build_ipv4(b"\0" * 6, b"\0" * 6, guest, remote, wire.PROTO_TCP, seg)[14:]
            self._send_ip4(self.gw4, guest, wire.PROTO_ICMP, wire.build_icmp4_error(3, code, orig))
        else:
            orig = wire.build_ipv6(b"\0" * 6, b"\0" * 6, guest, remote, wire.PROTO_TCP, seg)[14:]
            self._send_ip6(self.ll6, guest, 58, wire.build_icmp6_error(self.ll6, guest, 1, code,
                                                                         orig))

    def send_icmp_echo_error(self, family, err_src: str, guest: str, dst: str, ident, seq,
                             payload, typ, code, now):
        """An ICMP(v6) error (unreachable, time exceeded...) from ``err_src`` to the guest about
        its echo request to ``dst``, quoting that request (rebuilt with the guest's ident)."""
        self._last_now = now
        e, g, d = self._packed(err_src), self._packed(guest), self._packed(dst)
        rest = ((ident & 0xFFFF) << 16) | (seq & 0xFFFF)
        if family == 4:
            req = wire.icmp_message(8, 0, rest, payload)
            orig = wire.build_ipv4(b"\0" * 6, b"\0" * 6, g, d, wire.PROTO_ICMP, req)[14:]
            self._send_ip4(e, g, wire.PROTO_ICMP, wire.build_icmp4_error(typ, code, orig))
        else:
            req = wire.icmp6_message(g, d, 128, 0, rest, payload)
            orig = wire.build_ipv6(b"\0" * 6, b"\0" * 6, g, d, 58, req)[14:]
            self._send_ip6(e, g, 58, wire.build_icmp6_error(e, g, typ, code, orig))
