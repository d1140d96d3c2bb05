"""slirpy's own error types, importable from anywhere (no trio, no sockets): launch's lockdown
probe and sandbox.py use StartupError without pulling in port forwarding."""

from __future__ import annotations


class StartupError(Exception):
    """Something the command line asks for cannot be set up (a forward, the API socket, the
    pcap file, the lockdown): the CLI prints it as one line, `slirpy: error: ...`, and exits 1."""


class ForwardError(Exception):
    """A port forward's add()/remove() refused; str(e) says why."""
