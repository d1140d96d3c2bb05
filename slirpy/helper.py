"""The helper: a forked child enters the target's user+net namespaces, creates the tap, optionally
configures it, and hands the fd back over a socketpair (SCM_RIGHTS). The parent never setns()es.

Protocol on the socketpair: the child sends one message, either b"OK" with the tap fd attached,
or b"ERR <one line>". Without forward splicing (splice_wanted(config) false) it then _exit()s.

With it, the same child stays as the connector of spliced port forwards (slirpy/splice.py,
docs/forwarding.md): it closes every other fd, locks itself down (_lockdown()), sends
b"READY <what it kept>" (or b"LOCKDOWN <why>", and exits) and then serves requests, one
SEQPACKET message each, until the socketpair's EOF:
    request  REQ.pack(id, family 4|6, guest address (16 bytes, IPv4 in the first 4), guest port)
    reply    REP.pack(id, errno): 0 with the fd of a non-blocking TCP socket, bound to the guest
             address (port 0), whose connect() to guest:port has been started; else the errno
             of bind()/connect() and no fd.
It never blocks on the network: the parent waits for the connect to complete.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import struct

CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000

# the symbols already loaded (libc's among them): ctypes.util.find_library("c") would run
# ldconfig or a compiler, ~25 ms of every start
_libc = ctypes.CDLL(None, use_errno=True)


class HelperError(Exception):
    pass


def setns(fd: int, nstype: int) -> None:
    if _libc.setns(fd, nstype) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def unshare(flags: int) -> None:
    if _libc.unshare(flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def _same_ns(a: str, b: str) -> bool:
    sa, sb = os.stat(a), os.stat(b)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def _ns_paths(config) -> tuple[str | None, str]:
    """(userns path to join or None, netns path)."""
    if config.netns_type == "pid":
        pid = config.target
        netns = f"/proc/{pid}/ns/net"
        if not os.path.exists(f"/proc/{pid}"):
            raise HelperError(f"no such process: PID {pid}")
        userns = f"/proc/{pid}/ns/user"
        try:
            if _same_ns(userns, "/proc/self/ns/user"):
                userns = None
        except OSError as e:
            raise HelperError(f"cannot inspect {userns}: {e.strerror}") from None
        return userns, netns
    userns = config.userns_path
    if userns:
        try:
            if _same_ns(userns, "/proc/self/ns/user"):
                userns = None  # setns() into our own user namespace would fail with EINVAL
        except OSError as e:
            raise HelperError(f"cannot open user namespace {userns}: {e.strerror}") from None
    return userns, config.target


def _join(path: str, nstype: int, what: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise HelperError(f"cannot open {what} namespace {path}: {e.strerror}") from None
    try:
        setns(fd, nstype)
    except OSError as e:
        hint = " (not a network namespace?)" if e.errno == errno.EINVAL else ""
        raise HelperError(f"cannot join {what} namespace {path}: {e.strerror}{hint}") from None
    finally:
        os.close(fd)


# linux/if_tun.h
TUNSETIFF = 0x400454CA
TUNGETFEATURES = 0x800454CF
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
IFF_TAP, IFF_NO_PI, IFF_VNET_HDR = 0x0002, 0x1000, 0x4000
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN = 0x01, 0x02, 0x04, 0x08
TUN_F_UFO, TUN_F_USO4, TUN_F_USO6 = 0x10, 0x20, 0x40
TXQUEUELEN = 1000  # the tap's queue toward slirpy (frames); tun's default, set explicitly
VNET_HDR_LEN = 10  # struct virtio_net_hdr (no num_buffers)
# What we ask for, best first: the kernel refuses flags it does not know (EINVAL), so step down.
# UFO/USO are not requested: slirpy does not split guest UDP super-packets (yet), and without
# them the guest's kernel segments UDP itself.
OFFLOAD_STEPS = (TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN,
                 TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6,
                 TUN_F_CSUM | TUN_F_TSO4,
                 TUN_F_CSUM,
                 0)


def vnet_wanted() -> bool:
    """SLIRPY_VNET_HDR=0 in the environment turns the virtio-net header path off (plain frames)."""
    return os.environ.get("SLIRPY_VNET_HDR", "1") != "0"


def set_offload(fd: int, ioctl=None) -> int:
    """TUNSETOFFLOAD with the best flag set the kernel accepts; returns the flags set."""
    import fcntl
    ioctl = ioctl or fcntl.ioctl
    for flags in OFFLOAD_STEPS:
        try:
            ioctl(fd, TUNSETOFFLOAD, flags)
            return flags
        except OSError:
            continue
    return 0


def _tunsetiff(name: str, flags: int) -> int:
    """TUNSETIFF through python-pytun: the tap device named ``name`` exists from this call on, for
    as long as the returned fd (our own dup, close-on-exec; pytun's object is closed) is open.
    OSError when refused (pytun.Error carries the errno as its first argument)."""
    import pytun  # a C extension: ~0.3 ms to import
    try:
        dev = pytun.TunTapDevice(name=name, flags=flags)
    except pytun.Error as e:
        code = e.args[0] if e.args and isinstance(e.args[0], int) else 0
        raise OSError(code, os.strerror(code) if code else str(e)) from None
    try:
        return os.dup(dev.fileno())
    finally:
        dev.close()


def _create_tap(name: str, vnet: bool = True) -> tuple[int, int]:
    """-> (fd, offload flags or -1 when the fd carries no virtio-net header)."""
    if not os.path.exists("/dev/net/tun"):
        raise HelperError("/dev/net/tun does not exist (load the tun module or bind-mount it)")
    fd = None
    if vnet:
        try:
            fd = _tunsetiff(name, IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
        except OSError:
            fd = None  # a kernel without IFF_VNET_HDR: plain frames below
        if fd is not None:
            import fcntl
            try:
                fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_LEN))
            except OSError:
                pass  # 10 is the default
            return fd, set_offload(fd)
    try:
        fd = _tunsetiff(name, IFF_TAP | IFF_NO_PI)
    except OSError as e:
        code = e.errno
        msg = os.strerror(code) if code else str(e)
        if code in (errno.EBUSY, errno.EINVAL):
            msg += f" (does {name!r} already exist?)"
        raise HelperError(f"cannot create tap {name!r}: {msg}") from None
    return fd, -1


GUEST_IPV6_TOKEN = "::100"  # SLAAC gives fd00::100, the IPv6 twin of 10.0.2.100


def _sysctl6(tap: str, name: str, value: str) -> None:
    # /proc/sys/net is the calling task's network namespace: ours is the guest's by now
    path = f"/proc/sys/net/ipv6/conf/{tap}/{name}"
    try:
        with open(path, "w") as f:
            f.write(value)
    except FileNotFoundError:
        raise HelperError(f"-6: {path} does not exist (IPv6 disabled in the kernel or on "
                          f"{tap}?)") from None
    except OSError as e:
        raise HelperError(f"-6: cannot write {path}: {e.strerror}") from None


def _configure_ipv6(nl, idx: int, tap: str) -> None:
    """Leave the guest ready for SLAAC from our router advertisements, before the link goes up:
    IPv6 on, RAs accepted even if someone turns forwarding on (accept_ra=2), no DAD (nothing
    else is on this link; DAD would hold the link-local address, hence the first RS, and then
    the SLAAC address for a second each), and the interface token ::100 so the SLAAC address is
    fd00::100 (predictable, and the default target of IPv6 port forwards)."""
    _sysctl6(tap, "disable_ipv6", "0")
    _sysctl6(tap, "accept_dad", "0")
    _sysctl6(tap, "accept_ra", "2")
    try:
        _sysctl6(tap, "router_solicitation_delay", "0")
    except HelperError:
        pass  # an old kernel without it: the first RS comes up to a second later, that is all
    nl.set_link(idx, ipv6_token=socket.inet_pton(socket.AF_INET6, GUEST_IPV6_TOKEN),
                what="IPv6 token")


def _configure(config, nl) -> None:
    """-c over rtnetlink (``nl``: a slirpy.rtnl.Rtnl opened in the guest's namespace before the
    tap was created, so that the tap gets all this within a millisecond of appearing): lo up;
    MAC, MTU, txqueuelen; (IPv6 SLAAC setup); link up; CIDR base+100; default route via base+2."""
    from .rtnl import NetlinkError
    tap = config.tap_name
    try:
        try:
            lo = socket.if_nametoindex("lo")
        except OSError:
            lo = None
        if lo is not None:
            nl.set_link(lo, up=True, what="lo up")
        idx = socket.if_nametoindex(tap)
        mac = bytes.fromhex(config.macaddress.replace(":", "")) if config.macaddress else None
        nl.set_link(idx, mac=mac, mtu=config.mtu, txqlen=TXQUEUELEN, what="MAC, MTU, txqueuelen")
        if config.enable_ipv6:
            _configure_ipv6(nl, idx, tap)
        nl.set_link(idx, up=True, what="link up")
        nl.add_addr4(idx, config.guest.packed, config.prefixlen, what=f"address {config.guest}")
        nl.add_default_route4(idx, config.gateway.packed, what=f"default route via {config.gateway}")
    except NetlinkError as e:
        raise HelperError(f"configuring {tap}: {e.strerror}") from None


def splice_wanted(config) -> bool:
    """Whether the helper stays as the forward splice connector: TCP forwards can exist (-p
    with a TCP forward, or an API socket that may add some) and --disable-forward-splice is off."""
    if getattr(config, "disable_forward_splice", False):
        return False
    return bool(config.api_socket) or any(p.proto == "tcp" for p in getattr(config, "ports", ()))


def _child(config, sock: socket.socket, ppid: int = 0) -> None:
    fd = -1
    try:
        userns, netns = _ns_paths(config)
        if userns:
            _join(userns, CLONE_NEWUSER, "user")
        _join(netns, CLONE_NEWNET, "network")
        nl = None
        if config.configure:
            from .rtnl import Rtnl
            nl = Rtnl()  # before the tap: it appears, and is configured a few syscalls later
        fd, offload = _create_tap(config.tap_name, vnet_wanted())
        if nl is not None:
            _configure(config, nl)
            nl.close()
        socket.send_fds(sock, [b"OK %d" % offload], [fd])
        os.close(fd)  # the parent's copy is the tap's only one from here on
        fd = -1
        if ppid and splice_wanted(config):
            _connector(config, sock, ppid)
    except HelperError as e:
        sock.sendall(b"ERR " + str(e).replace("\n", " ").encode(errors="replace"))
    except BaseException as e:  # noqa: BLE001 - anything else still becomes one line
        sock.sendall(f"ERR helper: {type(e).__name__}: {e}".replace("\n", " ").encode(errors="replace"))
    finally:
        if fd >= 0:
            os.close(fd)


# ---------------------------------------------------------------------- the splice connector
REQ = struct.Struct("!IB16sH")  # id, family (4 or 6), guest address, guest port
REP = struct.Struct("!Ii")  # id, errno (0: the fd is attached)
PR_SET_PDEATHSIG = 1


class _LockdownFailed(Exception):
    pass


def _prctl(what: str, *args) -> None:
    args = tuple(args) + (0,) * (5 - len(args))
    if _libc.prctl(*[ctypes.c_ulong(a) for a in args]) != 0:
        e = ctypes.get_errno()
        raise _LockdownFailed(f"{what}: {os.strerror(e)}")


def _close_other_fds(keep: int) -> None:
    """Every fd but ``keep``: the fork inherited the parent's (its ready and exit fds, stdio
    pipes a caller may read to EOF); stdin/stdout/stderr become /dev/null."""
    null = os.open("/dev/null", os.O_RDWR)
    for i in range(3):
        if i != null:
            os.dup2(null, i)
    fds = []
    for name in os.listdir("/proc/self/fd"):
        n = int(name)
        if n > 2 and n != keep:
            fds.append(n)
    for n in fds:
        try:
            os.close(n)
        except OSError:
            pass  # the directory's own fd, gone already


def _empty_root() -> None:
    """--enable-sandbox: a mount namespace of its own whose root is an empty read-only tmpfs
    (the connector opens no file: sockets only)."""
    from . import sandbox
    sandbox._new_mount_ns()  # CAP_SYS_ADMIN in the container's user namespace, else a new one
    sandbox._mount(None, b"/", None, sandbox.MS_REC | sandbox.MS_SLAVE, None, "making / a slave")
    stage = b"/tmp" if os.path.isdir("/tmp") else b"/mnt"
    sandbox._mount(b"tmpfs", stage, b"tmpfs", sandbox.MS_NOSUID | sandbox.MS_NODEV |
                   sandbox.MS_NOEXEC, b"size=4k,nr_inodes=4,mode=0555", "mounting a tmpfs")
    os.chdir(stage)
    import platform
    nr = sandbox.SYS_PIVOT_ROOT.get(platform.machine())
    if nr is None:
        raise _LockdownFailed(f"pivot_root: unknown on {platform.machine()}")
    sandbox._check(_libc.syscall(nr, b".", b"."), "pivot_root")
    sandbox._check(_libc.umount2(b".", sandbox.MNT_DETACH), "detaching the old root")
    os.chdir("/")
    sandbox._mount(None, b"/", None, sandbox.MS_REMOUNT | sandbox.MS_BIND | sandbox.MS_RDONLY |
                   sandbox.MS_NOSUID | sandbox.MS_NODEV | sandbox.MS_NOEXEC, None,
                   "remounting the root read-only")


def _lockdown(config, sock: socket.socket, ppid: int) -> str:
    """Lock the connector down (docs/lockdown.md); returns what it kept, for the parent's log.
    Raises _LockdownFailed (or OSError) when a step fails: the connector then exits.
    It runs right after the tap fd went, beside the daemon's own start-up (about a millisecond
    without the flags), so that the connector is READY when the loop takes its first client:
    a forward's first connection is not later than on the tap path."""
    import fcntl  # noqa: F401 - _lo_up's, loaded while there are files
    done = ["fds: the socketpair only"]
    filt = None
    if config.enable_seccomp:
        from . import seccomp
        try:
            filt = seccomp.build()  # libseccomp is loaded now, before the root is emptied
        except seccomp.SeccompError as e:
            raise _LockdownFailed(f"seccomp: {e}") from None
    if config.enable_sandbox:
        try:
            _empty_root()
        except Exception as e:  # noqa: BLE001 - SandboxError, OSError: one line
            raise _LockdownFailed(f"empty root: {e}") from None
        done.append("root: an empty read-only tmpfs")
    from .caps import drop_caps
    drop_caps(0, keep_bounding=0)  # every set empty, no_new_privs
    done.append("no capabilities, no_new_privs")
    if filt is not None:
        from . import seccomp
        try:
            filt.load()
        except seccomp.SeccompError as e:
            raise _LockdownFailed(f"seccomp: {e}") from None
        done.append(f"seccomp ({filt.rules} rules)")
    # last: a credential change (setns into the user namespace, capset) clears it
    _prctl("PR_SET_PDEATHSIG", PR_SET_PDEATHSIG, 9)
    if os.getppid() != ppid:
        raise _LockdownFailed("the daemon is gone")
    return ", ".join(done)


