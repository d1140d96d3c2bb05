"""What the daemon opens on the host before it writes the ready byte, with no trio in sight: the
API socket, the `-p` forwards' sockets and the `--pcap` file. launch.run() opens them all (while
the helper configures the tap), then writes ready, then imports trio and starts the loop; the
components (api_socket.ApiServer, portfwd.PortForwarder, pcap.PcapWriter) adopt them from
`daemon.prebound`. A connection made the moment ready is written waits in the listen backlog, a
datagram in the socket's queue: nothing is refused or lost while the loop starts.

Every error here is a StartupError with one line, printed as `slirpy: error: ...` before ready.
"""

from __future__ import annotations

import errno
import os
import socket as _socket
import stat


from .errors import ForwardError, StartupError  # noqa: F401 (what this module raises)


_last_port_start: list[int] = []


def unprivileged_port_start() -> int:
    """The sysctl's value; inside --enable-sandbox (no /proc) the last value read before it."""
    try:
        with open("/proc/sys/net/ipv4/ip_unprivileged_port_start") as f:
            v = int(f.read().strip())
    except (OSError, ValueError):
        return _last_port_start[0] if _last_port_start else 1024
    _last_port_start[:] = [v]
    return v


def forward_conflict(taken, proto: str, host_addr: str, host_port: int) -> bool:
    """Whether (proto, host_addr, host_port) overlaps one of ``taken`` (such triples)."""
    for p, a, port in taken:
        if p == proto and port == host_port and (
                a == host_addr or "0.0.0.0" in (a, host_addr) and ":" not in a + host_addr
                or "::" in (a, host_addr) and ":" in a and ":" in host_addr):
            return True
    return False


def bind_forward(proto: str, host_addr: str, host_port: int) -> _socket.socket:
    """A non-blocking host socket for one forward: TCP listening, UDP bound. ForwardError."""
    if host_port < unprivileged_port_start():
        raise ForwardError(f"port {host_port}: below ip_unprivileged_port_start "
                           f"({unprivileged_port_start()}), refusing privileged port")
    family = _socket.AF_INET6 if ":" in host_addr else _socket.AF_INET
    kind = _socket.SOCK_STREAM if proto == "tcp" else _socket.SOCK_DGRAM
    s = _socket.socket(family, kind)
    try:
        if proto == "tcp":
            s.setsockopt(_socket.SOL_SOCKET, _socket.SO_REUSEADDR, 1)
        if family == _socket.AF_INET6:
            # as libslirp: "::" is v6 only, "0.0.0.0" is v4 only
            s.setsockopt(_socket.IPPROTO_IPV6, _socket.IPV6_V6ONLY, 1)
        s.bind((host_addr, host_port))
        if proto == "tcp":
            s.listen(128)
        s.setblocking(False)
    except OSError as e:
        s.close()
        why = "already in use" if e.errno == errno.EADDRINUSE else (e.strerror or str(e))
        raise ForwardError(f"port {host_addr}:{host_port}/{proto}: {why}") from None
    return s


def _live(path: str) -> bool:
    s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    s.settimeout(0.5)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


def open_api_listener(path: str) -> _socket.socket:
    """The API socket at ``path`` (mode 0600), listening, non-blocking; a stale socket file is
    replaced, a live one or another kind of file refused (StartupError)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            raise StartupError(f"--api-socket {path}: exists and is not a socket")
        if _live(path):
            raise StartupError(f"--api-socket {path}: another daemon is listening on it")
        os.unlink(path)  # stale
    s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        s.bind(path)
    except OSError as e:
        s.close()
        raise StartupError(f"--api-socket {path}: {e.strerror or e}") from None
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    s.listen(64)
    s.setblocking(False)
    return s


def open_pcap(path: str):
    """The --pcap file, opened for writing (StartupError)."""
    try:
        return open(path, "wb")
    except OSError as e:
        raise StartupError(f"--pcap {path}: {e.strerror or e}") from None


class Prebound:
    """What launch.run() opened before ready. Each component take()s its part once (None when
    it was not opened here: a daemon started by a test, or nothing asked for)."""

    def __init__(self):
        self.api: _socket.socket | None = None
        self.api_path: str | None = None
        self.api_ino: int | None = None
        self.ports: list[_socket.socket] | None = None  # in config.ports order
        self.pcap = None

    @classmethod
    def open(cls, config) -> "Prebound":
        pre = cls()
        try:
            taken = []
            pre.ports = []
            for pf in config.ports:
                try:
                    if forward_conflict(taken, pf.proto, pf.host_addr, pf.host_port):
                        raise ForwardError(f"port {pf.host_addr}:{pf.host_port}/{pf.proto}: "
                                           "already forwarded")
                    pre.ports.append(bind_forward(pf.proto, pf.host_addr, pf.host_port))
                except ForwardError as e:
                    raise StartupError(f"--port {pf.host_port}: {e}") from None
                taken.append((pf.proto, pf.host_addr, pf.host_port))
            if config.api_socket:
                pre.api = open_api_listener(config.api_socket)
                pre.api_path = config.api_socket
                pre.api_ino = os.stat(config.api_socket).st_ino
            if config.pcap:
                pre.pcap = open_pcap(config.pcap)
        except BaseException:
            pre.close()
            raise
        return pre

    def take(self, name: str):
        v = getattr(self, name)
        setattr(self, name, None)
        return v

    def close(self) -> None:
        """Close what no component took (an early exit); the API socket file goes too."""
        for s in self.ports or ():
            s.close()
        self.ports = None
        if self.api is not None:
            self.api.close()
            self.api = None
            self.unlink_api()
        if self.pcap is not None:
            self.pcap.close()
            self.pcap = None

    def unlink_api(self) -> None:
        """Remove the API socket file if it is still ours (an exit before the loop ran)."""
        if self.api_path is None:
            return
        try:
            if os.stat(self.api_path).st_ino == self.api_ino:
                os.unlink(self.api_path)
        except OSError:
            pass
