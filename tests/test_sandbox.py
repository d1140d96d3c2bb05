"""--enable-sandbox and --enable-seccomp: the daemon's root, capabilities and syscall filter, and
every feature still working inside (TCP out, UDP, DNS re-reading resolv.conf, -p forwards, API
add/list/remove, clean exit). The unprivileged (user namespace) path is exercised by
test_e2e_clients.py, where RootlessKit runs slirpy as an ordinary user."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from nsutil import (REPO, UdpServer, api, dns_answer, free_port, proc_status, require_netns,
                    sha_to_eof)

pytestmark = pytest.mark.netns

RESOLVER1, RESOLVER2 = "127.84.0.53", "127.84.0.54"
GUEST_BLOB = hashlib.shake_256(b"guest-blob").digest(1 << 20)
HOST_BLOB = hashlib.shake_256(b"host-blob").digest(1 << 20)

GUEST = r"""
import hashlib, json, os, socket, struct, sys, threading, time
D, TPORT, UPORT = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])

def wait(name):
    for _ in range(600):
        if os.path.exists(os.path.join(D, name)):
            return
        time.sleep(0.05)
    raise SystemExit("guest: timeout waiting for " + name)

def put(name, obj):
    with open(os.path.join(D, name + ".tmp"), "w") as f:
        json.dump(obj, f)
    os.rename(os.path.join(D, name + ".tmp"), os.path.join(D, name))

def dns(server="10.0.2.3"):
    q = struct.pack("!HHHHHH", 0x4242, 0x0100, 1, 0, 0, 0) + b"\x04test\x07example\x00\x00\x01\x00\x01"
    fam = socket.AF_INET6 if ":" in server else socket.AF_INET
    for _ in range(20):  # the v6 address may still be coming up
        s = socket.socket(fam, socket.SOCK_DGRAM); s.settimeout(4)
        try:
            s.connect((server, 53)); s.send(q)
            r = s.recv(512)
            return "%s %s" % (r[:2].hex(), socket.inet_ntoa(r[-4:]))
        except OSError as e:
            err = "ERR %s" % e
            time.sleep(0.2)
    return err

blob = hashlib.shake_256(b"guest-blob").digest(1 << 20)
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", 8000)); srv.listen(8)
def serve():
    while True:
        c, a = srv.accept()
        c.sendall(blob); c.close()
threading.Thread(target=serve, daemon=True).start()

out = {}
s = socket.create_connection(("10.0.2.2", TPORT), timeout=10)
h, n = hashlib.sha256(), 0
while True:
    b = s.recv(65536)
    if not b:
        break
    h.update(b); n += len(b)
out["tcp"] = [n, h.hexdigest()]
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(4)
u.connect(("10.0.2.2", UPORT)); u.send(b"ping-sandbox")
out["udp"] = u.recv(100).decode()
out["dns1"] = dns()
if "-6" in sys.argv:
    out["dns6"] = dns("fd00::3")
