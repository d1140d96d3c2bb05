"""Fast CLI tests: help text, version, parsing forms, and one-line errors with exit status 1."""

from __future__ import annotations

import ctypes
import ipaddress
import os
import re
import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nsutil import Slirpy, require_netns, run_slirpy
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
SLIRP4NETNS = "/usr/bin/slirp4netns"
OWN_FLAGS = ["-p, --port=[HOSTADDR:]HOSTPORT:GUESTPORT[/tcp|/udp]", "--dns-upstream=ADDR[:PORT]",
             "--pcap=FILE", "--pcap-max-bytes=N", "--log-level=LEVEL", "--allow=RULE",
             "--deny=RULE", "--default-deny"]


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
    """slirp4netns's five lines in its order (scripts grep SLIRP_CONFIG_VERSION_MAX to decide
    whether --disable-dns and --outbound-addr exist), with slirpy's values."""
    p = run_slirpy(flag)
    assert p.returncode == 0
    lines = p.stdout.splitlines()
    assert [ln.split(":")[0] for ln in lines[1:]] == [
        "commit", "libslirp", "SLIRP_CONFIG_VERSION_MAX", "libseccomp"]
    assert re.fullmatch(r"slirpy version \d+\.\d+\.\d+", lines[0])
    assert re.fullmatch(r"commit: ([0-9a-f]{40}|unknown)", lines[1])
    assert lines[2] == "libslirp: slirpy (compatible with 4.7.0)"
    assert lines[3] == "SLIRP_CONFIG_VERSION_MAX: 4"
    assert re.fullmatch(r"libseccomp: (\d+\.\d+\.\d+|not found)", lines[4])


@pytest.mark.skipif(not os.path.exists(SLIRP4NETNS), reason="LOUD: no /usr/bin/slirp4netns")
def test_version_lines_as_slirp4netns():
    theirs = subprocess.run([SLIRP4NETNS, "--version"], capture_output=True, text=True).stdout
    ours = run_slirpy("--version").stdout
    key = lambda text: [ln.split(" ")[0].split(":")[0] for ln in text.splitlines()]  # noqa: E731
    assert key(theirs) == ["slirp4netns", "commit", "libslirp", "SLIRP_CONFIG_VERSION_MAX",
                           "libseccomp"]
    assert key(ours) == ["slirpy"] + key(theirs)[1:]
    assert theirs.splitlines()[3] == ours.splitlines()[3]  # the same config version
    assert theirs.splitlines()[4] == ours.splitlines()[4]  # the same libseccomp here


def test_commit_is_read_from_git_files_not_a_git_process(monkeypatch):
    import subprocess as sp
    monkeypatch.setattr(sp, "run", lambda *a, **k: pytest.fail("a git process"))
    monkeypatch.setattr(sp, "Popen", lambda *a, **k: pytest.fail("a git process"))
    c = cli._git_commit()
    monkeypatch.undo()
    head = subprocess.run(["git", "-C", os.path.dirname(cli.__file__), "rev-parse", "HEAD"],
                          capture_output=True, text=True)
    if head.returncode == 0:
        assert c == head.stdout.strip()
    else:
        assert c == "unknown"


@pytest.mark.parametrize("argv", [["--mtu=4000", "42"], ["--mtu", "4000", "42"], ["-m4000", "42"],
                                  ["-m", "4000", "42"]])
def test_mtu_forms(argv):
    c = cli.parse_args(argv)
    assert c.mtu == 4000 and c.target == "42" and c.tap_name == "tap0"


def test_full_podman_line():
    c = cli.parse_args(["--disable-host-loopback", "--mtu=65520", "--enable-sandbox",
                        "--enable-seccomp", "--enable-ipv6", "-c", "-e", "3", "-r", "4",
                        "--api-socket", "/tmp/x.sock", "--netns-type=path", "/proc/self/ns/net", "tap9"])
    assert (c.disable_host_loopback, c.mtu, c.enable_sandbox, c.enable_seccomp, c.enable_ipv6,
            c.configure, c.exit_fd, c.ready_fd, c.api_socket, c.netns_type, c.target, c.tap_name) == (
        True, 65520, True, True, True, True, 3, 4, "/tmp/x.sock", "path", "/proc/self/ns/net", "tap9")


