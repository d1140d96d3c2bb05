"""The helper: a forked child enters the target's user+net namespaces, creates the tap, optionally
configures it, and hands the fd back over a socketpair (SCM_RIGHTS). The parent never setns()es.

Protocol on the socketpair: the child sends one message, either b"OK" with the tap fd attached,
or b"ERR <one line>". Then it _exit()s.
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


def _child(config, sock: socket.socket) -> None:
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
    except HelperError as e:
        sock.sendall(b"ERR " + str(e).replace("\n", " ").encode(errors="replace"))
    except BaseException as e:  # noqa: BLE001 - anything else still becomes one line
        sock.sendall(f"ERR helper: {type(e).__name__}: {e}".replace("\n", " ").encode(errors="replace"))


class PendingTap:
    """A forked helper at work; wait() returns (tap fd (non-blocking), offload flags or -1 for
    no virtio-net header) or raises HelperError with one line."""

    def __init__(self, pid: int, sock: socket.socket):
        self.pid, self.sock = pid, sock

    def wait(self) -> tuple[int, int]:
        try:
            msg, fds, _flags, _addr = socket.recv_fds(self.sock, 4096, 4)
        finally:
            self.sock.close()
            os.waitpid(self.pid, 0)
        if msg.startswith(b"OK") and len(fds) == 1:
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


def start_helper(config) -> PendingTap:
    """Fork the helper and return at once, so the parent can do its own start-up work (imports,
    the stack) on the other core while the child joins the namespaces and configures the tap."""
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            parent.close()
            _child(config, child)
        except BaseException:  # noqa: BLE001
            code = 1
        finally:
            os._exit(code)
    child.close()
    return PendingTap(pid, parent)


def open_tap(config) -> tuple[int, int]:
    """start_helper(config).wait()"""
    return start_helper(config).wait()