put("phase1", out)
wait("go2")
put("phase2", {"dns2": dns()})
"""


def _kill(proc):
    """The daemon and its guest (one session): kill both, collect the output."""
    if True:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return proc.communicate(timeout=10)


def _wait_file(path, proc, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path):
            return json.load(open(path))
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    out, err = _kill(proc)
    raise AssertionError(f"{os.path.basename(path)} never came; rc={proc.returncode}\n{out}\n{err}")


def _fetch(port: int) -> tuple[int, str]:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    got = sha_to_eof(lambda: s.recv(65536))
    s.close()
    return got


class Host:
    """Host side servers on loopback: a TCP server sending HOST_BLOB, a UDP echo, two resolvers."""

    def __init__(self):
        self.tcp = socket.socket()
        self.tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.tcp.bind(("127.0.0.1", 0))
        self.tcp.listen(8)
        self.tport = self.tcp.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()
        self.udp = UdpServer(lambda d: b"echo:" + d)
        self.r1 = UdpServer(lambda q: dns_answer(q, "198.51.100.1"), addr=RESOLVER1, port=53)
        self.r2 = UdpServer(lambda q: dns_answer(q, "198.51.100.2"), addr=RESOLVER2, port=53)

    def _serve(self):
        while True:
            try:
                c, _ = self.tcp.accept()
            except OSError:
                return
            c.sendall(HOST_BLOB)
            c.close()

    def close(self):
        self.tcp.close()
        for s in (self.udp, self.r1, self.r2):
            s.close()


def run_scenario(tmp_path, flags: list[str], inspect):
    """slirpy FLAGS -p HP:8000 -a API -- guest, inside a private mount namespace whose
    /etc/resolv.conf is a test file naming RESOLVER1. inspect(pid, ctx) runs while the guest
    waits between its two DNS queries. Returns (phase1, phase2, ctx, stderr)."""
    require_netns()
    host = Host()
    d = tmp_path / "xchg"
    d.mkdir()
    resolv = tmp_path / "resolv.conf"
    resolv.write_text(f"nameserver {RESOLVER1}\n")
    api = str(tmp_path / "api" / "api.sock")
    os.mkdir(os.path.dirname(api))
    hp = free_port()
    wrap = ["unshare", "-m", "--propagation", "private", "sh", "-c",
            f'mount --bind {resolv} /etc/resolv.conf && exec "$@"', "sh"]
    cmd = wrap + [sys.executable, "-m", "slirpy", *flags, "-p", f"127.0.0.1:{hp}:8000", "-a", api,
                  "--", sys.executable, "-c", GUEST, str(d), str(host.tport), str(host.udp.port),
                  *(["-6"] if "-6" in flags else [])]
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd="/", start_new_session=True)
    ctx = {"api": api, "hp": hp, "resolv": resolv, "dir": d}
    try:
        p1 = _wait_file(d / "phase1", proc)
        inspect(proc.pid, ctx)
        # resolv.conf rewritten in place (the file the sandbox bound): the next query must go to
        # the second resolver, which proves the re-read works inside
        with open(resolv, "r+") as f:
            f.write(f"nameserver {RESOLVER2}\n")
        t = os.stat(resolv).st_mtime + 5
        os.utime(resolv, (t, t))
        time.sleep(1.2)  # dns.py checks resolv.conf at most once a second
        (d / "go2").touch()
        p2 = _wait_file(d / "phase2", proc)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, f"rc={proc.returncode}\n{out}\n{err}"
        ctx["resolver_hits"] = (len(host.r1.seen), len(host.r2.seen))
        return p1, p2, ctx, err
    finally:
        if proc.returncode is None:
            _kill(proc)
        host.close()


def _check_features(p1, p2, ctx, err):
    assert p1["tcp"] == [len(HOST_BLOB), hashlib.sha256(HOST_BLOB).hexdigest()]
    assert p1["udp"] == "echo:ping-sandbox"
    assert p1["dns1"] == "4242 198.51.100.1"
    assert p2["dns2"] == "4242 198.51.100.2"
    assert ctx["resolver_hits"] == (1 + ("dns6" in p1), 1)
    assert ctx["fwd"] == (len(GUEST_BLOB), hashlib.sha256(GUEST_BLOB).hexdigest())
    assert ctx["api_fwd"] == ctx["fwd"]
    sp = ctx["splice"]  # the -p one spliced under the lockdown, the API one through the tap
    assert sp["helper_alive"] and sp["total"] == 1 and sp["fallbacks"] == {}, sp
    assert "late import" not in err and "Traceback" not in err, err
    assert not os.path.exists(ctx["api"]), "API socket not removed at exit"


def _exercise_forwards(ctx):
    """-p forward (its loopback client spliced by the locked-down connector), then an API
    forward added (a listener bound inside; "splice": false: through the tap), listed and
    removed."""
    ctx["fwd"] = _fetch(ctx["hp"])
    hp2 = free_port()
    r = api(ctx["api"], {"execute": "add_hostfwd", "arguments": {
        "proto": "tcp", "host_addr": "127.0.0.1", "host_port": hp2, "guest_port": 8000,
        "splice": False}}, timeout=5)
    assert "return" in r, r
    ctx["api_fwd"] = _fetch(hp2)
    ctx["splice"] = api(ctx["api"], {"execute": "get_stats"}, timeout=5)["return"]["forward_splice"]
    entries = api(ctx["api"], {"execute": "list_hostfwd"}, timeout=5)["entries"]
    assert [(e["host_port"], e["guest_addr"], e["guest_port"]) for e in entries] == \
        [(ctx["hp"], "10.0.2.100", 8000), (hp2, "10.0.2.100", 8000)]
    assert api(ctx["api"], {"execute": "remove_hostfwd",
                            "arguments": {"id": r["return"]["id"]}}, timeout=5) == {"return": {}}
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", hp2), timeout=2).close()


def test_sandbox_and_seccomp_root_caps_and_every_feature(tmp_path):
    def inspect(pid, ctx):
        st = proc_status(pid)
        ctx["status"] = st
        root = f"/proc/{pid}/root"
        # the daemon's root is the sandbox: /etc and /run read-only (as slirp4netns), and the API
        # socket's directory
        assert sorted(os.listdir(root)) == ["etc", "run", "tmp"], os.listdir(root)
        for d in ("etc", "run"):
            assert sorted(os.listdir(f"{root}/{d}")) == sorted(os.listdir(f"/{d}"))
            with pytest.raises(OSError) as e:
                open(f"{root}/{d}/slirpy-sandbox-probe", "w").close()
            assert e.value.errno == errno.EROFS, e.value
        assert open(f"{root}/etc/resolv.conf").read() == f"nameserver {RESOLVER1}\n"
        api_dir = os.path.dirname(ctx["api"])
        parts = [p for p in api_dir.split("/") if p]
        cur = root
        for part in parts:  # one entry per level down to the API directory
            assert os.listdir(cur) == [part] or cur == root, (cur, os.listdir(cur))
            cur = os.path.join(cur, part)
        assert os.listdir(cur) == ["api.sock"]
        for gone in ("usr", "proc", "work", "root", "bin", "dev"):
            assert not os.path.exists(f"{root}/{gone}")
        assert os.stat(f"/proc/{pid}/ns/mnt").st_ino != os.stat("/proc/self/ns/mnt").st_ino
        # writes outside the API directory are refused (read-only tmpfs root)
        _exercise_forwards(ctx)

    pcap = tmp_path / "cap.pcap"  # opened before the lockdown, outside the sandbox
    p1, p2, ctx, err = run_scenario(tmp_path, ["--enable-sandbox", "--enable-seccomp", "-6",
                                               f"--pcap={pcap}"], inspect)
    assert p1["dns6"] == "4242 198.51.100.1", p1  # IPv6: DNS at fd00::3 from inside too
    data = pcap.read_bytes()
    assert data[:4] == b"\xd4\xc3\xb2\xa1" and len(data) > 2 * len(HOST_BLOB), len(data)
    st = ctx["status"]
    # root keeps CAP_NET_BIND_SERVICE (bit 10) and nothing else, in every set that grants any
    assert st["CapEff"] == st["CapPrm"] == "0000000000000400", st
    assert st["CapBnd"] == "0000000000000400" and st["CapInh"] == "0000000000000000"
    assert st["CapAmb"] == "0000000000000000" and st["NoNewPrivs"] == "1"
    assert st["Seccomp"] == "2"
    _check_features(p1, p2, ctx, err)


def test_seccomp_alone_keeps_root_and_features(tmp_path):
    def inspect(pid, ctx):
        ctx["status"] = proc_status(pid)
        ctx["root"] = os.listdir(f"/proc/{pid}/root")
        _exercise_forwards(ctx)

    p1, p2, ctx, err = run_scenario(tmp_path, ["--enable-seccomp"], inspect)
    assert ctx["status"]["Seccomp"] == "2"
    assert "usr" in ctx["root"]  # no sandbox asked: the host's root
    _check_features(p1, p2, ctx, err)


def test_sandbox_alone_no_seccomp(tmp_path):
    def inspect(pid, ctx):
        ctx["status"] = proc_status(pid)
        assert sorted(os.listdir(f"/proc/{pid}/root")) == ["etc", "run", "tmp"]
        _exercise_forwards(ctx)

    p1, p2, ctx, err = run_scenario(tmp_path, ["--enable-sandbox"], inspect)
    assert ctx["status"]["Seccomp"] == "0"
    assert ctx["status"]["CapEff"] == "0000000000000400"
    _check_features(p1, p2, ctx, err)


# --------------------------------------------------------------------------- the filter itself
FILTER_PROBE = r"""
import ctypes, errno, os, socket, sys, threading
sys.path.insert(0, sys.argv[1])
from slirpy import seccomp
f = seccomp.build()
f.load()
libc = ctypes.CDLL(None, use_errno=True)
def call(name, fn):
    try:
        fn()
        print(name, "ALLOWED")
    except OSError as e:
        print(name, errno.errorcode.get(e.errno, e.errno))
