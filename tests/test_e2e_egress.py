"""The egress policy end to end (--allow/--deny/--default-deny, the API's rules), issue #23.

Each test runs slirpy in a netns the test makes (run_world: "A", the host side, with a veth to a
"world" netns at 192.0.2.2 / 2001:db8:1::2, and here also 10.99.0.2, an address inside the
`private` set). Servers listen in the world and on A's loopback (the guest's host loopback,
10.0.2.2). The guest (the `--` command) probes TCP, UDP, ping and DNS and prints what it got;
a refused flow must fail at once with the errno Linux gives for ICMP administratively
prohibited: EHOSTUNREACH for IPv4 (ICMP 3/13), EACCES for IPv6 (ICMPv6 1/1); a raw ping sees
the ICMP error itself.
"""

from __future__ import annotations

import json
import textwrap

import pytest

from nsutil import run_world

pytestmark = pytest.mark.netns

# servers: READYFILE SPEC...; SPEC tcp:ADDR:PORT (greets "hi PORT", holds the connection until
# the client closes), udp:ADDR:PORT (echo), dns:ADDR:PORT (answers A 198.51.100.7)
SERVERS = r'''
import socket, sys, threading, time
sys.path.insert(0, "tests")
from nsutil import dns_answer
def tcp(s, port):
    while True:
        c, _ = s.accept()
        def one(c=c):
            c.settimeout(30)
            try:
                c.sendall(b"hi %d\n" % port)
                while c.recv(100):
                    pass
            except OSError:
                pass
            c.close()
        threading.Thread(target=one, daemon=True).start()
def udp(s, dns):
    while True:
        d, a = s.recvfrom(2000)
        r = dns_answer(d, "198.51.100.7") if dns else d
        if r:
            s.sendto(r, a)
for spec in sys.argv[2:]:
    kind, rest = spec.split(":", 1)
    addr, port = rest.rsplit(":", 1)
    addr = addr.strip("[]")
    fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM if kind == "tcp" else socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((addr, int(port)))
    if kind == "tcp":
        s.listen(16)
        threading.Thread(target=tcp, args=(s, int(port)), daemon=True).start()
    else:
        threading.Thread(target=udp, args=(s, kind == "dns"), daemon=True).start()
open(sys.argv[1], "w").close()
time.sleep(80)  # killed by the script (bounded by run_world's timeout anyway)
'''

GUEST_LIB = r'''
import errno, json, os, socket, struct, sys, time
def _err(e):
    return "ERR " + (errno.errorcode.get(e.errno, str(e.errno)) if e.errno else "TIMEOUT")
def tcp(addr, port, keep=False):
    s = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET); s.settimeout(8)
    try:
        s.connect((addr, port))
        got = s.recv(100).decode().strip()
    except OSError as e:
        s.close()
        return _err(e)
    if keep:
        return s, got
    s.close()
    return "OK " + got
def udp(addr, port):
    s = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(8)
    try:
        s.connect((addr, port)); s.send(b"echo?")
        return "OK " + s.recv(100).decode()
    except OSError as e:
        return _err(e)
    finally:
        s.close()
def _csum(b):
    if len(b) % 2: b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b)); s = (s >> 16) + (s & 0xffff); s += s >> 16
    return ~s & 0xffff
def ping(addr):
    """A raw echo request; -> REPLY, or UNREACH type code (the ICMP error the guest got)."""
    v6 = ":" in addr
    r = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_RAW,
                      socket.IPPROTO_ICMPV6 if v6 else socket.IPPROTO_ICMP)
    r.settimeout(1)
    payload = b"egress-ping"
    h = struct.pack("!BBHHH", 128 if v6 else 8, 0, 0, 0x2323, 1)
    if not v6:
        h = struct.pack("!BBHHH", 8, 0, _csum(h + payload), 0x2323, 1)
    r.sendto(h + payload, (addr, 0))
    end = time.monotonic() + 8
    while time.monotonic() < end:
        try:
            d = r.recv(2000)
        except socket.timeout:
            continue
        icmp = d if v6 else d[(d[0] & 15) * 4:]
        t, c = icmp[0], icmp[1]
        if t in ((129,) if v6 else (0,)):
            return "REPLY"
        if t == (1 if v6 else 3):
            return "UNREACH %d %d" % (t, c)
    return "TIMEOUT"
def dns(server="10.0.2.3"):
    q = struct.pack("!HHHHHH", 0x4242, 0x0100, 1, 0, 0, 0) + b"\x04test\x07example\x00\x00\x01\x00\x01"
    s = socket.socket(socket.AF_INET6 if ":" in server else socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(8)
    try:
        s.connect((server, 53)); s.send(q)
        return "OK " + socket.inet_ntoa(s.recv(512)[-4:])
    except OSError as e:
        return _err(e)
def api(req):
    s = socket.socket(socket.AF_UNIX); s.settimeout(10)
    s.connect(sys.argv[1]); s.sendall(json.dumps(req).encode()); s.shutdown(socket.SHUT_WR)
    out = b""
    while True:
        b = s.recv(65536)
        if not b:
            return json.loads(out)
        out += b
def say(*a):
    print(*a, flush=True)
def wait_slaac(limit=10.0):
    end = time.monotonic() + limit
    while time.monotonic() < end:
        ok = any(l.split()[5] == "tap0" and l.startswith("fd00") for l in open("/proc/net/if_inet6"))
        via = any(r.split()[0] == "0" * 32 and r.split()[9] == "tap0" for r in open("/proc/net/ipv6_route"))
        if ok and via:
            return True
        time.sleep(0.02)
    return False
'''

