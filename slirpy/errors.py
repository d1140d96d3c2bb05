"""slirpy's own error types, importable from anywhere (no trio, no sockets): launch's lockdown
probe and sandbox.py use StartupError without pulling in port forwarding.

STRICT: our own bugs are loud in tests. The glue's catch-alls (one flow's failure is that flow's
reset or refusal, counted as `<proto>_glue_error`, never the daemon's end) re-raise while it is
set; tests/conftest.py sets it, as it sets slirpy.stack.tcp.STRICT for the engine's. A daemon the
tests start as a process keeps the production behaviour, which the e2e tests check.
"""

from __future__ import annotations

STRICT = False


class StartupError(Exception):
    """Something the command line asks for cannot be set up (a forward, the API socket, the
    pcap file, the lockdown): the CLI prints it as one line, `slirpy: error: ...`, and exits 1."""


class SandboxError(StartupError):
    """A lockdown step (sandbox.py, caps.py) failed: one line, what could not be done and why
    (the CLI prints it and exits 1)."""


class ForwardError(Exception):
    """A port forward's add()/remove() refused; str(e) says why."""