def test_own_flags():
    c = cli.parse_args(["-p", "8080:80", "--port=127.0.0.1:5353:53/udp", "--dns-upstream=1.1.1.1",
                        "--dns-upstream=[::1]:5300", "--dns-upstream=127.0.0.1:5301",
                        "--cidr=192.168.5.0/24", "-c", "--macaddress=02:00:00:00:00:01",
                        "--pcap=/tmp/a.pcap", "--pcap-max-bytes=1000", "--log-level=debug", "7"])
    assert [(p.proto, p.host_addr, p.host_port, p.guest_port) for p in c.ports] == [
        ("tcp", "0.0.0.0", 8080, 80), ("udp", "127.0.0.1", 5353, 53)]
    assert c.dns_upstreams == (("1.1.1.1", 53), ("::1", 5300), ("127.0.0.1", 5301))
    assert c.cidr == ipaddress.IPv4Network("192.168.5.0/24") and str(c.guest) == "192.168.5.100"
    assert c.macaddress == "02:00:00:00:00:01" and c.pcap == "/tmp/a.pcap"
    assert c.pcap_max_bytes == 1000 and c.log_level == "DEBUG"
    assert not c.disable_forward_splice
    assert cli.parse_args(["--disable-forward-splice", "7"]).disable_forward_splice
    assert cli.parse_args(["--disable-forward", "7"]).disable_forward_splice  # getopt's prefix


def test_egress_flags_keep_their_order_across_allow_and_deny():
    c = cli.parse_args(["--deny=private", "5", "--allow", "tcp:10.0.2.2:5432", "--default-deny",
                        "--deny=[2001:db8::]/32:443", "--allow=dns"])
    assert [(a, str(r)) for a, r in c.egress_rules] == [
        ("deny", "private"), ("allow", "tcp:10.0.2.2:5432"), ("deny", "[2001:db8::]/32:443"),
        ("allow", "dns")]
    assert c.default_deny and not cli.parse_args(["5"]).default_deny
    assert cli.parse_args(["5"]).egress_rules == ()


def test_egress_rule_table_cap_on_the_command_line():
    from slirpy.stack.policy import MAX_RULES
    ok = ["--deny=192.0.2.1"] * MAX_RULES + ["5"]
    assert len(cli.parse_args(ok).egress_rules) == MAX_RULES
    with pytest.raises(cli.UsageError, match=f"at most {MAX_RULES}"):
        cli.parse_args(["--deny=192.0.2.1"] + ok)


@pytest.mark.parametrize("argv", [
    ["-c", "4000", "--api-socket", "/tmp/s", "tap1"],
    ["4000", "-c", "tap1", "--api-socket", "/tmp/s"],
    ["4000", "tap1", "-c", "-a/tmp/s"],
    ["-ca", "/tmp/s", "4000", "tap1"],
    ["--api=/tmp/s", "--conf", "4000", "tap1"],  # unique prefixes, as getopt_long takes them
    ["4000", "-c", "--api-socket=/tmp/s", "--", "tap1"],  # `--` after an operand: operands follow
])
def test_options_anywhere_among_operands(argv):
    """glibc getopt_long permutes: options may follow the operands."""
    c = cli.parse_args(argv)
    assert (c.target, c.tap_name, c.configure, c.api_socket) == ("4000", "tap1", True, "/tmp/s")


def test_too_many_operands_is_a_warning_on_stdout():
    w = []
    c = cli.parse_args(["4000", "tap1", "extra", "-m", "9000"], w)
    assert (c.target, c.tap_name, c.mtu, w) == ("4000", "tap1", 9000, ["too many arguments"])
    # the daemon goes on: here it stops at the next step (no such process), after the warning
    p = run_slirpy("4000000", "tap1", "extra", timeout=5)
    assert p.stdout == "WARNING: too many arguments\n"
    assert p.stderr == "slirpy: error: no such process: PID 4000000\n"


def test_deprecated_slirp4netns_flags_still_work():
    w = []
    c = cli.parse_args(["--no-host-loopback", "--create-sandbox", "1"], w)
    assert c.disable_host_loopback and c.enable_sandbox
    assert w == ["--no-host-loopback is deprecated and will be removed in future releases, "
                 "please use --disable-host-loopback instead.",
                 "--create-sandbox is deprecated and will be removed in future releases, "
                 "please use --enable-sandbox instead."]


