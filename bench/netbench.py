#!/usr/bin/env python3
"""Side-by-side network benchmark: slirpy vs slirp4netns vs pasta, same machine, same run, alternating.

Each round, for each implementation: a fresh `unshare -Urn` namespace, the daemon attached with
`-c --mtu=M -r FD -e FD` (pasta: `--config-net -a 10.0.2.100 -n 24 -g 10.0.2.2 -m M`, run as the
unprivileged user nobody, since pasta refuses to run as root; the namespace is then nobody's too),
then the measurements below against servers on the host's 127.0.0.1 reached from the guest through
the gateway 10.0.2.2 (pasta maps its gateway address to the host's loopback, as slirp4netns does).
Prints one table of medians with the ratios slirpy/slirp4netns and slirpy/pasta and appends it to
bench/results/. pasta's "start to ready" is from exec until its first process exits, which it does
once the namespace is configured and it has forked into the background.

  bench/run [--rounds 3] [--seconds 5] [--only tput,fwd,rr,crr,ready,rss,parse,start,podman]
            [--flows 10000] [--start-runs 10] [--rules N]

--rules N adds a column "slirpy-rules": this tree's slirpy with N egress --deny rules that no flow
matches, so every new flow walks all N (the check runs only at flow creation: CRR shows its cost,
RR and throughput should not move).

Throughput is iperf3 (guest client -> host server on 127.0.0.1; -R for host->guest; "forward": a
host client on 127.0.0.1 through a forwarded port to a server in the guest), RR/CRR a
1-byte echo from the guest, "start to ready" from exec to the ready-fd byte, RSS from /proc.
slirpy runs as `python3 -m slirpy` from this tree (PYTHONPATH), never the console script.

"start" and "podman": the start-up figures of startbench.py (--help, --version, ready, tap
appears/configured, first connection served, RSS idle, exit after SIGTERM / exit-fd EOF; `podman
run --rm IMAGE true` as an ordinary user), --start-runs alternating runs each, medians.

Traffic goes only to loopback and to the namespaces made here.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import pathlib
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = pathlib.Path(__file__).resolve().parent
RESULTS = HERE / "results"

# Runs inside the guest namespace: request/response and connect/request/response clients, and
# a client that opens N connections and holds them.
GUEST_CLIENT = r"""
import socket, sys, time
mode, host, port, secs = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
if mode == "rr":
    s = socket.create_connection((host, port)); s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    n = 0; end = time.monotonic() + secs
    while time.monotonic() < end:
        for _ in range(100):
            s.sendall(b"x"); assert s.recv(1) == b"x"
        n += 100
    print(n / secs)
elif mode == "crr":
    n = 0; end = time.monotonic() + secs
    while time.monotonic() < end:
        s = socket.create_connection((host, port)); s.sendall(b"x"); assert s.recv(1) == b"x"; s.close(); n += 1
    print(n / secs)
elif mode == "hold":
    import resource
    count = int(secs)
    resource.setrlimit(resource.RLIMIT_NOFILE, (count + 100, count + 100))
    socks = [socket.create_connection((host, port)) for _ in range(count)]
    print("open", flush=True); sys.stdin.readline()
"""


class EchoServer:
    """Threaded 1-byte echo server on 127.0.0.1 (for RR, CRR and held flows)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4096)
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.conns.append(c)
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c):
        try:
            while True:
                b = c.recv(65536)
                if not b:
                    break
                c.sendall(b)
        except OSError:
            pass
        finally:
            c.close()

    def close(self):
        self.sock.close()


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


# pasta refuses to run as root: it and its namespace run as nobody
AS_NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"]


def _holder(prefix=()) -> subprocess.Popen:
    """`unshare -Urn sleep infinity`, returned once the namespace exists."""
    holder = subprocess.Popen([*prefix, "unshare", "-Urn", "sleep", "infinity"])
    mine = os.stat("/proc/self/ns/net").st_ino
    for _ in range(200):  # wait until unshare has made the namespace
        with contextlib.suppress(OSError):
            if os.stat(f"/proc/{holder.pid}/ns/net").st_ino != mine:
                break
        time.sleep(0.01)
    return holder


