"""DNS follows the host's resolver changes under --enable-sandbox (issue #25), and the sandbox
root holds /etc and /run read-only as slirp4netns's does (issue #18).

Each test runs the daemon sandboxed in a private mount namespace of its own, where /etc is an
overlay over the real one (writes go to a tmpfs: the machine's /etc/resolv.conf is never
touched) and /run is a fresh tmpfs. The test lays resolv.conf out there (through
/proc/HOLDER/root, HOLDER being a process that stays in that namespace), starts the daemon, asks
10.0.2.3 from a guest, changes the resolver the way one kind of host does, and checks that the
next queries reach the new stub resolver within 3 s. The stub resolvers are UDP servers on
127.84.1.53 and 127.84.1.54, port 53, answering different A records.

The real /usr/bin/slirp4netns --enable-sandbox runs on the same input for the six rows of the
issue's table (it follows them all) and for the NixOS and WSL chains (it never answers there;
slirpy answers and follows).
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time

import pytest

from nsutil import REPO, NsHolder, UdpServer, api, dns_answer, require_netns

pytestmark = pytest.mark.netns

R1, R2 = "127.84.1.53", "127.84.1.54"  # stub resolvers (loopback, port 53)
A1, A2 = "198.51.100.1", "198.51.100.2"  # what each answers
FOLLOW_WITHIN = 3.0  # seconds from the change to the first answer from the new resolver
SLIRP4NETNS = "/usr/bin/slirp4netns"

# Run by `unshare -m --propagation private sh -c SETUP sh T PY DAEMON...`: the private /etc and
# /run (with a mount below it), every mount shared within this namespace as on a systemd host,
# a holder process the test reaches the namespace through, then (once the test has laid the
# files out and created T/go) the daemon.
SETUP = r"""
set -e
T=$1; PY=$2; shift 2
mount -t tmpfs tmpfs "$T/ov"
mkdir "$T/ov/up" "$T/ov/work"
mount -t overlay overlay -o "lowerdir=/etc,upperdir=$T/ov/up,workdir=$T/ov/work" /etc
mount -t tmpfs tmpfs /run
mkdir -p /run/user/0
mount -t tmpfs tmpfs /run/user/0  # a mount below /run: must be read-only in the sandbox too
mount --make-rshared /  # as systemd makes it on a host: the daemon must cope, and follow mounts
"$PY" -c 'import os, time; os.closerange(3, 4096); time.sleep(600)' </dev/null >/dev/null 2>&1 &
echo $! > "$T/holder.pid"
i=0
while [ ! -e "$T/go" ]; do
    i=$((i+1)); [ $i -le 1500 ] || { echo "setup: no go" >&2; exit 1; }
    sleep 0.02
done
exec "$@"
"""

# A guest-side client in the daemon's network namespace: one DNS query to 10.0.2.3 per input
# line; prints the A record, "rcode N" or "timeout".
CLIENT = r"""
import socket, struct, sys
n = 0
for line in sys.stdin:
    n = (n + 1) & 0xFFFF
    q = struct.pack("!HHHHHH", n, 0x0100, 1, 0, 0, 0) + b"\x04test\x07example\x00\x00\x01\x00\x01"
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(float(line))
    try:
        s.sendto(q, ("10.0.2.3", 53))
        while True:
            r = s.recv(512)
            if r[:2] == q[:2]:
                break
        out = socket.inet_ntoa(r[-4:]) if r[3] & 15 == 0 else "rcode %d" % (r[3] & 15)
    except socket.timeout:
        out = "timeout"
    finally:
        s.close()
    print(out, flush=True)
