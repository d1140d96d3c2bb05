"""README.md's examples run as written: its first two commands are the ones CI runs (read out of
the file by .ci/readme_commands.py), the Usage block runs start to end, and every slirpy-api line
of the API section talks to a real daemon. `slirpy` and `slirpy-api` on PATH are small shims that
run this checkout with this interpreter (what `. .venv/bin/activate` gives a reader)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile

import pytest

from nsutil import REPO, free_port, require_netns

sys.path.insert(0, os.path.join(REPO, ".ci"))
from readme_commands import commands  # noqa: E402

README = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()


def _block(after: str) -> str:
    """The ```sh block that starts with the line `after`."""
    start = README.index("```sh\n" + after) + len("```sh\n")
    return README[start:README.index("```", start)]


@pytest.fixture
def shims():
    d = tempfile.mkdtemp(prefix="readme-")
    for name, mod in (("slirpy", "slirpy"), ("slirpy-api", "slirpy.api_client")):
        path = os.path.join(d, name)
        with open(path, "w") as f:
            f.write(f'#!/bin/sh\nPYTHONPATH={REPO} exec {sys.executable} -m {mod} "$@"\n')
        os.chmod(path, 0o755)
    env = dict(os.environ, PATH=d + os.pathsep + os.environ["PATH"])
    yield d, env
    subprocess.run(["rm", "-rf", d])


def test_first_two_commands_are_what_ci_runs():
    cmds = commands(README)
    assert len(cmds) == 2
    assert cmds[0].startswith("python3 -m venv .venv && .venv/bin/pip install . && .venv/bin/slirpy ")
    assert cmds[1] == "bash tests/install-deps.sh && .venv/bin/python -m pytest tests"
    ci = open(os.path.join(REPO, ".ci", "run")).read()
    assert "readme_commands.py README.md" in ci and "/usr/bin:" in ci


def _run_script(script: str, env: dict, timeout: float) -> subprocess.CompletedProcess:
    """bash -e on script in its own session; whatever it left running is killed afterwards."""
    p = subprocess.Popen(["bash", "-e", "-c", script], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO,
                         start_new_session=True)
    try:
        out, _ = p.communicate(timeout=timeout)
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(p.args, p.returncode, out)


@pytest.mark.netns
def test_usage_block_runs_as_written(shims):
    require_netns()
    _, env = shims
    block = _block("# PID form")
    r = _run_script(block, env, timeout=60)
    assert r.returncode == 0, r.stdout
    # the PID form: ready fd got "1", slirpy exited 0 when the fifo's writer closed it
    assert "exit 0, ready fd got: 1" in r.stdout, r.stdout
    # the command form's ping through 10.0.2.2 went through, and slirpy's status was ping's (0)
    assert re.search(r"1 packets transmitted, 1 received", r.stdout), r.stdout


@pytest.mark.netns
def test_api_client_lines_work_against_a_daemon(shims):
    require_netns()
    _, env = shims
    lines = [ln for ln in _block("slirpy-api -a").splitlines() if ln.startswith("slirpy-api")]
    assert len(lines) == 7
    port = 8080 if _free(8080) else free_port()  # the README's port, unless taken here
    outs = _run_api_lines(lines, env, [("127.0.0.1:8080:80", f"127.0.0.1:{port}:80")])
    assert json.loads(outs[0]) == {"return": {"id": 1}}
    assert json.loads(outs[1])["entries"][0]["host_port"] == port
    assert json.loads(outs[2]) == {"return": {}}
    assert "frames" in outs[3]                       # stats: a table for people
    assert isinstance(json.loads(outs[5])["flows"], list)
    assert json.loads(outs[6]) == {"entries": []}    # raw list_hostfwd after the remove


def _run_api_lines(lines, env, replace=()):
    """Start `slirpy -a SOCK -- sleep 60`, run each README line with /run/slirpy.sock (and each
    (old, new) of replace) substituted, assert each exits 0; -> their stdouts."""
    sock = os.path.join(tempfile.mkdtemp(prefix="readme-api-"), "slirpy.sock")
    daemon = subprocess.Popen([sys.executable, "-m", "slirpy", "-a", sock, "--", "sleep", "60"],
                              env=dict(env, PYTHONPATH=REPO), start_new_session=True)
    try:
        for _ in range(300):
            if os.path.exists(sock):
                break
            subprocess.run(["sleep", "0.05"])
        outs = []
        for ln in lines:
            cmd = ln.split("#")[0].strip().replace("/run/slirpy.sock", sock)
            for old, new in replace:
                cmd = cmd.replace(old, new)
            r = subprocess.run(["sh", "-c", cmd], capture_output=True, text=True, env=env,
                               timeout=20)
            assert r.returncode == 0, (cmd, r.stdout, r.stderr)
            outs.append(r.stdout)
        return outs
    finally:
        os.killpg(daemon.pid, signal.SIGTERM)
        daemon.wait(timeout=20)


def _free(port: int) -> bool:
    import socket
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def test_slirpy_api_without_arguments_is_one_line_exit_1():
    r = subprocess.run([sys.executable, "-m", "slirpy.api_client"], capture_output=True,
                       text=True, env=dict(os.environ, PYTHONPATH=REPO), timeout=20)
    assert r.returncode == 1
    assert r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("slirpy-api: error: "), r.stderr


def test_egress_recipes_parse_as_written():
    """Every `slirpy ...` line of the Egress policy recipes is a command line slirpy takes."""
    sys.path.insert(0, REPO)
    import shlex

    from slirpy import cli
    lines = [ln for ln in _block("# 1. no internet").splitlines() if ln.startswith("slirpy ")]
    assert len(lines) == 4
    for ln in lines:
        cfg = cli.parse_args(shlex.split(ln.replace("...", "5"))[1:])
        assert cfg.default_deny or cfg.egress_rules, ln
    wrapper = _block("cat > ~/.local/bin/slirpy-no-internet")
    flags = re.search(r"exec /usr/local/bin/slirpy (.*) \"\$@\"", wrapper).group(1)
    cfg = cli.parse_args(shlex.split(flags) + ["--disable-host-loopback", "--mtu=65520", "-c",
                                               "--netns-type=path", "/proc/self/ns/net", "tap0"])
    assert cfg.default_deny and [str(r) for _, r in cfg.egress_rules] == ["tcp:host-loopback:5432"]


@pytest.mark.netns
def test_rules_client_lines_work_against_a_daemon(shims):
    require_netns()
    _, env = shims
    lines = [ln for ln in _block("slirpy-api -a /run/slirpy.sock rules").splitlines()
             if ln.startswith("slirpy-api")]
    assert len(lines) == 4
    outs = _run_api_lines(lines, env)
    assert json.loads(outs[0]) == {"return": {"id": 1, "flows_reset":
                                              {"tcp": 0, "udp": 0, "icmp": 0}}}
    assert json.loads(outs[1])["return"]["id"] == 2
    assert [ln.split()[:3] for ln in outs[2].splitlines()[1:]] == [
        ["2", "allow", "private"], ["1", "deny", "tcp:192.0.2.0/24:22"], ["-", "allow", "(default)"]]
    assert json.loads(outs[3])["return"]["flows_reset"] == {"tcp": 0, "udp": 0, "icmp": 0}
