"""The texts of `--help` and `--version`, kept apart from cli.py so that __main__ prints them
without importing the argument parser, the Config or anything else (Podman runs `--help` before
every container start). Import nothing here beyond what the text needs.

cli.py uses the same HELP and version_text(): one place for each text.
"""

import os

from . import __version__

HELP = """\
Usage: slirpy [OPTION]... PID|PATH [TAPNAME]
       slirpy [OPTION]... -- CMD [ARG]...
User-mode networking for unprivileged network namespaces.

-c, --configure          bring up the interface
-e, --exit-fd=FD         specify the FD for terminating slirp4netns
-r, --ready-fd=FD        specify the FD to write to when the network is configured
-m, --mtu=MTU            specify MTU (default=1500, max=65521)
-6, --enable-ipv6        enable IPv6 (experimental)
-a, --api-socket=PATH    specify API socket path
--cidr=CIDR              specify network address CIDR (default=10.0.2.0/24)
--disable-host-loopback  prohibit connecting to 127.0.0.1:* on the host namespace
--netns-type=TYPE 	 specify network namespace type ([path|pid], default=pid)
--userns-path=PATH	 specify user namespace path
--enable-sandbox         create a new mount namespace (and drop all caps except CAP_NET_BIND_SERVICE if running as the root)
--enable-seccomp         enable seccomp to limit syscalls (experimental)
--outbound-addr=IPv4     sets outbound ipv4 address to bound to (experimental)
--outbound-addr6=IPv6    sets outbound ipv6 address to bound to (experimental)
--disable-dns            disables 10.0.2.3 (or configured internal ip) to host dns redirect (experimental)
--macaddress=MAC         specify the MAC address of the TAP (only valid with -c)
--target-type=TYPE       specify the target type ([netns|bess], default=netns)
-p, --port=[HOSTADDR:]HOSTPORT:GUESTPORT[/tcp|/udp]  forward a host port to the guest (repeatable)
--dns-upstream=ADDR[:PORT]  DNS server to forward to instead of /etc/resolv.conf (repeatable, IPv6 in brackets)
--pcap=FILE              write every tap frame to FILE (pcap format)
--pcap-max-bytes=N       stop writing the pcap file after N bytes
--allow=RULE             egress policy: let the guest reach RULE's destinations (repeatable, first match wins)
--deny=RULE              egress policy: refuse RULE's destinations (ICMP administratively prohibited)
--default-deny           egress policy: refuse what no rule allows (DNS at base+3 and forwards stay)
--disable-forward-splice  forwarded TCP from host loopback clients through the tap too (as slirp4netns), not spliced in the kernel
--log-level=LEVEL        logging level (DEBUG, INFO, WARNING, ERROR; default=ERROR)
-h, --help               show this help and exit
-v, --version            show version and exit
"""


LIBSLIRP_COMPAT = "4.7.0"  # the libslirp whose behaviour slirpy follows (slirp4netns 1.2.0's)
SLIRP_CONFIG_VERSION_MAX = 4  # libslirp 4.7's: scripts read it to know --disable-dns/--outbound-addr


def _git_commit() -> str:
    """The commit of the checkout this package runs from, read from .git's files (no git
    process); "unknown" for an installed package or anything unexpected."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        gitdir = os.path.join(root, ".git")
        if os.path.isfile(gitdir):  # a worktree: "gitdir: PATH"
            with open(gitdir) as f:
                line = f.read().strip()
            if not line.startswith("gitdir: "):
                return "unknown"
            gitdir = os.path.join(root, line[8:])
        with open(os.path.join(gitdir, "HEAD")) as f:
            head = f.read().strip()
        common = gitdir
        if os.path.isfile(os.path.join(gitdir, "commondir")):
            with open(os.path.join(gitdir, "commondir")) as f:
                common = os.path.join(gitdir, f.read().strip())
        if head.startswith("ref: "):
            ref = head[5:]
            head = ""
            for d in (gitdir, common):
                p = os.path.join(d, ref)
                if os.path.isfile(p):
                    with open(p) as f:
                        head = f.read().strip()
                    break
            else:
                with open(os.path.join(common, "packed-refs")) as f:
                    for line in f:
                        sha, _, name = line.strip().partition(" ")
                        if name == ref:
                            head = sha
                            break
        return head if len(head) == 40 and all(c in "0123456789abcdef" for c in head) else "unknown"
    except (OSError, UnicodeDecodeError):
        return "unknown"


def _libseccomp_version() -> str:
    """The libseccomp that --enable-seccomp would load (slirp4netns prints the one it links)."""
    try:
        import ctypes

        class _V(ctypes.Structure):
            _fields_ = [("major", ctypes.c_uint), ("minor", ctypes.c_uint), ("micro", ctypes.c_uint)]
        lib = ctypes.CDLL("libseccomp.so.2")
        lib.seccomp_version.restype = ctypes.POINTER(_V)
        v = lib.seccomp_version()
        return f"{v.contents.major}.{v.contents.minor}.{v.contents.micro}" if v else "unknown"
    except (OSError, AttributeError):
        return "not found"


def version_text() -> str:
    """slirp4netns --version's lines, in its order, with slirpy's values."""
    return (f"slirpy version {__version__}\n"
            f"commit: {_git_commit()}\n"
            f"libslirp: slirpy (compatible with {LIBSLIRP_COMPAT})\n"
            f"SLIRP_CONFIG_VERSION_MAX: {SLIRP_CONFIG_VERSION_MAX}\n"
            f"libseccomp: {_libseccomp_version()}\n")


