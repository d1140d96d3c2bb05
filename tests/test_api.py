"""API socket: exact reply bytes (compat doc table), bad input, limits; real unix socket, fake daemon."""

from __future__ import annotations

import json
import os
import socket
import stat

import pytest
import trio

from nsutil import free_port
from slirpy import api_socket
from slirpy.api_socket import ApiServer, handle_request
from slirpy.config import Config
from slirpy.errors import StartupError
from slirpy.portfwd import PortForwarder
from slirpy.stack.addrmap import AddressMap
from slirpy.stack.stats import Stats


class FakeStack:
    def __init__(self):
        self.stats = Stats()
        self.sent = []

    def send_udp(self, *a):
        self.sent.append(a)


class FakeDaemon:
    def __init__(self, **cfg):
        self.config = Config(**cfg)
        self.stack = FakeStack()

    def now(self):
        return trio.current_time()

    def flush(self):
        pass


class ClosingNat:
    """The TCP NAT's part for a forward: counts and closes what it is given."""

    def __init__(self, stats):
        self.stats = stats

    async def forward_inbound(self, sock, *_):
        self.stats.drop("nat_took_connection")
        sock.close()


def forwarder(d, tcp_nat=None):
    return PortForwarder(d, AddressMap(d.config), tcp_nat or ClosingNat(d.stack.stats))


class StatsOnly:
    """The observer's part of the API: get_stats answers the stack's counters."""

    def __init__(self, stack):
        self.stack = stack

    def stats(self):
        return self.stack.stats.as_dict()

    def flows(self):
        return []


async def call(path, data: bytes) -> bytes:
    s = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with s:
        await s.connect(path)
        await s.send(data)
        s.shutdown(socket.SHUT_WR)
        out = b""
        while True:
            b = await s.recv(65536)
            if not b:
                return out
            out += b


async def start(nursery, tmp_path, **cfg):
    d = FakeDaemon(**cfg)
    pf = forwarder(d)
    await nursery.start(pf.serve)
    path = str(tmp_path / "api.sock")
    srv = ApiServer(d.config, pf, StatsOnly(d.stack), path=path)
    await nursery.start(srv.serve)
    return d, pf, srv, path


async def test_compat_table_exact_bytes(tmp_path):
    port = free_port()
    async with trio.open_nursery() as n:
        d, pf, srv, path = await start(n, tmp_path)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        add = ('{"execute":"add_hostfwd","arguments":{"proto":"tcp","host_addr":"0.0.0.0",'
               f'"host_port":{port},"guest_addr":"10.0.2.100","guest_port":80}}}}').encode()
        assert await call(path, add) == b'{"return":{"id":1}}'
        assert await call(path, add) == \
            b'{"error":{"desc":"bad request: add_hostfwd: slirp_add_hostfwd failed"}}'
        assert await call(path, b'{"execute":"list_hostfwd"}') == (
            '{"entries":[{"id":1,"proto":"tcp","host_addr":"0.0.0.0",'
            f'"host_port":{port},"guest_addr":"10.0.2.100","guest_port":80}}]}}').encode()
        # the host port is really bound
        c = socket.socket()
        c.connect(("127.0.0.1", port))
        c.close()
        assert await call(path, b'{"execute":"remove_hostfwd","arguments":{"id":1}}') == \
            b'{"return":{}}'
        assert await call(path, b'{"execute":"remove_hostfwd","arguments":{"id":1}}') == \
            b'{"error":{"desc":"bad request: remove_hostfwd: bad arguments.id"}}'
        assert await call(path, b'{"execute":"nosuch"}') == \
            b'{"error":{"desc":"bad request: unknown execute"}}'
        assert await call(path, b'not json') == \
            b'{"error":{"desc":"bad request: cannot parse JSON"}}'
        assert await call(path, b'{"execute":"list_hostfwd"}') == b'{"entries":[]}'
        # after remove the host port is closed
        c = socket.socket()
        with pytest.raises(ConnectionRefusedError):
            c.connect(("127.0.0.1", port))
        c.close()
        # ids keep counting (slirp4netns numbering), guest_addr defaults to the guest
        port2 = free_port(socket.SOCK_DGRAM)
        r = await call(path, json.dumps({"execute": "add_hostfwd", "arguments": {
            "proto": "udp", "host_addr": "127.0.0.1", "host_port": port2, "guest_port": 53}}).encode())
        assert r == b'{"return":{"id":2}}'
        assert json.loads(await call(path, b'{"execute":"list_hostfwd"}'))["entries"] == [
            {"id": 2, "proto": "udp", "host_addr": "127.0.0.1", "host_port": port2,
             "guest_addr": "10.0.2.100", "guest_port": 53}]
        d.stack.stats.drop("x_reason", 3)
        st = json.loads(await call(path, b'{"execute":"get_stats"}'))
        assert st["return"]["dropped"] == {"nat_took_connection": 1, "x_reason": 3}
        n.cancel_scope.cancel()
    assert not os.path.exists(path)


