"""The real clients run slirpy unchanged, as an ordinary user (the rootless case):

- RootlessKit (`--net=slirp4netns --slirp4netns-binary=WRAPPER --port-driver=slirp4netns -p ...`),
  plain and with --slirp4netns-sandbox=true --slirp4netns-seccomp=true: the guest serves on 8000
  (reached from the host through -p) and downloads from a host server through 10.0.2.2.
- rootless Podman (runc, cgroupfs, vfs storage, containers.conf network_cmd_path = WRAPPER, an
  image imported from a tarball of busybox-static): with port_handler=slirp4netns and
  allow_host_loopback=true a container serves HTTP reached from the host and fetches from the host
  through 10.0.2.2; the default `--network slirp4netns` (Podman adds --enable-sandbox
  --enable-seccomp --enable-ipv6 --disable-host-loopback) reaches a host server outbound and is
  refused 10.0.2.2. That run happens in a network namespace the test made (a host address on its
  lo), so outbound traffic never leaves this machine's test namespaces. So does the egress
  policy's run (README's containers.conf: a network_cmd_path wrapper adding --default-deny and
  one allowed host-loopback port).

WRAPPER is `PYTHONPATH=<this tree> exec <this python> -m slirpy "$@"`, logging each call (pid and
arguments) so the tests can check what the clients passed and inspect the daemon in /proc.

The user, the wrapper and Podman's setup are in rootless_env.py (bench/ uses them too).
"""

from __future__ import annotations

import hashlib
import http.server
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from nsutil import free_port, proc_status, require_netns
from rootless_env import IMAGE, Podman, Rootless, _run

pytestmark = pytest.mark.netns

HOST_BLOB = hashlib.shake_256(b"clients-host-blob").digest(1 << 20)
GUEST_BLOB = hashlib.shake_256(b"clients-guest-blob").digest(1 << 20)
SHA_HOST = hashlib.sha256(HOST_BLOB).hexdigest()
SHA_GUEST = hashlib.sha256(GUEST_BLOB).hexdigest()


@pytest.fixture(scope="module")
def rootless():
    require_netns()
    r = Rootless()
    try:
        yield r.setup()
    finally:
        r.teardown()


# ------------------------------------------------------------------------------------ helpers
class BlobServer:
    """HTTP on ADDR (in the caller's network namespace), GET /blob -> HOST_BLOB."""

    def __init__(self, addr="127.0.0.1"):
        class H(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path != "/blob":
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(HOST_BLOB)))
                self.end_headers()
                self.wfile.write(HOST_BLOB)

            def log_message(self, *a):
                pass

        self.srv = http.server.ThreadingHTTPServer((addr, 0), H)
        self.port = self.srv.server_address[1]
        self.t = threading.Thread(target=self.srv.serve_forever, daemon=True)
        self.t.start()

    def close(self):
        self.srv.shutdown()
        self.srv.server_close()


def _get(url: str, timeout=20.0) -> bytes:
    """GET with retries until the far side listens (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                return r.read()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _wait_path(path: str, proc, timeout=40.0) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if proc.poll() is not None or time.monotonic() > deadline:
            out, err = _stop(proc)
            raise AssertionError(f"{path} never appeared (rc={proc.returncode})\n{out}\n{err}")
        time.sleep(0.1)


def _stop(proc, timeout=20):
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return proc.communicate(timeout=10)


def _gone(pid: int, timeout=10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/status") as f:
                if "\nState:\tZ" in f.read():
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.1)
    return False


def _check_sandboxed(pid: int, cap_eff: str, api_sock: str) -> None:
    st = proc_status(pid)
    assert st["Seccomp"] == "2", st
    assert st["CapEff"] == st["CapPrm"] == cap_eff, st
    assert st["CapBnd"] == "0000000000000400" and st["NoNewPrivs"] == "1", st
    root = f"/proc/{pid}/root"
    top = api_sock.strip("/").split("/")[0]  # the API socket's directory is bound at its path
    assert sorted(os.listdir(root)) == sorted({"etc", "run", top}), os.listdir(root)
    assert "resolv.conf" in os.listdir(f"{root}/etc")  # /etc and /run read-only, as slirp4netns
    assert os.path.isdir(f"{root}/run")
    assert os.path.basename(api_sock) in os.listdir(root + os.path.dirname(api_sock))


# ---------------------------------------------------------------------------------- RootlessKit
RK_GUEST = """#!/bin/sh
cd {d}
busybox httpd -f -p 8000 -h {d}/www &
busybox wget -q -O got.bin http://{gw}:{port}/blob
busybox sha256sum got.bin > got.sha
i=0
while [ {v6} = 1 ] && ! ip -6 addr show dev tap0 | grep -q 'inet6 fd00::' && [ $i -lt 50 ]; do
    sleep 0.1; i=$((i+1))
