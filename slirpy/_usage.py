"""The texts of `--help` and `--version`, kept apart from cli.py so that __main__ prints them
without importing the argument parser, the Config or anything else (Podman runs `--help` before
every container start). Import nothing here beyond what the text needs.

cli.py uses the same HELP and version_text(): one place for each text.
"""

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
--log-level=LEVEL        logging level (DEBUG, INFO, WARNING, ERROR; default=ERROR)
-h, --help               show this help and exit
-v, --version            show version and exit
"""


def version_text() -> str:
    """What `--version` prints (every line, newline-terminated)."""
    return f"slirpy version {__version__}\n"
