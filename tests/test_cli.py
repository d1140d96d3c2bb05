"""Fast CLI tests: help text, version, parsing forms, and one-line errors with exit status 1."""

from __future__ import annotations

import ipaddress
import os
import re

import pytest

from nsutil import run_slirpy
from slirpy import cli
from slirpy.config import Config

SLIRP4NETNS_HELP_LINES = [
    "-c, --configure          bring up the interface",
    "-e, --exit-fd=FD         specify the FD for terminating slirp4netns",
    "-r, --ready-fd=FD        specify the FD to write to when the network is configured",
    "-m, --mtu=MTU            specify MTU (default=1500, max=65521)",
    "-6, --enable-ipv6        enable IPv6 (experimental)",
    "-a, --api-socket=PATH    specify API socket path",
    "--cidr=CIDR              specify network address CIDR (default=10.0.2.0/24)",
    "--disable-host-loopback  prohibit connecting to 127.0.0.1:* on the host namespace",
    "--netns-type=TYPE \t specify network namespace type ([path|pid], default=pid)",
    "--userns-path=PATH\t specify user namespace path",
    "--enable-sandbox         create a new mount namespace (and drop all caps except "
    "CAP_NET_BIND_SERVICE if running as the root)",
    "--enable-seccomp         enable seccomp to limit syscalls (experimental)",
    "--outbound-addr=IPv4     sets outbound ipv4 address to bound to (experimental)",
    "--outbound-addr6=IPv6    sets outbound ipv6 address to bound to (experimental)",
    "--disable-dns            disables 10.0.2.3 (or configured internal ip) to host dns "
    "redirect (experimental)",
    "--macaddress=MAC         specify the MAC address of the TAP (only valid with -c)",
    "--target-type=TYPE       specify the target type ([netns|bess], default=netns)",
    "-h, --help               show this help and exit",
    "-v, --version            show version and exit",
]
OWN_FLAGS = ["-p, --port=[HOSTADDR:]HOSTPORT:GUESTPORT[/tcp|/udp]", "--dns-upstream=ADDR[:PORT]",
             "--pcap=FILE", "--pcap-max-bytes=N", "--log-level=LEVEL"]


def test_help_has_every_slirp4netns_line_and_ours():
    p = run_slirpy("--help")
    assert p.returncode == 0
    lines = p.stdout.splitlines()
    for want in SLIRP4NETNS_HELP_LINES:
        assert want in lines, want
    for flag in OWN_FLAGS:
        assert flag in p.stdout, flag
    assert "PID|PATH [TAPNAME]" in p.stdout
    assert run_slirpy("-h").stdout == p.stdout


@pytest.mark.parametrize("flag", ["--version", "-v"])
def test_version(flag):
    p = run_slirpy(flag)
    assert p.returncode == 0
    assert re.fullmatch(r"slirpy version \d+\.\d+\.\d+\n", p.stdout)


@pytest.mark.parametrize("argv", [["--mtu=4000", "42"], ["--mtu", "4000", "42"], ["-m4000", "42"],
                                  ["-m", "4000", "42"]])
def test_mtu_forms(argv):
    c = cli.parse_args(argv)
    assert c.mtu == 4000 and c.target == "42" and c.tap_name == "tap0"


def test_full_podman_line():
    c = cli.parse_args(["--disable-host-loopback", "--mtu=65520", "--enable-sandbox",
                        "--enable-seccomp", "--enable-ipv6", "-c", "-e", "3", "-r", "4",
                        "--api-socket", "/tmp/x.sock", "--netns-type=path", "/run/netns/n", "tap9"])
    assert (c.disable_host_loopback, c.mtu, c.enable_sandbox, c.enable_seccomp, c.enable_ipv6,
            c.configure, c.exit_fd, c.ready_fd, c.api_socket, c.netns_type, c.target, c.tap_name) == (
        True, 65520, True, True, True, True, 3, 4, "/tmp/x.sock", "path", "/run/netns/n", "tap9")


def test_own_flags():
    c = cli.parse_args(["-p", "8080:80", "--port=127.0.0.1:5353:53/udp", "--dns-upstream=1.1.1.1",
                        "--dns-upstream=[::1]:5300", "--dns-upstream=127.0.0.1:5301",
                        "--cidr=192.168.5.0/24", "--macaddress=02:00:00:00:00:01",
                        "--pcap=/tmp/a.pcap", "--pcap-max-bytes=1000", "--log-level=debug", "7"])
    assert [(p.proto, p.host_addr, p.host_port, p.guest_port) for p in c.ports] == [
        ("tcp", "0.0.0.0", 8080, 80), ("udp", "127.0.0.1", 5353, 53)]
    assert c.dns_upstreams == (("1.1.1.1", 53), ("::1", 5300), ("127.0.0.1", 5301))
    assert c.cidr == ipaddress.IPv4Network("192.168.5.0/24") and str(c.guest) == "192.168.5.100"
    assert c.macaddress == "02:00:00:00:00:01" and c.pcap == "/tmp/a.pcap"
    assert c.pcap_max_bytes == 1000 and c.log_level == "DEBUG"


