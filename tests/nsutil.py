"""Shared helpers for end-to-end tests in real namespaces (import from tests: `from nsutil import ...`).

API
---
have_netns() -> str | None
    None when `unshare -Urn` and /dev/net/tun work here, else the reason (for a loud pytest.skip).
require_netns()
    pytest.skip(...) with that reason unless namespaces work.
slirpy_cmd(*args) -> list[str]
    argv running this checkout's slirpy: [sys.executable, "-m", "slirpy", *args].
class NsHolder  (context manager)
    Starts `unshare -Urn sleep 600`; `.pid`; `.run(*cmd, **subprocess_kw)` runs cmd inside with
    `nsenter -t PID -U -n --preserve-credentials` (returns CompletedProcess, text, timeout 20 s);
    `.ip_json(*args)` runs `ip -j ARGS` inside and returns the parsed JSON.
class Slirpy  (context manager)
    Slirpy(*flags, tap="tap0", path_form=False) -> with-block yields self with:
      .ns (NsHolder), .proc (Popen of slirpy), .run_in_ns(*cmd) (= .ns.run),
      .close_exit_fd() (ends slirpy through -e), .wait(timeout) -> returncode.
    Passes `-c -r FD -e FD` plus the given flags, waits (<= 30 s: a loaded machine) for b"1" on the ready fd
    (asserts it), and on exit kills slirpy and the holder and asserts both are gone.
run_slirpy(*args, timeout=20, **kw) -> CompletedProcess (text) of a one-shot slirpy invocation.
exchange(conn, down) -> (n, sha256 hex)
    Sends `down` on a thread while reading conn to EOF, then shuts the write side down: the
    host end of a both-ways bulk test.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def exchange(conn, down: bytes) -> tuple[int, str]:
    import hashlib
    import socket
    import threading
    t = threading.Thread(target=conn.sendall, args=(down,))
    t.start()
    h, n = hashlib.sha256(), 0
    while True:
        b = conn.recv(1 << 16)
        if not b:
            break
        h.update(b)
        n += len(b)
    t.join()
    conn.shutdown(socket.SHUT_WR)
    return n, h.hexdigest()


def slirpy_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "slirpy", *args]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_slirpy(*args, timeout=20, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(slirpy_cmd(*args), capture_output=True, text=True, timeout=timeout,
                          env=_env(), **kw)


_reason: list = []


def have_netns() -> str | None:
    if _reason:
        return _reason[0]
    r = None
    if not shutil.which("unshare") or not shutil.which("nsenter"):
        r = "unshare/nsenter missing (bash tests/install-deps.sh)"
    elif not os.path.exists("/dev/net/tun"):
        r = "/dev/net/tun missing"
    else:
        p = subprocess.run(["unshare", "-Urn", "true"], capture_output=True, text=True)
        if p.returncode != 0:
            r = f"unshare -Urn fails here: {p.stderr.strip()}"
    _reason.append(r)
    return r


def require_netns() -> None:
    r = have_netns()
    if r:
        pytest.skip(f"NAMESPACE E2E TESTS CANNOT RUN: {r}")


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


class NsHolder:
    def __enter__(self):
        self.proc = subprocess.Popen(["unshare", "-Urn", "sleep", "600"])
        self.pid = self.proc.pid
        # wait until it has its own netns
        mine = os.stat("/proc/self/ns/net").st_ino
        for _ in range(200):
            try:
                if os.stat(f"/proc/{self.pid}/ns/net").st_ino != mine:
                    break
            except FileNotFoundError:
                pass
            time.sleep(0.01)
        else:
            raise AssertionError("unshare -Urn did not make a namespace")
        return self

    def run(self, *cmd, timeout=20, **kw) -> subprocess.CompletedProcess:
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        return subprocess.run(["nsenter", "-t", str(self.pid), "-U", "-n", "--preserve-credentials",
                               *cmd], timeout=timeout, **kw)

    def ip_json(self, *args):
        p = self.run("ip", "-j", *args)
        assert p.returncode == 0, p.stderr
        return json.loads(p.stdout)

    def __exit__(self, *exc):
        self.proc.kill()
        self.proc.wait(timeout=10)
        assert _gone(self.pid) or self.proc.returncode is not None


class Slirpy:
    def __init__(self, *flags, tap="tap0", path_form=False, configure=True):
        self.flags, self.tap, self.path_form, self.configure = flags, tap, path_form, configure
        self.proc = None

    def __enter__(self):
        self.ns = NsHolder().__enter__()
        try:
            self.ready_r, ready_w = os.pipe()
            exit_r, self.exit_w = os.pipe()
            args = ["-c"] if self.configure else []
            args += ["-r", str(ready_w), "-e", str(exit_r), *self.flags]
            if self.path_form:
                args += ["--netns-type=path", f"--userns-path=/proc/{self.ns.pid}/ns/user",
                         f"/proc/{self.ns.pid}/ns/net", self.tap]
            else:
                args += [str(self.ns.pid), self.tap]
            self.proc = subprocess.Popen(slirpy_cmd(*args), pass_fds=(ready_w, exit_r), env=_env(),
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            os.close(ready_w)
            os.close(exit_r)
            r, _, _ = select.select([self.ready_r], [], [], 30)
            self.ready_bytes = os.read(self.ready_r, 16) if r else b""
            if self.ready_bytes != b"1":
                self.proc.kill()
                out, err = self.proc.communicate(timeout=10)
                raise AssertionError(f"slirpy not ready: {self.ready_bytes!r}; stderr: {err}")
        except BaseException:
            self.ns.__exit__(None, None, None)
            raise
        return self

    def run_in_ns(self, *cmd, **kw):
        return self.ns.run(*cmd, **kw)

    def close_exit_fd(self):
        if self.exit_w is not None:
            os.close(self.exit_w)
            self.exit_w = None

    def wait(self, timeout=10) -> int:
        return self.proc.wait(timeout=timeout)

    def __exit__(self, *exc):
        try:
            self.close_exit_fd()
            if self.proc.poll() is None:
                try:
                    self.proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(timeout=5)
            self.stdout, self.stderr = self.proc.communicate(timeout=5)
            os.close(self.ready_r)
        finally:
            self.ns.__exit__(None, None, None)
        assert _gone(self.proc.pid) or self.proc.returncode is not None
