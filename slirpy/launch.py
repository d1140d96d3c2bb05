"""Start-up up to the ready byte, before anything heavy is imported.

start(): check the fds, make the command's namespace (`--` form) and fork the helper, which joins
the target's namespaces and creates and configures the tap (helper.py; a few ms).
run(): meanwhile open everything on the host that can refuse (the API socket, the `-p` forwards'
sockets, the --pcap file: listeners.py), have the lockdown tried in a forked child
(_probe.py, with --enable-sandbox/--enable-seccomp), collect the tap fd, write the ready byte
(and the `--` command's go byte), and only then import trio, the stack and the components and
start the loop (daemon.run_loop). What arrives in between waits: connections in the listen
backlogs, datagrams in the sockets' queues, the guest's frames in the tap's queue (1000 frames);
the loop reads none of it before the lockdown.

A SIGTERM/SIGINT/SIGHUP or an exit-fd EOF (SIGIO through O_ASYNC) before the loop's own watchers
run ends the daemon at once, even mid-import (the API socket file removed, the `--` command
stopped). Once the loop ends, the process leaves through os._exit() after flushing, without the
interpreter's teardown of every module.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys

from ._probe import LockdownProbe
from .helper import HelperError, start_helper
from .netns import spawn_command

EXIT_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def start(config):
    """-> (config, PendingTap, child_pid, go_fd) or an exit status after a one-line error."""
    from . import _early
    early = _early.take(config)  # forked by __main__ for exactly this config, or None
    for name in ("exit_fd", "ready_fd"):
        fd = getattr(config, name)
        if fd is not None:
            try:
                os.fstat(fd)
            except OSError:
                sys.stderr.write(f"slirpy: error: --{name.replace('_', '-')} {fd}: "
                                 "bad file descriptor\n")
                if early is not None:
                    early.abandon()
                return 1
    if early is not None:
        return config, early, None, None
    child_pid = go_fd = None
    try:
        if config.command is not None:
            child_pid, go_fd = spawn_command(config.command)
            config = dataclasses.replace(config, target=str(child_pid), netns_type="pid",
                                         userns_path=None)
        return config, start_helper(config), child_pid, go_fd
    except HelperError as e:
        return start_failed(e, child_pid, go_fd)


def start_failed(e, child_pid, go_fd) -> int:
    """Start-up failed before ready (the helper, or a socket/file that cannot be opened): reap the
    `--` command, which never got its go byte, say why, exit 1."""
    if child_pid is not None:
        os.close(go_fd)
        os.waitpid(child_pid, 0)
    sys.stderr.write(f"slirpy: error: {e}\n")
    return 1


def write_ready(fd: int) -> None:
    try:
        os.write(fd, b"1")
    except OSError as e:
        import logging
        logging.getLogger("slirpy.daemon").warning("ready fd %d: %s", fd, e)
    try:
        os.close(fd)
    except OSError:
        pass


def exit_fd_closed(fd: int | None) -> bool:
    """Whether the exit fd has reached EOF (or is gone) already; reads nothing else."""
    if fd is None:
        return False
    import select
    p = select.poll()
    p.register(fd, select.POLLIN)
    for _fd, ev in p.poll(0):
        if ev & (select.POLLHUP | select.POLLERR | select.POLLNVAL):
            return True
        if ev & select.POLLIN:
            try:
                return os.read(fd, 4096) == b""  # bytes written to it are ignored, as later
            except BlockingIOError:
                return False
            except OSError:
                return True
    return False


class _EarlyExit:
    """Outside the loop's signal receiver (before it, and after it): a stop request ends the
    process at once, tidily. Trio's receiver replaces these handlers while the loop runs."""

    def __init__(self, pre, child_pid):
        self.pre, self.child_pid = pre, child_pid
        for s in EXIT_SIGNALS:
            signal.signal(s, self._on_signal)

    def _on_signal(self, signum, frame):
        self.exit()

    def watch_exit_fd(self, fd: int | None):
        """Until the loop's own watcher runs (Daemon._watch_exit_fd calls the returned function):
        the exit fd raises SIGIO when it becomes readable (O_ASYNC), and at EOF the process ends
        there and then, even in the middle of the imports or the lockdown. Podman waits for the
        daemon's exit after a short container, which may close the fd before the loop runs."""
        if fd is None:
            return None
        import fcntl

        def on_sigio(signum, frame):
            if exit_fd_closed(fd):
                self.exit()

        try:
            signal.signal(signal.SIGIO, on_sigio)
            fcntl.fcntl(fd, fcntl.F_SETOWN, os.getpid())
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_ASYNC)
        except OSError:  # an fd that cannot signal: the loop's watcher will see the EOF
            signal.signal(signal.SIGIO, signal.SIG_IGN)
            return None

        def handoff():
            try:
                fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_ASYNC)
            except OSError:
                pass
            signal.signal(signal.SIGIO, signal.SIG_IGN)

        return handoff

    def exit(self):
        if self.pre is not None:
            self.pre.close()
            self.pre.unlink_api()
        code = 0
        if self.child_pid is not None:
            from .netns import exit_status
            try:
                os.kill(self.child_pid, signal.SIGTERM)
                _, status = os.waitpid(self.child_pid, 0)
                code = exit_status(status)
            except ChildProcessError:  # reaped by the loop already
                pass
            except ProcessLookupError:
                pass
        fast_exit(code)