def sysc(nr, *a):
    if libc.syscall(nr, *a) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
call("execve", lambda: os.execv("/bin/true", ["true"]))
call("fork", os.fork)
call("netlink", lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0))
call("packet", lambda: socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, 0))
call("inet", lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).close())
call("inet6", lambda: socket.socket(socket.AF_INET6, socket.SOCK_STREAM).close())
call("unix", lambda: [s.close() for s in socket.socketpair()])
names = {"x86_64": {"unshare": 272, "mount": 165, "ptrace": 101, "bpf": 321, "keyctl": 250,
                    "init_module": 175, "kexec_load": 246, "reboot": 169, "io_uring_setup": 425},
         "aarch64": {"unshare": 97, "mount": 40, "ptrace": 117, "bpf": 280, "keyctl": 219,
                     "init_module": 105, "kexec_load": 104, "reboot": 142, "io_uring_setup": 425}}
for n, nr in names.get(os.uname().machine, {}).items():
    call(n, lambda: sysc(nr, 0, 0, 0, 0, 0))
r, w = os.pipe()
call("tiocsti", lambda: sysc(16 if os.uname().machine == "x86_64" else 29, r, 0x5412, 0))
res = []
t = threading.Thread(target=lambda: res.append(1)); t.start(); t.join()
print("thread", res)
print("status", [l for l in open("/proc/self/status") if l.startswith("Seccomp:")][0].split()[1])
sys.stdout.flush()
if os.uname().machine == "x86_64":
    libc.syscall(0x40000000 | 39)  # x32 getpid: another ABI, must kill
    print("x32 ALLOWED")
