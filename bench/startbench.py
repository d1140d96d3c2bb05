"""Start-up figures, slirpy beside slirp4netns, alternating runs, medians (bench/netbench.py calls
run_start(); also `python3 bench/startbench.py [--runs N]` alone).

- `--help` and `--version`: exec to exit.
- start to ready: exec to the ready-fd byte (`-c --mtu=65520 --macaddress=M -r FD -e FD PID tap0`).
- tap appears / tap configured: a watcher inside the guest namespace, subscribed to rtnetlink's
  link, IPv4 address and route groups before the exec, notes when tap0 first appears and when it
  carries the MAC, the MTU, the up flag, 10.0.2.100/24 and the default route via 10.0.2.2 (times
  on CLOCK_MONOTONIC, which the bench and the watcher share).
- first guest connection served: the watcher then connects to a host echo server through
  10.0.2.2 and gets its byte back (the event loop is running by then).
- RSS idle: /proc/PID/status VmRSS 0.3 s after that.
- exit after SIGTERM / after exit-fd EOF: from the signal (the close) to the daemon reaped.
- podman run: `podman run --rm --network slirp4netns IMAGE true` as an ordinary user (rootless,
  tests/rootless_env.py), network_cmd_path this tree's slirpy or /usr/bin/slirp4netns, in a
  network namespace made here.

Traffic goes only to loopback and to the namespaces made here.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
MAC = "02:5a:11:00:00:42"
MTU = 65520

# Runs in the guest namespace: subscribe, say "ok", then report tap0's appearance and full
# configuration (monotonic seconds), then one echo through 10.0.2.2:PORT.
WATCHER = r"""
import socket, struct, sys, time
tap, mac, mtu, port = sys.argv[1], bytes.fromhex(sys.argv[2].replace(":", "")), int(sys.argv[3]), int(sys.argv[4])
s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
s.bind((0, 0x1 | 0x10 | 0x40))  # RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE
print("ok", flush=True)
def attrs(b, off):
    out = {}
    while off + 4 <= len(b):
        ln, ty = struct.unpack_from("HH", b, off)
        if ln < 4: break
        out[ty & 0x3fff] = b[off + 4:off + ln]
        off += (ln + 3) & ~3
    return out
idx = None; appear = None; link = addr = route = False
deadline = time.monotonic() + 10
s.settimeout(10)
while not (link and addr and route) and time.monotonic() < deadline:
    data = s.recv(1 << 16); now = time.monotonic(); off = 0
    while off + 16 <= len(data):
        ln, ty = struct.unpack_from("IH", data, off)
        if ln < 16: break
        m = data[off + 16:off + ln]; off += (ln + 3) & ~3
        if ty == 16 and len(m) >= 16:  # RTM_NEWLINK
            _, _, _, i, flags = struct.unpack_from("BBHiI", m)
            a = attrs(m, 16)
            if a.get(3, b"").rstrip(b"\0").decode() != tap: continue
            idx = i
            if appear is None: appear = now
            link = (flags & 1) and a.get(1) == mac and struct.unpack("I", a.get(4, b"\0" * 4))[0] == mtu
        elif ty == 20 and len(m) >= 8:  # RTM_NEWADDR
            fam, plen, _, _, i = struct.unpack_from("BBBBi", m)
            a = attrs(m, 8)
            if fam == 2 and plen == 24 and a.get(2, a.get(1)) == bytes([10, 0, 2, 100]): addr = True
        elif ty == 24 and len(m) >= 12:  # RTM_NEWROUTE
            fam, dlen = struct.unpack_from("BB", m)
            a = attrs(m, 12)
            if fam == 2 and dlen == 0 and a.get(5) == bytes([10, 0, 2, 2]): route = True
if not (link and addr and route):
    print("timeout", appear, link, addr, route, flush=True); sys.exit(1)
