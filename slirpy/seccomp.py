"""--enable-seccomp: a syscall filter for the daemon, built with libseccomp through ctypes.

Why libseccomp through ctypes: libseccomp (libseccomp2) is the maintained library every container
runtime uses and is on every Debian machine (apt itself depends on it); it knows each
architecture's syscall numbers and emits the architecture check, so the filter is not a hand-kept
table of numbers. Its Python binding (python3-seccomp) exists only for Debian's own interpreter
and the PyPI bindings are stale (pyseccomp, last release 2021) or forks, so this module declares
the dozen C functions it needs itself.

The filter (default: allow -- the daemon's needs are broad and Python's are hard to enumerate):
- syscalls a network daemon never needs after setup fail with EPERM (DENY_EPERM): running
  programs, new processes, tracing or reading other processes, mounts and namespaces, modules,
  kexec, reboot, swap, clock and hostname changes, keyrings, bpf, perf, userfaultfd, io_uring
  (its requests would bypass this filter), handle-based opens;
- clone() without CLONE_THREAD fails with EPERM (threads still work: trio.to_thread);
  clone3() fails with ENOSYS so that libc falls back to clone(), whose flags can be checked;
- socket() for any family but AF_UNIX, AF_INET and AF_INET6 fails with EAFNOSUPPORT;
- ioctl(TIOCSTI) and ioctl(TIOCLINUX) fail with EPERM (no typing into a terminal on stderr);
- a syscall from another architecture's ABI (i386's int 0x80 or x32 on x86_64) kills the
  process (libseccomp's architecture check, SCMP_FLTATR_ACT_BADARCH).
EPERM rather than a kill for the deny list: a refused call becomes a Python exception that the
daemon logs, and an attacker gains nothing either way.

`build()` loads libseccomp and prepares the filter (before the sandbox hides the library file);
`Filter.load()` installs it on every thread (TSYNC) with no_new_privs set.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import socket

SCMP_ACT_KILL_PROCESS = 0x80000000
SCMP_ACT_ALLOW = 0x7FFF0000


def SCMP_ACT_ERRNO(e: int) -> int:
    return 0x00050000 | (e & 0xFFFF)


SCMP_FLTATR_ACT_BADARCH = 2
SCMP_FLTATR_CTL_NNP = 3
SCMP_FLTATR_CTL_TSYNC = 4

SCMP_CMP_NE, SCMP_CMP_LT, SCMP_CMP_LE, SCMP_CMP_EQ, SCMP_CMP_GE, SCMP_CMP_GT = 1, 2, 3, 4, 5, 6
SCMP_CMP_MASKED_EQ = 7
NR_SCMP_ERROR = -1

CLONE_THREAD = 0x00010000
TIOCSTI = 0x5412
TIOCLINUX = 0x541C

DENY_EPERM = (
    # running programs, new processes
    "execve", "execveat", "fork", "vfork",
    # tracing and reading other processes
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd", "process_madvise",
    # mounts, roots, namespaces, handle-based opens
    "mount", "umount", "umount2", "pivot_root", "chroot", "unshare", "setns", "fsopen",
    "fsconfig", "fsmount", "fspick", "move_mount", "open_tree", "mount_setattr",
    "name_to_handle_at", "open_by_handle_at",
    # kernel modules, kexec, reboot
    "init_module", "finit_module", "delete_module", "create_module", "kexec_load",
    "kexec_file_load", "reboot",
    # swap, quotas, accounting, clocks, host identity
    "swapon", "swapoff", "quotactl", "quotactl_fd", "acct", "settimeofday", "clock_settime",
    "clock_adjtime", "adjtimex", "stime", "sethostname", "setdomainname",
    # keyrings, bpf, perf, userfaultfd, io_uring
    "add_key", "request_key", "keyctl", "bpf", "perf_event_open", "userfaultfd",
    "io_uring_setup", "io_uring_enter", "io_uring_register",
    # raw port I/O, kernel log, legacy
    "iopl", "ioperm", "syslog", "uselib", "_sysctl", "vhangup", "lookup_dcookie", "nfsservctl",
)
ALLOWED_FAMILIES = (socket.AF_UNIX, socket.AF_INET, socket.AF_INET6)
# architectures where clone()'s first argument is the flags (s390 swaps the first two)
CLONE_FLAGS_ARG0 = {"x86_64", "aarch64", "riscv64", "ppc64le", "i686", "armv7l"}


class SeccompError(Exception):
    """One line: what failed."""


class _ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("datum_a", ctypes.c_uint64),
                ("datum_b", ctypes.c_uint64)]


class _Version(ctypes.Structure):
    _fields_ = [("major", ctypes.c_uint), ("minor", ctypes.c_uint), ("micro", ctypes.c_uint)]


_lib = None


def _load():
    global _lib
    if _lib is not None:
        return _lib
    # the usual soname first: find_library() runs ldconfig or a compiler (~25 ms of start-up)
    name = "libseccomp.so.2"
    try:
        lib = ctypes.CDLL(name, use_errno=True)
    except OSError:
        from ctypes.util import find_library
        name = find_library("seccomp") or name
        try:
            lib = ctypes.CDLL(name, use_errno=True)
        except OSError as e:
            raise SeccompError(f"cannot load libseccomp ({name}): {e} (install libseccomp2)") from None
    lib.seccomp_init.argtypes = (ctypes.c_uint32,)
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_release.argtypes = (ctypes.c_void_p,)
    lib.seccomp_release.restype = None
    lib.seccomp_attr_set.argtypes = (ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32)
    lib.seccomp_syscall_resolve_name.argtypes = (ctypes.c_char_p,)
    lib.seccomp_syscall_resolve_name.restype = ctypes.c_int
    lib.seccomp_rule_add_array.argtypes = (ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                           ctypes.c_uint, ctypes.POINTER(_ArgCmp))
    lib.seccomp_load.argtypes = (ctypes.c_void_p,)
    lib.seccomp_export_pfc.argtypes = (ctypes.c_void_p, ctypes.c_int)
    lib.seccomp_export_bpf.argtypes = (ctypes.c_void_p, ctypes.c_int)
    lib.seccomp_version.restype = ctypes.POINTER(_Version)
    _lib = lib
    return lib


def libseccomp_version() -> str:
    v = _load().seccomp_version().contents
    return f"{v.major}.{v.minor}.{v.micro}"


class Filter:
    def __init__(self):
        self.lib = _load()
        self.ctx = self.lib.seccomp_init(SCMP_ACT_ALLOW)
        if not self.ctx:
            raise SeccompError("seccomp_init failed")
        self.rules = 0
        self._attr(SCMP_FLTATR_ACT_BADARCH, SCMP_ACT_KILL_PROCESS)
        self._attr(SCMP_FLTATR_CTL_NNP, 1)
        self._attr(SCMP_FLTATR_CTL_TSYNC, 1)

    def _attr(self, attr: int, value: int) -> None:
        rc = self.lib.seccomp_attr_set(self.ctx, attr, value)
        if rc < 0:
            raise SeccompError(f"seccomp_attr_set({attr}): {os.strerror(-rc)}")

    def rule(self, action: int, name: str, *cmps: tuple[int, int, int, int]) -> bool:
        """Add a rule; False when the syscall does not exist on this architecture."""
        nr = self.lib.seccomp_syscall_resolve_name(name.encode())
        if nr == NR_SCMP_ERROR:
            return False
        arr = (_ArgCmp * max(1, len(cmps)))(*[_ArgCmp(*c) for c in cmps])
        rc = self.lib.seccomp_rule_add_array(self.ctx, action, nr, len(cmps), arr)
        if rc < 0:
            if nr < 0:  # a pseudo-syscall (not on this architecture) libseccomp will not filter
                return False
            raise SeccompError(f"seccomp_rule_add({name}): {os.strerror(-rc)}")
        self.rules += 1
        return True

    def export_pfc(self, fd: int) -> None:
        rc = self.lib.seccomp_export_pfc(self.ctx, fd)
        if rc < 0:
            raise SeccompError(f"seccomp_export_pfc: {os.strerror(-rc)}")

    def load(self) -> None:
        rc = self.lib.seccomp_load(self.ctx)
        if rc < 0:
            raise SeccompError(f"seccomp_load: {os.strerror(-rc)}")

    def release(self) -> None:
        if self.ctx:
            self.lib.seccomp_release(self.ctx)
            self.ctx = None


def build() -> Filter:
    """The daemon's filter, ready to load()."""
    f = Filter()
    eperm = SCMP_ACT_ERRNO(errno.EPERM)
    for name in DENY_EPERM:
        f.rule(eperm, name)
    if platform.machine() in CLONE_FLAGS_ARG0:
        f.rule(eperm, "clone", (0, SCMP_CMP_MASKED_EQ, CLONE_THREAD, 0))
        f.rule(SCMP_ACT_ERRNO(errno.ENOSYS), "clone3")
    # socket(): only the families the daemon uses
    nosupport = SCMP_ACT_ERRNO(errno.EAFNOSUPPORT)
    top = max(ALLOWED_FAMILIES)
    f.rule(nosupport, "socket", (0, SCMP_CMP_GT, top, 0))
    for fam in range(top):
        if fam not in ALLOWED_FAMILIES:
            f.rule(nosupport, "socket", (0, SCMP_CMP_EQ, fam, 0))
    for req in (TIOCSTI, TIOCLINUX):
        f.rule(eperm, "ioctl", (1, SCMP_CMP_MASKED_EQ, 0xFFFFFFFF, req))
    return f
