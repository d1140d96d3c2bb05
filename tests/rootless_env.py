"""An ordinary user that runs rootless RootlessKit and Podman with this tree's slirpy: shared by
tests/test_e2e_clients.py and bench/ (no pytest in here).

Machine setup done here (and said on stdout): a user `slirpyci` with /etc/subuid and /etc/subgid
ranges; /dev/net/tun mode 0666 when it is not usable by other users; search (x) permission for that
user, by ACL, on directories leading to this interpreter (pyenv lives under /root, mode 0700).
These are left in place for the next run (and for a concurrent one on a shared machine).

WRAPPER (Rootless.wrapper) is `PYTHONPATH=<this tree> exec <this python> -m slirpy "$@"`, logging
each call (pid and arguments) to Rootless.calls.
"""

from __future__ import annotations

import fcntl
import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
USER = "slirpyci"
SUBID = "400000:65536"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
TOOLS = ("rootlesskit", "podman", "runc", "newuidmap", "newgidmap", "setfacl", "setpriv",
         "useradd", "busybox", "nsenter")

def _note(msg: str) -> None:
    sys.stdout.write(f"\n[test_e2e_clients setup] {msg}\n")


def _run(cmd, **kw):
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    kw.setdefault("timeout", 60)
    return subprocess.run(cmd, **kw)


