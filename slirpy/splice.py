"""Port forwards at kernel speed for loopback clients (issue #24; docs/forwarding.md).

A TCP forward's client on the host loopback (127.0.0.0/8, ::1, ::ffff:127.x) does not go through
the tap and the user-space TCP engine: the helper that made the tap (helper.py) stayed in the
container's user+net namespaces as the *connector*; asked over its socketpair, it opens a TCP
socket there, binds it to the forward's guest address (port 0), starts connect() to the guest's
port, and hands the fd back (SCM_RIGHTS). The daemon waits for the connect to complete, then
moves the bytes between the two kernel sockets with splice(2) through a pipe per direction:
they never enter Python.

So the guest's server sees the connection come from its own address (10.0.2.100 / fd00::100):
"from inside this namespace, through slirpy's forwarder", never from 127.0.0.1, which apps trust.
Every other case takes the tap path, as before, and is counted in get_stats `forward_splice`
`fallbacks` by reason: the connector dead, stuck or not ready; more than MAX_SPLICED connections
at once; the guest address not configured in the namespace (EADDRNOTAVAIL: no -c, no DHCP lease
yet); the connect failing otherwise or timing out; no pipe. A refused guest port (nothing
listening: the connect gets ECONNREFUSED) is the client's RST, as on the tap path.

needs: the daemon (config), the connector (pid, socketpair end) from launch, or None.
offers: wants(peer host) and take() for the port forwarder, status() and flows() for the API.
"""

from __future__ import annotations

import collections
import errno
import fcntl
import logging
import os
import signal
import socket
import struct

import trio

from .helper import REP, REQ

log = logging.getLogger(__name__)

SPLICE_F_MOVE, SPLICE_F_NONBLOCK = 1, 2
_FLAGS = SPLICE_F_MOVE | SPLICE_F_NONBLOCK
F_SETPIPE_SZ, F_GETPIPE_SZ = 1031, 1032
MAX_SPLICED = 256  # spliced connections at once; beyond, the tap path (counted "cap")
# A pipe's capacity is charged to the user (fs.pipe-user-pages-soft: 64 MiB by default; past it,
# the user's every new pipe gets one or two pages). 1 MiB pipes (fewer, larger splices) for the
# first connections, within PIPE_BIG_BUDGET; the others keep the default 64 KiB. At the cap:
# 16 MiB + 256 * 2 * 64 KiB = 48 MiB, within the soft limit.
PIPE_BIG = 1 << 20
PIPE_BIG_BUDGET = 16 << 20
READY_TIMEOUT = 2.0  # a connection waits this long for the connector's lockdown, then the tap
REPLY_TIMEOUT = 5.0  # the connector answers in microseconds; past this it is taken for stuck
# the connect to the guest has no timeout of ours (the kernel's SYN retries end it, ETIMEDOUT),
# but while it is pending the client is looked at this often: one that hung up (reset, or EOF
# with nothing sent) ends the attempt, as on the tap path (nat.py's "tcp_host_gone_early")
CLIENT_CHECK = 0.25
# a direction that never has to wait (a steady stream) yields to trio after this many splices
# into its destination (each at most a pipe's capacity)
BUSY_SPLICES = 8
_LINGER0 = struct.pack("ii", 1, 0)


def is_loopback(host: str) -> bool:
    """A peer address (as accept() gives it) on the host loopback."""
    return host.startswith("127.") or host == "::1" or host.startswith("::ffff:127.")


class _Unavailable(Exception):
    pass


class _Pipe:
    __slots__ = ("r", "w", "size", "big")

    def __init__(self, want_big: bool):
        self.r, self.w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.big = False
        if want_big:
            try:
                fcntl.fcntl(self.w, F_SETPIPE_SZ, PIPE_BIG)
                self.big = True
            except OSError:
                pass  # above pipe-max-size, or the user's pipe pages spent: the default
        try:
            self.size = fcntl.fcntl(self.w, F_GETPIPE_SZ)
        except OSError:
            self.size = 65536

    def close(self):
        os.close(self.r)
        os.close(self.w)