print("tap", appear, now, flush=True)
c = socket.create_connection(("10.0.2.2", port), timeout=10); c.sendall(b"x"); assert c.recv(1) == b"x"
print("served", time.monotonic(), flush=True)
"""


class Echo:
    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            with c:
                with contextlib.suppress(OSError):
                    c.sendall(c.recv(1))


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _wait_exit(proc, timeout: float) -> None:
    """Block until proc exits (a pidfd: no polling interval in the figure)."""
    import select
    fd = os.pidfd_open(proc.pid)
    try:
        p = select.poll()
        p.register(fd, select.POLLIN)
        if not p.poll(timeout * 1000):
            raise RuntimeError(f"pid {proc.pid} still running after {timeout} s")
    finally:
        os.close(fd)
    proc.wait()


def _oneshot(cmd, env) -> float:
    t0 = time.monotonic()
    r = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd="/")
    dt = time.monotonic() - t0
    if r.returncode:
        raise RuntimeError(f"{cmd} exited {r.returncode}")
    return dt * 1000


def _holder():
    holder = subprocess.Popen(["unshare", "-Urn", "sleep", "infinity"])
    mine = os.stat("/proc/self/ns/net").st_ino
    for _ in range(500):
        with contextlib.suppress(OSError):
            if os.stat(f"/proc/{holder.pid}/ns/net").st_ino != mine:
                return holder
        time.sleep(0.01)
    raise RuntimeError("unshare made no namespace")


def attach_once(cmd, env, echo_port: int, how: str) -> dict:
    """One attach: figures in ms (RSS in MB). how: "term" or "eof" (the way it is stopped)."""
    holder = _holder()
    watcher = subprocess.Popen(
        ["nsenter", "-t", str(holder.pid), "-U", "-n", "--preserve-credentials", sys.executable,
         "-c", WATCHER, "tap0", MAC, str(MTU), str(echo_port)], stdout=subprocess.PIPE, text=True)
    proc = None
    ready_r, ready_w = os.pipe()
    exit_r, exit_w = os.pipe()
    try:
        if watcher.stdout.readline().strip() != "ok":
            raise RuntimeError("watcher did not start")
        t0 = time.monotonic()
        proc = subprocess.Popen(
            cmd + ["-c", f"--mtu={MTU}", f"--macaddress={MAC}", "-r", str(ready_w), "-e", str(exit_r),
                   str(holder.pid), "tap0"],
            pass_fds=(ready_w, exit_r), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
            cwd="/")  # not a checkout: `python -m` puts the cwd first on sys.path
        os.close(ready_w)
        os.close(exit_r)
        ready_w = exit_r = -1
        got = os.read(ready_r, 1)
        ready = time.monotonic() - t0
        if got != b"1":
            raise RuntimeError(f"{cmd[0]} never became ready: {proc.stderr.read().decode()[-500:]}")
        tap = watcher.stdout.readline().split()
        served = watcher.stdout.readline().split()
        if tap[:1] != ["tap"] or served[:1] != ["served"]:
            raise RuntimeError(f"watcher: {tap} {served}")
        time.sleep(0.3)
        rss = _rss_mb(proc.pid)
        t1 = time.monotonic()
        if how == "term":
            proc.send_signal(signal.SIGTERM)
        else:
            os.close(exit_w)
            exit_w = -1
        _wait_exit(proc, 10)
        gone = time.monotonic() - t1
        return {"start to ready (ms)": ready * 1000,
                "tap appears (ms)": (float(tap[1]) - t0) * 1000,
                "tap configured (ms)": (float(tap[2]) - t0) * 1000,
                "first guest connection served (ms)": (float(served[1]) - t0) * 1000,
                "RSS idle (MB)": rss,
                f"exit after {'SIGTERM' if how == 'term' else 'exit-fd EOF'} (ms)": gone * 1000}
    finally:
        for fd in (ready_r, ready_w, exit_r, exit_w):
            if fd >= 0:
                os.close(fd)
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        watcher.kill()
        watcher.wait()
        holder.kill()
        holder.wait()


class PodmanRig:
    """Rootless Podman as the e2e client tests set it up, run in a network namespace made here."""

    def __init__(self):
        sys.path.insert(0, os.path.join(REPO, "tests"))
        from rootless_env import IMAGE, Podman, Rootless
        self.image = IMAGE
        self.rootless = Rootless().setup()
        self.podman = Podman(self.rootless)
        self.holder = subprocess.Popen(["unshare", "-n", "sleep", "infinity"])
        self.netns = f"/proc/{self.holder.pid}/ns/net"
        for _ in range(500):
            if os.stat(self.netns).st_ino != os.stat("/proc/self/ns/net").st_ino:
                break
            time.sleep(0.01)
        subprocess.run(["nsenter", f"--net={self.netns}", "ip", "link", "set", "lo", "up"], check=True)

    def run(self, network_cmd: str) -> float:
        argv = self.podman.argv([f"--network-cmd-path={network_cmd}", "run", "--rm", "--network",
                                 "slirp4netns", self.image, "true"])
        full = self.rootless.argv(argv, netns=self.netns)
        t0 = time.monotonic()
        r = subprocess.run(full, env=self.podman.envd, cwd=self.rootless.work, capture_output=True,
                           text=True, timeout=120)
        dt = time.monotonic() - t0
        if r.returncode:
            raise RuntimeError(f"podman run: {r.stdout}{r.stderr}"[-800:])
        return dt * 1000

    def wrapper(self, name: str, impl) -> str:
        """A wrapper like Rootless.wrapper for (argv prefix, env) with its own PYTHONPATH."""
        cmd, env = impl
        path = os.path.join(self.rootless.work, f"{name}-wrapper")
        with open(path, "w") as f:
            f.write("#!/bin/sh\n"
                    f"PYTHONPATH={env['PYTHONPATH'].split(os.pathsep)[0]} exec "
                    f"{' '.join(cmd)} \"$@\"\n")
        os.chmod(path, 0o755)
        return path

    def close(self):
        self.podman.teardown()
        self.rootless.teardown()
        self.holder.kill()
        self.holder.wait()


def run_start(impls: dict, runs: int, rec, podman: bool = True, attach: bool = True) -> None:
    """impls: name -> (argv prefix, env); rec(impl, figure, value). Alternates the order."""
    echo = Echo()
    names = list(impls)
    for i in range(runs if attach else 0):
        order = names if i % 2 == 0 else names[::-1]
        for impl in order:
            cmd, env = impls[impl]
            for flag in ("--help", "--version"):
                try:
                    rec(impl, f"{flag} (ms)", _oneshot(cmd + [flag], env))
                except Exception as e:  # noqa: BLE001 - reported, not fatal
                    print(f"  {impl} {flag}: FAILED: {e}", flush=True)
            for how in ("term", "eof"):
                try:
                    for k, v in attach_once(cmd, env, echo.port, how).items():
                        rec(impl, k, v)
                except Exception as e:  # noqa: BLE001
                    print(f"  {impl} attach ({how}): FAILED: {e}", flush=True)
    if not podman:
        return
    try:
        rig = PodmanRig()
    except Exception as e:  # noqa: BLE001
        print(f"  podman: FAILED to set up: {e}", flush=True)
        return
    try:
        cmds = {"slirp4netns": shutil.which("slirp4netns")}
        for impl in names:
            if impl not in cmds:  # another tree's slirpy (BENCH_BASE_TREE): a wrapper of its own
                cmds[impl] = rig.wrapper(impl, impls[impl])
        for impl in names:  # one warm-up each: image and storage in the page cache
            rig.run(cmds[impl])
        for i in range(runs):
            for impl in (names if i % 2 == 0 else names[::-1]):
                try:
                    rec(impl, "podman run --rm IMAGE true (ms)", rig.run(cmds[impl]))
                except Exception as e:  # noqa: BLE001
                    print(f"  {impl} podman: FAILED: {e}", flush=True)
    finally:
        rig.close()


def main():
    import argparse
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--no-podman", action="store_true")
    args = ap.parse_args()
    sys.path.insert(0, HERE)
    import netbench
    results: dict = {}

    def rec(impl, name, value):
        results.setdefault((name, impl), []).append(value)
        print(f"  {impl:12s} {name:36s} {value:10.3f}", flush=True)

    run_start({k: f() for k, f in netbench.IMPLS.items()}, args.runs, rec, podman=not args.no_podman)
    print()
    print(netbench.table(results))


if __name__ == "__main__":
    main()