# run_world body: $1 the guest script, $2 the servers script, $3 a scratch dir, $4.. slirpy's flags
BODY = """
ip addr add 10.99.0.1/24 dev v0
world ip addr add 10.99.0.2/24 dev v1 2>/dev/null || true
nsenter -t "$W" -n "$PY" -c "$2" "$3/world.ready" {world} & S1=$!
"$PY" -c "$2" "$3/host.ready" tcp:127.0.0.1:5432 tcp:127.0.0.1:5433 tcp:[::1]:5432 tcp:[::1]:5433 & S2=$!
i=0
while [ ! -e "$3/world.ready" ] || [ ! -e "$3/host.ready" ]; do
    i=$((i+1)); [ $i -le 400 ] && kill -0 $S1 && kill -0 $S2 || {{ echo "servers never came up" >&2; exit 1; }}
    sleep 0.05
done
G="$1"; D="$3"; shift 3
{slirpy}
kill $S1 $S2 2>/dev/null || true
"""

WORLD4 = ("tcp:192.0.2.2:80 tcp:192.0.2.2:81 udp:192.0.2.2:7 udp:192.0.2.2:9 "
          "dns:192.0.2.2:5353 tcp:10.99.0.2:80")
WORLD6 = "tcp:[2001:db8:1::2]:80 tcp:[2001:db8:1::2]:81 udp:[2001:db8:1::2]:7 udp:[2001:db8:1::2]:9"


def _run(guest, *flags, tmp_path, ipv6=False, slirpy=None):
    slirpy = slirpy or '"$PY" -m slirpy -c -a "$D/api.sock" --log-level=INFO "$@" -- "$PY" -c "$G" "$D/api.sock"'
    body = BODY.format(world=WORLD6 if ipv6 else WORLD4, slirpy=slirpy)
    if ipv6:  # the 10.99 address is for the IPv4 world only
        body = body.replace("ip addr add 10.99.0.1/24 dev v0\n", "").replace(
            "world ip addr add 10.99.0.2/24 dev v1 2>/dev/null || true\n", "")
    r = run_world(body, GUEST_LIB + textwrap.dedent(guest), SERVERS, str(tmp_path), *flags,
                  ipv6=ipv6, ping=True, timeout=90)
    assert r.returncode == 0, f"stdout={r.stdout}\nstderr={r.stderr}"
    return dict(line.split(" ", 1) for line in r.stdout.strip().splitlines()), r.stderr


GUEST_DENY_LIST = """
say("tcp80", tcp("192.0.2.2", 80))
say("tcp81", tcp("192.0.2.2", 81))
say("tcp81again", tcp("192.0.2.2", 81))
say("private", tcp("10.99.0.2", 80))
say("loop5432", tcp("10.0.2.2", 5432))
say("loop5433", tcp("10.0.2.2", 5433))
say("udp7", udp("192.0.2.2", 7))
say("udp9", udp("192.0.2.2", 9))
say("ping", ping("192.0.2.2"))
say("dns", dns())
pol = api({"execute": "get_stats"})["return"]["policy"]
say("hits", json.dumps([(r["id"], r["hits"]) for r in pol["rules"]]))
say("default", pol["default"], pol["default_hits"])
"""