def test_posixly_correct_stops_at_the_first_operand(monkeypatch):
    monkeypatch.setenv("POSIXLY_CORRECT", "1")
    c = cli.parse_args(["4000", "-c"], [])
    assert (c.target, c.tap_name, c.configure) == ("4000", "-c", False)


def test_help_and_version_win_where_they_come():
    assert cli.parse_args(["1", "-h", "--bogus"]) == "help"
    assert cli.parse_args(["--mtu=1500", "-v"]) == "version"
    with pytest.raises(cli.UsageError, match="exit-fd"):
        cli.parse_args(["-e", "x", "-h"])  # slirp4netns's loop: -e's error comes first


def test_mac_forms_as_slirp4netns_reads_them():
    assert cli.parse_args(["-c", "--macaddress=2:0:AB:0:0:1", "1"]).macaddress == "02:00:ab:00:00:01"


def test_command_form():
    c = cli.parse_args(["--mtu=9000", "--", "sh", "-c", "exit 3"])
    assert c.command == ("sh", "-c", "exit 3") and c.target is None and c.configure


@pytest.mark.parametrize("args, needle", [
    (["--mtu=67", "1"], "MTU must be at least 68"),
    (["--mtu=65522", "1"], "MTU must be a positive integer (< 65522)"),
    (["--mtu=0", "1"], "MTU must be a positive integer (< 65522)"),
    (["--mtu=abc", "1"], "MTU must be a positive integer"),
    (["--mtu=1_500", "1"], "MTU must be a positive integer"),
    (["--cidr=10.0.0.0/26", "1"], "prefix length needs to be 1-25"),
    (["--cidr=10.0.0.0/0", "1"], "prefix length needs to be 1-25"),
    (["--cidr=nonsense", "1"], "invalid CIDR: nonsense"),
    (["--cidr=10.0.2.0", "1"], "invalid CIDR: 10.0.2.0"),
    (["--cidr=10.0.2.0/024", "1"], "invalid CIDR"),
    (["--cidr=10.0.2.300/24", "1"], "invalid network address: 10.0.2.300"),
    (["--cidr=10.0.2.100/24", "1"],
     "CIDR needs to be a network address like 10.0.2.0/24, not like 10.0.2.100/24"),
    (["--bogus", "1"], "unrecognized option '--bogus'"),
    (["-x", "1"], "invalid option -- 'x'"),
    (["1", "--mtu"], "option '--mtu' requires an argument"),
    (["1", "-m"], "option requires an argument -- 'm'"),
    (["--configure=yes", "1"], "option '--configure' doesn't allow an argument"),
    (["--enable", "1"], "option '--enable' is ambiguous"),
    (["-c", "--macaddress=zz:00:00:00:00:00", "1"], '"zz:00:00:00:00:00" is an invalid MAC address'),
    (["-c", "--macaddress=02:00:00:00:00:00:00", "1"], "is an invalid MAC address"),
    (["-c", "--macaddress=01:00:00:00:00:00", "1"], "multicast"),
    (["--macaddress=02:00:00:00:00:01", "1"], "cannot be specified when --configure or -c"),
    (["--target-type=bess", "1"], "bess"),
    (["--target-type=foo", "1"], '--target-type must be either "netns" or "bess"'),
    (["--netns-type=foo", "1"], "--netns-type"),
    (["--netns-type=path", "/nonexistent/netns"], "existing path expected when --netns-type=path"),
    (["--userns-path=/nonexistent/userns", "1"], "userns path doesn't exist: /nonexistent/userns"),
    (["--outbound-addr=nosuchif0", "1"], "outbound-addr has to be valid ipv4 address or interface"),
    (["--outbound-addr=::1", "1"], "outbound-addr has to be valid ipv4 address or interface"),
    (["--outbound-addr6=nosuchif0", "1"], "outbound-addr6 has to be valid ipv6 address"),
    (["notapid"], "PID must be a positive integer"),
    (["0", "tap0"], "PID must be a positive integer"),
    ([], "missing PID"),
    (["1", "a" * 16], "TAPNAME"),
    (["-p", "99999:80", "1"], "--port"),
    (["--dns-upstream=nothost", "1"], "--dns-upstream"),
    (["-e", "x", "1"], "exit-fd must be a non-negative integer"),
    (["-e", "-1", "1"], "exit-fd must be a non-negative integer"),
    (["-r", "3x", "1"], "ready-fd must be a non-negative integer"),
    (["-e", "99999999999", "1"], "exit-fd must be a non-negative integer"),  # not an int
    (["--"], "command"),
    (["--deny=2001:db8::1", "1"], "--deny: 2001:db8::1: IPv6 addresses go in brackets"),
    (["--allow=tcp:10.0.2.2:0", "1"], "--allow: tcp:10.0.2.2:0: port 0 out of range 1..65535"),
    (["--deny=icmp:private:22", "1"], "icmp rules take no port"),
    (["--allow=127.0.0.1:5432", "1"], "host-loopback"),
    (["--allow=\n", "1"], "--allow: '\\n': only printable"),
    (["--deny=", "1"], "--deny: : empty rule"),
    (["--default-deny=yes", "1"], "option '--default-deny' doesn't allow an argument"),
    (["--deny", "bogus", "1"], "--deny: bogus: 'bogus' is not an IPv4 address, [IPv6] or one of"),
])
def test_bad_input_one_line_exit_1(args, needle):
    p = run_slirpy(*args, timeout=5)
    assert p.returncode == 1, p
    assert p.stdout == ""
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("slirpy: error: "), p.stderr
    assert needle in p.stderr
    assert "Traceback" not in p.stderr


