"""Logging for slirpy: setup (slirpy's loggers only) and a rate limiter for warnings that can repeat.

Policy: quiet by default (ERROR), one line per meaningful event (start, ready, forward added or
removed, flow refused and why, a cap reached, resolver problems, exit), never one line per packet.
Anything that can happen once per packet or per flow goes through `RateLimited`.
"""

from __future__ import annotations

import logging
import sys
import time

FORMAT = "slirpy: %(levelname)s %(name)s: %(message)s"


def setup_logging(level: str = "ERROR", stream=None) -> None:
    """`--log-level` applies to the `slirpy.*` loggers only. Other libraries (pyroute2 logs every
    netlink message at DEBUG) stay at ERROR whatever the level, so DEBUG is slirpy's own story."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    ours = logging.getLogger("slirpy")
    for h in list(ours.handlers):
        ours.removeHandler(h)
    ours.addHandler(handler)
    ours.setLevel(level)
    ours.propagate = False
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(handler)
    root.setLevel(logging.ERROR)
    for noisy in ("pyroute2", "trio"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


class RateLimited:
    """Log a repeatable message at most once per `interval` seconds per key.

        _refused = RateLimited(log, logging.INFO)
        _refused.log("tcp:refused", "tcp %s:%d refused: %s", dst, port, why)

    The first occurrence is logged at once; later ones within the interval are counted and the next
    line that gets through says how many were suppressed. Keys are bounded (`max_keys`): when full,
    the table is cleared (the worst case is an extra line, never unbounded memory).
    """

    def __init__(self, logger: logging.Logger, level: int = logging.WARNING, interval: float = 10.0,
                 max_keys: int = 256, clock=time.monotonic):
        self.logger = logger
        self.level = level
        self.interval = interval
        self.max_keys = max_keys
        self.clock = clock
        self._seen: dict = {}  # key -> [next_allowed_time, suppressed_count]

    def log(self, key, msg: str, *args, exc_info=False) -> bool:
        """Returns True when a line was emitted."""
        if not self.logger.isEnabledFor(self.level):
            return False
        now = self.clock()
        e = self._seen.get(key)
        if e is not None and now < e[0]:
            e[1] += 1
            return False
        suppressed = e[1] if e is not None else 0
        if e is None and len(self._seen) >= self.max_keys:
            self._seen.clear()
        self._seen[key] = [now + self.interval, 0]
        if suppressed:
            msg += " (%d similar suppressed)"
            args = (*args, suppressed)
        self.logger.log(self.level, msg, *args, exc_info=exc_info)
        return True
