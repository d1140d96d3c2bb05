"""Counters shared by the stack and the glue: frames, bytes, and drops by reason."""

from __future__ import annotations

import collections
import dataclasses


@dataclasses.dataclass(slots=True)
class Stats:
    frames_in: int = 0
    frames_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    # reason -> count; reasons are short snake_case strings such as "ipv4_bad_checksum".
    dropped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    # the gateway's DHCP server (stack/dhcp.py): messages seen and answered, leases held
    dhcp: dict = dataclasses.field(default_factory=dict)

    def drop(self, reason: str, n: int = 1) -> None:
        self.dropped[reason] += n

    def as_dict(self) -> dict:
        return {
            "frames_in": self.frames_in,
            "frames_out": self.frames_out,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "dropped": dict(sorted(self.dropped.items())),
            "dhcp": dict(self.dhcp),
        }
