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
    Slirpy(*flags, tap="tap0", path_form=False, argv0=None, operands_first=False,
           extra_operands=()) -> with-block yields self with:
      .ns (NsHolder), .proc (Popen of slirpy), .run_in_ns(*cmd) (= .ns.run),
      .close_exit_fd() (ends slirpy through -e), .wait(timeout) -> returncode.
    Passes `-c -r FD -e FD` plus the given flags, waits (<= 30 s: a loaded machine) for b"1" on the ready fd
    (asserts it), and on exit kills slirpy and the holder and asserts both are gone; then
    .stdout/.stderr hold its output. argv0="/usr/bin/slirp4netns" runs the real slirp4netns
    with the same command line instead (for comparisons); operands_first puts PID TAPNAME
    before the options; extra_operands follow TAPNAME.
run_slirpy(*args, timeout=20, **kw) -> CompletedProcess (text) of a one-shot slirpy invocation.
exchange(conn, down) -> (n, sha256 hex)
    Sends `down` on a thread while reading conn to EOF, then shuts the write side down: the
    host end of a both-ways bulk test.
api_raw(path, request, timeout=10) -> bytes
    Sends one request (bytes) on a slirpy API socket, half-closes, returns the reply read to EOF.
api(path, req, timeout=10) -> dict
    api_raw() with req (a dict) as JSON and the reply parsed as JSON.
free_port(kind=SOCK_STREAM, addr="127.0.0.1") -> int
    A port that was free on addr a moment ago (bound, then closed): for forwards and refusals.
proc_status(pid) -> dict
    /proc/PID/status as {field: value text}.
class UdpServer(handler, addr="127.0.0.1", port=0)
    A UDP server thread on addr (IPv4 or IPv6): .port; .seen, a list of (datagram, peer address
    tuple); each datagram's handler(d) result, unless None, goes back to its sender. .close().
dns_answer(query, ip) -> bytes | None
    A DNS response to query with one A record (ip), or None when it is too short to answer.
require_world()
    require_netns(), and pytest.skip(...) unless this is root with ip(8) and nsenter.
run_world(body, *args, ipv6=False, ping=False, timeout=60) -> CompletedProcess (text)
    Runs `unshare -n sh -c PRELUDE+body sh ARGS...` (cwd and PYTHONPATH this checkout): a netns
    "A" (the script's own), lo up, with a veth v0 to a second "world" netns (a `sleep` whose pid
    is $W, killed on exit) holding v1, so A has a peer that is not loopback. IPv4: A 192.0.2.1/24,
    world 192.0.2.2/24; ipv6=True instead: A 2001:db8:1::1/64, world 2001:db8:1::2/64 (nodad).
    ping=True opens A's ping_group_range. In body: `set -e` holds, "$PY" is this interpreter,
    `world CMD...` runs CMD in the world netns, ARGS are $1, $2, ...
