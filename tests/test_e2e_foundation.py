"""End-to-end: slirpy against real `unshare -Urn` namespaces (tap, -c config, ready/exit fds, ping)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess

import pytest

from nsutil import NsHolder, Slirpy, require_netns, run_slirpy, slirpy_cmd, _env

pytestmark = pytest.mark.netns


@pytest.fixture(autouse=True)
def _need_netns():
    require_netns()
    if not shutil.which("ping") or not shutil.which("ip"):
        pytest.skip("ping/ip MISSING: run bash tests/install-deps.sh")


def _check_configured(s: Slirpy, mtu: int):
    links = {l["ifname"]: l for l in s.ns.ip_json("link", "show")}
    assert links["tap0"]["mtu"] == mtu
    assert "UP" in links["tap0"]["flags"] and "UP" in links["lo"]["flags"]
    addrs = [(a["local"], a["prefixlen"]) for l in s.ns.ip_json("addr", "show", "dev", "tap0")
             for a in l["addr_info"] if a["family"] == "inet"]
    assert addrs == [("10.0.2.100", 24)]
    routes = s.ns.ip_json("route", "show", "default")
    assert [(r["dst"], r["gateway"], r["dev"]) for r in routes] == [("default", "10.0.2.2", "tap0")]
    assert s.ready_bytes == b"1"
    for ip in ("10.0.2.2", "10.0.2.3"):
        p = s.run_in_ns("ping", "-c1", "-W2", ip)
        assert p.returncode == 0, p.stdout + p.stderr
        assert f"64 bytes from {ip}" in p.stdout or f"bytes from {ip}" in p.stdout


@pytest.mark.parametrize("path_form", [False, True], ids=["pid", "path"])
def test_configure_ready_ping_exit(path_form):
    with Slirpy("--mtu=4000", path_form=path_form) as s:
        _check_configured(s, 4000)
        s.close_exit_fd()
        assert s.wait(timeout=10) == 0
    assert s.stderr == ""


def test_macaddress_and_cidr():
    with Slirpy("--macaddress=02:11:22:33:44:55", "--cidr=10.9.0.0/16") as s:
        link = s.ns.ip_json("link", "show", "tap0")[0]
        assert link["address"] == "02:11:22:33:44:55" and link["mtu"] == 1500
        addrs = [(a["local"], a["prefixlen"]) for a in
                 s.ns.ip_json("addr", "show", "dev", "tap0")[0]["addr_info"] if a["family"] == "inet"]
        assert addrs == [("10.9.0.100", 16)]
        p = s.run_in_ns("ping", "-c1", "-W2", "10.9.0.2")
        assert p.returncode == 0 and "bytes from 10.9.0.2" in p.stdout


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_ends_cleanly(sig):
    with Slirpy() as s:
        s.proc.send_signal(sig)
        assert s.wait(timeout=10) == 0


def test_without_configure_tap_is_down_and_unaddressed():
    with Slirpy(configure=False) as s:
        link = s.ns.ip_json("addr", "show", "tap0")[0]
        assert "UP" not in link["flags"]
        assert [a for a in link["addr_info"] if a["family"] == "inet"] == []


def test_netns_gone_ends_with_message():
    with Slirpy() as s:
        s.ns.proc.kill()
        s.ns.proc.wait(timeout=10)
        rc = s.wait(timeout=30)  # a bound, not a speed check: it failed once at load average 80
        err = s.proc.stderr.read()
    assert rc == 1
    assert err.startswith("slirpy: error: ") and "namespace gone" in err and err.count("\n") == 1


def test_tap_name_in_use():
    with Slirpy() as s:
        p = run_slirpy(str(s.ns.pid), "tap0", timeout=10)
        assert p.returncode == 1
        assert p.stderr.startswith("slirpy: error: cannot create tap 'tap0'") and p.stderr.count("\n") == 1
        p = run_slirpy(str(s.ns.pid), "lo", timeout=10)
        assert p.returncode == 1 and "cannot create tap 'lo'" in p.stderr


def test_command_form_ping():
    p = run_slirpy("--", "sh", "-c", "ip -br addr show tap0; ping -c1 -W2 10.0.2.2", timeout=30)
    assert p.returncode == 0, p.stderr
    assert "10.0.2.100/24" in p.stdout
    assert "64 bytes from 10.0.2.2" in p.stdout


@pytest.mark.parametrize("script, status", [("exit 7", 7), ("exit 0", 0), ("kill -9 $$", 137),
                                            ("kill -TERM $$", 143)])
def test_command_form_status(script, status):
    p = run_slirpy("--", "sh", "-c", script, timeout=30)
    assert p.returncode == status, p.stderr


def test_command_runs_after_tap_configured():
    # the very first thing CMD does is look for the address: it must already be there
    p = run_slirpy("--mtu=2000", "--", "ip", "-o", "addr", "show", "dev", "tap0", timeout=30)
    assert p.returncode == 0, p.stderr
    assert " inet 10.0.2.100/24 " in p.stdout
    p = run_slirpy("--mtu=2000", "--", "ip", "-o", "link", "show", "dev", "tap0", timeout=30)
    assert p.returncode == 0 and " mtu 2000 " in p.stdout, p.stdout + p.stderr


def test_command_not_found():
    p = run_slirpy("--", "/nonexistent/cmd", timeout=30)
    assert p.returncode == 127
    assert "cannot run '/nonexistent/cmd'" in p.stderr


def test_command_form_sigterm_to_slirpy():
    proc = subprocess.Popen(slirpy_cmd("--", "sleep", "60"), env=_env(), stderr=subprocess.PIPE)
    try:
        # wait until the command is running inside
        import time
        for _ in range(500):
            kids = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
            if kids and open(f"/proc/{kids[0]}/cmdline", "rb").read().startswith(b"sleep"):
                break
            time.sleep(0.02)
        else:
            raise AssertionError("command did not start")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 128 + signal.SIGTERM
        assert not os.path.exists(f"/proc/{kids[0]}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_no_dev_net_tun():
    # a private mount namespace where /dev/net is an empty tmpfs: no tun device
    p = subprocess.run(["unshare", "-Urm", "sh", "-c",
                        'mount -t tmpfs none /dev/net && exec "$@"', "sh",
                        *slirpy_cmd("--", "true")], capture_output=True, text=True, timeout=30, env=_env())
    assert p.returncode == 1, p.stderr
    assert p.stderr == "slirpy: error: /dev/net/tun does not exist (load the tun module or bind-mount it)\n"


def test_path_form_userns_same_as_ours():
    # --userns-path naming our own user namespace is skipped, not an EINVAL from setns
    with NsHolder() as ns:
        ready_r, ready_w = os.pipe()
        exit_r, exit_w = os.pipe()
        proc = subprocess.Popen(["nsenter", "-t", str(ns.pid), "-U", "--preserve-credentials",
                                 *slirpy_cmd("-c", "--netns-type=path", "--userns-path=/proc/self/ns/user",
                                             "-r", str(ready_w), "-e", str(exit_r),
                                             f"/proc/{ns.pid}/ns/net", "tap0")],
                                pass_fds=(ready_w, exit_r), stderr=subprocess.PIPE, text=True, env=_env())
        os.close(ready_w)
        os.close(exit_r)
        try:
            import select
            assert select.select([ready_r], [], [], 15)[0], "slirpy never became ready"
            assert os.read(ready_r, 1) == b"1"
            addrs = [a["local"] for l in ns.ip_json("addr", "show", "dev", "tap0") for a in l["addr_info"]
                     if a["family"] == "inet"]
            assert addrs == ["10.0.2.100"]
        finally:
            os.close(exit_w)
            os.close(ready_r)
            rc = proc.wait(timeout=10)
        assert rc == 0, proc.stderr.read()
