"""Codecs: Ethernet, ARP, IPv4, IPv6, ICMPv4, ICMPv6 (+NDP), UDP, TCP header.

Parsers named ``*_untrusted`` take guest bytes (a memoryview) and return either a tuple or a
``str`` drop reason; they never raise. One ``Struct.unpack_from`` per header. Builders write a
whole frame into one preallocated bytearray with ``pack_into``.
"""

from __future__ import annotations

import struct

from .checksum import checksum, ones_sum

ETH = struct.Struct("!6s6sH")
ARP = struct.Struct("!HHBBH6s4s6s4s")
IP4 = struct.Struct("!BBHHHBBH4s4s")
IP6 = struct.Struct("!IHBB16s16s")
UDP = struct.Struct("!HHHH")
TCP = struct.Struct("!HHIIBBHHH")
ICMP = struct.Struct("!BBHI")
EXT = struct.Struct("!BB")
FRAG6 = struct.Struct("!BBHI")

ETH_IPV4, ETH_ARP, ETH_IPV6 = 0x0800, 0x0806, 0x86DD
PROTO_ICMP, PROTO_TCP, PROTO_UDP, PROTO_ICMP6 = 1, 6, 17, 58
BROADCAST = b"\xff" * 6
MAX_EXT_HEADERS = 8
_EXT_HDRS = {0, 43, 60, 51}  # hop-by-hop, routing, dst options, AH (fragment handled apart)


# virtio-net header (struct virtio_net_hdr, 10 bytes, the host's byte order: a legacy tap) that
# precedes every frame on a tap opened with IFF_VNET_HDR.
VNET = struct.Struct("=BBHHHH")  # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset
VNET_LEN = 10
VNET_F_NEEDS_CSUM, VNET_F_DATA_VALID = 0x01, 0x02
VNET_GSO_NONE, VNET_GSO_TCPV4, VNET_GSO_UDP, VNET_GSO_TCPV6, VNET_GSO_ECN = 0, 1, 3, 4, 0x80
VNET_NONE = bytes(VNET_LEN)  # a frame that is complete: no checksum to finish, no segmentation
# Largest TCP payload slirpy puts in one GSO frame: IPv4 total length (16 bits) minus IP and
# TCP headers with room for options.
GSO_MAX_PAYLOAD = 65535 - 20 - 60


def parse_vnet_untrusted(buf):
    """-> (flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, frame) or reason."""
    if len(buf) < VNET_LEN:
        return "vnet_truncated"
    return VNET.unpack_from(buf, 0) + (buf[VNET_LEN:],)