def test_deny_list_tcp_udp_icmp_private_and_one_host_loopback_port(tmp_path):
    """Rules, first match wins, default allow: a TCP port, a UDP port, ping, the private set
    (10.99.0.2 in the world; also the gateway 10.0.2.2, which is 10/8) with one host-loopback
    port allowed before it. DNS still answers: private does not cover the forwarder."""
    out, err = _run(GUEST_DENY_LIST, "--deny=tcp:192.0.2.2:81", "--deny=udp:192.0.2.0/24:9",
                    "--deny=icmp:192.0.2.2", "--allow=tcp:host-loopback:5432", "--deny=private",
                    "--dns-upstream=192.0.2.2:5353", tmp_path=tmp_path)
    assert out["tcp80"] == "OK hi 80"
    assert out["tcp81"] == out["tcp81again"] == "ERR EHOSTUNREACH"
    assert out["private"] == "ERR EHOSTUNREACH"
    assert out["loop5432"] == "OK hi 5432" and out["loop5433"] == "ERR EHOSTUNREACH"
    assert out["udp7"] == "OK echo?" and out["udp9"] == "ERR EHOSTUNREACH"
    assert out["ping"] == "UNREACH 3 13"
    assert out["dns"] == "OK 198.51.100.7"
    # hits per rule: 81 twice; udp 9 once; the ping once; 5432 once; private twice (10.99, 5433)
    assert json.loads(out["hits"]) == [[1, 2], [2, 1], [3, 1], [4, 1], [5, 2]]
    # logged at INFO once per rule per interval: the second refusal of rule 1 is not a line
    lines = [ln for ln in err.splitlines() if "egress policy:" in ln]
    assert sum("refused by rule 1 (deny tcp:192.0.2.2:81)" in ln for ln in lines) == 1, err
    assert any("udp to 192.0.2.2:9 refused by rule 2" in ln for ln in lines), err
    assert any("icmp to 192.0.2.2 refused by rule 3" in ln for ln in lines), err


GUEST_DEFAULT_DENY = """
say("loop5432", tcp("10.0.2.2", 5432))
say("loop5433", tcp("10.0.2.2", 5433))
say("tcp80", tcp("192.0.2.2", 80))
say("udp7", udp("192.0.2.2", 7))
say("ping", ping("192.0.2.2"))
say("dns", dns())
import socket as _s
srv = _s.socket(); srv.bind(("0.0.0.0", 8080)); srv.listen(1); srv.settimeout(20)
open(os.path.join(os.path.dirname(sys.argv[1]), "listening"), "w").close()
c, peer = srv.accept()
c.sendall(b"guest here"); c.close()
say("fwd_peer", peer[0])
say("default", json.dumps(api({"execute": "list_rules"})["return"]["default_hits"]))
"""

SLIRPY_WITH_FORWARD = """
"$PY" -m slirpy -c -a "$D/api.sock" --log-level=INFO "$@" -- "$PY" -c "$G" "$D/api.sock" & P=$!
i=0
while [ ! -e "$D/listening" ]; do
    i=$((i+1)); [ $i -le 600 ] || { echo "guest never listened" >&2; exit 1; }
    sleep 0.05
done
"$PY" -c 'import socket; c = socket.create_connection(("127.0.0.1", 18080), 10); print("fwd", c.recv(100).decode())' > "$D/fwd.out"
wait $P
cat "$D/fwd.out"  # after the guest's lines: written at the same moment, they could interleave
"""


def test_default_deny_with_an_allow_list_keeps_dns_and_forwards(tmp_path):
    """--default-deny --allow=tcp:10.0.2.2:5432: the host's loopback on that one port and
    nothing else; DNS still answers (its own switch); a -p forward into the guest works (its
    loopback client spliced: the guest sees its own address; the policy is not asked)."""
    out, err = _run(GUEST_DEFAULT_DENY, "--default-deny", "--allow=tcp:10.0.2.2:5432",
                    "--dns-upstream=192.0.2.2:5353", "-p", "127.0.0.1:18080:8080",
                    tmp_path=tmp_path, slirpy=SLIRPY_WITH_FORWARD)
    assert out["loop5432"] == "OK hi 5432"
    assert out["loop5433"] == out["tcp80"] == out["udp7"] == "ERR EHOSTUNREACH"
    assert out["ping"] == "UNREACH 3 13"
    assert out["dns"] == "OK 198.51.100.7"
    assert out["fwd"] == "guest here" and out["fwd_peer"] == "10.0.2.100"
    assert out["default"] == "4"  # 5433, 80, udp 7, the ping (DNS is not the default's)
    assert "refused by --default-deny" in err