BAD = [
    ({"proto": "sctp", "host_port": 1, "guest_port": 80}, "add_hostfwd: bad arguments.proto"),
    ({"host_port": 40000, "guest_port": 80}, "add_hostfwd: bad arguments.proto"),
    ({"proto": None, "host_port": 40000, "guest_port": 80}, "add_hostfwd: bad arguments.proto"),
    ({"proto": "tcp", "host_port": 0, "guest_port": 80}, "add_hostfwd: bad arguments.host_port"),
    ({"proto": "tcp", "host_port": 65536, "guest_port": 80}, "add_hostfwd: bad arguments.host_port"),
    ({"proto": "tcp", "host_port": "40000", "guest_port": 80}, "add_hostfwd: bad arguments.host_port"),
    ({"proto": "tcp", "host_port": True, "guest_port": 80}, "add_hostfwd: bad arguments.host_port"),
    ({"proto": "tcp", "host_port": None, "guest_port": 80}, "add_hostfwd: bad arguments.host_port"),
    ({"proto": "tcp", "host_port": 40000.0, "guest_port": 80}, "add_hostfwd: bad arguments.host_port"),
    ({"proto": "tcp", "guest_port": 80}, "add_hostfwd: bad arguments.host_port"),
    ({"proto": "tcp", "host_port": 40000}, "add_hostfwd: bad arguments.guest_port"),
    ({"proto": "tcp", "host_port": 40000, "guest_port": 0}, "add_hostfwd: bad arguments.guest_port"),
    ({"proto": "tcp", "host_port": 40000, "guest_port": False}, "add_hostfwd: bad arguments.guest_port"),
    ({"proto": "tcp", "host_addr": "8.8.8.8", "host_port": 40000, "guest_port": 80},
     "add_hostfwd: bad arguments.host_addr"),
    ({"proto": "tcp", "host_addr": 7, "host_port": 40000, "guest_port": 80},
     "add_hostfwd: bad arguments.host_addr"),
    ({"proto": "tcp", "host_port": 40000, "guest_addr": "192.168.1.5", "guest_port": 80},
     "add_hostfwd: bad arguments.guest_addr"),
    ({"proto": "tcp", "host_port": 40000, "guest_addr": "10.0.2.2", "guest_port": 80},
     "add_hostfwd: bad arguments.guest_addr"),
    ({"proto": "tcp", "host_port": 40000, "guest_addr": None, "guest_port": 80},
     "add_hostfwd: bad arguments.guest_addr"),
    ({"proto": "tcp", "host_port": 40000, "guest_addr": "nonsense", "guest_port": 80},
     "add_hostfwd: bad arguments.guest_addr"),
    ({"proto": "tcp", "host_port": 40000, "guest_addr": "fd00::100", "guest_port": 80},
     "add_hostfwd: bad arguments.guest_addr"),  # IPv6 not enabled
    ("notadict", "add_hostfwd: bad arguments.proto"),
]


async def test_bad_inputs_error_and_keep_serving(tmp_path):
    async with trio.open_nursery() as n:
        d, pf, srv, path = await start(n, tmp_path)
        for args, desc in BAD:
            req = json.dumps({"execute": "add_hostfwd", "arguments": args}).encode()
            assert await call(path, req) == api_socket._err("bad request: " + desc), args
        for req, desc in [
            (b'{"execute":"remove_hostfwd"}', "remove_hostfwd: bad arguments.id"),
            (b'{"execute":"remove_hostfwd","arguments":{"id":"1"}}', "remove_hostfwd: bad arguments.id"),
            (b'{"execute":"remove_hostfwd","arguments":{"id":99}}', "remove_hostfwd: bad arguments.id"),
            (b'{"arguments":{}}', "no execute found"),
            (b'{"execute":5}', "no execute found"),
            (b'[1,2]', "json_object() failed"),
            (b'{"execute":"add_hostfwd"}', "add_hostfwd: bad arguments.proto"),
            (b'', "cannot parse JSON"),
            (b'\xff\xfe', "cannot parse JSON"),
            (b'[' * 100000, None),
        ]:
            r = await call(path, req)
            if desc:
                assert r == api_socket._err("bad request: " + desc), req
            else:
                assert b'"error"' in r
        # privileged port: refused (slirpy rule even as root)
        assert await call(path, b'{"execute":"add_hostfwd","arguments":{"proto":"tcp",'
                          b'"host_port":80,"guest_port":80}}') == \
            api_socket._err("bad request: add_hostfwd: slirp_add_hostfwd failed")
        assert pf.list() == []
        # still serving good requests
        p = free_port()
        r = await call(path, json.dumps({"execute": "add_hostfwd", "arguments": {
            "proto": "tcp", "host_addr": "127.0.0.1", "host_port": p, "guest_port": 80}}).encode())
        assert r == b'{"return":{"id":1}}'
        n.cancel_scope.cancel()


