"""The first part of start-up, before the heavy imports: check the fds, make the command's
namespace (`--` form) and fork the helper. The helper then joins the namespaces and configures the
tap (its pyroute2 import is the longest step) on one core while the parent imports trio, the stack
and the components on the other: daemon.run() collects the tap fd afterwards."""

from __future__ import annotations

import dataclasses
import os
import sys

from .helper import HelperError, start_helper
from .netns import spawn_command


def start(config):
    """-> (config, PendingTap, child_pid, go_fd) or an exit status after a one-line error."""
    for name in ("exit_fd", "ready_fd"):
        fd = getattr(config, name)
        if fd is not None:
            try:
                os.fstat(fd)
            except OSError:
                sys.stderr.write(f"slirpy: error: --{name.replace('_', '-')} {fd}: "
                                 "bad file descriptor\n")
                return 1
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
    """The helper failed (at fork or when its fd was awaited): reap the `--` command, which never
    got its go byte, say why, exit 1."""
    if child_pid is not None:
        os.close(go_fd)
        os.waitpid(child_pid, 0)
    sys.stderr.write(f"slirpy: error: {e}\n")
    return 1