SIOCGIFFLAGS, IFF_UP = 0x8913, 0x1


def _lo_up() -> bool:
    """A connection to the namespace's own address goes through lo: with lo down its SYN is
    dropped and connect() hangs (the tap path still works then)."""
    import fcntl  # loaded already (_create_tap)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        flags = struct.unpack_from("H", fcntl.ioctl(s, SIOCGIFFLAGS, struct.pack("16sH14x", b"lo", 0)), 16)[0]
        return bool(flags & IFF_UP)
    except OSError:
        return False
    finally:
        s.close()


def _connect(req: bytes) -> tuple[int, int, socket.socket | None]:
    """One request -> (id, errno, socket or None)."""
    rid, fam, addr, port = REQ.unpack(req)
    if not _lo_up():
        return rid, errno.ENETDOWN, None
    if fam == 4:
        af, host = socket.AF_INET, socket.inet_ntop(socket.AF_INET, addr[:4])
    else:
        af, host = socket.AF_INET6, socket.inet_ntop(socket.AF_INET6, addr)
    try:
        s = socket.socket(af, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    except OSError as e:
        return rid, e.errno or errno.EIO, None
    try:
        # the guest sees the connection come from its own address: "from inside this namespace,
        # through slirpy's forwarder", never from 127.0.0.1 (docs/forwarding.md)
        s.bind((host, 0))
        err = s.connect_ex((host, port))
    except OSError as e:
        s.close()
        return rid, e.errno or errno.EIO, None
    if err not in (0, errno.EINPROGRESS):
        s.close()
        return rid, err, None
    return rid, 0, s


def _connector(config, sock: socket.socket, ppid: int) -> None:
    try:
        _close_other_fds(sock.fileno())  # the ready fd's copy, the caller's stdio
        kept = _lockdown(config, sock, ppid)
    except Exception as e:  # noqa: BLE001 - any step: one line to the parent, then exit
        try:
            sock.send(b"LOCKDOWN " + str(e).replace("\n", " ").encode(errors="replace")[:500])
        except OSError:
            pass
        return
    try:
        sock.send(b"READY " + kept.encode())
        while True:
            req = sock.recv(64)
            if len(req) != REQ.size:
                return  # EOF (the daemon closed its end, or is gone), or not our protocol
            rid, err, s = _connect(req)
            if s is None:
                sock.send(REP.pack(rid, err))
                continue
            try:
                socket.send_fds(sock, [REP.pack(rid, 0)], [s.fileno()])
            finally:
                s.close()
    except OSError:
        return  # the daemon's end is gone


class PendingTap:
    """A forked helper at work; wait() returns (tap fd (non-blocking), offload flags or -1 for
    no virtio-net header) or raises HelperError with one line."""

    def __init__(self, pid: int, sock: socket.socket, stays: bool = False):
        self.pid, self.sock, self.stays = pid, sock, stays
        self.connector: tuple[int, socket.socket] | None = None

    def wait(self) -> tuple[int, int]:
        """When the helper stays as the splice connector (splice_wanted), ``self.connector``
        is (its pid, the socketpair's end) afterwards: the daemon's (slirpy/splice.py)."""
        ok = False
        try:
            msg, fds, _flags, _addr = socket.recv_fds(self.sock, 4096, 4)
            ok = msg.startswith(b"OK") and len(fds) == 1
        finally:
            if ok and self.stays:
                self.connector = (self.pid, self.sock)
            else:
                self.sock.close()
                os.waitpid(self.pid, 0)
        if ok:
            os.set_blocking(fds[0], False)
            try:
                offload = int(msg[3:] or b"-1")
            except ValueError:
                offload = -1
            return fds[0], offload
        for fd in fds:
            os.close(fd)
        if msg.startswith(b"ERR "):
            raise HelperError(msg[4:].decode(errors="replace"))
        raise HelperError("helper died without a reply")


    def abandon(self) -> None:
        """Start-up failed elsewhere: let the helper finish, close the fd it sends."""
        try:
            _msg, fds, _flags, _addr = socket.recv_fds(self.sock, 4096, 4)
            for fd in fds:
                os.close(fd)
        except OSError:
            pass
        finally:
            self.sock.close()
            os.waitpid(self.pid, 0)


    def close_connector(self) -> None:
        """Start-up failed after the tap came: the connector ends at the socketpair's EOF."""
        if self.connector is not None:
            pid, sock = self.connector
            self.connector = None
            sock.close()
            os.waitpid(pid, 0)


def start_helper(config) -> PendingTap:
    """Fork the helper and return at once, so the parent can do its own start-up work (imports,
    the stack) on the other core while the child joins the namespaces and configures the tap."""
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ppid = os.getpid()
    stays = splice_wanted(config)
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            parent.close()
            _child(config, child, ppid)
        except BaseException:  # noqa: BLE001
            code = 1
        finally:
            os._exit(code)
    child.close()
    return PendingTap(pid, parent, stays)


def open_tap(config) -> tuple[int, int]:
    """start_helper(config).wait()"""
    return start_helper(config).wait()