async def test_large_request_silent_client_and_many_clients(tmp_path, monkeypatch):
    monkeypatch.setattr(api_socket, "READ_TIMEOUT", 0.3)
    async with trio.open_nursery() as n:
        d, pf, srv, path = await start(n, tmp_path)
        big = b'{"execute":"list_hostfwd","pad":"' + b"x" * 70000 + b'"}'
        assert await call(path, big) == b'{"error":{"desc":"bad request: too large message"}}'
        # a silent client is dropped without a reply after the timeout
        s = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await s.connect(path)
        with trio.fail_after(5):
            assert await s.recv(100) == b""
        s.close()
        # 100 idle clients at once: beyond the cap they are closed; others still get answers
        idle = []
        for _ in range(100):
            c = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            await c.connect(path)
            idle.append(c)
        await trio.sleep(0.05)
        assert srv.active <= api_socket.MAX_CLIENTS
        assert srv.refused >= 100 - api_socket.MAX_CLIENTS
        for c in idle:
            c.close()
        await trio.sleep(0.5)  # the silent ones time out (patched to 0.3 s)
        assert srv.active == 0
        assert await call(path, b'{"execute":"list_hostfwd"}') == b'{"entries":[]}'
        n.cancel_scope.cancel()


async def test_stale_socket_replaced_live_refused(tmp_path):
    path = str(tmp_path / "s.sock")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()  # file left behind, nobody listening
    d = FakeDaemon()
    async with trio.open_nursery() as n:
        srv = ApiServer(d.config, forwarder(d), StatsOnly(d.stack), path=path)
        await n.start(srv.serve)
        assert await call(path, b'{"execute":"list_hostfwd"}') == b'{"entries":[]}'
        with pytest.raises(StartupError, match="another daemon"):
            await ApiServer(d.config, forwarder(d), StatsOnly(d.stack), path=path).serve()
        n.cancel_scope.cancel()
    assert not os.path.exists(path)
    open(path, "w").close()
    with pytest.raises(StartupError, match="not a socket"):
        await ApiServer(d.config, forwarder(d), StatsOnly(d.stack), path=path).serve()


def test_handle_request_with_no_forwards():
    d = FakeDaemon()
    api = ApiServer(d.config, forwarder(d), StatsOnly(d.stack))
    assert handle_request(api, b'{"execute":"list_hostfwd"}') == b'{"entries":[]}'


async def test_client_cli(tmp_path, capsys):
    from slirpy import api_client
    async with trio.open_nursery() as n:
        d, pf, srv, path = await start(n, tmp_path)
        p = free_port()
        rc = await trio.to_thread.run_sync(api_client.main, ["--socket", path, "add", "tcp", f"127.0.0.1:{p}:80"])
        assert rc == 0
        rc2 = await trio.to_thread.run_sync(api_client.main, ["--socket", path, "add", "tcp", f"127.0.0.1:{p}:80"])
        assert rc2 == 1
        rc3 = await trio.to_thread.run_sync(api_client.main, ["--socket", path, "list"])
        rc4 = await trio.to_thread.run_sync(api_client.main, ["--socket", path, "remove", "1"])
        rc5 = await trio.to_thread.run_sync(api_client.main, ["--socket", path, "raw", "{}"])
        assert (rc3, rc4, rc5) == (0, 0, 1)
        n.cancel_scope.cancel()
    out = capsys.readouterr().out.splitlines()
    assert out[0] == '{"return":{"id":1}}'
    assert out[1] == '{"error":{"desc":"bad request: add_hostfwd: slirp_add_hostfwd failed"}}'
    assert json.loads(out[2])["entries"][0]["host_port"] == p
    assert out[3] == '{"return":{}}'
    assert out[4] == '{"error":{"desc":"bad request: no execute found"}}'


from hypothesis import given, settings, strategies as hs  # noqa: E402

