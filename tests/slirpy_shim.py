"""Test-only wrapper that runs slirpy in-process with hooks and no product code changed:
`python tests/slirpy_shim.py SLIRPY-ARGS...`

Environment:
  SHIM_IMPAIR="seed,drop,dup,reorder"  probabilities per frame, both directions between the tap
      fd and the stack (slirpy.tap.Tap.read_batch / write_frames are wrapped): a dropped frame
      vanishes, a duplicated one is delivered twice, a reordered one is held back and delivered
      after the next frame in the same direction.
  SHIM_CTL="rfd,wfd"  a thread answers each line read on rfd with one JSON line
      {"flows": N, "fds": N, "dropped": {reason: count}}: the flows in the TCP engine's table, the
      open fds of this process and the stack's drop counters.
  SHIM_NOFILE=N  RLIMIT_NOFILE soft limit set once the daemon starts (after the tap is open).
  SHIM_EXEC=CODE  Python run before slirpy starts (e.g. to make one glue method fail).
  Counts of what the shim did are written to stderr at exit ("SHIM dropped=.. duped=.. held=..").
"""

from __future__ import annotations

import atexit
import json
import os
import random
import resource
import sys
import threading

import slirpy.daemon
import slirpy.tap
from slirpy.cli import main

DAEMONS: list = []
COUNTS = {"dropped": 0, "duped": 0, "held": 0}


def _impair(spec: str) -> None:
    seed, drop, dup, reorder = spec.split(",")
    rng = random.Random(int(seed))
    drop, dup, reorder = float(drop), float(dup), float(reorder)
    held = {"in": None, "out": None}

    def mangle(frames, way):
        out = []
        for f in frames:
            r = rng.random()
            if r < drop:
                COUNTS["dropped"] += 1
                continue
            if r < drop + reorder and held[way] is None:
                COUNTS["held"] += 1
                held[way] = f
                continue
            out.append(f)
            if r < drop + reorder + dup:
                COUNTS["duped"] += 1
                out.append(f)
            if held[way] is not None:
                out.append(held[way])
                held[way] = None
        return out

    orig_read, orig_write = slirpy.tap.Tap.read_batch, slirpy.tap.Tap.write_frames

    def read_batch(self):
        frames = orig_read(self)
        return mangle(frames, "in") if frames else frames

    def write_frames(self, frames):
        return orig_write(self, mangle(list(frames), "out"))

    slirpy.tap.Tap.read_batch = read_batch
    slirpy.tap.Tap.write_frames = write_frames
    atexit.register(lambda: sys.stderr.write(
        "SHIM " + " ".join(f"{k}={v}" for k, v in COUNTS.items()) + "\n"))


def _fdinfo():
    for fd in os.listdir("/proc/self/fd"):
        try:
            yield f"{fd}:{os.readlink('/proc/self/fd/' + fd)}"
        except OSError:
            pass


def _ctl(rfd: int, wfd: int) -> None:
    def loop():
        with os.fdopen(rfd, "r") as r:
            for _ in r:
                st = DAEMONS[0].stack if DAEMONS else None
                # one listing for both: counting from a second listdir raced with the pidfd
                # being opened (a baseline of 11 with a 12-entry list, then "12 != 11")
                fds = sorted(_fdinfo())
                ans = {"flows": len(st.tcp._flows) if st else -1,
                       "fds": len(fds),
                       "fd_list": fds,
                       "dropped": dict(st.stats.dropped) if st else {}}
                os.write(wfd, (json.dumps(ans) + "\n").encode())
    threading.Thread(target=loop, daemon=True).start()


def _install():
    orig_init = slirpy.daemon.Daemon.__init__
    ctl = os.environ.get("SHIM_CTL")
    nofile = os.environ.get("SHIM_NOFILE")

    def init(self, *a, **k):
        orig_init(self, *a, **k)
        DAEMONS.append(self)
        if nofile:
            hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
            resource.setrlimit(resource.RLIMIT_NOFILE, (int(nofile), hard))
        if ctl:
            rfd, wfd = (int(x) for x in ctl.split(","))
            _ctl(rfd, wfd)

    slirpy.daemon.Daemon.__init__ = init
    if os.environ.get("SHIM_IMPAIR"):
        _impair(os.environ["SHIM_IMPAIR"])
    if os.environ.get("SHIM_EXEC"):
        exec(os.environ["SHIM_EXEC"], {})


if __name__ == "__main__":
    _install()
    sys.exit(main(sys.argv[1:]))