"""

from __future__ import annotations

import json
import os
import select
import shlex
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sha_to_eof(read, pause: float = 0.0) -> tuple[int, str]:
    """(bytes, sha256 hex) of what read() returns until b"" (EOF); pause: seconds between reads
    (a slow reader)."""
    import hashlib
    h, n = hashlib.sha256(), 0
    while b := read():
        h.update(b)
        n += len(b)
        if pause:
            time.sleep(pause)
    return n, h.hexdigest()


def exchange(conn, down: bytes) -> tuple[int, str]:
    t = threading.Thread(target=conn.sendall, args=(down,))
    t.start()
    got = sha_to_eof(lambda: conn.recv(1 << 16))
    t.join()
    conn.shutdown(socket.SHUT_WR)
    return got


def api_raw(path: str, request: bytes, timeout: float = 10) -> bytes:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(path)
        s.sendall(request)
        s.shutdown(socket.SHUT_WR)
        buf = b""
        while b := s.recv(65536):
            buf += b
        return buf
    finally:
        s.close()


def api(path: str, req: dict, timeout: float = 10) -> dict:
    return json.loads(api_raw(path, json.dumps(req).encode(), timeout))


def free_port(kind=socket.SOCK_STREAM, addr: str = "127.0.0.1") -> int:
    s = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, kind)
    s.bind((addr, 0))
    p = s.getsockname()[1]
    s.close()
    return p


def proc_status(pid: int) -> dict:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            out[k] = v.strip()
    return out


class UdpServer:
    def __init__(self, handler, addr="127.0.0.1", port=0):
        self.sock = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET,
                                  socket.SOCK_DGRAM)
        self.sock.bind((addr, port))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.handler = handler
        self.stop = False
        self.seen = []
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self):
        while not self.stop:
            try:
                d, a = self.sock.recvfrom(65535)
            except (socket.timeout, OSError):
                continue
            self.seen.append((d, a))
            r = self.handler(d)
            if r is not None:
                self.sock.sendto(r, a)

    def close(self):
        self.stop = True
        self.t.join(2)
        self.sock.close()


def dns_answer(q: bytes, ip: str) -> bytes | None:
    if len(q) < 12:
        return None
    off = 12
    while q[off]:
        off += 1 + q[off]
    end = off + 5
    rr = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 60, 4) + socket.inet_aton(ip)
    return q[:2] + struct.pack("!HHHHH", 0x8180, 1, 1, 0, 0) + q[12:end] + rr


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


def require_world() -> None:
    require_netns()
    if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("nsenter") is None:
        pytest.skip("LOUD: need root, ip(8) and nsenter to build the world netns")


_WORLD_ADDRS = {  # (A's address, the world's address) on the veth
    False: ("192.0.2.1/24", "192.0.2.2/24"),
    True: ("2001:db8:1::1/64 nodad", "2001:db8:1::2/64 nodad"),
}


def world_script(body: str, *, ipv6=False, ping=False, life=60) -> str:
    """The shell script run_world() runs (the prelude that builds the world netns, then body)."""
    a, w = _WORLD_ADDRS[ipv6]
    return f"""set -e
PY={shlex.quote(sys.executable)}
ip link set lo up
{'echo "0 2147483647" > /proc/sys/net/ipv4/ping_group_range' if ping else ''}
unshare -n sleep {int(life)} & W=$!
trap 'kill $W' EXIT
world() {{ nsenter -t "$W" -n "$@"; }}
i=0
while [ "$(readlink /proc/$W/ns/net)" = "$(readlink /proc/$$/ns/net)" ]; do
    i=$((i+1)); [ $i -le 100 ] || {{ echo "world netns never appeared" >&2; exit 1; }}
    sleep 0.05
done
ip link add v0 type veth peer name v1 netns $W
ip addr add {a} dev v0
ip link set v0 up
world sh -ec 'ip link set lo up; ip addr add {w} dev v1; ip link set v1 up'
""" + body


def run_world(body: str, *args, ipv6=False, ping=False, timeout=60) -> subprocess.CompletedProcess:
    require_world()
    script = world_script(body, ipv6=ipv6, ping=ping, life=timeout)
    return subprocess.run(["unshare", "-n", "sh", "-c", script, "sh", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=REPO, env=_env())


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
    def __init__(self, *flags, tap="tap0", path_form=False, configure=True, argv0=None,
                 operands_first=False, extra_operands=()):
        """``argv0``: another binary with slirp4netns's command line (the real slirp4netns) in
        slirpy's place; ``operands_first``: PID TAPNAME first, every option after them (getopt
        permutes); ``extra_operands`` come after TAPNAME."""
        self.flags, self.tap, self.path_form, self.configure = flags, tap, path_form, configure
        self.argv0, self.operands_first, self.extra_operands = argv0, operands_first, extra_operands
        self.proc = None

    def __enter__(self):
        self.ns = NsHolder().__enter__()
        try:
            self.ready_r, ready_w = os.pipe()
            exit_r, self.exit_w = os.pipe()
            args = ["-c"] if self.configure else []
            args += ["-r", str(ready_w), "-e", str(exit_r), *self.flags]
            if self.path_form:
                args += ["--netns-type=path", f"--userns-path=/proc/{self.ns.pid}/ns/user"]
                operands = [f"/proc/{self.ns.pid}/ns/net", self.tap]
            else:
                operands = [str(self.ns.pid), self.tap]
            operands += self.extra_operands
            args = operands + args if self.operands_first else args + operands
            cmd = slirpy_cmd(*args) if self.argv0 is None else [self.argv0, *args]
            self.proc = subprocess.Popen(cmd, pass_fds=(ready_w, exit_r), env=_env(),
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
