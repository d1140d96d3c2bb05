"""The one configuration object: a frozen dataclass built once by the CLI and passed in everywhere.

No I/O here: the sans-IO stack imports this module too.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from typing import Literal

IPv4Network = ipaddress.IPv4Network
IPv4Address = ipaddress.IPv4Address
IPv6Address = ipaddress.IPv6Address

DEFAULT_CIDR = ipaddress.IPv4Network("10.0.2.0/24")
DEFAULT_MTU = 1500
MIN_MTU = 68
MAX_MTU = 65521
# IPv6 addresses are fixed as in slirp4netns -6.
IPV6_PREFIX = ipaddress.IPv6Network("fd00::/64")
IPV6_GATEWAY = ipaddress.IPv6Address("fd00::2")
IPV6_DNS = ipaddress.IPv6Address("fd00::3")
IPV6_LINK_LOCAL_GATEWAY = ipaddress.IPv6Address("fe80::2")


@dataclasses.dataclass(frozen=True, slots=True)
class PortForward:
    """One host-to-guest forward: `[HOSTADDR:]HOSTPORT:GUESTPORT[/proto]`."""

    proto: Literal["tcp", "udp"]
    host_addr: str
    host_port: int
    guest_port: int
    guest_addr: str | None = None  # None: the guest's own address (CIDR base + 100)


@dataclasses.dataclass(frozen=True, slots=True)
class Config:
    # --- where the network goes ---------------------------------------------------------------
    target: str | None = None  # PID or netns PATH; None with the `--` command form
    tap_name: str = "tap0"
    netns_type: Literal["pid", "path"] = "pid"
    userns_path: str | None = None
    target_type: Literal["netns"] = "netns"
    command: tuple[str, ...] | None = None  # `slirpy [OPTION]... -- CMD [ARG]...`

    # --- slirp4netns flags -------------------------------------------------------------------
    configure: bool = False
    exit_fd: int | None = None
    ready_fd: int | None = None
    mtu: int = DEFAULT_MTU
    enable_ipv6: bool = False
    api_socket: str | None = None
    cidr: IPv4Network = DEFAULT_CIDR
    disable_host_loopback: bool = False
    enable_sandbox: bool = False
    enable_seccomp: bool = False
    outbound_addr: IPv4Address | None = None
    outbound_addr6: IPv6Address | None = None
    disable_dns: bool = False
    macaddress: str | None = None  # the guest tap's MAC, set with -c

    # --- slirpy's own flags ------------------------------------------------------------------
    ports: tuple[PortForward, ...] = ()
    dns_upstreams: tuple[tuple[str, int], ...] = ()  # overrides /etc/resolv.conf when given
    pcap: str | None = None
    pcap_max_bytes: int | None = None
    log_level: str = "ERROR"
    # egress policy (stack/policy.py): --allow/--deny in command-line order, as
    # (action, policy.Rule) pairs; --default-deny
    egress_rules: tuple = ()
    default_deny: bool = False
    # --disable-forward-splice: loopback clients of TCP forwards take the tap path too
    # (slirp4netns's semantics: the guest sees the gateway), not the kernel splice (splice.py)
    disable_forward_splice: bool = False
    # all TCP flows' buffered bytes together (stack/tcp.py); no flag: the environment variable
    # SLIRPY_TCP_MEM_BUDGET (bytes) sets it, so slirp4netns's command line stays as it is
    tcp_mem_budget: int = 128 * 1024 * 1024
    # TCP engine tuning (stack/tcp.py; no flags: tests and embedders set them)
    tcp_sndbuf: int = 256 * 1024  # per flow, bytes from the host waiting for the guest
    tcp_rcvbuf: int = 256 * 1024  # per flow, guest bytes waiting for the host; sets the window
    max_tcp_flows: int = 32768  # issue #20: 20,000 connections are served (fds permitting)
    max_tcp_half_open: int = 1024  # SYN_PENDING / SYN_RCVD / SYN_SENT together
    tcp_delack: float = 0.001  # a lone in-order segment is ACKed after at most this long

    # --- derived addresses (slirp4netns: gateway .2, DNS .3, guest .100) ---------------------
    @property
    def gateway(self) -> IPv4Address:
        return self.cidr.network_address + 2

    @property
    def dns(self) -> IPv4Address:
        return self.cidr.network_address + 3

    @property
    def guest(self) -> IPv4Address:
        return self.cidr.network_address + 100

    @property
    def prefixlen(self) -> int:
        return self.cidr.prefixlen

    @property
    def router_mac(self) -> bytes:
        """MAC the stack answers ARP/NDP with: 52:55 followed by the gateway's IPv4 (as libslirp)."""
        return b"\x52\x55" + self.gateway.packed

    @property
    def mss(self) -> int:
        """TCP MSS offered to an IPv4 guest (MTU less IPv4 and TCP headers)."""
        return self.mtu - 40

    @property
    def mss6(self) -> int:
        return self.mtu - 60