"""


# ------------------------------------------------------------------------- file operations
def _write(path, text):
    with open(path, "w") as f:
        f.write(text)


def _ns(ip):
    return f"# generated\nnameserver {ip}\noptions edns0\n"


def _rewrite_in_place(path, text):
    """Same inode, new content (what an editor that truncates, or `echo >`, does)."""
    ino = os.stat(path).st_ino
    with open(path, "r+") as f:
        f.truncate(0)
        f.write(text)
    assert os.stat(path).st_ino == ino


def _rename_over(path, text):
    """A new file renamed over the old one (NetworkManager, resolvconf, dhclient)."""
    tmp = os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".new")
    _write(tmp, text)
    os.rename(tmp, path)


def _repoint(link, target):
    """A new symlink renamed over the old one (atomic, as systemd and NixOS do)."""
    tmp = os.path.join(os.path.dirname(link), "." + os.path.basename(link) + ".new")
    os.symlink(target, tmp)
    os.rename(tmp, link)


def _link(link, target):
    if os.path.lexists(link):
        os.unlink(link)
    os.symlink(target, link)


def _mkdir(path):
    os.makedirs(path, exist_ok=True)


# ----------------------------------------------------------------------------- the rows
# Each row: setup(root, t) lays resolv.conf out naming R1; switch(root, t) changes it to R2.
# root is the namespace seen through /proc/HOLDER/root; t is the test's tmp dir (outside /etc
# and /run: it stands in for WSL's /mnt/wsl and NixOS's /nix/store).
STUB = "/run/systemd/resolve/stub-resolv.conf"
NM = "/run/NetworkManager/resolv.conf"


def _plain(root, t):
    if os.path.lexists(root + "/etc/resolv.conf"):  # the overlay's copy of the machine's
        os.unlink(root + "/etc/resolv.conf")
    _write(root + "/etc/resolv.conf", _ns(R1))


def _stub(root, t):
    _mkdir(root + os.path.dirname(STUB))
    _mkdir(root + os.path.dirname(NM))
    _write(root + STUB, _ns(R1))
    _write(root + NM, _ns(R2))
    _link(root + "/etc/resolv.conf", "../run/systemd/resolve/stub-resolv.conf")


def _nixos(root, t):
    """/etc/resolv.conf -> /etc/static/resolv.conf; /etc/static -> STORE/aaa-etc/etc, whose
    resolv.conf -> ../../bbb-resolv.conf."""
    store = f"{t}/nix/store"
    _mkdir(f"{store}/aaa-etc/etc")
    _write(f"{store}/bbb-resolv.conf", _ns(R1))
    os.symlink("../../bbb-resolv.conf", f"{store}/aaa-etc/etc/resolv.conf")
    _link(root + "/etc/static", f"{store}/aaa-etc/etc")
    _link(root + "/etc/resolv.conf", "/etc/static/resolv.conf")


def _nixos_switch(root, t):
    """nixos-rebuild switch: a new generation in the store, /etc/static re-pointed to it."""
    store = f"{t}/nix/store"
    _mkdir(f"{store}/ccc-etc/etc")
    _write(f"{store}/ddd-resolv.conf", _ns(R2))
    os.symlink("../../ddd-resolv.conf", f"{store}/ccc-etc/etc/resolv.conf")
    _repoint(root + "/etc/static", f"{store}/ccc-etc/etc")


def _wsl(root, t):
    _mkdir(f"{t}/mnt/wsl")
    _write(f"{t}/mnt/wsl/resolv.conf", _ns(R1))
    _link(root + "/etc/resolv.conf", f"{t}/mnt/wsl/resolv.conf")


def _wsl_elsewhere(root, t):
    """The link re-pointed into a directory the sandbox does not hold: cannot be followed."""
    _mkdir(f"{t}/elsewhere")
    _write(f"{t}/elsewhere/resolv.conf", _ns(R2))
    _repoint(root + "/etc/resolv.conf", f"{t}/elsewhere/resolv.conf")


ROWS = {
    # the table of issue #25
    "stub-rewritten": (_stub, lambda root, t: _rewrite_in_place(root + STUB, _ns(R2))),
    "stub-renamed-over": (_stub, lambda root, t: _rename_over(root + STUB, _ns(R2))),
    "plain-rewritten": (_plain, lambda root, t: _rewrite_in_place(root + "/etc/resolv.conf",
                                                                  _ns(R2))),
    "plain-renamed-over": (_plain, lambda root, t: _rename_over(root + "/etc/resolv.conf",
                                                                _ns(R2))),
    "link-repointed": (_stub, lambda root, t: _repoint(root + "/etc/resolv.conf", NM)),
    "link-replaced-by-file": (_stub, lambda root, t: _rename_over(root + "/etc/resolv.conf",
                                                                  _ns(R2))),
    # what slirpy does beyond slirp4netns
    "nixos-generation-switch": (_nixos, _nixos_switch),
    "wsl-renamed-over": (_wsl, lambda root, t: _rename_over(f"{t}/mnt/wsl/resolv.conf", _ns(R2))),
}


# ------------------------------------------------------------------------------ the harness
class Run:
    """The daemon (slirpy or slirp4netns) sandboxed in its own mount namespace, a guest netns,
    the two stub resolvers and a guest-side DNS client."""

    def __init__(self, tmp_path, setup, daemon="slirpy", api_in_run=False):
        require_netns()
        self.t = str(tmp_path)
        self.daemon = daemon
        self.r1 = UdpServer(lambda q: dns_answer(q, A1), addr=R1, port=53)
        self.r2 = UdpServer(lambda q: dns_answer(q, A2), addr=R2, port=53)
        self.ns = NsHolder().__enter__()
        self.proc = self.client = None
        self.holder = None
        # the API socket in the test's tmp dir, or where Podman puts it (XDG_RUNTIME_DIR, in
        # /run): then the test reaches it through the holder's root
        self.api_in_run = api_in_run
        self.api = ("/run/user/0/libpod/tmp/api.sock" if api_in_run
                    else os.path.join(self.t, "api", "api.sock"))
        os.makedirs(os.path.join(self.t, "ov"))
        if not api_in_run:
            os.makedirs(os.path.dirname(self.api))
        try:
            self._start(setup)
        except BaseException:
            self.close()
            raise

    def _start(self, setup):
        ready_r, ready_w = os.pipe()
        exit_r, self.exit_w = os.pipe()
        if self.daemon == "slirpy":
            cmd = [sys.executable, "-m", "slirpy", "--log-level=INFO", "-a", self.api]
        else:
            cmd = [SLIRP4NETNS]
        cmd += ["--enable-sandbox", "--enable-seccomp", "-c", "-r", str(ready_w), "-e",
                str(exit_r), str(self.ns.pid), "tap0"]
        env = dict(os.environ, PYTHONPATH=REPO)
        self.proc = subprocess.Popen(
            ["unshare", "-m", "--propagation", "private", "sh", "-c", SETUP, "sh", self.t,
             sys.executable, *cmd], pass_fds=(ready_w, exit_r), stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, env=env, cwd="/", start_new_session=True)
        os.close(ready_w)
        os.close(exit_r)
        pidfile = os.path.join(self.t, "holder.pid")
        deadline = time.monotonic() + 20
        while not (os.path.exists(pidfile) and open(pidfile).read().strip()):
            assert self.proc.poll() is None and time.monotonic() < deadline, self._fail("no holder")
            time.sleep(0.02)
        self.holder = int(open(pidfile).read())
        self.root = f"/proc/{self.holder}/root"
        if self.api_in_run:
            os.makedirs(self.root + os.path.dirname(self.api))
        # the namespace is the holder's own: its /etc is the overlay, not the machine's
        assert os.stat(self.root + "/etc").st_dev != os.stat("/etc").st_dev
        setup(self.root, self.t)
        open(os.path.join(self.t, "go"), "w").close()
        r, _, _ = select.select([ready_r], [], [], 30)
        ready = os.read(ready_r, 16) if r else b""
        os.close(ready_r)
        assert ready == b"1", self._fail(f"not ready: {ready!r}")
        self.client = subprocess.Popen(
            ["nsenter", "-t", str(self.ns.pid), "-U", "-n", "--preserve-credentials",
             sys.executable, "-c", CLIENT], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            text=True)

    def api_path(self) -> str:
        """The API socket as the test (outside the daemon's namespace) reaches it."""
        return self.root + self.api if self.api_in_run else self.api

    def _fail(self, what):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        out, err = self.proc.communicate(timeout=10)
        return f"{what}; rc={self.proc.returncode}\n{out}\n{err}"

    def query(self, timeout=1.0) -> str:
        self.client.stdin.write(f"{timeout}\n")
        self.client.stdin.flush()
        return self.client.stdout.readline().strip()

    def follow(self, switch, want=A2, was=A1) -> float:
        """Apply switch; query until the answer is `want`; returns the seconds it took."""
        switch(self.root, self.t)
        t0 = time.monotonic()
        seen = []
        while True:
            got = self.query()
            took = time.monotonic() - t0
            seen.append((round(took, 2), got))
            if got == want:
                return took
            assert got == was and took < FOLLOW_WITHIN, seen
            time.sleep(0.1)

    def finish(self) -> str:
        """Exit through -e; returns the daemon's stderr."""
        os.close(self.exit_w)
        self.exit_w = None
        try:
            out, err = self.proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            raise AssertionError(self._fail("no exit after -e")) from None
        assert self.proc.returncode == 0, (self.proc.returncode, out, err)
        return err

    def close(self):
        if self.client is not None and self.client.poll() is None:
            self.client.kill()
            self.client.wait(10)
        if self.exit_w is not None:
            os.close(self.exit_w)
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.communicate(timeout=10)
        if self.holder is not None:
            try:
                os.kill(self.holder, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.ns.__exit__(None, None, None)
        self.r1.close()
        self.r2.close()


def _mounts(pid):
    """(mount point, 'ro'|'rw') for every mount of the process, from its mountinfo."""
    out = []
    with open(f"/proc/{pid}/mountinfo") as f:
        for line in f:
            parts = line.split()
            out.append((parts[4], "ro" if "ro" in parts[5].split(",") else "rw"))
    return out


@pytest.mark.parametrize("row", list(ROWS))
def test_slirpy_follows_resolver_change_sandboxed(tmp_path, row):
    setup, switch = ROWS[row]
    run = Run(tmp_path, setup)
    try:
        assert run.query(timeout=3.0) == A1
        pid = run.proc.pid
        root = f"/proc/{pid}/root"
        # the sandbox: /etc and /run as in the daemon's namespace (slirp4netns's layout), the
        # test's tmp dir for the API socket (and the WSL/NixOS chain), all read-only but the
        # API socket's directory
        assert sorted(os.listdir(root)) == ["etc", "run", "tmp"], os.listdir(root)
        for d in ("etc", "run"):
            assert sorted(os.listdir(f"{root}/{d}")) == sorted(os.listdir(f"{run.root}/{d}"))
        mounts = _mounts(pid)
        api_dir = os.path.dirname(run.api)
        assert (api_dir, "rw") in mounts, mounts
        assert [m for m in mounts if m[1] == "rw"] == [(api_dir, "rw")], mounts
        hits1 = len(run.r1.seen)
        assert hits1 >= 1 and not run.r2.seen

        took = run.follow(switch)
        assert took < FOLLOW_WITHIN
        hits1 = len(run.r1.seen)
        assert run.query() == A2  # and it stays there: the old resolver is asked no more
        assert len(run.r1.seen) == hits1 and len(run.r2.seen) == 2
        st = api(run.api, {"execute": "get_stats"}, timeout=5)["return"]["dns"]
        assert st["upstreams"] == [R2] and st["source"] == "/etc/resolv.conf", st
        assert st["changes"] == 1 and st["resolv_conf_error"] is None, st
        err = run.finish()
    finally:
        run.close()
    # one INFO line for the change, old -> new; nothing else went wrong
    assert err.count(f"dns: upstreams changed: {R1} -> {R2}") == 1, err
    assert err.count(f"dns: upstreams {R1} (from /etc/resolv.conf") == 1, err
    assert "WARNING" not in err and "Traceback" not in err and "late import" not in err, err
    assert not os.path.exists(run.api), "API socket not removed at exit"


def test_slirpy_resolv_conf_leading_outside_the_sandbox_is_logged(tmp_path):
    """A link re-pointed into a directory the sandbox does not hold cannot be followed from
    inside: the guest gets SERVFAIL (no silent use of a stale server), and one WARNING says why
    and what to do; get_stats shows it."""
    run = Run(tmp_path, _wsl)
    try:
        assert run.query(timeout=3.0) == A1
        took = run.follow(_wsl_elsewhere, want="rcode 2")
        assert took < FOLLOW_WITHIN
        for _ in range(3):
            assert run.query() == "rcode 2"
        st = api(run.api, {"execute": "get_stats"}, timeout=5)["return"]["dns"]
        assert st["upstreams"] == [] and st["resolv_conf_error"], st
        assert st["resolv_conf_target"] == f"{run.t}/elsewhere/resolv.conf", st
        err = run.finish()
    finally:
        run.close()
    assert not run.r2.seen
    warn = [ln for ln in err.splitlines() if "WARNING" in ln]
    assert len(warn) == 1, err
    assert f"cannot read /etc/resolv.conf (-> {run.t}/elsewhere/resolv.conf)" in warn[0], warn
    assert "restart slirpy" in warn[0] and f"{run.t}/mnt/wsl" in warn[0], warn
    assert err.count(f"dns: upstreams changed: {R1} -> none") == 1, err
    assert err.count(f"dns: /etc/resolv.conf now leads to {run.t}/elsewhere/resolv.conf") == 1


def test_slirpy_api_socket_in_run_as_podman_puts_it(tmp_path):
    """Podman's API socket lives in XDG_RUNTIME_DIR (/run/user/UID/...): its directory is bound
    read-write over the read-only /run (and below the read-only /run/user/0 mount), the API
    answers, DNS follows, and the socket is removed at exit."""
    run = Run(tmp_path, _stub, api_in_run=True)
    try:
        assert run.query(timeout=3.0) == A1
        mounts = _mounts(run.proc.pid)
        api_dir = os.path.dirname(run.api)
        assert [m for m in mounts if m[1] == "rw"] == [(api_dir, "rw")], mounts
        assert ("/run/user/0", "ro") in mounts and ("/run", "ro") in mounts, mounts
        assert sorted(os.listdir(f"/proc/{run.proc.pid}/root")) == ["etc", "run"]
        assert run.follow(lambda root, t: _repoint(root + "/etc/resolv.conf", NM)) < FOLLOW_WITHIN
        st = api(run.api_path(), {"execute": "get_stats"}, timeout=5)["return"]["dns"]
        assert st["upstreams"] == [R2], st
        err = run.finish()
        assert not os.path.exists(run.api_path()), "API socket not removed at exit"
        assert os.listdir(run.root + api_dir) == []
    finally:
        run.close()
    assert "WARNING" not in err and "Traceback" not in err, err


def _nsenter_mount(holder, *args):
    p = subprocess.run(["nsenter", "-t", str(holder), "-m", *args], capture_output=True,
                       text=True, timeout=20)
    assert p.returncode == 0, p.stderr


def test_slirpy_sandbox_mounts_follow_the_host_and_not_back(tmp_path):
    """The sandbox's mounts are slaves (as slirp4netns's): a mount made on the host under /run
    after the start appears inside, and its unmount too (a netns file or /run/user/UID unmounted
    on the host is not kept alive by the daemon); the daemon's own tmpfs root never shows on the
    host side."""
    run = Run(tmp_path, _plain)
    try:
        assert run.query(timeout=3.0) == A1
        inside = f"/proc/{run.proc.pid}/root/run/late"
        assert not os.path.exists(inside)
        _nsenter_mount(run.holder, "mkdir", "-p", "/run/late")
        _nsenter_mount(run.holder, "mount", "-t", "tmpfs", "-o", "size=16k", "late", "/run/late")
        _write(f"{run.root}/run/late/marker", "x")
        assert open(f"{inside}/marker").read() == "x"
        _nsenter_mount(run.holder, "umount", "/run/late")
        assert os.listdir(inside) == []
        assert [m for m in _mounts(run.proc.pid) if m[0] == "/run/late"] == []
        # nothing of the sandbox on the host side: its /tmp is still the machine's
        assert os.path.isdir(f"{run.root}{run.t}/ov")
        assert not [m for m in _mounts(run.holder) if m[0] in ("/tmp", "/tmp/etc")]
        run.finish()
    finally:
        run.close()


@pytest.mark.parametrize("row", list(ROWS)[:6])
def test_slirp4netns_reference(tmp_path, row):
    """The table's rows with the real slirp4netns 1.2 --enable-sandbox on the same input: it
    follows every one, as slirpy does, and its root holds /etc and /run."""
    if not os.path.exists(SLIRP4NETNS):
        pytest.skip(f"LOUD: {SLIRP4NETNS} not installed (bash tests/install-deps.sh)")
    setup, switch = ROWS[row]
    run = Run(tmp_path, setup, daemon="slirp4netns")
    try:
        assert run.query(timeout=3.0) == A1
        assert sorted(os.listdir(f"/proc/{run.proc.pid}/root")) == ["etc", "run"]
        assert run.follow(switch) < FOLLOW_WITHIN
        assert run.query() == A2
        run.finish()
    finally:
        run.close()


@pytest.mark.parametrize("row", ["nixos-generation-switch", "wsl-renamed-over"])
def test_slirp4netns_reference_loses_chains_outside_etc_and_run(tmp_path, row):
    """What slirpy does better: slirp4netns --enable-sandbox holds only /etc and /run, so a
    resolv.conf whose chain leads elsewhere (NixOS's store, WSL's /mnt/wsl) cannot be read
    inside and the guest's query gets no answer at all (slirpy: answered, and followed)."""
    if not os.path.exists(SLIRP4NETNS):
        pytest.skip(f"LOUD: {SLIRP4NETNS} not installed (bash tests/install-deps.sh)")
    setup, _switch = ROWS[row]
    run = Run(tmp_path, setup, daemon="slirp4netns")
    try:
        assert run.query(timeout=2.0) == "timeout"
        assert not run.r1.seen and not run.r2.seen
        run.finish()
    finally:
        run.close()
