"""Start-up: ready is written before the event loop exists (launch.run), and nothing sent the
moment it is written is refused or lost: a ping and a TCP connection from the guest, an API
request and a connection to a forwarded port all wait (tap queue, listen backlogs) and are served
once the loop runs. SLIRPY_TEST_PAUSE_AFTER_READY holds the daemon between ready and the loop so
that everything here is surely sent inside that window.

Also: the tap that `-c` configures carries what slirp4netns's does (address with its broadcast,
MTU, MAC, up, default route, lo up), and `--help`/`--version` come from __main__ without the
argument parser."""

from __future__ import annotations

import hashlib
import json
import os
import select
import socket
import subprocess
import sys
import threading

import pytest

from nsutil import NsHolder, REPO, _env, api, free_port, require_netns, slirpy_cmd

pytestmark = pytest.mark.netns

PAUSE = "1.5"

# In the guest namespace before the daemon starts: a server on GUEST_PORT for the forward; then,
# on "go" from stdin, at once: a ping to 10.0.2.2 and a TCP exchange with the host's server.
GUEST = r"""
import hashlib, socket, subprocess, sys, threading
gport, hport = int(sys.argv[1]), int(sys.argv[2])
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", gport)); srv.listen(8)
def serve():  # reads a 13-byte request (no EOF: see the test), answers, closes
    c, _ = srv.accept()
    data = b""
    while len(data) < 13 and (b := c.recv(65536)):
        data += b
    c.sendall(b"guest saw " + hashlib.sha256(data).hexdigest().encode()); c.close()
threading.Thread(target=serve, daemon=True).start()
print("listening", flush=True)
sys.stdin.readline()
ping = subprocess.Popen(["ping", "-c", "1", "-W", "20", "10.0.2.2"], stdout=subprocess.PIPE, text=True)
c = socket.create_connection(("10.0.2.2", hport), timeout=20)
c.sendall(b"from the guest"); c.shutdown(socket.SHUT_WR)
got = b""
while b := c.recv(65536):
    got += b
print("tcp", got.decode(), flush=True)
out, _ = ping.communicate(timeout=30)
print("ping", ping.returncode, "1 received" in out, flush=True)
"""