done
ip -6 addr show dev tap0 > addr6
touch phase1
i=0
while [ ! -e done ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done
kill $!
"""


@pytest.mark.parametrize("hardened, cidr", [(False, None), (True, None), (True, "10.0.3.0/24")],
                         ids=["plain", "sandbox+seccomp", "sandbox+seccomp+cidr+ipv6"])
def test_rootlesskit_both_directions(rootless, hardened, cidr):
    d = os.path.join(rootless.work, f"rk-{int(hardened)}-{int(bool(cidr))}")
    gw = "10.0.3.2" if cidr else "10.0.2.2"
    os.makedirs(os.path.join(d, "www"))
    with open(os.path.join(d, "www", "page.bin"), "wb") as f:
        f.write(GUEST_BLOB)
    host = BlobServer()
    guest = os.path.join(d, "guest.sh")
    with open(guest, "w") as f:
        f.write(RK_GUEST.format(d=d, port=host.port, gw=gw, v6=int(bool(cidr))))
    os.chmod(guest, 0o755)
    for p in (d, os.path.join(d, "www")):
        rootless.chown(p)
    hp = free_port()
    before = len(rootless.daemon_calls())
    extra = ["--slirp4netns-sandbox=true", "--slirp4netns-seccomp=true"] if hardened else []
    if cidr:  # RootlessKit then passes --cidr and --enable-ipv6
        extra += [f"--cidr={cidr}", "--ipv6"]
    proc = rootless.popen(["rootlesskit", "--net=slirp4netns",
                           f"--slirp4netns-binary={rootless.wrapper}", "--mtu=65520",
                           "--port-driver=slirp4netns", "-p", f"127.0.0.1:{hp}:8000/tcp",
                           *extra, guest], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
    try:
        _wait_path(os.path.join(d, "phase1"), proc)
        # guest -> host through 10.0.2.2
        assert open(os.path.join(d, "got.sha")).read().split()[0] == SHA_HOST
        # host -> guest through RootlessKit's -p (added over slirpy's API socket)
        body = _get(f"http://127.0.0.1:{hp}/page.bin")
        assert hashlib.sha256(body).hexdigest() == SHA_GUEST
        calls = rootless.daemon_calls()[before:]
        assert len(calls) == 1, calls
        pid, args = calls[0]
        assert "--api-socket" in args and "--mtu" in args
        if cidr:
            assert args[args.index("--cidr") + 1] == cidr and "--enable-ipv6" in args, args
            # the guest got its SLAAC address from slirpy's router advertisements
            assert "inet6 fd00::" in open(os.path.join(d, "addr6")).read()
        if hardened:
            assert "--enable-sandbox" in args and "--enable-seccomp" in args, args
            api = args[args.index("--api-socket") + 1]
            # an ordinary user: a user namespace was made for the mount namespace, and no
            # capability is left (it had none to keep)
            _check_sandboxed(pid, "0000000000000000", api)
            assert proc_status(pid)["Uid"].split()[0] == str(rootless.uid)
        open(os.path.join(d, "done"), "w").close()
        out, err = _stop(proc, timeout=30)
        assert proc.returncode == 0, f"rootlesskit rc={proc.returncode}\n{out}\n{err}"
        assert _gone(pid), "slirpy outlived rootlesskit"
    finally:
        if proc.returncode is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate(timeout=10)
        host.close()


# -------------------------------------------------------------------------------------- Podman
def _network(opts: str = "") -> str:
    """Podman's default network (it passes --enable-ipv6 by default), with opts."""
    return "slirp4netns" + (":" + opts if opts else "")


@pytest.fixture(scope="module")
def podman(rootless):
    p = Podman(rootless)
    try:
        yield p
    finally:
        p.teardown()


def test_podman_port_handler_slirp4netns_both_directions(rootless, podman):
    host = BlobServer()
    vol = os.path.join(podman.dirs["vol"], "www")
    os.makedirs(vol)
    with open(os.path.join(vol, "page.bin"), "wb") as f:
        f.write(GUEST_BLOB)
    rootless.chown(vol)
    hp = free_port()
    before = len(rootless.daemon_calls())
    script = (f"wget -q -O /out/got.bin http://10.0.2.2:{host.port}/blob && "
              "sha256sum /out/got.bin > /out/got.sha; exec httpd -f -p 8000 -h /www")
    out_dir = os.path.join(podman.dirs["vol"], "out")
    os.makedirs(out_dir)
    rootless.chown(out_dir)
    try:
        r = podman.run(["run", "-d", "--name", "web",
                        "--network", _network("port_handler=slirp4netns,allow_host_loopback=true"),
                        "-p", f"127.0.0.1:{hp}:8000", "-v", f"{vol}:/www:ro", "-v", f"{out_dir}:/out",
                        IMAGE, "sh", "-c", script])
        assert r.returncode == 0, f"podman run: {r.stdout}{r.stderr}"
        body = _get(f"http://127.0.0.1:{hp}/page.bin")
        assert hashlib.sha256(body).hexdigest() == SHA_GUEST
        sha = os.path.join(out_dir, "got.sha")
        deadline = time.monotonic() + 20
        while not os.path.exists(sha) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert open(sha).read().split()[0] == SHA_HOST
        calls = rootless.daemon_calls()[before:]
        assert len(calls) == 1, calls
        pid, args = calls[0]
        # Podman's own flags, with allow_host_loopback leaving out --disable-host-loopback
        for flag in ("--mtu=65520", "--enable-sandbox", "--enable-seccomp", "-c", "--api-socket",
                     "--netns-type=path"):
            assert flag in args, (flag, args)
        assert "--disable-host-loopback" not in args
        # slirpy runs as root in Podman's user namespace: CAP_NET_BIND_SERVICE is kept
        _check_sandboxed(pid, "0000000000000400", args[args.index("--api-socket") + 1])
        r = podman.run(["rm", "-f", "-t", "0", "web"])
        assert r.returncode == 0, r.stderr
        assert _gone(pid), "slirpy outlived its container"
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", hp), timeout=2).close()
    finally:
        podman.run(["rm", "-f", "-t", "0", "web"])
        host.close()


SERVER_IN_NETNS = """
import hashlib, http.server, sys
blob = hashlib.shake_256(b"clients-host-blob").digest(1 << 20)
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.send_header("Content-Length", str(len(blob)))
        self.end_headers(); self.wfile.write(blob)
    def log_message(self, *a):
        pass
s = http.server.ThreadingHTTPServer((sys.argv[1], 0), H)
print(s.server_address[1], flush=True)
s.serve_forever()
"""


def _host_netns(holder) -> str:
    """The netns of holder (an `unshare -n` process) once it exists, with lo up and 192.0.2.1 on
    it: a "host" with a non-loopback address, made by the test."""
    netns = f"/proc/{holder.pid}/ns/net"
    deadline = time.monotonic() + 10
    while os.stat(netns).st_ino == os.stat("/proc/self/ns/net").st_ino:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    for cmd in (["ip", "link", "set", "lo", "up"], ["ip", "addr", "add", "192.0.2.1/32", "dev", "lo"]):
        r = _run(["nsenter", f"--net={netns}", *cmd])
        assert r.returncode == 0, r.stderr
    return netns


def test_podman_default_network_outbound(rootless, podman):
    ipv6 = True  # Podman's default: -6
    network = _network()
    holder = subprocess.Popen(["unshare", "-n", "sleep", "300"])
    srv = None
    try:
        netns = _host_netns(holder)
        # a "host" server on a non-loopback address of the test's namespace, and one on its
        # loopback that --disable-host-loopback must keep out of reach
        srv = subprocess.Popen(["nsenter", f"--net={netns}", sys.executable, "-c", SERVER_IN_NETNS,
                                "0.0.0.0"], stdout=subprocess.PIPE, text=True)
        port = int(srv.stdout.readline())
        before = len(rootless.daemon_calls())
        # (no -T: busybox 1.35's wget -q -T segfaults on a refused connection)
        script = (f"wget -q -O - http://192.0.2.1:{port}/ | sha256sum; "
                  f"wget -O /dev/null http://10.0.2.2:{port}/ 2>&1 | tail -1")
        r = podman.run(["run", "--rm", "--network", network, IMAGE, "sh", "-c", script],
                       netns=netns)
        assert r.returncode == 0, f"podman run: {r.stdout}{r.stderr}"
        lines = r.stdout.splitlines()
        assert lines[0].split()[0] == SHA_HOST, r.stdout + r.stderr
        assert lines[1] == ("wget: can't connect to remote host (10.0.2.2): Network is "
                            "unreachable"), r.stdout  # ICMP net unreachable, as slirp4netns
        calls = rootless.daemon_calls()[before:]
        assert len(calls) == 1, calls
        args = calls[0][1]
        for flag in ("--disable-host-loopback", "--mtu=65520", "--enable-sandbox",
                     "--enable-seccomp", "-c", "-e", "-r", "--netns-type=path"):
            assert flag in args, (flag, args)
        assert ("--enable-ipv6" in args) == ipv6, args
        assert _gone(calls[0][0]), "slirpy outlived its container"
    finally:
        if srv is not None:
            srv.kill()
            srv.wait(timeout=10)
        holder.kill()
        holder.wait(timeout=10)


def test_podman_egress_policy_through_a_network_cmd_path_wrapper(rootless, podman):
    """README "Egress policy with Podman" as written: containers.conf's network_cmd_path names a
    wrapper adding --default-deny --allow=tcp:host-loopback:PORT, network_cmd_options Podman's own
    allow_host_loopback=true. In the container: the host's loopback on that port is reached, a
    server on another host address is refused at once (No route to host: ICMP administratively
    prohibited), and slirpy got the flags with Podman's. Run in a netns the test made."""
    holder = subprocess.Popen(["unshare", "-n", "sleep", "300"])
    servers = []
    try:
        netns = _host_netns(holder)
        ports = []
        for addr in ("127.0.0.1", "192.0.2.1"):
            srv = subprocess.Popen(["nsenter", f"--net={netns}", sys.executable, "-c",
                                    SERVER_IN_NETNS, addr], stdout=subprocess.PIPE, text=True)
            servers.append(srv)
            ports.append(int(srv.stdout.readline()))
        loop_port, other_port = ports
        wrapper = os.path.join(rootless.work, "slirpy-no-internet")
        with open(wrapper, "w") as f:
            f.write("#!/bin/sh\n"
                    f'exec {rootless.wrapper} --default-deny --allow=tcp:host-loopback:{loop_port} "$@"\n')
        os.chmod(wrapper, 0o755)
        conf = os.path.join(podman.dirs["cfg"], "egress.conf")
        with open(conf, "w") as f:
            f.write(CONTAINERS_CONF_EGRESS.format(wrapper=wrapper))
        before = len(rootless.daemon_calls())
        script = (f"wget -q -O - http://10.0.2.2:{loop_port}/ | sha256sum; "
                  f"wget -O /dev/null http://192.0.2.1:{other_port}/ 2>&1 | tail -1")
        r = rootless.run(["podman", "run", "--rm", "--network", "slirp4netns", IMAGE, "sh", "-c",
                          script], netns=netns, env=dict(podman.envd, CONTAINERS_CONF=conf),
                         timeout=90)
        assert r.returncode == 0, f"podman run: {r.stdout}{r.stderr}"
        lines = r.stdout.splitlines()
        assert lines[0].split()[0] == SHA_HOST, r.stdout + r.stderr
        assert lines[1] == ("wget: can't connect to remote host (192.0.2.1): No route to host"), \
            r.stdout
        # the wrapper's flags come before Podman's --help too: slirpy still prints its help
        calls = [c for c in rootless.daemon_calls()[before:] if "--help" not in c[1]]
        assert len(calls) == 1, calls
        args = calls[0][1]
        assert args[:2] == ["--default-deny", f"--allow=tcp:host-loopback:{loop_port}"], args
        assert "--disable-host-loopback" not in args and "--enable-sandbox" in args, args
    finally:
        for srv in servers:
            srv.kill()
            srv.wait(timeout=10)
        holder.kill()
        holder.wait(timeout=10)


CONTAINERS_CONF_EGRESS = """[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
network_cmd_path = "{wrapper}"
network_cmd_options = ["allow_host_loopback=true"]
"""


def test_podman_sends_empty_guest_addr_and_it_means_the_guest():
    # found by running Podman: its add_hostfwd carries "guest_addr":"" (api.c: the default guest)
    from types import SimpleNamespace

    from slirpy.api_socket import ApiServer, handle_request
    from slirpy.config import Config
    from slirpy.portfwd import PortForwarder
    from slirpy.stack.addrmap import AddressMap

    class Fwd(PortForwarder):
        added: list = []

        def add(self, proto, host_addr, host_port, guest_addr, guest_port, *_follow):
            self.added.append((proto, host_addr, host_port, guest_addr, guest_port))
            return len(self.added)

    cfg = Config()
    fwd = Fwd(SimpleNamespace(config=cfg), AddressMap(cfg), None)
    req = (b'{"execute":"add_hostfwd","arguments":{"proto":"tcp","host_addr":"",'
           b'"host_port":18080,"guest_addr":"","guest_port":8000}}')
    assert handle_request(ApiServer(cfg, fwd, None), req) == b'{"return":{"id":1}}'
    assert fwd.added == [("tcp", "0.0.0.0", 18080, "10.0.2.100", 8000)]


def test_ordinary_user_command_form_sandboxed(rootless):
    """No client at all: an ordinary user runs `slirpy --enable-sandbox --enable-seccomp -- CMD`
    (its own user+net namespace; the sandbox makes a second user namespace for the mounts)."""
    host = BlobServer()
    try:
        guest = (f"busybox wget -q -O - http://10.0.2.2:{host.port}/blob | busybox sha256sum; "
                 "cat /proc/$PPID/status | grep -E '^(Seccomp|CapEff):'")
        r = rootless.run([rootless.wrapper, "--enable-sandbox", "--enable-seccomp", "--",
                          "sh", "-c", guest], timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
        assert r.stdout.split()[0] == SHA_HOST, r.stdout + r.stderr
        # the guest's parent is the daemon
        assert "Seccomp:\t2" in r.stdout and "CapEff:\t0000000000000000" in r.stdout, r.stdout
        assert "late import" not in r.stderr and "Traceback" not in r.stderr, r.stderr
    finally:
        host.close()
