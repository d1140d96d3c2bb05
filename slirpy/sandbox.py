"""--enable-sandbox: lock the daemon into an empty root once its sockets and tap are in hand.

`lockdown(daemon)` is called by the daemon after every component has started (the tap fd, the API
socket, the -p listeners and the pcap file are all open) and before the first guest frame is read:

1. preimport(): import every module the daemon may still need (slirpy's own, the codecs json and
   socket use, traceback...), because nothing can be imported from disk afterwards. A meta-path
   hook installed afterwards logs any import that was missed ("late import"), so tests catch it.
2. seccomp filter built (libseccomp must be loaded from disk before the pivot) when asked.
3. enter(): unshare(CLONE_NEWNS) -- first creating a user namespace (uid/gid mapped to themselves)
   when the daemon lacks CAP_SYS_ADMIN, as an ordinary user under RootlessKit does --, make every
   mount a slave (the host's later mounts and unmounts still arrive, nothing goes back), mount a
   small tmpfs, bind into it (plan()), read-only down to every mount below:
     - /etc and /run, as slirp4netns does;
     - the directories outside them that /etc/resolv.conf's symlink chain passes through (a
       WSL-style /mnt/wsl, a NixOS /nix/store), so that DNS follows every way the host changes
       its resolver: a file rewritten or renamed over, a link re-pointed or replaced;
     - the API socket's directory read-write (the socket is unlinked there at exit),
   pivot_root into it, detach the old root, remount the tmpfs read-only, then drop every capability
   (bounding, ambient, inheritable too) except CAP_NET_BIND_SERVICE when the daemon had it before
   (root, or root in Podman's user namespace), and set no_new_privs.
4. the seccomp filter is loaded (slirpy/seccomp.py).

All through ctypes on libc: no shelling out, nothing installed.
"""

from __future__ import annotations

import ctypes
import importlib
import logging
import os
import pkgutil
import platform
import stat
import sys

from .caps import CAP_NET_BIND_SERVICE, CAP_SYS_ADMIN, drop_caps, get_caps
from .caps import check as _check
from .errors import SandboxError

log = logging.getLogger(__name__)

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_SLAVE = 1 << 19
MNT_DETACH = 2
AT_FDCWD = -100
AT_RECURSIVE = 0x8000
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID, MOUNT_ATTR_NODEV, MOUNT_ATTR_NOEXEC = 1, 2, 4, 8
SYS_MOUNT_SETATTR = 442  # the same on every architecture (added after the syscall tables merged)

SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217,
                  "i686": 217, "armv7l": 218}

TMPFS_OPTS = b"size=64k,nr_inodes=256,mode=0755"
RESOLV_CONF = "/etc/resolv.conf"
ALWAYS_VISIBLE = ("/etc", "/run")  # as slirp4netns: bound read-only

_libc = ctypes.CDLL(None, use_errno=True)  # libc is loaded; find_library("c") costs ~25 ms
_libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_void_p)
_libc.umount2.argtypes = (ctypes.c_char_p, ctypes.c_int)
_libc.unshare.argtypes = (ctypes.c_int,)


def _b(path: str) -> bytes:
    return os.fsencode(path)


def _mount(src, dst, fstype, flags: int, data, what: str) -> None:
    _check(_libc.mount(src, dst, fstype, flags, data), what)


# ---------------------------------------------------------------------------------- imports
# Imported lazily by the standard library on paths the daemon can take after the sandbox.
PREIMPORT = (
    "encodings.idna", "encodings.ascii", "encodings.latin_1", "encodings.utf_8",
    "encodings.utf_8_sig", "encodings.utf_16", "encodings.utf_16_le", "encodings.utf_16_be",
    "encodings.utf_32", "encodings.utf_32_le", "encodings.utf_32_be", "encodings.punycode",
    "stringprep", "unicodedata", "json", "json.decoder", "json.encoder", "traceback",
    "linecache", "tokenize", "ipaddress", "dataclasses", "heapq", "collections", "struct",
    "select", "errno", "signal", "socket", "trio", "trio.socket", "trio.lowlevel",
    "trio.to_thread",
)
SKIP_MODULES = {"slirpy.__main__"}