"""


def test_filter_refuses_what_a_network_daemon_never_needs():
    r = subprocess.run([sys.executable, "-c", FILTER_PROBE, REPO], capture_output=True, text=True,
                       timeout=30)
    got = dict(line.split(" ", 1) for line in r.stdout.splitlines())
    assert got["execve"] == "EPERM" and got["fork"] == "EPERM", r.stdout + r.stderr
    assert got["netlink"] == got["packet"] == "EAFNOSUPPORT"
    assert got["inet"] == got["inet6"] == got["unix"] == "ALLOWED"
    assert got["thread"] == "[1]" and got["status"] == "2"
    machine = platform.machine()
    if machine in ("x86_64", "aarch64"):
        for n in ("unshare", "mount", "ptrace", "bpf", "keyctl", "init_module", "kexec_load",
                  "reboot", "io_uring_setup", "tiocsti"):
            assert got[n] == "EPERM", (n, r.stdout)
    if machine == "x86_64":
        assert "x32 ALLOWED" not in r.stdout
        assert r.returncode == -signal.SIGSYS, (r.returncode, r.stderr)
    else:
        assert r.returncode == 0, r.stderr


# ------------------------------------------------------------------------------ the plan
ETC_RUN = [(d, True) for d in ("/etc", "/run") if os.path.isdir(d)]


def test_plan_symlinked_resolv_conf_binds_its_directory(tmp_path):
    from slirpy.config import Config
    from slirpy.sandbox import plan
    d = tmp_path / "run" / "resolve"
    d.mkdir(parents=True)
    (d / "stub-resolv.conf").write_text("nameserver 127.0.0.53\n")
    link = tmp_path / "etc" / "resolv.conf"
    link.parent.mkdir()
    link.symlink_to(d / "stub-resolv.conf")
    (tmp_path / "api").mkdir()
    # /etc and /run always (as slirp4netns), the link's directory (it may be re-pointed or
    # replaced), the target's (it may be renamed over), the API directory read-write, last
    binds, links = plan(Config(api_socket=str(tmp_path / "api" / "s")), str(link))
    assert binds == ETC_RUN + [(str(tmp_path / "etc"), True), (str(d), True),
                               (str(tmp_path / "api"), False)]
    assert links == []
    # a bind below another bound directory is folded into it (else it would be hidden, or its
    # mount point created through the outer bind on the host)
    binds, links = plan(Config(api_socket=str(tmp_path / "api.sock")), str(link))
    assert binds == ETC_RUN + [(str(tmp_path), False)] and links == []
    # nothing to read when DNS goes to --dns-upstream or is disabled: /etc and /run still
    binds, links = plan(Config(dns_upstreams=(("127.0.0.1", 53),),
                               api_socket=str(d / "x.sock")), str(link))
    assert binds == ETC_RUN + [(str(d), False)] and links == []
    binds, _ = plan(Config(disable_dns=True), str(link))
    assert binds == ETC_RUN


def test_plan_nixos_and_wsl_chains(tmp_path):
    """NixOS: /etc/resolv.conf -> /etc/static/resolv.conf, /etc/static -> a store path whose
    resolv.conf links to another store path: the store is bound (a re-pointed /etc/static stays
    inside it). WSL: a link to /mnt/wsl/resolv.conf binds /mnt/wsl. A symlinked directory on the
    way outside every bind (/var/run -> /run) is recreated; a dangling link binds the directory
    its target would be in."""
    from slirpy.config import Config
    from slirpy.sandbox import plan, resolve_chain
    etc, store, wsl, var = (tmp_path / n for n in ("etc", "nix/store", "mnt/wsl", "var"))
    for p in (etc, store / "aaa-etc" / "etc", wsl, var, tmp_path / "run" / "resolvconf"):
        p.mkdir(parents=True)
    (store / "bbb-resolv.conf").write_text("nameserver 127.0.0.53\n")
    (store / "aaa-etc" / "etc" / "resolv.conf").symlink_to("../../bbb-resolv.conf")
    (etc / "static").symlink_to(store / "aaa-etc" / "etc")
    (etc / "resolv.conf").symlink_to("/" + str(etc / "static" / "resolv.conf").lstrip("/"))
    final, chain = resolve_chain(str(etc / "resolv.conf"))
    assert final == str(store / "bbb-resolv.conf")
    assert [(ln, last) for ln, _t, last in chain] == [
        (str(etc / "resolv.conf"), True), (str(etc / "static"), False),
        (str(store / "aaa-etc" / "etc" / "resolv.conf"), True)]
    binds, links = plan(Config(), str(etc / "resolv.conf"))
    assert binds == ETC_RUN + [(str(etc), True), (str(store), True)] and links == []

    (wsl / "resolv.conf").write_text("nameserver 127.0.0.53\n")
    (etc / "wsl.conf").symlink_to(wsl / "resolv.conf")
    binds, links = plan(Config(), str(etc / "wsl.conf"))
    assert binds == ETC_RUN + [(str(etc), True), (str(wsl), True)] and links == []

    (tmp_path / "run" / "resolvconf" / "resolv.conf").write_text("nameserver 127.0.0.53\n")
    (var / "run").symlink_to("../run")
    (etc / "old.conf").symlink_to(var / "run" / "resolvconf" / "resolv.conf")
    binds, links = plan(Config(), str(etc / "old.conf"))
    assert binds == ETC_RUN + [(str(etc), True), (str(tmp_path / "run" / "resolvconf"), True)]
    assert links == [(str(var / "run"), "../run")]

    (etc / "dangling.conf").symlink_to(wsl / "not-yet.conf")
    binds, _ = plan(Config(), str(etc / "dangling.conf"))
    assert binds == ETC_RUN + [(str(etc), True), (str(wsl), True)]
    # a loop: no hang, the directories seen so far
    (etc / "loop").symlink_to(etc / "loop")
    binds, _ = plan(Config(), str(etc / "loop"))
    assert binds == ETC_RUN + [(str(etc), True)]


def test_preimport_covers_slirpy():
    r = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        import sys
        from slirpy.sandbox import preimport
        failed = preimport()
        print([f for f in failed if f.startswith("slirpy")])
        print(sorted(m for m in sys.modules if m.startswith("slirpy.")))
    """)], capture_output=True, text=True, timeout=30, env=dict(os.environ, PYTHONPATH=REPO))
    lines = r.stdout.splitlines()
    assert lines[0] == "[]", r.stderr
    mods = eval(lines[1])
    for m in ("slirpy.nat", "slirpy.udp_nat", "slirpy.dns", "slirpy.api_socket", "slirpy.portfwd",
              "slirpy.stack.stack", "slirpy.seccomp", "slirpy.icmp_nat"):
        assert m in mods