_json = hs.recursive(hs.none() | hs.booleans() | hs.integers() | hs.floats() | hs.text(max_size=8),
                     lambda c: hs.lists(c, max_size=4) | hs.dictionaries(hs.text(max_size=8), c, max_size=4),
                     max_leaves=12)
_args = hs.fixed_dictionaries({}, optional={
    "proto": hs.sampled_from(["tcp", "udp", "x", 1, None]),
    "host_addr": hs.sampled_from(["0.0.0.0", "::1", "1.2.3.4", "", 5]),
    "host_port": hs.integers(-5, 70000) | _json, "guest_port": hs.integers(-5, 70000) | _json,
    "guest_addr": hs.sampled_from(["10.0.2.100", "10.0.2.50", "10.0.3.1", "fd00::5", ""]),
    "id": _json})


@settings(max_examples=300, deadline=None)
@given(raw=hs.binary(max_size=200) | _json.map(lambda v: json.dumps(v).encode())
       | hs.tuples(hs.sampled_from(["add_hostfwd", "remove_hostfwd", "list_hostfwd", "get_stats"]),
                   _args).map(lambda t: json.dumps({"execute": t[0], "arguments": t[1]}).encode()))
def test_handle_request_never_raises(raw):
    d = FakeDaemon()

    class NoBind(PortForwarder):  # never binds real ports (hypothesis picks privileged ones too)
        n = 0

        def add(self, *a):
            self.n += 1
            return self.n

        def remove(self, fid):
            from slirpy.errors import ForwardError
            raise ForwardError("none")

        def list(self):
            return []

    api = ApiServer(d.config, NoBind(d, AddressMap(d.config), None), StatsOnly(d.stack))
    out = json.loads(handle_request(api, raw))
    assert isinstance(out, dict) and len(out) == 1
    assert set(out) <= {"return", "error", "entries"}


# ---- the egress policy's rules (slirpy's own: add_rule, list_rules, remove_rule) ----------
class _FakeTcpNat:
    def __init__(self, flows):
        self.flows = flows  # [(family, dst, dport)] the guest opened

    def reset_outbound(self, denied):
        gone = [f for f in self.flows if denied(*f)]
        self.flows = [f for f in self.flows if f not in gone]
        return len(gone)


def _egress(tcp_flows=(), udp_keys=()):
    from types import SimpleNamespace

    from slirpy.egress import Egress
    from slirpy.hostsock import FlowTable
    from slirpy.stack.policy import Policy
    stats = Stats()
    udp = SimpleNamespace(table=FlowTable(8), stats=stats)
    for k in udp_keys:
        udp.table.add(k, object(), 0.0, 30.0)
    icmp = SimpleNamespace(table=FlowTable(8), stats=stats)
    return Egress(Policy(Config()), _FakeTcpNat(list(tcp_flows)), udp, icmp), udp


def test_rules_over_the_api_exact_replies():
    d = FakeDaemon()
    eg, udp = _egress([(4, "192.0.2.2", 22), (4, "192.0.2.2", 80)],
                      [(4, "10.0.2.100", 5000, "192.0.2.2", 53), (4, "10.0.2.100", 5001, "192.0.2.9", 9)])
    api = ApiServer(d.config, forwarder(d), StatsOnly(d.stack), egress=eg)

    def req(execute, **args):
        return handle_request(api, json.dumps({"execute": execute, "arguments": args}).encode())
    assert req("add_rule", action="allow", rule="tcp:192.0.2.2:80") == \
        b'{"return":{"id":1,"flows_reset":{"tcp":0,"udp":0,"icmp":0}}}'
    # a deny covering open flows ends them, and says so (the allowed :80 stays)
    assert req("add_rule", action="deny", rule="192.0.2.2") == \
        b'{"return":{"id":2,"flows_reset":{"tcp":1,"udp":1,"icmp":0}}}'
    assert eg.tcp_nat.flows == [(4, "192.0.2.2", 80)] and len(udp.table) == 1
    assert req("add_rule", action="deny", rule="private", index=0) == \
        b'{"return":{"id":3,"flows_reset":{"tcp":0,"udp":0,"icmp":0}}}'
    assert json.loads(handle_request(api, b'{"execute":"list_rules"}')) == {"return": {
        "default": "allow", "default_hits": 0, "max_rules": 256, "refused": 0, "rules": [
            {"id": 3, "action": "deny", "rule": "private", "hits": 0},
            {"id": 1, "action": "allow", "rule": "tcp:192.0.2.2:80", "hits": 0},
            {"id": 2, "action": "deny", "rule": "192.0.2.2", "hits": 0}]}}
    assert req("remove_rule", id=1) == b'{"return":{"flows_reset":{"tcp":1,"udp":0,"icmp":0}}}'
    assert req("remove_rule", id=1) == b'{"error":{"desc":"bad request: remove_rule: bad arguments.id"}}'
    assert req("add_rule", action="permit", rule="x") == \
        b'{"error":{"desc":"bad request: add_rule: bad arguments.action"}}'
    assert req("add_rule", action="deny", rule=5) == \
        b'{"error":{"desc":"bad request: add_rule: bad arguments.rule"}}'
    assert req("add_rule", action="deny", rule="10.0.0.0/33") == (
        b'{"error":{"desc":"bad request: add_rule: bad arguments.rule: 10.0.0.0/33: prefix length '
        b'33 out of range 0..32"}}')
    assert req("add_rule", action="deny", rule="10.0.0.0", index=7) == \
        b'{"error":{"desc":"bad request: add_rule: bad arguments.index: index 7 out of range 0..2"}}'
    assert req("add_rule", action="deny", rule="10.0.0.0", index="0") == \
        b'{"error":{"desc":"bad request: add_rule: bad arguments.index"}}'