def preimport() -> list[str]:
    """Import slirpy's every module and PREIMPORT; return the names that failed to import."""
    import slirpy
    failed = []
    names = list(PREIMPORT)
    names += [m.name for m in pkgutil.walk_packages(slirpy.__path__, "slirpy.")
              if m.name not in SKIP_MODULES]
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError:
            failed.append(name)
    for enc in ("idna", "ascii", "latin-1", "utf-8", "utf-8-sig", "utf-16", "utf-16-le",
                "utf-16-be", "utf-32", "utf-32-le", "utf-32-be"):
        "x".encode(enc).decode(enc)
    return failed


class LateImportLogger:
    """A meta-path finder that only reports: an import reaching the path finders after the
    sandbox means preimport() missed a module (it then fails: there are no files)."""

    def __init__(self):
        self.seen: list[str] = []

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in self.seen and len(self.seen) < 100:
            self.seen.append(fullname)
            log.error("late import of %s inside the sandbox (not preimported)", fullname)
        return None

    def find_module(self, fullname, path=None):  # pragma: no cover - old protocol
        return None


# ---------------------------------------------------------------------------------- sandbox
def _single_threaded() -> bool:
    try:
        return len(os.listdir("/proc/self/task")) == 1
    except OSError:
        return True


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _new_mount_ns() -> bool:
    """unshare(CLONE_NEWNS), creating a user namespace first when we lack CAP_SYS_ADMIN.
    Returns True when a user namespace was created."""
    eff = get_caps()[0]
    if eff & (1 << CAP_SYS_ADMIN):
        _check(_libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
        return False
    if not _single_threaded():
        raise SandboxError("cannot create a user namespace: the daemon is already multithreaded")
    uid, gid = os.geteuid(), os.getegid()
    if _libc.unshare(CLONE_NEWUSER | CLONE_NEWNS) != 0:
        e = ctypes.get_errno()
        raise SandboxError(f"unshare(CLONE_NEWUSER|CLONE_NEWNS): {os.strerror(e)} (no "
                           "CAP_SYS_ADMIN, and unprivileged user namespaces are not allowed?)")
    try:
        _write("/proc/self/setgroups", "deny")
        _write("/proc/self/uid_map", f"{uid} {uid} 1\n")
        _write("/proc/self/gid_map", f"{gid} {gid} 1\n")
    except OSError as e:
        raise SandboxError(f"mapping uid/gid in the new user namespace: {e.strerror}") from None
    return True


def _mkdirs(root: str, path: str) -> str:
    """mkdir -p root+path (path absolute); returns the full path."""
    full = root
    for part in [p for p in path.split("/") if p]:
        full = os.path.join(full, part)
        if not os.path.isdir(full):
            os.mkdir(full, 0o755)
    return full


def resolve_chain(path: str, max_links: int = 40) -> tuple[str, list[tuple[str, str, bool]]]:
    """Follow `path` as the kernel does, one component at a time.

    Returns (final path, [(symlink, its target text, last)]) where `last` says the symlink was the
    last component of what was being resolved (resolv.conf itself, or a link to which another link
    pointed), as opposed to a directory on the way (NixOS's /etc/static, /var/run). The final path
    is where the file is or would be: a missing component ends the walk there."""
    links: list[tuple[str, str, bool]] = []
    if not path.startswith("/"):
        path = os.path.join(os.getcwd(), path)
    todo = [p for p in path.split("/") if p][::-1]
    cur = "/"
    while todo:
        comp = todo.pop()
        if comp == ".":
            continue
        if comp == "..":
            cur = os.path.dirname(cur)
            continue
        nxt = os.path.join(cur, comp)
        try:
            st = os.lstat(nxt)
        except OSError:
            return os.path.normpath(os.path.join(nxt, *todo[::-1])), links
        if not stat.S_ISLNK(st.st_mode):
            cur = nxt
            continue
        if len(links) >= max_links:
            return nxt, links
        try:
            target = os.readlink(nxt)
        except OSError:
            return nxt, links
        links.append((nxt, target, not todo))
        todo.extend([p for p in target.split("/") if p][::-1])
        if target.startswith("/"):
            cur = "/"
    return cur, links


def _under(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


def plan(config, resolv_conf: str = RESOLV_CONF) -> tuple[list[tuple[str, bool]], list[tuple[str, str]]]:
    """What the sandbox will hold: ([(absolute path to bind, read_only)] in mount order,
    [(symlink to recreate, its target)]).

    - /etc and /run, read-only, as slirp4netns binds them (tools look for them in
      /proc/PID/root; resolv.conf and its usual chain -- systemd-resolved, NetworkManager,
      resolvconf -- live there).
    - when DNS reads resolv.conf: the directories outside /etc and /run that its resolution chain
      passes through, read-only: the directory of every symlink that is a last component (the
      link itself can be re-pointed or replaced) and the directory of the final file (it can be
      renamed over). A WSL-style link to /mnt/wsl/resolv.conf binds /mnt/wsl; NixOS's
      /etc/static/resolv.conf -> /nix/store/X-etc/etc/resolv.conf -> /nix/store/Y-resolv.conf
      binds /nix/store (X-etc/etc is inside it), so a re-pointed /etc/static is followed too.
      Symlinked directories on the way (/var/run -> /run) outside those are recreated as they are.
    - the API socket's directory, read-write, last (mounted over whatever holds it).
    """
    trees = [d for d in ALWAYS_VISIBLE if os.path.isdir(d)]
    chain_dirs: list[str] = []
    files: list[str] = []
    links: list[tuple[str, str]] = []
    inter: list[tuple[str, str]] = []  # symlinked directories on the way
    needs_resolv = not config.disable_dns and not config.dns_upstreams
    if needs_resolv:
        final, chain = resolve_chain(resolv_conf)
        for link, target, last in chain:
            d = os.path.dirname(link)
            if not last:
                inter.append((link, target))
            elif d == "/":  # cannot bind /: keep the link as it is
                links.append((link, target))
            else:
                chain_dirs.append(d)
        d = os.path.dirname(final)
        if d == "/":
            if os.path.isfile(final):
                files.append(final)
        elif os.path.isdir(d):
            chain_dirs.append(d)
    api_dir = None
    if config.api_socket:
        api_dir = os.path.dirname(os.path.abspath(config.api_socket))
        if api_dir == "/":
            raise SandboxError("the API socket's directory is /: it cannot be bound into the "
                               "sandbox (put the socket in a directory of its own)")
    rw_tops = [api_dir] if api_dir else []
    # a directory bound below another bound directory is folded into it (else it would be
    # hidden, or its mount point created through the outer bind on the host)
    extra: list[str] = []
    for d in sorted(set(chain_dirs), key=len):
        if any(_under(d, t) for t in trees + extra + rw_tops):
            continue
        extra.append(d)
    covered = trees + extra + rw_tops
    files = [f for f in files if not any(_under(f, t) for t in covered)]
    for link, target in inter:
        if not any(_under(link, t) for t in covered) and (link, target) not in links:
            links.append((link, target))
    binds = [(p, True) for p in sorted(trees + extra) + files]
    if api_dir:
        binds.append((api_dir, False))
    return binds, links


def _setattr_recursive(path: bytes, attrs: int) -> bool:
    """mount_setattr(AT_RECURSIVE) (Linux 5.12): attrs on path's mount and every mount below.
    False when the kernel refuses (older kernel, seccomp): the caller remounts the top one."""
    attr = (ctypes.c_uint64 * 4)(attrs, 0, 0, 0)
    return _libc.syscall(SYS_MOUNT_SETATTR, ctypes.c_long(AT_FDCWD), path, AT_RECURSIVE, attr,
                         ctypes.sizeof(attr)) == 0


def enter(config, resolv_conf: str = RESOLV_CONF) -> dict:
    """Enter the sandbox (see the module doc). Returns a summary for the log/tests."""
    machine = platform.machine()
    if machine not in SYS_PIVOT_ROOT:
        raise SandboxError(f"pivot_root syscall number unknown for {machine}")
    had_bind_service = bool(get_caps()[0] & (1 << CAP_NET_BIND_SERVICE))
    binds, links = plan(config, resolv_conf)
    cwd = os.getcwd()
    userns = _new_mount_ns()
    # slave, as slirp4netns: mounts and unmounts made on the host later reach the binds (a
    # netns file or a user's /run/user/UID unmounted there is not kept alive here), and nothing
    # done here reaches the host
    _mount(None, b"/", None, MS_REC | MS_SLAVE, None, "making / a slave mount")
    # O_PATH fds (in the new mount namespace: a bind source must be one of its mounts) before
    # the tmpfs goes on, since it may cover where a source lives (/tmp)
    fds = []
    try:
        for path, _ro in binds:
            try:
                fds.append(os.open(path, os.O_PATH | os.O_CLOEXEC))
            except OSError as e:
                raise SandboxError(f"cannot open {path}: {e.strerror}") from None
        stage = "/tmp" if os.path.isdir("/tmp") else "/mnt"
        _mount(b"tmpfs", _b(stage), b"tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, TMPFS_OPTS,
               f"mounting tmpfs on {stage}")
        for (path, ro), fd in zip(binds, fds):
            if os.path.isdir(f"/proc/self/fd/{fd}"):
                target = _mkdirs(stage, path)
            else:
                parent = _mkdirs(stage, os.path.dirname(path))
                target = os.path.join(parent, os.path.basename(path))
                os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
            _mount(_b(f"/proc/self/fd/{fd}"), _b(target), None, MS_BIND | MS_REC, None,
                   f"bind-mounting {path}")
            locked = MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOEXEC
            if ro and _setattr_recursive(_b(target), locked | MOUNT_ATTR_RDONLY):
                continue  # read-only down to every mount below it (/run/user/UID, ...)
            flags = MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NODEV | MS_NOEXEC | (MS_RDONLY if ro else 0)
            _mount(None, _b(target), None, flags, None, f"remounting {path}")
        for link, target in links:
            parent = _mkdirs(stage, os.path.dirname(link))
            full = os.path.join(parent, os.path.basename(link))
            if not os.path.lexists(full):
                os.symlink(target, full)
        os.chdir(stage)
        _check(_libc.syscall(SYS_PIVOT_ROOT[machine], b".", b"."), "pivot_root")
        _check(_libc.umount2(b".", MNT_DETACH), "detaching the old root")
        os.chdir("/")
        _mount(None, b"/", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC,
               None, "remounting the sandbox root read-only")
    finally:
        for fd in fds:
            os.close(fd)
    try:
        os.chdir(cwd)  # a relative --api-socket path keeps working when cwd was bound
    except OSError:
        pass
    keep = (1 << CAP_NET_BIND_SERVICE) if had_bind_service else 0
    drop_caps(keep)
    return {"userns": userns, "binds": binds, "links": links, "kept_caps": keep}


def lockdown(daemon) -> None:
    """Sandbox and/or seccomp as configured. Raises SandboxError (one line) on failure."""
    cfg = daemon.config
    failed = preimport()
    if failed:
        log.info("preimport: not available: %s", ", ".join(failed))
    # keep values that are read from /proc at run time
    from .listeners import unprivileged_port_start
    unprivileged_port_start()
    filt = None
    if cfg.enable_seccomp:
        from . import seccomp
        try:
            filt = seccomp.build()
        except seccomp.SeccompError as e:
            raise SandboxError(f"--enable-seccomp: {e}") from None
    done = []
    if cfg.enable_sandbox:
        try:
            info = enter(cfg)
        except SandboxError as e:
            raise SandboxError(f"--enable-sandbox: {e}") from None
        hook = LateImportLogger()
        sys.meta_path.insert(0, hook)
        daemon.late_imports = hook.seen
        # what DNS can still follow in here (dns.py names it when resolv.conf leads elsewhere)
        daemon.sandbox_paths = [p for p, _ro in info["binds"]] + [ln for ln, _t in info["links"]]
        done.append("sandbox (%s%s%s; kept caps %#x)" % (
            "own user namespace, " if info["userns"] else "",
            ", ".join(("ro " if ro else "rw ") + p for p, ro in info["binds"]) or "nothing bound",
            "".join(f", link {ln} -> {t}" for ln, t in info["links"]),
            info["kept_caps"]))
    if filt is not None:
        try:
            filt.load()
        except seccomp.SeccompError as e:
            raise SandboxError(f"--enable-seccomp: {e}") from None
        done.append(f"seccomp filter ({filt.rules} rules)")
    log.info("lockdown: %s", ", ".join(done))