# The same bad command line to slirp4netns and to slirpy: both refuse it (non-zero status) and
# say it with the same words. Two operands, as slirp4netns 1.2.0 needs them (it has no default
# TAPNAME), and the errors all come before it looks at PID 1's namespace.
SAME_WORDS = [
    (["--cidr=nonsense"], "invalid CIDR: nonsense"),
    (["--cidr=10.0.2.0"], "invalid CIDR: 10.0.2.0"),
    (["--cidr=10.0.2.0/26"], "prefix length needs to be 1-25"),
    (["--cidr=10.0.2.0/0"], "prefix length needs to be 1-25"),
    (["--cidr=10.0.2.300/24"], "invalid network address: 10.0.2.300"),
    (["--cidr=10.0.2.100/24"],
     "CIDR needs to be a network address like 10.0.2.0/24, not like 10.0.2.100/24"),
    (["--mtu=65522"], "MTU must be a positive integer (< 65522)"),
    (["-m", "0"], "MTU must be a positive integer (< 65522)"),
    (["--mtu=x1"], "MTU must be a positive integer (< 65522)"),
    (["-e", "x"], "exit-fd must be a non-negative integer"),
    (["--exit-fd=-2"], "exit-fd must be a non-negative integer"),
    (["-r", "1.5"], "ready-fd must be a non-negative integer"),
    (["--userns-path=/nonexistent/u"], "userns path doesn't exist: /nonexistent/u"),
    (["--macaddress=02:00:00:00:00:01"], "cannot be specified when --configure or -c is not"),
    (["-c", "--macaddress=zz"], '"zz" is an invalid MAC address'),
    (["--target-type=foo"], '--target-type must be either "netns" or "bess"'),
    (["--outbound-addr=nosuchif0"], "has to be valid ipv4 address or interface name"),
    (["--bogus"], "unrecognized option '--bogus'"),
    (["-x"], "invalid option -- 'x'"),
    (["--configure=1"], "option '--configure' doesn't allow an argument"),
    (["--enable-s"], "option '--enable-s' is ambiguous"),
    # options after the operands are read too (getopt permutes): the error is still found
    (["PERMUTED", "--cidr=10.0.2.1/24"], "CIDR needs to be a network address"),
    (["PERMUTED", "-m", "70000"], "MTU must be a positive integer (< 65522)"),
]


@pytest.mark.skipif(not os.path.exists(SLIRP4NETNS), reason="LOUD: no /usr/bin/slirp4netns")
@pytest.mark.parametrize("args, words", SAME_WORDS)
def test_bad_input_same_words_as_slirp4netns(args, words):
    if args[0] == "PERMUTED":  # PID TAPNAME first, then the options
        argv = ["1", "tap0", *args[1:]]
    else:
        argv = [*args, "1", "tap0"]
    theirs = subprocess.run([SLIRP4NETNS, *argv], capture_output=True, text=True, timeout=5)
    ours = run_slirpy(*argv, timeout=5)
    assert theirs.returncode != 0 and ours.returncode == 1
    assert words in theirs.stderr, theirs.stderr
    assert words in ours.stderr, ours.stderr
    assert ours.stderr.startswith("slirpy: error: ") and ours.stderr.count("\n") == 1


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


