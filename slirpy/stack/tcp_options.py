"""TCP options: parse (untrusted) and build. RFC 9293 (MSS), 7323 (window scale, timestamps),
2018 (SACK)."""

from __future__ import annotations

import struct
from typing import NamedTuple

_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_TS = struct.Struct("!II")

KIND_EOL, KIND_NOP, KIND_MSS, KIND_WSCALE, KIND_SACK_PERM, KIND_SACK, KIND_TS = 0, 1, 2, 3, 4, 5, 8
MAX_SACK_BLOCKS = 4


class TcpOptions(NamedTuple):
    mss: int | None = None
    wscale: int | None = None  # clamped to 14 as RFC 7323 says
    sack_perm: bool = False
    sack_blocks: tuple[tuple[int, int], ...] = ()
    ts_val: int | None = None
    ts_ecr: int | None = None


NO_OPTIONS = TcpOptions()


def parse_tcp_options_untrusted(buf) -> TcpOptions | str:
    """Parse the option bytes of a TCP header. Returns TcpOptions, or a drop reason (str) for
    options that run off the end or have impossible lengths. Unknown kinds are skipped."""
    mss = wscale = ts_val = ts_ecr = None
    sack_perm = False
    sack_blocks: tuple[tuple[int, int], ...] = ()
    n = len(buf)
    i = 0
    while i < n:
        kind = buf[i]
        if kind == KIND_EOL:
            break
        if kind == KIND_NOP:
            i += 1
            continue
        if i + 1 >= n:
            return "tcp_option_truncated"
        length = buf[i + 1]
        if length < 2 or i + length > n:
            return "tcp_option_bad_length"
        if kind == KIND_MSS:
            if length != 4:
                return "tcp_option_bad_length"
            mss = _U16.unpack_from(buf, i + 2)[0]
        elif kind == KIND_WSCALE:
            if length != 3:
                return "tcp_option_bad_length"
            wscale = min(buf[i + 2], 14)
        elif kind == KIND_SACK_PERM:
            if length != 2:
                return "tcp_option_bad_length"
            sack_perm = True
        elif kind == KIND_SACK:
            if (length - 2) % 8 or length == 2:
                return "tcp_option_bad_length"
            blocks = []
            for off in range(i + 2, i + length, 8):
                blocks.append(_TS.unpack_from(buf, off))
            sack_blocks = tuple(blocks[:MAX_SACK_BLOCKS])
        elif kind == KIND_TS:
            if length != 10:
                return "tcp_option_bad_length"
            ts_val, ts_ecr = _TS.unpack_from(buf, i + 2)
        i += length
    return TcpOptions(mss, wscale, sack_perm, sack_blocks, ts_val, ts_ecr)


def build_tcp_options(
    mss: int | None = None,
    wscale: int | None = None,
    sack_perm: bool = False,
    sack_blocks=(),
    ts: tuple[int, int] | None = None,
) -> bytes:
    """Option bytes padded with NOPs to a multiple of 4 (max 40 bytes)."""
    out = bytearray()
    if mss is not None:
        out += bytes((KIND_MSS, 4)) + _U16.pack(mss)
    if sack_perm:
        out += bytes((KIND_NOP, KIND_NOP, KIND_SACK_PERM, 2))
    if ts is not None:
        out += bytes((KIND_NOP, KIND_NOP, KIND_TS, 10)) + _TS.pack(ts[0] & 0xFFFFFFFF, ts[1] & 0xFFFFFFFF)
    if wscale is not None:
        out += bytes((KIND_NOP, KIND_WSCALE, 3, wscale))
    if sack_blocks:
        room = (40 - len(out) - 2) // 8
        blocks = list(sack_blocks)[: max(0, min(room, MAX_SACK_BLOCKS))]
        if blocks:
            out += bytes((KIND_NOP, KIND_NOP, KIND_SACK, 2 + 8 * len(blocks)))
            for left, right in blocks:
                out += _TS.pack(left & 0xFFFFFFFF, right & 0xFFFFFFFF)
    while len(out) % 4:
        out.append(KIND_NOP)
    if len(out) > 40:
        raise ValueError("TCP options exceed 40 bytes")
    return bytes(out)
