"""Batched, non-blocking I/O on the tap fd (one Ethernet frame per read/write, IFF_NO_PI)."""

from __future__ import annotations

import collections
import errno
import os

READ_SIZE = 65536 + 14
MAX_READ_BATCH = 256
MAX_WRITE_QUEUE = 1024  # frames waiting for the guest to read (tap write EAGAIN) ...
MAX_WRITE_QUEUE_BYTES = 8 * 1024 * 1024  # ... and their bytes: 1024 64 KiB GSO frames are 64 MiB


class TapGone(Exception):
    """The tap fd failed: the guest network namespace is most likely gone."""


class Tap:
    def __init__(self, fd: int, stats=None):
        self.fd = fd
        self.stats = stats
        self.queue: collections.deque = collections.deque()
        self.queue_bytes = 0  # sum of len() over self.queue
        self.max_queue = MAX_WRITE_QUEUE
        self.max_queue_bytes = MAX_WRITE_QUEUE_BYTES

    def read_batch(self) -> list[bytes]:
        """Frames until EAGAIN (at most MAX_READ_BATCH). Raises TapGone on a fatal error."""
        out = []
        fd = self.fd
        for _ in range(MAX_READ_BATCH):
            try:
                b = os.read(fd, READ_SIZE)
            except BlockingIOError:
                break
            except InterruptedError:
                continue
            except OSError as e:
                raise TapGone(f"tap read: {e.strerror} (guest network namespace gone?)") from None
            if not b:
                raise TapGone("tap read: end of file (guest network namespace gone?)")
            out.append(b)
        return out

    def write_frames(self, frames) -> None:
        """Write now what the fd takes; queue the rest (bounded in frames and bytes, oldest
        dropped and counted)."""
        q = self.queue
        if q:
            for f in frames:
                q.append(f)
                self.queue_bytes += len(f)
        else:
            fd = self.fd
            it = iter(frames)
            for f in it:
                try:
                    os.write(fd, f)
                except BlockingIOError:
                    q.append(f)
                    self.queue_bytes += len(f)
                    for f in it:
                        q.append(f)
                        self.queue_bytes += len(f)
                    break
                except OSError as e:
                    if e.errno in (errno.EINVAL, errno.EMSGSIZE):
                        self._drop("tap_write_invalid")
                        continue
                    if e.errno == errno.EIO:  # the guest set tap0 down: not gone, just deaf
                        self._drop("tap_write_link_down")
                        continue
                    raise TapGone(f"tap write: {e.strerror} (guest network namespace gone?)") from None
        while len(q) > self.max_queue or self.queue_bytes > self.max_queue_bytes:
            self.queue_bytes -= len(q.popleft())
            self._drop("tap_write_queue_full")

    def drain(self) -> bool:
        """Write queued frames until EAGAIN. True when the queue is empty."""
        q = self.queue
        while q:
            try:
                os.write(self.fd, q[0])
            except BlockingIOError:
                return False
            except OSError as e:
                if e.errno in (errno.EINVAL, errno.EMSGSIZE, errno.EIO):
                    self.queue_bytes -= len(q.popleft())
                    self._drop("tap_write_link_down" if e.errno == errno.EIO else
                               "tap_write_invalid")
                    continue
                raise TapGone(f"tap write: {e.strerror} (guest network namespace gone?)") from None
            self.queue_bytes -= len(q.popleft())
        return True

    def _drop(self, reason: str) -> None:
        if self.stats is not None:
            self.stats.drop(reason)
