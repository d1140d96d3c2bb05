"""Linux capabilities through libc, for both lockdowns: sandbox.py's (the daemon keeps
CAP_NET_BIND_SERVICE when it had it) and the splice connector's in helper.py (it keeps none).
ctypes only, no other slirpy import but errors.py: the connector, a fork of the early
interpreter locking itself down beside the daemon's start-up, would otherwise pay sandbox.py's
imports (logging, pkgutil: ~16 ms) for these few calls.
"""

from __future__ import annotations

import ctypes
import errno
import os

from .errors import SandboxError

PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4

CAP_NET_BIND_SERVICE = 10
CAP_SYS_ADMIN = 21
_LINUX_CAPABILITY_VERSION_3 = 0x20080522

_libc = ctypes.CDLL(None, use_errno=True)  # libc is loaded; find_library("c") costs ~25 ms
_libc.prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                        ctypes.c_ulong)


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def check(ret: int, what: str) -> None:
    """A libc call's non-zero return as SandboxError("what: strerror")."""
    if ret != 0:
        e = ctypes.get_errno()
        raise SandboxError(f"{what}: {os.strerror(e)}")


def get_caps() -> tuple[int, int, int]:
    """(effective, permitted, inheritable) as 64-bit masks."""
    hdr = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    check(_libc.capget(ctypes.byref(hdr), data), "capget")
    eff, prm, inh = (getattr(data[0], f) | (getattr(data[1], f) << 32)
                     for f in ("effective", "permitted", "inheritable"))
    return eff, prm, inh


def set_caps(effective: int, permitted: int, inheritable: int) -> None:
    hdr = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    for i in (0, 1):
        sh = 32 * i
        data[i].effective = (effective >> sh) & 0xFFFFFFFF
        data[i].permitted = (permitted >> sh) & 0xFFFFFFFF
        data[i].inheritable = (inheritable >> sh) & 0xFFFFFFFF
    check(_libc.capset(ctypes.byref(hdr), data), "capset")


def drop_caps(keep: int, keep_bounding: int = 1 << CAP_NET_BIND_SERVICE) -> None:
    """Keep only the capabilities in mask `keep` (effective and permitted) and those in
    `keep_bounding` in the bounding set; empty the ambient and inheritable sets; set
    no_new_privs."""
    if _libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) != 0:
        e = ctypes.get_errno()
        if e != errno.EINVAL:  # EINVAL: kernel without ambient capabilities
            raise SandboxError(f"prctl(PR_CAP_AMBIENT_CLEAR_ALL): {os.strerror(e)}")
    for cap in range(64):
        if keep_bounding >> cap & 1:
            continue
        if _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            e = ctypes.get_errno()
            if e == errno.EINVAL:  # past the last capability this kernel knows
                break
            raise SandboxError(f"prctl(PR_CAPBSET_DROP, {cap}): {os.strerror(e)}")
    set_caps(keep, keep, 0)
    check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
