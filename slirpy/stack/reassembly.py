"""Bounded IPv4/IPv6 fragment reassembly.

Entries are keyed by (family, src, dst, proto, ident). Bounds: MAX_DATAGRAM bytes per datagram,
MAX_ENTRIES in progress, MAX_BYTES held in total, TIMEOUT seconds per entry (checked lazily on
insert and in expire()). When the table or the byte budget is full, the oldest datagram in
progress is evicted (counted ``reass_evicted``), so a fragment flood cannot lock legitimate
fragmented traffic out. Overlap with a different range drops the whole datagram (RFC 5722,
applied to IPv4 too); an exact duplicate range is ignored. A completed datagram is removed from
the table before it is returned, so a late duplicate simply opens a fresh entry that times out:
the libslirp ip_reass use-after-free / duplicate-last-fragment crash cannot happen here. Data is
copied on insert (no references into guest buffers survive the call).
"""

from __future__ import annotations

MAX_DATAGRAM = 65535
MAX_ENTRIES = 64
MAX_BYTES = 1 << 20
TIMEOUT = 30.0


class _Entry:
    __slots__ = ("deadline", "pieces", "size", "total")

    def __init__(self, deadline):
        self.deadline = deadline
        self.pieces = {}  # offset -> bytes
        self.size = 0  # bytes held
        self.total = None  # known once the last fragment arrives


class Reassembler:
    def __init__(self, stats, max_entries=MAX_ENTRIES, max_bytes=MAX_BYTES, timeout=TIMEOUT):
        self.stats = stats
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.timeout = timeout
        self._t: dict = {}
        self.bytes_held = 0

    def __len__(self):
        return len(self._t)

    def _remove(self, key):
        e = self._t.pop(key)
        self.bytes_held -= e.size

    def _evict_oldest(self, keep=None):
        """Make room by dropping the oldest datagram in progress (dict order = creation order).
        A flood of never-completed fragments thus ages out under new traffic instead of
        locking every fragmented datagram out for TIMEOUT seconds."""
        for k in self._t:
            if k != keep:
                self._remove(k)
                self.stats.drop("reass_evicted")
                return

    def expire(self, now):
        for key in [k for k, e in self._t.items() if e.deadline <= now]:
            self._remove(key)
            self.stats.drop("reass_timeout")

    def get_timer(self):
        if not self._t:
            return None
        return min(e.deadline for e in self._t.values())

    def insert(self, key, offset: int, more: bool, data, now):
        """Add one fragment; returns the whole payload (bytes) when complete, else None."""
        self.expire(now)
        n = len(data)
        end = offset + n
        if end > MAX_DATAGRAM:
            self.stats.drop("reass_too_big")
            if key in self._t:
                self._remove(key)
            return None
        if more and (n == 0 or n & 7):
            self.stats.drop("reass_bad_fragment_size")
            return None
        e = self._t.get(key)
        if e is None:
            while len(self._t) >= self.max_entries:
                self._evict_oldest()
            e = self._t[key] = _Entry(now + self.timeout)
        while self.bytes_held + n > self.max_bytes and len(self._t) > 1:
            self._evict_oldest(keep=key)
        if self.bytes_held + n > self.max_bytes:
            self.stats.drop("reass_memory_full")
            if not e.pieces:
                self._remove(key)
            return None
        old = e.pieces.get(offset)
        if old is not None and len(old) == n:
            if bytes(data) == old and (more or e.total == end):
                self.stats.drop("reass_duplicate")
                return None
        if not more:
            if e.total is not None and e.total != end:
                self._remove(key)
                self.stats.drop("reass_inconsistent_length")
                return None
            if any(o + len(p) > end for o, p in e.pieces.items()):
                self._remove(key)
                self.stats.drop("reass_inconsistent_length")
                return None
        elif e.total is not None and end > e.total:
            self._remove(key)
            self.stats.drop("reass_inconsistent_length")
            return None
        for o, p in e.pieces.items():
            if o < end and offset < o + len(p):
                self._remove(key)
                self.stats.drop("reass_overlap")
                return None
        e.pieces[offset] = bytes(data)
        e.size += n
        self.bytes_held += n
        if not more:
            e.total = end
        if e.total is None:
            return None
        covered = sum(len(p) for p in e.pieces.values())
        if covered != e.total:
            return None
        self._remove(key)
        return b"".join(e.pieces[o] for o in sorted(e.pieces))