class HostServer:
    """127.0.0.1: reads to EOF, answers 'host saw SHA256'."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        c, _ = self.sock.accept()
        with c:
            data = b""
            while b := c.recv(65536):
                data += b
            c.sendall(b"host saw " + hashlib.sha256(data).hexdigest().encode())


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def test_everything_sent_at_ready_is_served(tmp_path):
    require_netns()
    host = HostServer()
    hport, gport = free_port(), free_port()
    api_path = str(tmp_path / "api.sock")
    with NsHolder() as ns:
        guest = subprocess.Popen(
            ["nsenter", "-t", str(ns.pid), "-U", "-n", "--preserve-credentials", sys.executable,
             "-c", GUEST, str(gport), str(host.port)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        proc = None
        try:
            assert guest.stdout.readline().strip() == "listening"
            ready_r, ready_w = os.pipe()
            exit_r, exit_w = os.pipe()
            env = dict(_env(), SLIRPY_TEST_PAUSE_AFTER_READY=PAUSE)
            proc = subprocess.Popen(
                slirpy_cmd("-c", "-r", str(ready_w), "-e", str(exit_r), "-a", api_path,
                           "-p", f"127.0.0.1:{hport}:{gport}", str(ns.pid), "tap0"),
                pass_fds=(ready_w, exit_r), env=env, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, text=True)
            os.close(ready_w)
            os.close(exit_r)
            r, _, _ = select.select([ready_r], [], [], 30)
            assert r and os.read(ready_r, 1) == b"1", proc.stderr.read() if proc.poll() else ""
            os.close(ready_r)
            # the moment ready is written: all four at once
            guest.stdin.write("go\n")
            guest.stdin.flush()
            results = {}

            def api_call():
                results["api"] = api(api_path, {"execute": "list_hostfwd"}, timeout=30)

            def forwarded():
                # no shutdown(SHUT_WR) right after the bytes: data and FIN sent before the
                # guest's side is connected are lost today (before this change too), a NAT
                # matter of its own, not of start-up
                c = socket.create_connection(("127.0.0.1", hport), timeout=30)
                c.sendall(b"from the host")
                got = b""
                while b := c.recv(65536):
                    got += b
                results["fwd"] = got

            threads = [threading.Thread(target=f) for f in (api_call, forwarded)]
            for t in threads:
                t.start()
            tcp = guest.stdout.readline().split()
            ping = guest.stdout.readline().split()
            for t in threads:
                t.join(40)
            assert tcp == ["tcp", "host", "saw", _sha(b"from the guest")], tcp
            assert ping == ["ping", "0", "True"], ping
            assert results.get("fwd") == b"guest saw " + _sha(b"from the host").encode()
            entries = results["api"]["entries"]
            assert [(e["host_port"], e["guest_port"]) for e in entries] == [(hport, gport)]
            os.close(exit_w)
            assert proc.wait(timeout=20) == 0
            assert not os.path.exists(api_path)
        finally:
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
            guest.kill()
            guest.wait()


def _state(ns) -> dict:
    """What `-c` left in the namespace, in the terms both daemons must agree on."""
    links = {link["ifname"]: link for link in ns.ip_json("link", "show")}
    tap = links["tap0"]
    addrs = [(a["family"], a["local"], a["prefixlen"], a.get("broadcast"), a.get("scope"))
             for a in ns.ip_json("addr", "show", "tap0")[0]["addr_info"] if a["family"] == "inet"]
    routes = sorted(json.dumps(r, sort_keys=True) for r in ns.ip_json("-4", "route", "show"))
    return {"tap_up": "UP" in tap["flags"], "mtu": tap["mtu"], "mac": tap["address"],
            "txqlen": tap.get("txqlen"), "addrs": addrs, "routes": routes,
            "lo_up": "UP" in links["lo"]["flags"]}


@pytest.mark.parametrize("flags", [(), ("--mtu=65520", "--macaddress=02:5a:11:00:00:42"),
                                   ("--cidr=10.0.3.0/24", "--mtu=1500")])
def test_configured_tap_same_as_slirp4netns(flags):
    """-c: the same address (broadcast included), MTU, MAC (when given), up flags, routes and lo
    as the real slirp4netns leaves; slirpy's helper does it over its own rtnetlink messages."""
    require_netns()
    states = {}
    for name, cmd in (("slirp4netns", ["/usr/bin/slirp4netns"]), ("slirpy", slirpy_cmd())):
        if not os.path.exists(cmd[0]):
            pytest.fail("slirp4netns is not installed (bash tests/install-deps.sh)")
        with NsHolder() as ns:
            ready_r, ready_w = os.pipe()
            exit_r, exit_w = os.pipe()
            p = subprocess.Popen(cmd + ["-c", "-r", str(ready_w), "-e", str(exit_r), *flags,
                                        str(ns.pid), "tap0"],
                                 pass_fds=(ready_w, exit_r), env=_env(),
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            os.close(ready_w)
            os.close(exit_r)
            try:
                r, _, _ = select.select([ready_r], [], [], 30)
                assert r and os.read(ready_r, 1) == b"1", name
                states[name] = _state(ns)
            finally:
                os.close(exit_w)
                os.close(ready_r)
                p.wait(20)
    a, b = states["slirpy"], states["slirp4netns"]
    if "--macaddress=02:5a:11:00:00:42" not in flags:
        a.pop("mac"), b.pop("mac")  # random per tap
    assert a == b


def _imported(importtime_stderr: str) -> set[str]:
    return {ln.split("|")[-1].strip() for ln in importtime_stderr.splitlines() if "|" in ln}


@pytest.mark.parametrize("flag", ["--help", "-h", "--version", "-v"])
def test_help_and_version_fast_path(flag):
    """A lone --help/--version is answered by __main__ without argparse, cli.py or the Config,
    with the very text cli.main gives for it."""
    p = subprocess.run([sys.executable, "-X", "importtime", "-m", "slirpy", flag],
                       capture_output=True, text=True, env=_env(), timeout=30)
    assert p.returncode == 0, p.stderr
    imported = _imported(p.stderr)
    # what this interpreter imports before any code runs (site, .pth files such as an editable
    # install's finder) is not the fast path's doing
    base = subprocess.run([sys.executable, "-X", "importtime", "-c", "pass"], capture_output=True,
                          text=True, env=_env(), timeout=30)
    imported -= _imported(base.stderr)
    assert "slirpy._usage" in imported
    for heavy in ("argparse", "slirpy.cli", "slirpy.config", "ipaddress", "dataclasses", "trio"):
        assert heavy not in imported, heavy
    sys.path.insert(0, REPO)
    from slirpy import cli
    import contextlib
    import io
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert cli.main([flag]) == 0
    assert p.stdout == buf.getvalue() and p.stdout


EARLY_ARGV = [
    "-c 123 tap0", "123", "-c -m 65520 123 tap1",
    "--disable-host-loopback --mtu=65520 --enable-sandbox --enable-seccomp --enable-ipv6 -c "
    "-e 0 -r 1 --netns-type=path /run/user/1000/netns/x tap0",
    "-c --cidr=10.0.3.0/24 --macaddress=02:AA:00:00:00:01 5",
    "--netns-type=path --userns-path=/proc/9/ns/user /proc/9/ns/net",
    "-p 8080:80 -p 127.0.0.1:1:2/udp -m 1400 -a /tmp/api.sock 7",
    "-c 5 --api-socket /tmp/x tap1", "-- sh -c true", "-c6 5", "--cidr=10.0.2.100/24 5",
    "--cidr=10.0.2.0/26 5", "-c --bogus 5", "5 tap0 extra", "-e 99 5", "--mtu=67 5",
    "--mtu 1280 -6 5", "--mtu 1200 -6 5", "--macaddress=01:00:00:00:00:01 -c 5",
    "--netns-type=pid /run/x", "-c 0", "-c 5 tap/0", "-c 5 " + "t" * 16, "--target-type=bess 5",
    "-c --cidr 10.0.2.0/24 --cidr 10.0.3.0/24 5", "--log-level=bogus 5", "--help 5",
    "-c --enable-sandbox --disable-dns -a rel/api.sock 5", "--enable-seccomp 5",
    # the egress policy: --default-deny is read (a flag), a rule is the full parser's
    "--default-deny -c 5", "-c --default-deny --default-deny 5", "--allow=tcp:10.0.2.2:80 -c 5",
    "--default-deny --deny=private -c 5", "--deny=bogus -c 5", "--allow 10.0.0.1/33 5",
    # the splice connector: the helper stays only with an API socket (or a -p TCP forward, which
    # the early parse leaves to the full one) and without --disable-forward-splice
    "-c -a /tmp/api.sock --disable-forward-splice 5", "--disable-forward-splice -c 5",
    "-c --disable-forward-splice --disable-forward-splice 5",
]


@pytest.mark.parametrize("line", EARLY_ARGV)
def test_early_helper_reads_only_what_cli_agrees_with(line):
    """__main__ forks the helper before cli.py's imports only for command lines it reads the
    same way as cli.parse_args (the key launch.start compares); otherwise it leaves them alone."""
    import shlex
    sys.path.insert(0, REPO)
    from slirpy import _early, cli
    argv = shlex.split(line)
    early = _early.parse(argv)
    if early is None:
        return
    cfg = cli.parse_args(argv)  # must not raise: the early helper would have made a tap
    assert _early.config_key(cfg) == early.key()
    assert _early.probe_key(cfg) == early.probe_key()  # the lockdown probe forked with it


def test_early_helper_leaves_no_tap_on_a_refused_command_line():
    """A command line the full parser refuses after the early helper was forked would leave a
    tap for a moment; these are read as 'not sure' instead (no early helper at all)."""
    sys.path.insert(0, REPO)
    from slirpy import _early
    for line in (["--log-level=bogus", "5"], ["-p", "x", "5"], ["--pcap-max-bytes=1", "5"],
                 ["--outbound-addr=eth9", "5"], ["--dns-upstream=1.2.3.4", "5"],
                 ["--deny=bogus", "5"], ["--allow=10.0.0.0/33", "-c", "5"]):
        assert _early.parse(line) is None, line


@pytest.mark.parametrize("how", ["SIGTERM", "exit-fd EOF"])
def test_stop_between_ready_and_loop_exits_at_once(tmp_path, how):
    """Ready is written before the loop; a SIGTERM or an exit-fd EOF in that window ends the
    daemon there and then (status 0, API socket removed), not once the loop runs (Podman waits
    for the daemon after a container as short as `true`). The daemon is held 10 s in the window
    (SLIRPY_TEST_PAUSE_AFTER_READY): the wait's bound is below that."""
    require_netns()
    import signal
    api_path = str(tmp_path / "api.sock")
    with NsHolder() as ns:
        ready_r, ready_w = os.pipe()
        exit_r, exit_w = os.pipe()
        proc = subprocess.Popen(slirpy_cmd("-c", "-r", str(ready_w), "-e", str(exit_r), "-a",
                                           api_path, str(ns.pid)),
                                pass_fds=(ready_w, exit_r),
                                env=dict(_env(), SLIRPY_TEST_PAUSE_AFTER_READY="10"),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        os.close(ready_w)
        os.close(exit_r)
        try:
            r, _, _ = select.select([ready_r], [], [], 30)
            assert r and os.read(ready_r, 1) == b"1"
            assert os.path.exists(api_path)
            if how == "SIGTERM":
                proc.send_signal(signal.SIGTERM)
            else:
                os.close(exit_w)
                exit_w = -1
            assert proc.wait(timeout=8) == 0
            assert proc.stderr.read() == ""
            assert not os.path.exists(api_path)
        finally:
            os.close(ready_r)
            if exit_w >= 0:
                os.close(exit_w)
            if proc.poll() is None:
                proc.kill()
                proc.wait()