def fast_exit(code: int):
    """Leave now: flush what Python buffers, skip the interpreter's teardown."""
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except Exception:  # noqa: BLE001 - a closed stdout must not change the exit status
            pass
    if "logging" in sys.modules:
        sys.modules["logging"].shutdown()
    os._exit(code)


def run(started) -> int:
    """From the forked helper to the running daemon: see the module docstring. Does not return
    when the daemon ran (fast_exit); returns 1 after a start-up error before ready."""
    config, pending, child_pid, go_fd = started
    from .errors import StartupError
    from .listeners import Prebound
    from . import _early
    probe = _early.take_probe(config)  # forked by __main__ for exactly this config, or None
    if probe is None and (config.enable_sandbox or config.enable_seccomp):
        probe = LockdownProbe(config)
    early = _EarlyExit(None, child_pid)  # from here a stop request exits at once
    try:
        pre = early.pre = Prebound.open(config)
    except StartupError as e:
        pending.abandon()
        if probe is not None:
            probe.wait()
        return start_failed(e, child_pid, go_fd)
    try:
        tap_fd, offload = pending.wait()
    except HelperError as e:
        pre.close()
        if probe is not None:
            probe.wait()
        return start_failed(e, child_pid, go_fd)
    refused = probe.wait() if probe is not None else ""
    if refused:
        pending.close_connector()
        os.close(tap_fd)
        pre.close()
        return start_failed(refused, child_pid, go_fd)
    target_pidfd = None
    if child_pid is None and config.netns_type == "pid" and config.target:
        try:  # now: once ready is written the target may exit, and be reaped, any moment
            target_pidfd = os.pidfd_open(int(config.target))
        except OSError:
            pass  # gone already: the tap fd pins the namespace; nothing to watch
    handoff = early.watch_exit_fd(config.exit_fd)
    if config.ready_fd is not None:
        write_ready(config.ready_fd)
    if go_fd is not None:
        os.write(go_fd, b"1")
        os.close(go_fd)
    if exit_fd_closed(config.exit_fd):
        early.exit()
    _test_pause()
    from . import daemon  # trio, the stack, the components: the long import, after ready
    if exit_fd_closed(config.exit_fd):
        early.exit()
    try:
        code = daemon.run_loop(config, tap_fd, offload, pre, child_pid, target_pidfd, handoff,
                               connector=pending.connector)
    except BaseException as e:  # a component's startup error (maybe inside an ExceptionGroup)
        msg = startup_error(e)
        if msg is None:
            raise
        sys.stderr.write(f"slirpy: error: {msg}\n")
        code = 1
    fast_exit(code)


def _test_pause() -> None:
    """SLIRPY_TEST_PAUSE_AFTER_READY=SECONDS (at most 10): wait that long between ready and the
    loop, so that a test can show that what comes in that window is served (tests only)."""
    v = os.environ.get("SLIRPY_TEST_PAUSE_AFTER_READY")
    if v:
        import time
        try:
            time.sleep(min(max(float(v), 0.0), 10.0))
        except ValueError:
            pass


def startup_error(e: BaseException) -> str | None:
    """The one line to print for a component's StartupError, found inside ExceptionGroups too;
    None for anything else (which is re-raised)."""
    from .errors import StartupError
    if isinstance(e, StartupError):
        return str(e)
    if isinstance(e, BaseExceptionGroup):
        for sub in e.exceptions:
            m = startup_error(sub)
            if m is not None:
                return m
    return None