@contextlib.contextmanager
def attached(impl, mtu: int, fwd: tuple[int, int] | None = None):
    """A fresh user+net namespace with the daemon attached; yields (daemon_pid, ns_pid, ready_s).
    fwd=(host_port, guest_port): a TCP forward from the host's 127.0.0.1, added through the API
    socket once ready (slirpy and slirp4netns: the same add_hostfwd request), or pasta's -t."""
    binary, env = impl
    if binary[0].endswith("pasta"):
        with attached_pasta(binary, mtu, fwd) as got:
            yield got
        return
    api_dir = tempfile.mkdtemp(prefix="bench-api-") if fwd else None
    if fwd:
        binary = binary + ["-a", os.path.join(api_dir, "s")]
    holder = _holder()
    ready_r, ready_w = os.pipe()
    exit_r, exit_w = os.pipe()
    t0 = time.monotonic()
    proc = subprocess.Popen(
        binary + ["-c", f"--mtu={mtu}", "-r", str(ready_w), "-e", str(exit_r), str(holder.pid), "tap0"],
        pass_fds=(ready_w, exit_r), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    os.close(ready_w)
    os.close(exit_r)
    try:
        got = os.read(ready_r, 1)
        ready_s = time.monotonic() - t0
        if got != b"1":
            raise RuntimeError(f"{binary[0]} never became ready: {proc.stderr.read().decode()[-500:]}")
        if fwd:
            add_hostfwd(os.path.join(api_dir, "s"), *fwd)
        yield proc.pid, holder.pid, ready_s
    finally:
        if api_dir:
            shutil.rmtree(api_dir, ignore_errors=True)
        os.close(exit_w)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        os.close(ready_r)
        holder.kill()
        holder.wait()


def add_hostfwd(path: str, host_port: int, guest_port: int) -> None:
    req = {"execute": "add_hostfwd", "arguments": {"proto": "tcp", "host_addr": "127.0.0.1",
                                                    "host_port": host_port, "guest_port": guest_port}}
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(path)
        s.sendall(json.dumps(req).encode())
        s.shutdown(socket.SHUT_WR)
        reply = s.recv(4096)
    if b'"return"' not in reply:
        raise RuntimeError(f"add_hostfwd: {reply!r}")


@contextlib.contextmanager
def attached_pasta(binary, mtu: int, fwd=None):
    holder = _holder(AS_NOBODY)
    piddir = tempfile.mkdtemp(prefix="bench-pasta-")
    os.chmod(piddir, 0o777)
    pidfile = os.path.join(piddir, "pid")
    pid = None
    try:
        t0 = time.monotonic()
        r = subprocess.run([*AS_NOBODY, *binary, "-q", "--config-net", "-a", "10.0.2.100", "-n",
                            "24", "-g", "10.0.2.2", "-m", str(mtu), "-t", f"{fwd[0]}:{fwd[1]}" if fwd else "none", "-u", "none",
                            "-T", "none", "-U", "none", "-P", pidfile, str(holder.pid)],
                           capture_output=True, text=True, timeout=30)
        ready_s = time.monotonic() - t0
        if r.returncode:
            raise RuntimeError(f"pasta: {r.stderr[-500:]}")
        pid = int(open(pidfile).read())
        yield pid, holder.pid, ready_s
    finally:
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        holder.kill()
        holder.wait()
        shutil.rmtree(piddir, ignore_errors=True)


def in_ns(ns_pid: int, *cmd: str) -> list[str]:
    return ["nsenter", "-t", str(ns_pid), "-U", "-n", "--preserve-credentials", *cmd]


def iperf_client(prefix: list[str], host: str, port: int, seconds: float, reverse: bool) -> float:
    """Gb/s an iperf3 client (run behind prefix, e.g. in_ns(...)) measured to host:port;
    reverse: the server sends (-R)."""
    args = ["iperf3", "-c", host, "-p", str(port), "-t", str(seconds), "-J"]
    if reverse:
        args.append("-R")
    out = subprocess.run([*prefix, *args], capture_output=True, text=True, timeout=seconds + 30)
    data = json.loads(out.stdout)
    if "error" in data:
        raise RuntimeError(data["error"])
    return data["end"]["sum_received"]["bits_per_second"] / 1e9


def iperf(ns_pid: int, seconds: float, reverse: bool) -> float:
    port = free_port()
    srv = subprocess.Popen(["iperf3", "-s", "-1", "-B", "127.0.0.1", "-p", str(port)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.2)
        return iperf_client(in_ns(ns_pid), "10.0.2.2", port, seconds, reverse)
    finally:
        srv.kill()
        srv.wait()


def iperf_fwd(impl, mtu: int, seconds: float, reverse: bool) -> float:
    """A host client on 127.0.0.1 through a forwarded port to an iperf3 server in the guest."""
    host_port, guest_port = free_port(), 5201
    with attached(impl, mtu, fwd=(host_port, guest_port)) as (_dpid, nspid, _ready):
        srv = subprocess.Popen(in_ns(nspid, "iperf3", "-s", "-1", "-p", str(guest_port)),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(0.3)
            return iperf_client([], "127.0.0.1", host_port, seconds, reverse)
        finally:
            srv.kill()
            srv.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def guest_client(ns_pid: int, mode: str, port: int, secs: float) -> float:
    out = subprocess.run(in_ns(ns_pid, sys.executable, "-c", GUEST_CLIENT, mode, "10.0.2.2",
                               str(port), str(secs)), capture_output=True, text=True,
                         timeout=secs + 60)
    if out.returncode:
        raise RuntimeError(out.stderr[-500:])
    return float(out.stdout.strip())


def rss_with_flows(daemon_pid: int, ns_pid: int, port: int, flows: int) -> float:
    p = subprocess.Popen(in_ns(ns_pid, sys.executable, "-c", GUEST_CLIENT, "hold", "10.0.2.2",
                               str(port), str(flows)),
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    try:
        line = p.stdout.readline()
        if line.strip() != "open":
            raise RuntimeError(p.stderr.read()[-500:])
        return rss_kb(daemon_pid) / 1024
    finally:
        p.stdin.close()
        p.wait(60)


REPO = HERE.parent


def _slirpy_env(tree=REPO) -> dict:
    # this tree's code, not the `slirpy` console script (which may point at another checkout)
    env = dict(os.environ)
    env["PYTHONPATH"] = str(tree) + os.pathsep + env.get("PYTHONPATH", "")
    return env


IMPLS = {
    "slirp4netns": lambda: ([shutil.which("slirp4netns") or "slirp4netns"], None),
    "slirpy": lambda: ([sys.executable, "-m", "slirpy"], _slirpy_env()),
    "pasta": lambda: ([shutil.which("pasta") or "pasta"], None),
}
# BENCH_BASE_TREE=/path/to/another/checkout: a third column, "slirpy-base", that tree's slirpy
# measured in the same alternating rounds (a before/after under the same machine load)
BASE_TREE = os.environ.get("BENCH_BASE_TREE")
if BASE_TREE:
    IMPLS["slirpy-base"] = lambda: ([sys.executable, "-m", "slirpy"], _slirpy_env(BASE_TREE))


def run(args) -> dict:
    only = set(args.only.split(","))
    results: dict[tuple[str, str], list[float]] = {}

    def rec(impl, name, value):
        results.setdefault((name, impl), []).append(value)
        print(f"  {impl:12s} {name:36s} {value:10.3f}", flush=True)

    echo = EchoServer()
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4 * args.flows + 1000)), hard))
    for rnd in range(args.rounds):
        print(f"round {rnd + 1}/{args.rounds}", flush=True)
        order = list(IMPLS.items())
        if rnd % 2:
            order.reverse()  # alternate who goes first
        for impl, binary in order:
            for mtu in (65520, 1500):
                if not ({"tput"} & only) and mtu == 1500:
                    continue
                try:
                    with attached(binary(), mtu) as (dpid, nspid, ready_s):
                        if mtu == 65520:
                            if "ready" in only:
                                rec(impl, "start to ready (ms)", ready_s * 1000)
                            if "rss" in only:
                                rec(impl, "RSS idle (MB)", rss_kb(dpid) / 1024)
                            if "rr" in only:
                                rec(impl, "TCP_RR (trans/s)", guest_client(nspid, "rr", echo.port, args.seconds))
                            if "crr" in only:
                                rec(impl, "TCP_CRR (conn/s)", guest_client(nspid, "crr", echo.port, args.seconds))
                        if "tput" in only:
                            rec(impl, f"guest->host MTU {mtu} (Gb/s)", iperf(nspid, args.seconds, False))
                            rec(impl, f"host->guest MTU {mtu} (Gb/s)", iperf(nspid, args.seconds, True))
                        if mtu == 65520 and "rss" in only and args.flows:
                            rec(impl, f"RSS {args.flows} flows (MB)",
                                rss_with_flows(dpid, nspid, echo.port, args.flows))
                except Exception as e:  # a failing implementation is reported, not fatal
                    print(f"  {impl} MTU {mtu}: FAILED: {e}", flush=True)
            if "fwd" in only:
                for rev, label in ((False, "host->guest"), (True, "guest->host")):
                    try:
                        rec(impl, f"forward {label} 127.0.0.1 client (Gb/s)",
                            iperf_fwd(binary(), 65520, args.seconds, rev))
                    except Exception as e:
                        print(f"  {impl} forward: FAILED: {e}", flush=True)
    echo.close()
    if {"start", "podman"} & only:
        sys.path.insert(0, str(HERE))
        from startbench import run_start
        print(f"start-up: {args.start_runs} alternating runs", flush=True)
        # pasta has no slirp4netns command line (-r/-e, -c): its start is "start to ready" above
        run_start({k: f() for k, f in IMPLS.items() if k != "pasta"}, args.start_runs, rec,
                  podman="podman" in only, attach="start" in only)
    return results


