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
    """needs: the config, ``prebound`` (the file opened before ready, or None), ``on_stop()``
    (the daemon stops handing it frames). offers: write(frames), status(), ``active``."""

    def __init__(self, config, prebound=None, on_stop=None, path: str | None = None,
                 max_bytes: int | None = None):
        self.on_stop = on_stop
        cfg = config
        self.path = path if path is not None else cfg.pcap
        self.max_bytes = max_bytes if max_bytes is not None else cfg.pcap_max_bytes
        self.frames = 0
        self.bytes = 0  # bytes in the file, headers included
        self.capped = False
        self._f = None
        self._w = None
        if not self.path:
            return
        pre = prebound
        if pre is not None and pre.pcap is not None and self.path == cfg.pcap:
            self._f = pre.take("pcap")  # opened before ready
        else:
            from .listeners import open_pcap
            self._f = open_pcap(self.path)
        import dpkt  # here, not at the top: ~50 ms of start-up for a daemon without --pcap
        self._w = dpkt.pcap.Writer(self._f, snaplen=SNAPLEN, linktype=dpkt.pcap.DLT_EN10MB)
        self.bytes = FILE_HEADER
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

    @property
    def active(self) -> bool:
        """Capturing: frames go to write()."""
        return self._w is not None

    def status(self) -> dict:
        return {"file": self.path, "frames": self.frames, "bytes": self.bytes,
                "max_bytes": self.max_bytes, "stopped": self.capped or self._w is None}

    def _stop(self, why: str) -> None:
        self.capped = True
        log.warning("pcap %s: %s", self.path, why)
        self.close()

    def close(self) -> None:
        self._w = None
        if self.on_stop is not None:
            on_stop, self.on_stop = self.on_stop, None
            on_stop()  # the daemon back to its one-attribute-test fast path
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