# ---- the option reader against glibc's own getopt_long (what slirp4netns calls) -------------
class _COption(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("has_arg", ctypes.c_int),
                ("flag", ctypes.c_void_p), ("val", ctypes.c_int)]


def _glibc_getopt_long(argv):
    """(options [(key, value)], operands) as glibc's getopt_long reads argv, or "error"."""
    libc = ctypes.CDLL(None)
    ctypes.c_int.in_dll(libc, "optind").value = 0  # 0: glibc re-initialises its state
    ctypes.c_int.in_dll(libc, "opterr").value = 0
    names = list(cli._LONG)
    keep = [n.encode() for n in names]
    longs = (_COption * (len(names) + 1))(
        *[_COption(keep[i], int(cli._LONG[n][0]), None,
                   ord(cli._LONG[n][1]) if len(cli._LONG[n][1]) == 1 else 1000 + i)
          for i, n in enumerate(names)], _COption(None, 0, None, 0))
    raw = [b"prog", *[a.encode() for a in argv]]
    arr = (ctypes.c_char_p * (len(raw) + 1))(*raw, None)
    libc.getopt_long.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p), ctypes.c_char_p,
                                 ctypes.POINTER(_COption), ctypes.c_void_p]
    opts = []
    while True:
        r = libc.getopt_long(len(raw), arr, cli._SHORT.encode(), longs, None)
        if r == -1:
            break
        if r in (ord("?"), ord(":")):
            return "error"
        if r >= 1000:
            name = names[r - 1000]
            takes, key = cli._LONG[name]
        else:
            key = chr(r)
            takes = cli._SHORT[cli._SHORT.index(key) + 1:][:1] == ":"
        value = ctypes.c_char_p.in_dll(libc, "optarg").value if takes else None
        opts.append((key, value.decode() if value is not None else None))
    optind = ctypes.c_int.in_dll(libc, "optind").value
    return opts, [arr[i].decode() for i in range(optind, len(raw))]


def _ours(argv):
    opts, operands = [], []
    try:
        for item in cli._getopt_long(argv):
            if item[0] == "opt":
                opts.append(item[1:])
            elif item[0] == "arg":
                operands.append(item[1])
            else:
                operands += item[1]
    except cli.UsageError:
        return "error"
    return opts, operands


_TOKENS = ["-c", "-e", "3", "-m1500", "-ca", "/s", "-c6", "-6m", "--mtu", "--mtu=9", "--conf",
           "--enable", "--enable-ipv6", "--api-socket", "--dis", "--disable-dns", "--pcap",
           "--pcap-m=3", "--p", "--no", "-", "--", "1234", "tap0", "-x", "--bogus", "-6v",
           "--outbound-addr", "--outbound-addr6=x", "--configure=1", "--cidr", "-p", "--e",
           "--=3", "-e-1", "--help=", "--ready-fd=", "---c"]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(_TOKENS), max_size=8))
def test_getopt_long_as_glibc(argv):
    assert "POSIXLY_CORRECT" not in os.environ
    assert _ours(argv) == _glibc_getopt_long(argv)


# ---- the same accepted command lines, run by slirp4netns and by slirpy -----------------------
@pytest.mark.skipif(not os.path.exists(SLIRP4NETNS), reason="LOUD: no /usr/bin/slirp4netns")
@pytest.mark.parametrize("argv0", [SLIRP4NETNS, None], ids=["slirp4netns", "slirpy"])
@pytest.mark.parametrize("operands_first, extra", [(True, ()), (False, ("extra",))],
                         ids=["options-after-operands", "third-operand"])
def test_accepted_forms_as_slirp4netns(argv0, operands_first, extra):
    """`PID TAP -c -r R -e E --mtu 1400` (options after the operands) and a third operand (a
    warning on stdout) bring the tap up in both; each stops when its exit fd closes."""
    require_netns()
    with Slirpy("--mtu", "1400", tap="tap7", argv0=argv0, operands_first=operands_first,
                extra_operands=extra) as s:
        link = s.ns.ip_json("addr", "show", "tap7")[0]
        assert link["mtu"] == 1400
        assert [a["local"] for a in link["addr_info"] if a["family"] == "inet"] == ["10.0.2.100"]
        s.close_exit_fd()
        assert s.wait() == 0
    assert ("WARNING: too many arguments" in s.stdout) == bool(extra), s.stdout