def test_command_form():
    c = cli.parse_args(["--mtu=9000", "--", "sh", "-c", "exit 3"])
    assert c.command == ("sh", "-c", "exit 3") and c.target is None and c.configure


def test_not_implemented_table_is_one_line_per_flag():
    assert cli.not_implemented(Config()) is None
    for field, flag in cli.NOT_IMPLEMENTED.items():
        assert flag.startswith("--")
        assert hasattr(Config(), field)


@pytest.mark.parametrize("args, needle", [
    (["--mtu=67", "1"], "--mtu 67"),
    (["--mtu=65522", "1"], "--mtu 65522"),
    (["--mtu=abc", "1"], "--mtu"),
    (["--cidr=10.0.0.0/26", "1"], "--cidr"),
    (["--cidr=10.0.0.0/0", "1"], "--cidr"),
    (["--cidr=nonsense", "1"], "--cidr"),
    (["--bogus", "1"], "--bogus"),
    (["--macaddress=zz:00:00:00:00:00", "1"], "--macaddress"),
    (["--macaddress=01:00:00:00:00:00", "1"], "multicast"),
    (["--target-type=bess", "1"], "bess"),
    (["--netns-type=foo", "1"], "--netns-type"),
    (["notapid"], "PID"),
    ([], "missing PID"),
    (["1", "tap0", "extra"], "too many"),
    (["1", "a" * 16], "TAPNAME"),
    (["-p", "99999:80", "1"], "--port"),
    (["--dns-upstream=nothost", "1"], "--dns-upstream"),
    (["-e", "x", "1"], "--exit-fd"),
    (["--"], "command"),
])
def test_bad_input_one_line_exit_1(args, needle):
    p = run_slirpy(*args, timeout=5)
    assert p.returncode == 1, p
    assert p.stdout == ""
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("slirpy: error: "), p.stderr
    assert needle in p.stderr
    assert "Traceback" not in p.stderr


@pytest.mark.parametrize("args", [["-6", "1"], ["-a", "/tmp/s", "1"], ["--enable-sandbox", "1"],
                                  ["--enable-seccomp", "1"], ["--outbound-addr=127.0.0.1", "1"],
                                  ["--outbound-addr6=::1", "1"], ["--disable-dns", "1"],
                                  ["-p", "8080:80", "1"], ["--dns-upstream=127.0.0.1", "1"],
                                  ["--pcap=/tmp/x", "1"]])
def test_not_implemented_flags_fail_fast(args):
    flag = args[0] if args[0].startswith("--") else {"-6": "--enable-ipv6", "-a": "--api-socket",
                                                      "-p": "--port"}[args[0]]
    flag = flag.split("=")[0]
    field = [k for k, v in cli.NOT_IMPLEMENTED.items() if v == flag]
    if not field:
        return  # implemented since: nothing to refuse
    p = run_slirpy(*args, timeout=5)
    assert p.returncode == 1
    assert p.stderr == f"slirpy: error: {flag}: not implemented yet\n"


def test_nonexistent_pid():
    pid = 4_000_000
    assert not os.path.exists(f"/proc/{pid}")
    p = run_slirpy(str(pid), timeout=5)
    assert (p.returncode, p.stderr) == (1, f"slirpy: error: no such process: PID {pid}\n")


def test_path_not_a_netns():
    p = run_slirpy("--netns-type=path", "/etc/hostname", timeout=5)
    assert p.returncode == 1
    assert p.stderr.startswith("slirpy: error: cannot join network namespace /etc/hostname")
    assert p.stderr.count("\n") == 1


def test_path_missing():
    p = run_slirpy("--netns-type=path", "/nonexistent/netns", timeout=5)
    assert p.returncode == 1 and "No such file" in p.stderr and p.stderr.count("\n") == 1


def test_tcp_mem_budget_from_the_environment(monkeypatch):
    """SLIRPY_TCP_MEM_BUDGET (bytes) sets the TCP memory budget; no flag, so slirp4netns's
    command line is unchanged. Nonsense is a one-line usage error."""
    monkeypatch.delenv("SLIRPY_TCP_MEM_BUDGET", raising=False)
    assert cli.parse_args(["1234"]).tcp_mem_budget == Config().tcp_mem_budget == 128 << 20
    monkeypatch.setenv("SLIRPY_TCP_MEM_BUDGET", "2097152")
    assert cli.parse_args(["1234"]).tcp_mem_budget == 2097152
    for bad in ("", "lots", "-5", "1000", str(1 << 41)):
        monkeypatch.setenv("SLIRPY_TCP_MEM_BUDGET", bad)
        with pytest.raises(cli.UsageError, match="SLIRPY_TCP_MEM_BUDGET"):
            cli.parse_args(["1234"])
