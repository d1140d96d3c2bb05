"""The lockdown's trial run before ready (see LockdownProbe). Imports nothing at module level
beyond os, so that __main__ can fork it before cli.py's imports (_early.py)."""

from __future__ import annotations

import os


class LockdownProbe:
    """--enable-sandbox/--enable-seccomp: the lockdown itself happens in the loop, after every
    module is imported (nothing can be imported from disk inside the sandbox), so after ready.
    What can refuse it is tried first in a forked child, while the helper works: the same
    sandbox.enter() (its own mount namespace, the binds, pivot_root, the capability drop) and
    seccomp.build(). A refusal there is the one-line error before ready, as slirp4netns gives
    it; the child's namespace and mounts go with it."""

    def __init__(self, config):
        r, w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:
            try:
                os.close(r)
                os.write(w, self._try(config).encode(errors="replace")[:4000])
            finally:
                os._exit(0)
        os.close(w)
        self.fd = r

    @staticmethod
    def _try(config) -> str:
        try:
            if config.enable_seccomp:
                from . import seccomp
                try:
                    seccomp.build().release()
                except seccomp.SeccompError as e:
                    return f"--enable-seccomp: {e}"
            if config.enable_sandbox:
                from . import sandbox
                try:
                    sandbox.enter(config)
                except sandbox.SandboxError as e:
                    return f"--enable-sandbox: {e}"
        except BaseException as e:  # noqa: BLE001 - any surprise is one line, as in the loop
            return f"lockdown: {type(e).__name__}: {e}".replace("\n", " ")
        return ""

    def wait(self) -> str:
        """'' when the lockdown can be done, else the error line."""
        msg = b""
        try:
            while chunk := os.read(self.fd, 4096):
                msg += chunk
        finally:
            os.close(self.fd)
            os.waitpid(self.pid, 0)
        return msg.decode(errors="replace")