GUEST_LIVE = """
held, got = tcp("192.0.2.2", 80, keep=True)
say("held", got)
r = api({"execute": "add_rule", "arguments": {"action": "deny", "rule": "tcp:192.0.2.2:80"}})
say("add", json.dumps(r))
try:
    held.settimeout(8)
    say("held_after", "EOF" if held.recv(100) == b"" else "DATA")
except OSError as e:
    say("held_after", _err(e))
say("tcp80_denied", tcp("192.0.2.2", 80))
say("udp7_before", udp("192.0.2.2", 7))
r = api({"execute": "add_rule", "arguments": {"action": "allow", "rule": "udp:192.0.2.2:7",
                                               "index": 0}})
say("add_allow", json.dumps(r))
say("udp7_after", udp("192.0.2.2", 7))
say("list", json.dumps([(x["id"], x["action"], x["rule"]) for x in
                        api({"execute": "list_rules"})["return"]["rules"]]))
say("remove", json.dumps(api({"execute": "remove_rule", "arguments": {"id": 1}})))
say("tcp80_again", tcp("192.0.2.2", 80))
say("bad", json.dumps(api({"execute": "add_rule", "arguments": {"action": "deny", "rule": "10.0.0.0/40"}})))
"""


def test_live_rule_changes_over_the_api(tmp_path):
    """add_rule applies to new flows and ends the open ones it denies (the guest's connection
    is reset, the reply says so); an allow inserted first wins; remove_rule lets flows again."""
    out, _ = _run(GUEST_LIVE, "--deny=udp:192.0.2.2:7", tmp_path=tmp_path)
    assert out["held"] == "hi 80"
    assert json.loads(out["add"]) == {"return": {"id": 2, "flows_reset":
                                                 {"tcp": 1, "udp": 0, "icmp": 0}}}
    assert out["held_after"] == "ERR ECONNRESET"
    assert out["tcp80_denied"] == "ERR EHOSTUNREACH"
    assert out["udp7_before"] == "ERR EHOSTUNREACH"
    assert json.loads(out["add_allow"])["return"]["id"] == 3
    assert out["udp7_after"] == "OK echo?"
    assert json.loads(out["list"]) == [[3, "allow", "udp:192.0.2.2:7"], [1, "deny", "udp:192.0.2.2:7"],
                                       [2, "deny", "tcp:192.0.2.2:80"]]
    assert json.loads(out["remove"]) == {"return": {"flows_reset": {"tcp": 0, "udp": 0, "icmp": 0}}}
    assert out["tcp80_again"] == "ERR EHOSTUNREACH"  # rule 2 still there
    assert json.loads(out["bad"]) == {"error": {"desc": "bad request: add_rule: bad arguments.rule: "
                                                         "10.0.0.0/40: prefix length 40 out of range 0..32"}}


GUEST_V6 = """
say("slaac", wait_slaac())
say("tcp80", tcp("2001:db8:1::2", 80))
say("tcp81", tcp("2001:db8:1::2", 81))
say("udp7", udp("2001:db8:1::2", 7))
say("udp9", udp("2001:db8:1::2", 9))
say("ping", ping("2001:db8:1::2"))
say("loop6", tcp("fd00::2", 5432))
say("loop6_denied", tcp("fd00::2", 5433))
"""


def test_ipv6_destinations(tmp_path):
    """IPv6 rules (brackets, a prefix) through the same NATs: ICMPv6 administratively
    prohibited, which Linux reports as EACCES; host-loopback covers fd00::2."""
    out, _ = _run(GUEST_V6, "-6", "--deny=tcp:[2001:db8:1::2]:81", "--deny=udp:[2001:db8::]/32:9",
                  "--deny=icmp:[2001:db8::]/32", "--allow=host-loopback:5432",
                  "--deny=host-loopback", tmp_path=tmp_path, ipv6=True)
    assert out["slaac"] == "True"
    assert out["tcp80"] == "OK hi 80" and out["tcp81"] == "ERR EACCES"
    assert out["udp7"] == "OK echo?" and out["udp9"] == "ERR EACCES"
    assert out["ping"] == "UNREACH 1 1"
    assert out["loop6"] == "OK hi 5432" and out["loop6_denied"] == "ERR EACCES"
