"""The daemon's CPU time for a fixed amount of work, this tree beside another checkout, alternating
runs, medians: a before/after that a shared, loaded machine disturbs less than rates do.

    python3 bench/cpubench.py --base /path/to/other/checkout [--runs 5]

Each run starts `slirpy -c -- python GUEST` (a fresh user+net namespace); the guest works against
echo servers on this host's loopback through the gateway 10.0.2.2 and reports its own CPU time;
the daemon's is every reaped child's CPU time (slirpy, its helper, the guest) less the guest's.
Workloads: tcp (12000 request/responses of 64 bytes on one connection, 400 connect/request/
close), udp (4000 request/responses on one flow, 400 new flows of one request each), h2g (the
guest receives 1 GiB from a host server: host->guest bulk), g2h (the guest sends 1 GiB to a host
server). A run's start-up (~0.2 s of CPU) is in every figure alike.

Traffic goes only to loopback and to the namespace made here.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import resource
import socket
import statistics
import subprocess
import sys
import textwrap
import threading

HERE = pathlib.Path(__file__).resolve().parent
TREE = HERE.parent

BULK = 1 << 30  # bytes per bulk run

GUEST = f"""
import resource, socket, sys
BULK = {BULK}
mode, tp, up = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
if mode == "tcp":
    s = socket.create_connection(("10.0.2.2", tp), timeout=5)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for i in range(12000):
        s.sendall(b"x" * 64)
        s.recv(100)
    s.close()
    for i in range(400):
        c = socket.create_connection(("10.0.2.2", tp), timeout=5)
        c.sendall(b"y")
        c.recv(100)
        c.close()
elif mode in ("h2g", "g2h"):
    s = socket.create_connection(("10.0.2.2", tp), timeout=30)
    s.sendall(b"r" if mode == "h2g" else b"s")
    if mode == "h2g":
        n = 0
        while b := s.recv(1 << 18):
            n += len(b)
        assert n == BULK, n
    else:
        chunk = bytes(1 << 18)
        for _ in range(BULK // len(chunk)):
            s.sendall(chunk)
        s.shutdown(socket.SHUT_WR)
        assert s.recv(16) == str(BULK).encode()
    s.close()
else:
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.settimeout(2)
    u.connect(("10.0.2.2", up))
    for i in range(4000):
        u.send(b"x" * 64)
        u.recv(100)
    for i in range(400):
        c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        c.settimeout(2)
        c.connect(("10.0.2.2", up))
        c.send(b"y")
        c.recv(100)
        c.close()
r = resource.getrusage(resource.RUSAGE_SELF)
print(r.ru_utime + r.ru_stime)
"""


def _echo_servers() -> tuple[int, int]:
    """A TCP and a UDP echo server on 127.0.0.1 (threads, for the life of the process)."""
    t = socket.socket()
    t.bind(("127.0.0.1", 0))
    t.listen(512)
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.bind(("127.0.0.1", 0))

    def conn(c):
        with c:
            d = c.recv(1)  # the first byte: the bulk commands, or the first of an echo
            if d == b"r":  # bulk to the guest
                chunk = bytes(1 << 18)
                for _ in range(BULK // len(chunk)):
                    c.sendall(chunk)
                return
            if d == b"s":  # bulk from the guest
                n = 0
                while b := c.recv(1 << 18):
                    n += len(b)
                c.sendall(str(n).encode())
                return
            while d:
                c.sendall(d)
                d = c.recv(4096)

    def accept():
        while True:
            c, _ = t.accept()
            threading.Thread(target=conn, args=(c,), daemon=True).start()

    def udp():
        while True:
            d, a = u.recvfrom(2048)
            u.sendto(d, a)
    threading.Thread(target=accept, daemon=True).start()
    threading.Thread(target=udp, daemon=True).start()
    return t.getsockname()[1], u.getsockname()[1]


def run_once(tree: pathlib.Path, mode: str, tp: int, up: int) -> float:
    """The daemon's CPU seconds for one run of the workload."""
    env = dict(os.environ, PYTHONPATH=str(tree))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    r = subprocess.run([sys.executable, "-m", "slirpy", "-c", "--", sys.executable, "-c",
                        textwrap.dedent(GUEST), mode, str(tp), str(up)],
                       capture_output=True, text=True, env=env, timeout=300, cwd="/")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode != 0:
        raise SystemExit(f"{tree}: rc={r.returncode}\n{r.stderr[-2000:]}")
    total = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return total - float(r.stdout.split()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="another checkout of slirpy")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--only", default="tcp,udp")
    args = ap.parse_args()
    if not 1 <= args.runs <= 50:
        ap.error("--runs 1..50")
    trees = {"this tree": TREE, "base": pathlib.Path(args.base).resolve()}
    tp, up = _echo_servers()
    print("| workload | " + " | ".join(f"{k} (s, median)" for k in trees) + " | runs |")
    print("|---|" + "---:|" * (len(trees) + 1))
    for mode in args.only.split(","):
        got: dict = {k: [] for k in trees}
        for i in range(args.runs):
            order = list(trees.items()) if i % 2 == 0 else list(trees.items())[::-1]
            for name, tree in order:
                got[name].append(run_once(tree, mode, tp, up))
        cells = " | ".join(f"{statistics.median(v):.3f}" for v in got.values())
        raw = "; ".join(f"{k}: " + " ".join(f"{x:.2f}" for x in v) for k, v in got.items())
        print(f"| {mode} | {cells} | {raw} |", flush=True)


if __name__ == "__main__":
    main()