# ------------------------------------------------------------------------------ the rootless user
class Rootless:
    def __init__(self):
        self.granted: list[str] = []
        self.work = None

    def setup(self):
        missing = [t for t in TOOLS if shutil.which(t) is None]
        assert not missing, f"missing {missing}: run bash tests/install-deps.sh"
        # several test runs may share this machine: the user, its subuid lines and the ACLs are
        # set up under one lock and left in place (a teardown would pull them from under a
        # concurrent run); everything else lives in this run's own directory
        with open("/tmp/.slirpy-test-user.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._setup_machine()
        # short: Podman's API socket path (XDG_RUNTIME_DIR/libpod/tmp/<64 hex>.net) must fit
        # in sun_path's 108 bytes
        self.work = tempfile.mkdtemp(prefix="sc-", dir="/tmp")
        os.chmod(self.work, 0o755)
        os.chown(self.work, self.uid, self.gid)
        # not realpath(): a venv's python is a symlink whose path is what selects the venv
        self.python = os.path.abspath(sys.executable)
        self.wrapper = os.path.join(self.work, "slirpy-wrapper")
        self.calls = os.path.join(self.work, "calls.log")
        with open(self.wrapper, "w") as f:
            f.write("#!/bin/sh\n"
                    f'echo "$$ $*" >> {self.calls}\n'
                    f'PYTHONPATH={REPO} exec {self.python} -m slirpy "$@"\n')
        os.chmod(self.wrapper, 0o755)
        # a real short daemon, not --help (which imports neither trio nor pyroute2): the command
        # form starts the helper and the event loop, so a package missing for this user shows here
        r = self.run([self.wrapper, "--", "cat", "/proc/net/dev"])
        assert r.returncode == 0 and " tap0:" in r.stdout, \
            f"{USER} cannot run this tree's slirpy: {r.stdout}{r.stderr}"
        return self

    def _setup_machine(self):
        try:
            pw = pwd.getpwnam(USER)
        except KeyError:
            r = _run(["useradd", "-m", "-s", "/bin/sh", USER])
            assert r.returncode == 0 or "already exists" in r.stderr, r.stderr
            _note(f"created user {USER}")
            pw = pwd.getpwnam(USER)
        self.uid, self.gid, self.home = pw.pw_uid, pw.pw_gid, pw.pw_dir
        for f in ("/etc/subuid", "/etc/subgid"):
            text = open(f).read() if os.path.exists(f) else ""
            if not any(line.split(":")[0] == USER for line in text.splitlines()):
                # written directly: usermod --add-subuids refuses when the file does not exist
                with open(f, "a") as fh:
                    fh.write(("" if not text or text.endswith("\n") else "\n") + f"{USER}:{SUBID}\n")
                _note(f"added {f} range {SUBID} for {USER}")
        mode = stat.S_IMODE(os.stat("/dev/net/tun").st_mode)
        if mode & 0o006 != 0o006:
            os.chmod("/dev/net/tun", 0o666)
            _note(f"/dev/net/tun was mode {mode:04o}, not usable by an ordinary user: made 0666 "
                  "(the usual mode on a host)")
        paths = {os.path.realpath(sys.executable), os.path.abspath(sys.executable), sys.prefix,
                 sys.base_prefix, REPO,
                 os.path.dirname(os.path.realpath(__import__("trio").__file__))}
        for p in paths:
            self._grant_search(p)

    def _grant_search(self, path: str) -> None:
        d = path if os.path.isdir(path) else os.path.dirname(path)
        while True:
            if not stat.S_IMODE(os.stat(d).st_mode) & 0o001 and d not in self.granted and \
                    f"user:{USER}:--x" not in _run(["getfacl", "-p", d]).stdout:
                r = _run(["setfacl", "-m", f"u:{USER}:x", d])
                assert r.returncode == 0, f"setfacl on {d}: {r.stderr}"
                self.granted.append(d)
                _note(f"granted {USER} search permission on {d} (ACL) to reach {path}")
            if d == "/":
                break
            d = os.path.dirname(d)

    def env(self, **extra) -> dict:
        return {"PATH": PATH, "HOME": self.home, "USER": USER, "LOGNAME": USER, "LANG": "C.UTF-8",
                **extra}

    def argv(self, cmd, netns: str | None = None) -> list[str]:
        a = ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--init-groups", "--", *cmd]
        if netns:
            a = ["nsenter", f"--net={netns}", "--", *a]
        return a

    def run(self, cmd, netns=None, env=None, **kw):
        return _run(self.argv(cmd, netns), env=env or self.env(), cwd=self.work, **kw)

    def popen(self, cmd, netns=None, env=None, **kw):
        return subprocess.Popen(self.argv(cmd, netns), env=env or self.env(), cwd=self.work,
                                start_new_session=True, **kw)

    def chown(self, path):
        os.chown(path, self.uid, self.gid)

    def daemon_calls(self) -> list[tuple[int, list[str]]]:
        """(pid, argv) of each wrapper call that started a daemon (not --help)."""
        out = []
        if os.path.exists(self.calls):
            for line in open(self.calls):
                pid, *args = line.split()
                if args != ["--help"]:
                    out.append((int(pid), args))
        return out

    def teardown(self):
        if self.work:
            shutil.rmtree(self.work, ignore_errors=True)


CONTAINERS_CONF = """[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
network_cmd_path = "{wrapper}"
"""
STORAGE_CONF = """[storage]
driver = "vfs"
"""
IMAGE = "localhost/slirpy-busybox:test"


class Podman:
    def __init__(self, rootless: Rootless):
        self.r = rootless
        base = os.path.join(rootless.work, "p")
        self.dirs = {k: os.path.join(base, k) for k in ("cfg", "data", "run", "vol")}
        for p in [base, *self.dirs.values(), os.path.join(self.dirs["cfg"], "containers")]:
            os.makedirs(p, exist_ok=True)
            rootless.chown(p)
        os.chmod(self.dirs["run"], 0o700)
        for name, text in (("containers.conf", CONTAINERS_CONF), ("storage.conf", STORAGE_CONF)):
            with open(os.path.join(self.dirs["cfg"], "containers", name), "w") as f:
                f.write(text.format(wrapper=rootless.wrapper))
        self.envd = rootless.env(XDG_CONFIG_HOME=self.dirs["cfg"], XDG_DATA_HOME=self.dirs["data"],
                                 XDG_RUNTIME_DIR=self.dirs["run"])
        tar = os.path.join(base, "busybox.tar")
        _busybox_rootfs_tar(tar)
        r = self.run(["import", tar, IMAGE])
        assert r.returncode == 0, f"podman import: {r.stdout}{r.stderr}"

    def argv(self, args):
        return ["podman", *args]

    def run(self, args, netns=None, timeout=90):
        return self.r.run(self.argv(args), netns=netns, env=self.envd, timeout=timeout)

    def popen(self, args, netns=None, **kw):
        return self.r.popen(self.argv(args), netns=netns, env=self.envd, **kw)

    def teardown(self):
        self.run(["rm", "-af", "-t", "0"], timeout=60)
        pidfile = os.path.join(self.dirs["run"], "libpod", "tmp", "pause.pid")
        try:
            os.kill(int(open(pidfile).read().strip()), signal.SIGKILL)
        except (OSError, ValueError):
            pass


def _busybox_rootfs_tar(path: str) -> None:
    with tarfile.open(path, "w") as t:
        for d in ("bin", "etc", "tmp", "www", "out"):
            ti = tarfile.TarInfo(d)
            ti.type, ti.mode = tarfile.DIRTYPE, 0o1777 if d in ("tmp", "out") else 0o755
            t.addfile(ti)
        t.add(os.path.realpath(shutil.which("busybox")), arcname="bin/busybox")
        for applet in ("sh", "httpd", "wget", "sha256sum", "sleep", "cat", "echo", "ls", "true"):
            ti = tarfile.TarInfo(f"bin/{applet}")
            ti.type, ti.linkname = tarfile.SYMTYPE, "busybox"
            t.addfile(ti)