def test_rule_table_full_is_an_error_and_counted():
    d = FakeDaemon()
    eg, _ = _egress()
    eg.policy.max_rules = 2
    api = ApiServer(d.config, forwarder(d), StatsOnly(d.stack), egress=eg)
    add = b'{"execute":"add_rule","arguments":{"action":"deny","rule":"192.0.2.1"}}'
    handle_request(api, add)
    handle_request(api, add)
    assert handle_request(api, add) == \
        b'{"error":{"desc":"bad request: add_rule: rule table full (2 rules)"}}'
    assert eg.stats()["refused"] == 1 and len(eg.policy) == 2


def test_rules_without_a_policy_is_an_error():
    d = FakeDaemon()
    api = ApiServer(d.config, forwarder(d), StatsOnly(d.stack))
    assert handle_request(api, b'{"execute":"list_rules"}') == \
        b'{"error":{"desc":"bad request: list_rules: no egress policy"}}'


_rule_args = hs.fixed_dictionaries({}, optional={
    "action": hs.sampled_from(["allow", "deny", "x", 1, None]),
    "rule": hs.text(max_size=30) | hs.sampled_from(["private", "tcp:10.0.2.2:22", "[::]/0"]) | _json,
    "index": hs.integers(-3, 5) | _json, "id": hs.integers(-1, 5) | _json})


@settings(max_examples=300, deadline=None)
@given(reqs=hs.lists(hs.tuples(hs.sampled_from(["add_rule", "remove_rule", "list_rules"]),
                               _rule_args), max_size=6))
def test_rule_requests_never_raise(reqs):
    d = FakeDaemon()
    eg, _ = _egress([(4, "10.0.2.2", 22)])
    api = ApiServer(d.config, forwarder(d), StatsOnly(d.stack), egress=eg)
    for execute, args in reqs:
        out = json.loads(handle_request(api, json.dumps({"execute": execute,
                                                         "arguments": args}).encode()))
        assert isinstance(out, dict) and set(out) <= {"return", "error"} and len(out) == 1


async def test_client_cli_rules(tmp_path, capsys):
    from slirpy import api_client
    async with trio.open_nursery() as n:
        d, pf, srv, path = await start(n, tmp_path)
        srv.egress, _ = _egress()
        run = [["rules", "add", "deny", "tcp:[2001:db8::]/32:443"],
               ["rules", "add", "allow", "private", "--index", "0"], ["rules", "list"],
               ["rules", "remove", "1"], ["rules", "add", "deny", "nonsense"]]
        rcs = [await trio.to_thread.run_sync(api_client.main, ["--socket", path, *a]) for a in run]
        n.cancel_scope.cancel()
    assert rcs == [0, 0, 0, 0, 1]
    out = capsys.readouterr().out.splitlines()
    assert out[0] == '{"return":{"id":1,"flows_reset":{"tcp":0,"udp":0,"icmp":0}}}'
    assert out[2].split() == ["id", "action", "rule", "hits"]
    assert [ln.split() for ln in out[3:6]] == [["2", "allow", "private", "0"],
                                              ["1", "deny", "tcp:[2001:db8::]/32:443", "0"],
                                              ["-", "allow", "(default)", "0"]]
    assert out[6] == '{"return":{"flows_reset":{"tcp":0,"udp":0,"icmp":0}}}'
    assert "bad arguments.rule: nonsense:" in out[7]