def build_tcp_vnet(dst_mac, src_mac, family, src, dst, sport, dport, seq, ack, flags, window,
                   options, payload, ident, gso_size) -> bytearray:
    """virtio-net header + Ethernet + IPv4/IPv6 + TCP in one buffer, one copy of the payload.

    The TCP checksum is left to the kernel (NEEDS_CSUM: the field holds the pseudo-header sum);
    a payload longer than ``gso_size`` is marked TCPV4/TCPV6 GSO so the kernel segments it if it
    ever leaves the guest's stack (delivered locally, it is taken whole, like a GRO packet)."""
    olen = len(options)
    if olen & 3:
        options = bytes(options) + b"\x00" * (4 - (olen & 3))
        olen = len(options)
    hl = 20 + olen
    n = len(payload)
    l4len = hl + n
    iphl = 20 if family == 4 else 40
    l4off = VNET_LEN + 14 + iphl
    out = bytearray(l4off + hl)  # the headers; the payload is joined on (one copy, no zero-fill)
    gso = n > gso_size
    if family == 4:
        VNET.pack_into(out, 0, VNET_F_NEEDS_CSUM, VNET_GSO_TCPV4 if gso else VNET_GSO_NONE,
                       14 + iphl + hl, gso_size if gso else 0, 14 + iphl, 16)
        ETH.pack_into(out, VNET_LEN, dst_mac, src_mac, ETH_IPV4)
        IP4.pack_into(out, VNET_LEN + 14, 0x45, 0, 20 + l4len, ident & 0xFFFF, 0x4000, 64,
                      PROTO_TCP, 0, src, dst)
        struct.pack_into("!H", out, VNET_LEN + 24,
                         checksum(memoryview(out)[VNET_LEN + 14:VNET_LEN + 34]))
    else:
        VNET.pack_into(out, 0, VNET_F_NEEDS_CSUM, VNET_GSO_TCPV6 if gso else VNET_GSO_NONE,
                       14 + iphl + hl, gso_size if gso else 0, 14 + iphl, 16)
        ETH.pack_into(out, VNET_LEN, dst_mac, src_mac, ETH_IPV6)
        IP6.pack_into(out, VNET_LEN + 14, 6 << 28, l4len, PROTO_TCP, 64, src, dst)
    TCP.pack_into(out, l4off, sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, (hl // 4) << 4,
                  flags & 0xFF, window & 0xFFFF, ones_sum(bytes(src) + bytes(dst), PROTO_TCP + l4len),
                  0)
    if olen:
        out[l4off + 20:l4off + hl] = options
    return out + payload if n else out


# ---------------------------------------------------------------------------------- parsers
def parse_ethernet_untrusted(buf):
    """-> (dst_mac, src_mac, ethertype, payload memoryview) or reason."""
    if len(buf) < 14:
        return "eth_truncated"
    dst, src, et = ETH.unpack_from(buf, 0)
    return dst, src, et, buf[14:]


def parse_arp_untrusted(buf):
    """-> (op, sha, spa, tha, tpa) or reason. Only Ethernet/IPv4 ARP."""
    if len(buf) < 28:
        return "arp_truncated"
    htype, ptype, hlen, plen, op, sha, spa, tha, tpa = ARP.unpack_from(buf, 0)
    if htype != 1 or ptype != ETH_IPV4 or hlen != 6 or plen != 4:
        return "arp_unsupported"
    return op, sha, spa, tha, tpa


def parse_ipv4_untrusted(buf):
    """-> (src, dst, proto, ttl, ident, frag_off_bytes, more_frags, payload) or reason.

    Options are skipped; header checksum checked; Ethernet padding after total length trimmed.
    """
    n = len(buf)
    if n < 20:
        return "ipv4_truncated"
    vihl, _tos, total, ident, ff, ttl, proto, _ck, src, dst = IP4.unpack_from(buf, 0)
    if vihl >> 4 != 4:
        return "ipv4_bad_version"
    ihl = (vihl & 15) * 4
    if ihl < 20:
        return "ipv4_bad_ihl"
    if ihl > n:
        return "ipv4_truncated"
    if total < ihl:
        return "ipv4_bad_length"
    if total > n:
        return "ipv4_length_exceeds_frame"
    if ones_sum(buf[:ihl]) != 0xFFFF:
        return "ipv4_bad_checksum"
    if ff & 0x8000:
        return "ipv4_reserved_flag"
    return src, dst, proto, ttl, ident, (ff & 0x1FFF) * 8, bool(ff & 0x2000), buf[ihl:total]


def parse_ipv6_untrusted(buf):
    """-> (src, dst, next_header, hop_limit, frag, payload) or reason.

    The extension-header chain is walked (at most MAX_EXT_HEADERS); ``frag`` is None or
    (ident, offset_bytes, more_frags, unfragmentable_len) and payload starts after the
    fragment header (for fragments: the fragmentable part, ``next_header`` taken from the
    fragment header) or after the last extension header.
    """
    n = len(buf)
    if n < 40:
        return "ipv6_truncated"
    vtf, plen, nh, hlim, src, dst = IP6.unpack_from(buf, 0)
    if vtf >> 28 != 6:
        return "ipv6_bad_version"
    end = 40 + plen
    if end > n:
        return "ipv6_length_exceeds_frame"
    off = 40
    for _ in range(MAX_EXT_HEADERS + 1):
        if nh == 44:
            if off + 8 > end:
                return "ipv6_truncated_ext"
            nnh, _r, offmf, ident = FRAG6.unpack_from(buf, off)
            frag = (ident, offmf & 0xFFF8, bool(offmf & 1), off)
            # Everything after the fragment header is the fragmentable part (offsets count
            # from here); headers inside it are walked, if at all, after reassembly.
            return src, dst, nnh, hlim, frag, buf[off + 8:end]
        if nh in _EXT_HDRS:
            if off + 2 > end:
                return "ipv6_truncated_ext"
            nnh, hl = EXT.unpack_from(buf, off)
            size = (hl + 2) * 4 if nh == 51 else (hl + 1) * 8
            if off + size > end:
                return "ipv6_truncated_ext"
            off += size
            nh = nnh
            continue
        return src, dst, nh, hlim, None, buf[off:end]
    return "ipv6_too_many_ext_headers"


def parse_udp_untrusted(buf, pseudo: int | None, family: int = 4):
    """-> (sport, dport, payload) or reason. ``pseudo`` is the pseudo-header sum (None: skip)."""
    n = len(buf)
    if n < 8:
        return "udp_truncated"
    sport, dport, length, ck = UDP.unpack_from(buf, 0)
    if length < 8 or length > n:
        return "udp_bad_length"
    if pseudo is not None:
        if ck == 0:
            if family == 6:
                return "udp6_zero_checksum"
        elif ones_sum(buf[:length], pseudo) != 0xFFFF:
            return "udp_bad_checksum"
    return sport, dport, buf[8:length]


def parse_tcp_untrusted(buf, pseudo: int | None):
    """-> (sport, dport, seq, ack, flags, window, options, payload) or reason."""
    n = len(buf)
    if n < 20:
        return "tcp_truncated"
    sport, dport, seq, ack, doff, flags, win, ck, _urg = TCP.unpack_from(buf, 0)
    hl = (doff >> 4) * 4
    if hl < 20:
        return "tcp_bad_data_offset"
    if hl > n:
        return "tcp_data_offset_exceeds_segment"
    if pseudo is not None and ones_sum(buf, pseudo) != 0xFFFF:
        return "tcp_bad_checksum"
    return sport, dport, seq, ack, flags, win, buf[20:hl], buf[hl:]


def parse_icmp_untrusted(buf, pseudo: int = 0):
    """ICMPv4 (pseudo=0) or ICMPv6 (pseudo = pseudo-header sum).
    -> (type, code, rest_of_header (u32), body) or reason."""
    if len(buf) < 8:
        return "icmp_truncated"
    typ, code, _ck, rest = ICMP.unpack_from(buf, 0)
    if ones_sum(buf, pseudo) != 0xFFFF:
        return "icmp_bad_checksum"
    return typ, code, rest, buf[8:]


def parse_ndp_options_untrusted(buf):
    """-> dict {type: bytes value} (first occurrence) or reason. Zero-length options are drops."""
    opts = {}
    off, n = 0, len(buf)
    for _ in range(64):
        if off >= n:
            return opts
        if off + 2 > n:
            return "ndp_option_truncated"
        typ, ln = buf[off], buf[off + 1]
        if ln == 0:
            return "ndp_option_zero_length"
        size = ln * 8
        if off + size > n:
            return "ndp_option_truncated"
        opts.setdefault(typ, bytes(buf[off + 2:off + size]))
        off += size
    return "ndp_too_many_options"


# --------------------------------------------------------------------------------- builders
def build_arp(dst_mac: bytes, src_mac: bytes, op: int, sha, spa, tha, tpa) -> bytearray:
    out = bytearray(42)
    ETH.pack_into(out, 0, dst_mac, src_mac, ETH_ARP)
    ARP.pack_into(out, 14, 1, ETH_IPV4, 6, 4, op, sha, spa, tha, tpa)
    return out


def pseudo_sum(family: int, src: bytes, dst: bytes, proto: int, length: int) -> int:
    return ones_sum(src + dst) + proto + length


def build_ipv4(dst_mac, src_mac, src: bytes, dst: bytes, proto: int, l4: bytes | bytearray,
               ident: int = 0, ttl: int = 64, frag_off: int = 0, more: bool = False,
               df: bool = False, tos: int = 0) -> bytearray:
    """Ethernet + IPv4 header (no options) around an already-complete L4 payload."""
    n = len(l4)
    out = bytearray(34 + n)
    ETH.pack_into(out, 0, dst_mac, src_mac, ETH_IPV4)
    ff = (frag_off >> 3) | (0x2000 if more else 0) | (0x4000 if df else 0)
    IP4.pack_into(out, 14, 0x45, tos, 20 + n, ident & 0xFFFF, ff, ttl, proto, 0, src, dst)
    struct.pack_into("!H", out, 24, checksum(memoryview(out)[14:34]))
    out[34:] = l4
    return out


def build_ipv6(dst_mac, src_mac, src: bytes, dst: bytes, nh: int, l4, hlim: int = 64,
               frag: tuple | None = None) -> bytearray:
    """Ethernet + IPv6 (+ fragment header when ``frag`` = (ident, offset, more))."""
    n = len(l4)
    extra = 8 if frag is not None else 0
    out = bytearray(54 + extra + n)
    ETH.pack_into(out, 0, dst_mac, src_mac, ETH_IPV6)
    IP6.pack_into(out, 14, 6 << 28, n + extra, 44 if frag else nh, hlim, src, dst)
    if frag is not None:
        ident, off, more = frag
        FRAG6.pack_into(out, 54, nh, 0, off | (1 if more else 0), ident)
    out[54 + extra:] = l4
    return out


def tcp_segment(family, src, dst, sport, dport, seq, ack, flags, window, options, payload):
    """TCP header+options+payload with checksum, as bytes ready for build_ipv4/build_ipv6."""
    olen = len(options)
    if olen & 3:
        options = bytes(options) + b"\x00" * (4 - (olen & 3))
        olen = len(options)
    hl = 20 + olen
    n = hl + len(payload)
    seg = bytearray(n)
    TCP.pack_into(seg, 0, sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, (hl // 4) << 4,
                  flags & 0xFF, window & 0xFFFF, 0, 0)
    seg[20:hl] = options
    seg[hl:] = payload
    struct.pack_into("!H", seg, 16, checksum(seg, pseudo_sum(family, src, dst, PROTO_TCP, n)))
    return seg


def udp_datagram(family, src, dst, sport, dport, payload):
    n = 8 + len(payload)
    d = bytearray(n)
    UDP.pack_into(d, 0, sport, dport, n if n <= 0xFFFF else 0, 0)
    d[8:] = payload
    ck = checksum(d, pseudo_sum(family, src, dst, PROTO_UDP, n))
    struct.pack_into("!H", d, 6, ck or 0xFFFF)
    return d


def icmp_message(typ, code, rest: int, body, pseudo: int = 0):
    d = bytearray(8 + len(body))
    ICMP.pack_into(d, 0, typ, code, 0, rest & 0xFFFFFFFF)
    d[8:] = body
    struct.pack_into("!H", d, 2, checksum(d, pseudo))
    return d


def icmp6_message(src, dst, typ, code, rest, body):
    n = 8 + len(body)
    return icmp_message(typ, code, rest, body, pseudo_sum(6, src, dst, PROTO_ICMP6, n))


def fragment_ipv4(dst_mac, src_mac, src, dst, proto, l4, ident, mtu, ttl=64, tos=0):
    """Split one L4 datagram into IPv4 frames of at most ``mtu`` IP bytes."""
    if 20 + len(l4) <= mtu:
        return [build_ipv4(dst_mac, src_mac, src, dst, proto, l4, ident, ttl, tos=tos)]
    step = max(8, ((mtu - 20) // 8) * 8)
    out = []
    mv = memoryview(l4)
    for off in range(0, len(l4), step):
        chunk = mv[off:off + step]
        out.append(build_ipv4(dst_mac, src_mac, src, dst, proto, chunk, ident, ttl, off,
                              off + step < len(l4), tos=tos))
    return out


def fragment_ipv6(dst_mac, src_mac, src, dst, nh, l4, ident, mtu, hlim=64):
    if 40 + len(l4) <= mtu:
        return [build_ipv6(dst_mac, src_mac, src, dst, nh, l4, hlim)]
    step = max(8, ((mtu - 48) // 8) * 8)
    out = []
    mv = memoryview(l4)
    for off in range(0, len(l4), step):
        out.append(build_ipv6(dst_mac, src_mac, src, dst, nh, mv[off:off + step], hlim,
                              (ident, off, off + step < len(l4))))
    return out


# ------------------------------------------------------------------------- ICMPv6 / NDP codecs
NA_ROUTER, NA_SOLICITED, NA_OVERRIDE = 0x80000000, 0x40000000, 0x20000000
ALL_NODES6 = bytes.fromhex("ff020000000000000000000000000001")
ALL_NODES_MAC = b"\x33\x33\x00\x00\x00\x01"


_NS_REASONS = ("ndp_ns_not_link_local", "ndp_ns_truncated", "ndp_ns_multicast_target")
_NA_REASONS = ("ndp_na_not_link_local", "ndp_na_truncated", "ndp_na_multicast_target")


def _parse_ndp_target_untrusted(reasons, code: int, hlim: int, body):
    """NS and NA share a layout: a 16-byte target address, then options (RFC 4861 7.1.1/7.1.2)."""
    if hlim != 255 or code != 0:
        return reasons[0]
    if len(body) < 16:
        return reasons[1]
    opts = parse_ndp_options_untrusted(body[16:])
    if type(opts) is str:
        return opts
    target = bytes(body[:16])
    if target[0] == 0xFF:
        return reasons[2]
    return target, opts


def parse_ndp_ns_untrusted(code: int, hlim: int, body):
    """Neighbour solicitation body (after the 8-byte ICMPv6 header).
    -> (target: bytes, options dict) or reason."""
    return _parse_ndp_target_untrusted(_NS_REASONS, code, hlim, body)


def parse_ndp_rs_untrusted(code: int, hlim: int, body):
    """Router solicitation body (after the reserved word). -> options dict or reason."""
    if hlim != 255 or code != 0:
        return "ndp_rs_not_link_local"
    return parse_ndp_options_untrusted(body)


def build_ndp_na(src: bytes, dst: bytes, target: bytes, mac: bytes, flags: int) -> bytearray:
    """Neighbour advertisement with a target link-layer address option."""
    return icmp6_message(src, dst, 136, 0, flags, target + b"\x02\x01" + mac)


def build_ndp_ra(src: bytes, dst: bytes, mac: bytes, mtu: int, prefix: bytes,
                 prefixlen: int = 64, router_lifetime: int = 1800, hop_limit: int = 64,
                 valid: int = 86400, preferred: int = 14400, rdnss: bytes | None = None,
                 rdnss_lifetime: int = 1800) -> bytearray:
    """Router advertisement (RFC 4861 4.2): source link-layer, MTU, prefix information
    (on-link + autonomous: SLAAC) and, when given, one recursive DNS server (RFC 8106)."""
    body = (b"\x00\x00\x00\x00" + b"\x00\x00\x00\x00"  # reachable time, retrans timer
            + b"\x01\x01" + mac
            + b"\x05\x01\x00\x00" + mtu.to_bytes(4, "big")
            + bytes([3, 4, prefixlen, 0xC0]) + valid.to_bytes(4, "big")
            + preferred.to_bytes(4, "big") + b"\x00" * 4 + prefix)
    if rdnss is not None:
        body += b"\x19\x03\x00\x00" + rdnss_lifetime.to_bytes(4, "big") + rdnss
    rest = (hop_limit << 24) | router_lifetime
    return icmp6_message(src, dst, 134, 0, rest, body)


def parse_ndp_na_untrusted(code: int, hlim: int, body):
    """Neighbour advertisement body (after the flags word). -> (target, options) or reason."""
    return _parse_ndp_target_untrusted(_NA_REASONS, code, hlim, body)


def build_icmp4_error(typ: int, code: int, quoted_ip: bytes, rest: int = 0) -> bytearray:
    """ICMPv4 error quoting the offending datagram, truncated so the reply fits 576 bytes."""
    return icmp_message(typ, code, rest, bytes(quoted_ip[:576 - 28]))


def build_icmp6_error(src: bytes, dst: bytes, typ: int, code: int, quoted_ip: bytes,
                      rest: int = 0) -> bytearray:
    """ICMPv6 error (RFC 4443: as much of the invoking packet as fits in 1280 bytes)."""
    return icmp6_message(src, dst, typ, code, rest, bytes(quoted_ip[:1280 - 48]))