LAUNCH_WITHOUT_UNSHARE = r"""
import errno, os, sys
sys.path.insert(0, os.environ["PYTHONPATH"])
from slirpy import seccomp
f = seccomp.Filter()
f.rule(seccomp.SCMP_ACT_ERRNO(errno.EPERM), "unshare")
f.load()
os.execv(sys.executable, [sys.executable, "-m", "slirpy", *sys.argv[1:]])
"""


def test_sandbox_refused_is_one_error_line(tmp_path):
    """When the mount namespace cannot be made (here unshare() is refused by a filter the test
    puts on the daemon), slirpy says so in one line, exits 1, never reports ready, and removes
    its API socket."""
    from nsutil import NsHolder
    require_netns()
    api = str(tmp_path / "api.sock")
    with NsHolder() as ns:
        ready_r, ready_w = os.pipe()
        p = subprocess.run([sys.executable, "-c", LAUNCH_WITHOUT_UNSHARE, "-c", "-r", str(ready_w),
                            "--enable-sandbox", "-a", api, str(ns.pid)], pass_fds=(ready_w,),
                           capture_output=True, text=True, timeout=30,
                           env=dict(os.environ, PYTHONPATH=REPO))
        os.close(ready_w)
        ready = os.read(ready_r, 16)
        os.close(ready_r)
    assert p.returncode == 1, p
    assert p.stderr == ("slirpy: error: --enable-sandbox: unshare(CLONE_NEWNS): "
                        "Operation not permitted\n"), p.stderr
    assert ready == b""
    assert not os.path.exists(api)


def test_sandbox_imports_no_port_forwarding_and_no_trio():
    """launch's lockdown probe imports sandbox.py before ready: its StartupError comes from
    slirpy.errors, not from the port forwarder (which imports trio); its capability calls from
    slirpy.caps (shared with the splice connector), which imports nothing else."""
    r = subprocess.run([sys.executable, "-c", "import sys, slirpy.sandbox; print(sorted(m for m "
                        "in sys.modules if m.startswith('slirpy') or m == 'trio'))"],
                       capture_output=True, text=True, timeout=30,
                       env=dict(os.environ, PYTHONPATH=REPO))
    assert r.stdout.strip() == "['slirpy', 'slirpy.caps', 'slirpy.errors', 'slirpy.sandbox']", \
        r.stderr
