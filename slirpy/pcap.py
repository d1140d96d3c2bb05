"""`--pcap FILE`: every tap frame, both directions, in classic pcap format (dpkt's writer).

The daemon calls `write(frames)` once per batch where frames enter (the tap reader, before the
stack sees them) and where they leave (flush, before the tap write); with no --pcap,
`daemon.pcap` is None and the hot path pays one attribute test per batch. Guest-bound frames have
the router MAC (52:55:...) as source, so direction is visible in the file. Timestamps are wall
clock, one per batch. `--pcap-max-bytes N` caps the file: the frame that would pass N is not
written, capture stops and one line is logged. The file is flushed every second and closed on exit.
"""

from __future__ import annotations

import logging
import time


import trio

log = logging.getLogger(__name__)

SNAPLEN = 262144  # libpcap's maximum; frames are never longer (64 KiB + headers)
FILE_HEADER = 24
RECORD_HEADER = 16
FLUSH_INTERVAL = 1.0


class PcapWriter:
    def __init__(self, daemon, path: str | None = None, max_bytes: int | None = None):
        self.daemon = daemon
        cfg = daemon.config
        self.path = path if path is not None else cfg.pcap
        self.max_bytes = max_bytes if max_bytes is not None else cfg.pcap_max_bytes
        self.frames = 0
        self.bytes = 0  # bytes in the file, headers included
        self.capped = False
        self._f = None
        self._w = None
        if not self.path:
            return
        pre = getattr(daemon, "prebound", None)
        if pre is not None and pre.pcap is not None and self.path == cfg.pcap:
            self._f = pre.take("pcap")  # opened before ready
        else:
            from .listeners import open_pcap
            self._f = open_pcap(self.path)
        import dpkt  # here, not at the top: ~50 ms of start-up for a daemon without --pcap
        self._w = dpkt.pcap.Writer(self._f, snaplen=SNAPLEN, linktype=dpkt.pcap.DLT_EN10MB)
        self.bytes = FILE_HEADER
        daemon.pcap = self  # the hook the daemon tests per batch; None again once stopped
        daemon.pcap_writer = self  # stays, for get_stats
        log.info("capturing frames to %s%s", self.path,
                 f" (at most {self.max_bytes} bytes)" if self.max_bytes is not None else "")

    def write(self, frames) -> None:
        """One batch of frames (bytes-like), all stamped with the same time."""
        w = self._w
        if w is None:
            return
        ts = time.time()
        cap = self.max_bytes
        for f in frames:
            if len(f) > SNAPLEN:
                f = bytes(f[:SNAPLEN])  # never happens with a 64 KiB MTU; keeps tcpdump happy
            size = RECORD_HEADER + len(f)
            if cap is not None and self.bytes + size > cap:
                self._stop(f"--pcap-max-bytes {cap} reached after {self.frames} frames; capture stopped")
                return
            try:
                w.writepkt_time(f, ts)
            except OSError as e:
                self._stop(f"write failed: {e.strerror or e}")
                return
            self.frames += 1
            self.bytes += size

    def status(self) -> dict:
        return {"file": self.path, "frames": self.frames, "bytes": self.bytes,
                "max_bytes": self.max_bytes, "stopped": self.capped or self._w is None}

    def _stop(self, why: str) -> None:
        self.capped = True
        log.warning("pcap %s: %s", self.path, why)
        self.close()

    def close(self) -> None:
        self._w = None
        if getattr(self.daemon, "pcap", None) is self:
            self.daemon.pcap = None  # back to the one-attribute-test fast path
        f, self._f = self._f, None
        if f is not None:
            try:
                f.close()
            except OSError as e:
                log.error("pcap %s: %s", self.path, e)

    async def serve(self, task_status=trio.TASK_STATUS_IGNORED):
        task_status.started()
        if self._f is None:
            return
        try:
            while self._f is not None:
                await trio.sleep(FLUSH_INTERVAL)
                f = self._f
                if f is not None:
                    try:
                        f.flush()
                    except OSError as e:
                        self._stop(f"write failed: {e.strerror or e}")
        finally:
            if self._f is not None:
                log.info("pcap %s: %d frames, %d bytes written", self.path, self.frames, self.bytes)
            self.close()
