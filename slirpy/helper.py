"""The helper: a forked child enters the target's user+net namespaces, creates the tap, optionally
configures it, and hands the fd back over a socketpair (SCM_RIGHTS). The parent never setns()es.

Protocol on the socketpair: the child sends one message, either b"OK" with the tap fd attached,
or b"ERR <one line>". Then it _exit()s.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import socket
import struct

CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


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
    import fcntl
    import struct
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), flags))
    except OSError:
        os.close(fd)
        raise
    return fd


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
            import struct
            try:
                fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_LEN))
            except OSError:
                pass  # 10 is the default
            return fd, set_offload(fd)
    try:
        fd = _tunsetiff(name, IFF_TAP | IFF_NO_PI)
    except OSError as e:
        msg = e.strerror or str(e)
        if e.errno in (errno.EBUSY, errno.EINVAL):
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


def _configure_ipv6(ipr, idx: int, tap: str) -> None:
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
    ipr.link("set", index=idx, IFLA_AF_SPEC={"attrs": [
        ("AF_INET6", {"attrs": [("IFLA_INET6_TOKEN", GUEST_IPV6_TOKEN)]})]})


# linux/sockios.h; struct ifreq is 16 bytes of name + a 24-byte union
SIOCGIFFLAGS, SIOCSIFFLAGS, SIOCSIFADDR, SIOCSIFNETMASK = 0x8913, 0x8914, 0x8916, 0x891C
SIOCSIFMTU, SIOCSIFHWADDR, SIOCSIFTXQLEN, SIOCADDRT = 0x8922, 0x8924, 0x8943, 0x890B
IFF_UP, RTF_UP, RTF_GATEWAY, ARPHRD_ETHER = 0x1, 0x1, 0x2, 1


class _Sockaddr(ctypes.Structure):
    _fields_ = [("sa_family", ctypes.c_ushort), ("sa_data", ctypes.c_char * 14)]


class _Rtentry(ctypes.Structure):  # struct rtentry (linux/route.h), the native layout
    _fields_ = [("rt_pad1", ctypes.c_ulong), ("rt_dst", _Sockaddr), ("rt_gateway", _Sockaddr),
                ("rt_genmask", _Sockaddr), ("rt_flags", ctypes.c_ushort),
                ("rt_pad2", ctypes.c_short), ("rt_pad3", ctypes.c_ulong),
                ("rt_pad4", ctypes.c_void_p), ("rt_metric", ctypes.c_short),
                ("rt_dev", ctypes.c_char_p), ("rt_mtu", ctypes.c_ulong),
                ("rt_window", ctypes.c_ulong), ("rt_irtt", ctypes.c_ushort)]


def _sin(addr) -> bytes:
    """struct sockaddr_in for an IPv4Address (16 bytes)."""
    return struct.pack("=HH4s8x", socket.AF_INET, 0, addr.packed)


def _configure_ioctl(config) -> None:
    """The IPv4 configuration with the classic ioctls, as slirp4netns does: no netlink library
    to import (pyroute2 alone takes ~100 ms of the start-to-ready time)."""
    import fcntl
    import ipaddress
    name = config.tap_name.encode()

    def ifreq(data: bytes = b"") -> bytes:
        return struct.pack("16s", name) + data.ljust(24, b"\0")

    def step(what, fn):
        try:
            return fn()
        except OSError as e:
            raise HelperError(f"configuring {config.tap_name}: {what}: {e.strerror}") from None

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        def up(ifname: bytes):
            req = struct.pack("16s", ifname) + bytes(24)
            flags = struct.unpack_from("=h", fcntl.ioctl(s, SIOCGIFFLAGS, req), 16)[0]
            fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sh22x", ifname, flags | IFF_UP))

        step("bringing lo up", lambda: up(b"lo"))
        if config.macaddress:
            mac = bytes.fromhex(config.macaddress.replace(":", ""))
            step("setting the MAC address", lambda: fcntl.ioctl(
                s, SIOCSIFHWADDR, ifreq(struct.pack("=H14s", ARPHRD_ETHER, mac))))
        step("setting the MTU", lambda: fcntl.ioctl(s, SIOCSIFMTU, ifreq(struct.pack("=i", config.mtu))))
        try:  # tun's default is already TXQUEUELEN; this ioctl wants CAP_NET_ADMIN in the init ns
            fcntl.ioctl(s, SIOCSIFTXQLEN, ifreq(struct.pack("=i", TXQUEUELEN)))
        except OSError:
            pass
        step("bringing it up", lambda: up(name))
        step("adding the address", lambda: fcntl.ioctl(s, SIOCSIFADDR, ifreq(_sin(config.guest))))
        mask = ipaddress.IPv4Network(f"0.0.0.0/{config.prefixlen}").netmask
        step("setting the netmask", lambda: fcntl.ioctl(s, SIOCSIFNETMASK, ifreq(_sin(mask))))
        rt = _Rtentry()
        for field, addr in (("rt_dst", ipaddress.IPv4Address(0)), ("rt_gateway", config.gateway),
                            ("rt_genmask", ipaddress.IPv4Address(0))):
            ctypes.memmove(ctypes.addressof(rt) + getattr(_Rtentry, field).offset, _sin(addr), 16)
        rt.rt_flags = RTF_UP | RTF_GATEWAY
        dev = ctypes.create_string_buffer(name)
        rt.rt_dev = ctypes.cast(dev, ctypes.c_char_p)
        step("adding the default route", lambda: fcntl.ioctl(s, SIOCADDRT, bytes(rt)))


def _configure(config) -> None:
    if not config.enable_ipv6:
        _configure_ioctl(config)
        return
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError
    try:
        with IPRoute() as ipr:
            lo = ipr.link_lookup(ifname="lo")
            if lo:
                ipr.link("set", index=lo[0], state="up")
            idx = ipr.link_lookup(ifname=config.tap_name)[0]
            if config.macaddress:
                ipr.link("set", index=idx, address=config.macaddress)
            ipr.link("set", index=idx, mtu=config.mtu)
            ipr.link("set", index=idx, txqlen=TXQUEUELEN)
            if config.enable_ipv6:
                _configure_ipv6(ipr, idx, config.tap_name)
            ipr.link("set", index=idx, state="up")
            ipr.addr("add", index=idx, address=str(config.guest), prefixlen=config.prefixlen)
            ipr.route("add", dst="0.0.0.0/0", gateway=str(config.gateway), oif=idx)
    except NetlinkError as e:
        raise HelperError(f"configuring {config.tap_name}: netlink error {e.code}: "
                          f"{os.strerror(e.code) if e.code else e}") from None


def _child(config, sock: socket.socket) -> None:
    try:
        userns, netns = _ns_paths(config)
        if userns:
            _join(userns, CLONE_NEWUSER, "user")
        _join(netns, CLONE_NEWNET, "network")
        fd, offload = _create_tap(config.tap_name, vnet_wanted())
        if config.configure:
            _configure(config)
        socket.send_fds(sock, [b"OK %d" % offload], [fd])
    except HelperError as e:
        sock.sendall(b"ERR " + str(e).replace("\n", " ").encode(errors="replace"))
    except BaseException as e:  # noqa: BLE001 - anything else still becomes one line
        sock.sendall(f"ERR helper: {type(e).__name__}: {e}".replace("\n", " ").encode(errors="replace"))


def open_tap(config) -> tuple[int, int]:
    """Fork the helper, return (tap fd (non-blocking), offload flags or -1 for no virtio-net
    header). Raises HelperError with one line."""
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
    try:
        msg, fds, _flags, _addr = socket.recv_fds(parent, 4096, 4)
    finally:
        parent.close()
        os.waitpid(pid, 0)
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
