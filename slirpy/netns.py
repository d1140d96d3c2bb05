"""The `slirpy -- CMD` form: a child in a new user+net namespace that waits for the go signal."""

from __future__ import annotations

import os
import sys

from .helper import CLONE_NEWNET, CLONE_NEWUSER, HelperError, unshare


def spawn_command(argv: tuple[str, ...]) -> tuple[int, int]:
    """Fork a child that unshares user+net (current uid/gid -> root) and waits.

    Returns (pid, go_fd): write one byte to go_fd (then close it) once the network is up and the
    child execs argv; close it without writing and the child exits 127.
    Raises HelperError if the namespace cannot be made.
    """
    uid, gid = os.getuid(), os.getgid()
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(ready_r)
            os.close(go_w)
            try:
                unshare(CLONE_NEWUSER | CLONE_NEWNET)
                with open("/proc/self/setgroups", "w") as f:
                    f.write("deny")
                with open("/proc/self/uid_map", "w") as f:
                    f.write(f"0 {uid} 1\n")
                with open("/proc/self/gid_map", "w") as f:
                    f.write(f"0 {gid} 1\n")
            except OSError as e:
                os.write(ready_w, f"ERR cannot create user+net namespace: {e}".encode())
                os._exit(127)
            os.write(ready_w, b"OK")
            os.close(ready_w)
            if os.read(go_r, 1) != b"1":
                os._exit(127)
            os.close(go_r)
            try:
                os.execvp(argv[0], list(argv))
            except OSError as e:
                sys.stderr.write(f"slirpy: error: cannot run {argv[0]!r}: {e.strerror}\n")
                sys.stderr.flush()
                os._exit(127)
        finally:
            os._exit(127)
    os.close(ready_w)
    os.close(go_r)
    msg = b""
    while True:
        chunk = os.read(ready_r, 4096)
        if not chunk:
            break
        msg += chunk
    os.close(ready_r)
    if msg != b"OK":
        os.close(go_w)
        os.waitpid(pid, 0)
        raise HelperError(msg[4:].decode(errors="replace") if msg.startswith(b"ERR ") else
                          "namespace child died")
    return pid, go_w


def exit_status(wait_status: int) -> int:
    if os.WIFSIGNALED(wait_status):
        return 128 + os.WTERMSIG(wait_status)
    return os.waitstatus_to_exitcode(wait_status)