def table(results) -> str:
    names = []
    for name, _ in results:
        if name not in names:
            names.append(name)
    impls = ["slirpy", "slirp4netns", "pasta"]
    for extra in ("slirpy-base", "slirpy-rules"):  # BENCH_BASE_TREE, --rules N
        if any(impl == extra for _, impl in results):
            impls.append(extra)
    lines = ["| figure | " + " | ".join(impls) + " | slirpy/slirp4netns | slirpy/pasta |",
             "|---|" + "---:|" * (len(impls) + 2)]
    for name in names:
        med = {i: statistics.median(results[(name, i)]) if results.get((name, i)) else None
               for i in impls}
        cells = [f"{med[i]:.3f}" if med[i] is not None else "-" for i in impls]
        a = med["slirpy"]
        ratios = [f"{a / med[i]:.2f}x" if a is not None and med[i] else "-"
                  for i in ("slirp4netns", "pasta")]
        lines.append(f"| {name} | " + " | ".join(cells + ratios) + " |")
    return "\n".join(lines)


def machine() -> str:
    cpu = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return (f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus ({cpu}), "
            f"kernel {platform.release()}, Python {platform.python_version()}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--flows", type=int, default=10000)
    ap.add_argument("--only", default="tput,fwd,rr,crr,ready,rss,parse,start,podman")
    ap.add_argument("--start-runs", type=int, default=10)
    ap.add_argument("--rules", type=int, default=0,
                    help="a column slirpy-rules: slirpy with N egress --deny rules that no flow "
                         "matches (each new flow checks them all; 0: no such column)")
    args = ap.parse_args()
    if not 0 <= args.rules <= 256:
        ap.error("--rules 0..256 (the rule table's cap)")
    if args.rules:
        flags = [f"--deny=tcp:203.0.113.{i % 250 + 1}:{i + 1}" for i in range(args.rules)]
        IMPLS["slirpy-rules"] = lambda: ([sys.executable, "-m", "slirpy", *flags], _slirpy_env())
    if args.rounds < 1 or args.rounds > 20 or args.seconds <= 0 or args.seconds > 60:
        ap.error("--rounds 1..20, --seconds (0, 60]")
    if not 1 <= args.start_runs <= 100:
        ap.error("--start-runs 1..100")
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    res = run(args)
    parse_out = ""
    if "parse" in args.only.split(","):
        p = subprocess.run([sys.executable, str(HERE / "parse.py")], capture_output=True, text=True,
                           timeout=600, env=_slirpy_env())
        parse_out = ("\nparser frames/s (Ethernet+IPv4+L4, slirpy verifies checksums):\n\n```\n"
                     + (p.stdout or p.stderr[-1000:]) + "```\n")
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H%M%SZ")
    out = (f"# slirpy vs slirp4netns vs pasta, {stamp}\n\nmachine: {machine()}\n"
           f"rounds: {args.rounds}, seconds per measurement: {args.seconds}, "
           f"start-up runs: {args.start_runs}, medians\n\n"
           f"{table(res)}\n{parse_out}")
    print()
    print(out)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"net-{stamp}.md").write_text(out)


if __name__ == "__main__":
    main()