class _Spliced:
    """One spliced connection (list_flows)."""
    __slots__ = ("fwd", "peer", "family", "guest", "gport", "to_guest", "from_guest",
                 "abort_client", "abort_inner")

    def __init__(self, fwd, peer, family, guest, gport):
        self.fwd, self.peer, self.family, self.guest, self.gport = fwd, peer, family, guest, gport
        self.to_guest = self.from_guest = 0
        self.abort_client = self.abort_inner = False


class Splicer:
    def __init__(self, daemon, connector=None):
        self.d = daemon
        self.pid, self.sock = connector if connector is not None else (None, None)
        self.enabled = connector is not None and not daemon.config.disable_forward_splice
        self.alive = connector is not None
        self.kept: str | None = None  # what the connector kept (its READY line)
        self._ready = trio.Event()
        self._lock = trio.Lock()
        self._next_id = 1
        self.active = 0
        self.total = 0
        self.refused = 0
        self.resets = 0
        self.gone_early = 0  # clients that hung up while the guest had not answered yet
        self.bytes_to_guest = self.bytes_from_guest = 0
        self.fallbacks: collections.Counter = collections.Counter()
        self._big = 0  # bytes of raised pipe capacity in use
        self._conns: set[_Spliced] = set()

    # --------------------------------------------------------------------------- the API
    def status(self) -> dict:
        return {"enabled": self.enabled, "helper_alive": self.alive, "helper_pid": self.pid,
                "active": self.active, "total": self.total, "refused": self.refused,
                "resets": self.resets, "gone_early": self.gone_early,
                "bytes_to_guest": self.bytes_to_guest,
                "bytes_from_guest": self.bytes_from_guest,
                "fallbacks": dict(sorted(self.fallbacks.items())), "max": MAX_SPLICED}

    def flows(self) -> list[dict]:
        """As list_flows' UDP forward mappings: the guest (the server) is src, the client dst."""
        return [{"proto": "tcp", "family": c.family, "src": c.guest, "sport": c.gport,
                 "dst": c.peer[0], "dport": c.peer[1], "state": "SPLICED", "forward": c.fwd,
                 "client": f"{c.peer[0]}:{c.peer[1]}", "bytes_in": c.from_guest,
                 "bytes_out": c.to_guest}
                for c in list(self._conns)]

    # ------------------------------------------------------------------------ the connector
    async def serve(self, task_status=trio.TASK_STATUS_IGNORED):
        if self.sock is None:
            self._ready.set()
            task_status.started()
            return
        self.sock.setblocking(False)
        pidfd = None
        try:
            pidfd = os.pidfd_open(self.pid)
        except OSError:
            pass
        task_status.started()
        try:
            async with trio.open_nursery() as nursery:
                if pidfd is not None:
                    nursery.start_soon(self._watch, pidfd)
                await self._hello()
                await trio.sleep_forever()
        finally:
            if pidfd is not None:
                os.close(pidfd)
            trio.lowlevel.notify_closing(self.sock)  # a request still waiting on it ends
            self.sock.close()  # the connector's EOF: it exits

    async def _hello(self):
        """The connector's first word: READY <what it kept> or LOCKDOWN <why it could not>."""
        msg = b""
        while True:
            try:
                msg = self.sock.recv(1024)
                break
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self.sock)
            except OSError as e:
                msg = b"? " + os.strerror(e.errno or errno.EIO).encode()
                break
        if msg.startswith(b"READY "):
            self.kept = msg[6:].decode(errors="replace")
            log.info("forward splice: connector pid %d ready (%s)", self.pid, self.kept)
        elif msg.startswith(b"LOCKDOWN "):
            self._dead("could not lock itself down: " + msg[9:].decode(errors="replace"))
        else:
            self._dead("ended before it was ready" if not msg else "said something else")
        self._ready.set()

    async def _watch(self, pidfd: int):
        await trio.lowlevel.wait_readable(pidfd)
        self._dead("exited")
        try:
            os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            pass

    def _dead(self, why: str) -> None:
        """The one line when the connector goes: from now on every connection takes the tap."""
        if not self.alive:
            return
        self.alive = False
        self._ready.set()
        if self.enabled:
            log.warning("forward splice: connector (pid %d) %s; loopback clients of port "
                        "forwards take the tap path from now on", self.pid, why)
        try:
            os.kill(self.pid, signal.SIGKILL)  # a stuck one; a dead one: nothing happens
        except OSError:
            pass

    async def _request(self, family: int, gaddr: str, gport: int) -> tuple[int, int | None]:
        """-> (0, fd of a socket whose connect() to gaddr:gport has started) or (errno, None).
        _Unavailable: the connector is gone (marked dead)."""
        af = socket.AF_INET if family == 4 else socket.AF_INET6
        packed = socket.inet_pton(af, gaddr).ljust(16, b"\0")
        async with self._lock:
            if not self.alive:
                raise _Unavailable
            rid = self._next_id
            self._next_id = rid % 0xFFFFFFFF + 1
            try:
                self.sock.send(REQ.pack(rid, family, packed, gport))
            except OSError as e:
                self._dead(f"is gone ({os.strerror(e.errno or errno.EIO)})")
                raise _Unavailable from None
            with trio.move_on_after(REPLY_TIMEOUT):
                while True:
                    try:
                        msg, fds, _flags, _addr = socket.recv_fds(self.sock, 64, 1)
                    except BlockingIOError:
                        try:
                            await trio.lowlevel.wait_readable(self.sock)
                        except trio.ClosedResourceError:  # the daemon is ending (serve)
                            raise _Unavailable from None
                        continue
                    except OSError as e:
                        self._dead(f"is gone ({os.strerror(e.errno or errno.EIO)})")
                        raise _Unavailable from None
                    if len(msg) != REP.size or len(fds) > 1:
                        for fd in fds:
                            os.close(fd)
                        self._dead("closed its end" if not msg else "answered something else")
                        raise _Unavailable
                    r, err = REP.unpack(msg)
                    if r != rid:  # the answer to a request whose asker timed out
                        for fd in fds:
                            os.close(fd)
                        continue
                    if err or not fds:
                        for fd in fds:
                            os.close(fd)
                        return err or errno.EIO, None
                    return 0, fds[0]
            self._dead(f"did not answer within {REPLY_TIMEOUT:g} s")
            raise _Unavailable

    # ------------------------------------------------------------------- the port forwarder
    def wants(self, host: str) -> bool:
        """Whether a connection from ``host`` is one to splice (a loopback client)."""
        return self.enabled and is_loopback(host)

    def _fallback(self, reason: str) -> bool:
        self.fallbacks[reason] += 1
        return False

    async def take(self, conn, family: int, gaddr: str, gport: int, fwd_id: int,
                   peer) -> bool:
        """A forward's loopback client (``conn``, a trio socket): True when it is the
        splicer's (spliced until both ends are done; or refused with an RST, as the guest's
        RST would on the tap path), False when it should take the tap path (counted)."""
        if not self.alive:
            return self._fallback("helper_dead")
        if not self._ready.is_set():
            with trio.move_on_after(READY_TIMEOUT):
                await self._ready.wait()
            if not self._ready.is_set():
                return self._fallback("helper_not_ready")
            if not self.alive:
                return self._fallback("helper_dead")
        if self.active >= MAX_SPLICED:
            return self._fallback("cap")
        self.active += 1
        pipes: list[_Pipe] = []
        inner = None
        try:
            try:
                for _ in range(2):
                    pipes.append(_Pipe(self._big + PIPE_BIG <= PIPE_BIG_BUDGET))
                    self._big += PIPE_BIG if pipes[-1].big else 0
            except OSError as e:
                return self._fallback("pipe_" + errno.errorcode.get(e.errno, "error").lower())
            try:
                err, fd = await self._request(family, gaddr, gport)
            except _Unavailable:
                return self._fallback("helper_dead")
            if err:
                return self._fallback(errno.errorcode.get(err, "error").lower())
            inner = socket.socket(fileno=fd)
            err = await self._connect_done(inner, conn.fileno())
            if err is None:  # the client hung up first: the guest never sees it
                self.gone_early += 1
                _close(socket.socket(fileno=conn.detach()), rst=True)
                return True
            if err in (errno.ECONNREFUSED, errno.ETIMEDOUT):
                # the guest's RST (nothing listening), or no answer: the client's RST, as the
                # tap path gives it
                self.refused += 1
                _close(socket.socket(fileno=conn.detach()), rst=True)
                return True
            if err:
                return self._fallback("connect_" + errno.errorcode.get(err, "error").lower())
            client = socket.socket(fileno=conn.detach())
            c = _Spliced(fwd_id, peer[:2], family, gaddr, gport)
            self.total += 1
            self._conns.add(c)
            try:
                await self._run(c, client, inner, pipes)
            finally:
                self._conns.discard(c)
                _close(client, rst=c.abort_client)
                _close(inner, rst=c.abort_inner)
                inner = None
            return True
        finally:
            if inner is not None:
                inner.close()
            for p in pipes:
                self._big -= PIPE_BIG if p.big else 0
                p.close()
            self.active -= 1

    @staticmethod
    async def _connect_done(inner, client_fd: int) -> int | None:
        """The connect's errno (0: connected), or None when the client hung up meanwhile."""
        while True:
            with trio.move_on_after(CLIENT_CHECK):
                await trio.lowlevel.wait_writable(inner)
                return inner.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            peek = socket.socket(fileno=client_fd)  # borrowed: detached below, not closed
            try:
                if peek.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b"":
                    return None  # EOF with nothing sent: gone (an EOF after a request is a
                    # half-close, and the request still waits for the guest)
            except BlockingIOError:
                pass
            except OSError:
                return None  # reset
            finally:
                peek.detach()

    # --------------------------------------------------------------------------- the pump
    async def _run(self, c: _Spliced, client, inner, pipes) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._one_way, c, client, inner, pipes[0], True, nursery.cancel_scope)
            nursery.start_soon(self._one_way, c, inner, client, pipes[1], False,
                               nursery.cancel_scope)

    async def _one_way(self, c: _Spliced, src, dst, pipe: _Pipe, to_guest: bool, abort):
        """src -> pipe -> dst until src's EOF (then dst's write side is shut, once the pipe is
        empty) or an error: src reset (ECONNRESET...) -> dst aborted (RST); dst gone (EPIPE,
        ECONNRESET) -> src aborted. Waits on trio only on EAGAIN."""
        splice = os.splice
        sfd, dfd = src.fileno(), dst.fileno()
        pr, pw, size = pipe.r, pipe.w, pipe.size
        wait_readable, wait_writable = trio.lowlevel.wait_readable, trio.lowlevel.wait_writable
        checkpoint = trio.lowlevel.checkpoint
        held = 0
        busy = 0
        eof = False
        while True:
            if not eof and held < size:
                try:
                    n = splice(sfd, pw, size - held, flags=_FLAGS)
                except BlockingIOError:
                    n = -1
                except OSError as e:  # src failed: dst gets the RST
                    log.debug("forward splice %s: %s side: %s", c.peer,
                              "client" if to_guest else "guest", e)
                    self._reset(c, abort_client=not to_guest, abort=abort)
                    return
                if n == 0:
                    eof = True
                elif n > 0:
                    held += n
            if held:
                try:
                    m = splice(pr, dfd, held, flags=_FLAGS)
                except BlockingIOError:
                    await wait_writable(dfd)
                    continue
                except OSError as e:  # dst failed: src gets the RST
                    log.debug("forward splice %s: %s side: %s", c.peer,
                              "guest" if to_guest else "client", e)
                    self._reset(c, abort_client=to_guest, abort=abort)
                    return
                held -= m
                if to_guest:
                    c.to_guest += m
                    self.bytes_to_guest += m
                else:
                    c.from_guest += m
                    self.bytes_from_guest += m
                busy += 1
                if busy >= BUSY_SPLICES:  # a steady stream: trio's other tasks (the pump) too
                    busy = 0
                    await checkpoint()
                continue
            if eof:
                try:
                    dst.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                return
            await wait_readable(sfd)

    def _reset(self, c: _Spliced, abort_client: bool, abort) -> None:
        """One side failed (its peer's RST, or gone): the other side gets an RST, as on the tap
        path (nat.py closes with SO_LINGER 0), and both directions end."""
        self.resets += 1
        if abort_client:
            c.abort_client = True
        else:
            c.abort_inner = True
        abort.cancel()


def _close(sock, rst: bool = False) -> None:
    if rst:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER0)
        except OSError:
            pass
    sock.close()
