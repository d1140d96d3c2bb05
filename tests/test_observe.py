"""Unit tests for observability: the rate limiter, logging setup, Observer cap warnings, PcapWriter,
get_stats/list_flows on fake and real parts, and slirpy-api's stats/flows output."""

from __future__ import annotations

import io
import json
import logging
from types import SimpleNamespace

import dpkt
import pytest
import trio

from slirpy import api_client
from slirpy.api_socket import ApiServer, handle_request
from slirpy.config import Config
from slirpy.logutil import RateLimited, setup_logging
from slirpy.dns import DnsForwarder
from slirpy.observe import Observer, is_cap_reason
from slirpy.pcap import PcapWriter
from slirpy.portfwd import PortForwarder
from slirpy.stack.addrmap import AddressMap
from slirpy.stack.stack import Stack
from slirpy.hostsock import FlowTable


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


class ListHandler(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines = []

    def emit(self, record):
        self.lines.append((record.levelname, record.getMessage()))


@pytest.fixture
def caught():
    h = ListHandler()
    lg = logging.getLogger("slirpy")
    old = lg.level, lg.propagate
    lg.addHandler(h)
    lg.setLevel(logging.DEBUG)
    yield h.lines
    lg.removeHandler(h)
    lg.setLevel(old[0])
    lg.propagate = old[1]


def test_rate_limited_once_per_interval_and_counts_suppressed(caught):
    clock = Clock()
    rl = RateLimited(logging.getLogger("slirpy.t"), logging.WARNING, interval=10.0, clock=clock)
    emitted = [rl.log("k", "boom %d", i) for i in range(1000)]
    assert emitted.count(True) == 1 and caught == [("WARNING", "boom 0")]
    assert rl.log("other", "other key") is True  # keys are independent
    clock.t += 10.0
    assert rl.log("k", "boom %d", 1000)
    assert caught[-1] == ("WARNING", "boom 1000 (999 similar suppressed)")
    clock.t += 10.0
    rl.log("k", "again")
    assert caught[-1] == ("WARNING", "again")


def test_rate_limited_bounded_keys_and_disabled_level(caught):
    rl = RateLimited(logging.getLogger("slirpy.t"), logging.INFO, max_keys=8, clock=Clock())
    for i in range(100):
        rl.log(i, "k%d", i)
    assert len(rl._seen) <= 8 and len(caught) == 100
    logging.getLogger("slirpy").setLevel(logging.WARNING)
    assert rl.log("x", "hidden") is False and len(caught) == 100


def test_setup_logging_levels_ours_only():
    buf = io.StringIO()
    root = logging.getLogger()
    saved = root.level, list(root.handlers)
    try:
        setup_logging("DEBUG", buf)
        logging.getLogger("slirpy.x").debug("ours")
        logging.getLogger("pyroute2.netlink").debug("theirs: every netlink message")
        logging.getLogger("pyroute2.netlink").warning("theirs: warning")
        logging.getLogger("pyroute2.netlink").error("theirs: error")
        out = buf.getvalue().splitlines()
        assert out[0] == "slirpy: DEBUG slirpy.x: ours"
        assert not any("theirs" in x for x in out)  # pyroute2 is not ours: never on our handler
        assert not logging.getLogger("pyroute2.netlink").isEnabledFor(logging.WARNING)
        assert logging.getLogger("pyroute2.netlink").isEnabledFor(logging.ERROR)
        buf.truncate(0)
        buf.seek(0)
        setup_logging("ERROR", buf)
        logging.getLogger("slirpy.x").warning("quiet")
        logging.getLogger("slirpy.x").error("loud")
        assert buf.getvalue() == "slirpy: ERROR slirpy.x: loud\n"
    finally:
        lg = logging.getLogger("slirpy")
        for h in list(lg.handlers):
            lg.removeHandler(h)
        lg.propagate = True
        lg.setLevel(logging.NOTSET)
        root.setLevel(saved[0])
        root.handlers[:] = saved[1]


class FakeDaemon:
    def __init__(self, **cfg):
        self.config = Config(**cfg)
        self.stack = Stack(self.config, 0.0)
        self.t = 0.0
        self.tap = None
        self.sandbox_paths = None

    def now(self):
        return self.t

    def compact(self):
        pass


def observer(d, udp=None, icmp=None, portfwd=None):
    """An Observer over d with the parts daemon.wire gives it; tables and forwards as given."""
    return Observer(d, tcp_nat=SimpleNamespace(compact=lambda: None),
                    udp_nat=SimpleNamespace(table=udp if udp is not None else FlowTable(8)),
                    icmp_nat=SimpleNamespace(table=icmp if icmp is not None else FlowTable(8)),
                    portfwd=portfwd or PortForwarder(d, AddressMap(d.config), None),
                    dns=DnsForwarder(d), pcap=PcapWriter(d.config))


def api(obs):
    return ApiServer(obs.daemon.config, obs.portfwd, obs)


def test_observer_warns_once_per_cap_not_per_drop(caught):
    d = FakeDaemon()
    obs = observer(d)
    assert any("starting" in m for _, m in caught)
    caught.clear()
    for _ in range(50):
        for _ in range(100):
            d.stack.stats.drop("tcp_flow_cap")
        d.stack.stats.drop("ipv4_bad_checksum")
        obs.check()
    warns = [m for lv, m in caught if lv == "WARNING"]
    assert warns == ["limit reached: tcp_flow_cap (+100, 100 in total)"]
    debug = [m for lv, m in caught if lv == "DEBUG"]
    assert debug == ["dropped: ipv4_bad_checksum (+1, 1 in total)"]
    assert is_cap_reason("udp_flow_evicted") and is_cap_reason("tap_write_queue_full")
    assert is_cap_reason("dns_rate_limited") and not is_cap_reason("ipv4_truncated")


def test_pcap_writer_unit(tmp_path, caught):
    path = str(tmp_path / "u.pcap")
    d = FakeDaemon(pcap=path, pcap_max_bytes=24 + 3 * (16 + 60))
    stops = []
    w = PcapWriter(d.config, on_stop=lambda: stops.append(1))
    assert w.active
    frames = [bytes([i]) * 60 for i in range(5)]
    w.write(frames[:2])
    w.write([bytearray(frames[2]), memoryview(frames[3])])  # 4th passes the cap: not written
    assert w.frames == 3 and w.capped and not w.active and stops == [1]  # the daemon's hook off
    w.write(frames[4:])
    assert [m for lv, m in caught if lv == "WARNING"] == [
        f"pcap {path}: --pcap-max-bytes 252 reached after 3 frames; capture stopped"]
    with open(path, "rb") as f:
        got = [bytes(b) for _, b in dpkt.pcap.Reader(f)]
    assert got == frames[:3]
    assert w.status() == {"file": path, "frames": 3, "bytes": 252, "max_bytes": 252, "stopped": True}


def test_no_pcap_no_hook(tmp_path):
    d = FakeDaemon()
    w = PcapWriter(d.config)
    assert not w.active and w._w is None
    w.write([b"x" * 60])
    assert w.frames == 0


def test_pcap_unwritable_is_startup_error(tmp_path):
    from slirpy.errors import StartupError
    with pytest.raises(StartupError, match="--pcap"):
        PcapWriter(FakeDaemon(pcap=str(tmp_path / "no" / "such" / "dir.pcap")).config)


def test_get_stats_and_list_flows_on_real_stack_and_tables():
    d = FakeDaemon()
    u, i = FlowTable(8), FlowTable(8)
    obs = observer(d, udp=u, icmp=i)
    st = json.loads(handle_request(api(obs), b'{"execute":"get_stats"}'))["return"]
    for k in ("frames_in", "frames_out", "bytes_in", "bytes_out", "dropped", "uptime", "dropped_total",
              "flows", "forwards", "reassembly", "buffers", "pcap"):
        assert k in st, k
    assert st["flows"]["tcp"] == {"open": 0, "states": {}, "max": 32768}
    assert st["reassembly"]["max_entries"] == 64 and st["pcap"] is None

    class V:
        bytes_in, bytes_out = 12, 34
    u.add((4, "10.0.2.100", 5000, "1.2.3.4", 53), V(), 0.0, 10.0)
    i.add((4, "10.0.2.100", 77, "1.2.3.4"), V(), 0.0, 30.0)
    d.t = 4.0
    fl = json.loads(handle_request(api(obs), b'{"execute":"list_flows"}'))["return"]["flows"]
    assert fl == [
        {"proto": "udp", "family": 4, "src": "10.0.2.100", "sport": 5000, "dst": "1.2.3.4", "dport": 53,
         "state": "ACTIVE", "bytes_in": 12, "bytes_out": 34, "idle": 4.0, "expires_in": 6.0},
        {"proto": "icmp", "family": 4, "src": "10.0.2.100", "sport": 77, "dst": "1.2.3.4", "dport": None,
         "state": "ACTIVE", "bytes_in": 12, "bytes_out": 34, "idle": 4.0, "expires_in": 26.0}]
    st = obs.stats()
    assert st["flows"]["udp"]["open"] == 1 and st["flows"]["icmp"]["open"] == 1


def test_tcp_flows_listed_from_engine():
    d = FakeDaemon()
    fid = d.stack.connect_tcp(4, "10.0.2.2", 40000, "10.0.2.100", 80, 0.0)
    assert fid is not None
    obs = observer(d)
    fl = obs.flows()
    assert len(fl) == 1 and fl[0]["proto"] == "tcp" and fl[0]["dst"] == "10.0.2.2"
    assert fl[0]["state"] == obs.stats()["flows"]["tcp"]["states"].popitem()[0]


def test_introspection_of_broken_parts_never_raises():
    d = FakeDaemon()
    obs = observer(d, icmp=type("T", (), {"items": lambda self: [(1,)]})())  # garbage for a table
    assert handle_request(api(obs), b'{"execute":"list_flows"}') == \
        b'{"error":{"desc":"bad request: list_flows: internal error"}}'


def test_existing_replies_unchanged():
    a = api(observer(FakeDaemon()))
    assert handle_request(a, b'{"execute":"list_hostfwd"}') == b'{"entries":[]}'
    assert handle_request(a, b'{"execute":"nosuch"}') == b'{"error":{"desc":"bad request: unknown execute"}}'
    assert handle_request(a, b"not json") == b'{"error":{"desc":"bad request: cannot parse JSON"}}'


async def test_client_stats_and_flows_table_and_json(tmp_path, capsys):
    d = FakeDaemon()
    u = FlowTable(8)
    obs = observer(d, udp=u)
    d.stack.stats.drop("eth_unknown_type", 5)
    v = type("V", (), {"bytes_in": 7, "bytes_out": 9})()
    u.add((4, "10.0.2.100", 5000, "10.0.2.2", 9999), v, 0.0, 60.0)
    path = str(tmp_path / "api.sock")
    async with trio.open_nursery() as n:
        await n.start(ApiServer(d.config, obs.portfwd, obs, path=path).serve)
        rcs = []
        for argv in (["stats"], ["stats", "--json"], ["flows"], ["flows", "--json"]):
            rcs.append(await trio.to_thread.run_sync(api_client.main, ["--socket", path, *argv]))
        n.cancel_scope.cancel()
    assert rcs == [0, 0, 0, 0]
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("uptime")
    assert any(ln.split() == ["eth_unknown_type", "5"] for ln in lines)
    jl = [ln for ln in lines if ln.startswith("{")]
    assert len(jl) == 2
    st = json.loads(jl[0])
    assert st["dropped"] == {"eth_unknown_type": 5} and st["flows"]["udp"]["open"] == 1
    assert json.loads(jl[1])["flows"][0]["dport"] == 9999
    row = [ln for ln in lines if ln.startswith("udp ") and "10.0.2.2:9999" in ln]
    assert len(row) == 1 and row[0].split() == ["udp", "10.0.2.100:5000", "10.0.2.2:9999", "ACTIVE", "7", "9"]
    assert "1 flow" in lines


def test_udp_forward_mappings_listed():
    from slirpy.portfwd import _UdpMap
    d = FakeDaemon()
    m = _UdpMap(("192.0.2.7", 5555), 33000, "192.0.2.7", 1.0, "10.0.2.100")
    m.bytes_in, m.bytes_out = 5, 11
    fwd = type("F", (), {"proto": "udp", "id": 3, "guest_addr": "10.0.2.100", "guest_port": 53,
                         "by_client": {("192.0.2.7", 5555): m}})()
    tcpf = type("F", (), {"proto": "tcp", "id": 4, "by_client": {}})()
    obs = observer(d, portfwd=type("P", (), {"forwards": {3: fwd, 4: tcpf}})())
    d.t = 3.5
    assert obs.flows() == [
        {"proto": "udp", "family": 4, "src": "10.0.2.100", "sport": 53, "dst": "192.0.2.7",
         "dport": 33000, "state": "FORWARDED", "forward": 3, "client": "192.0.2.7:5555",
         "bytes_in": 5, "bytes_out": 11, "idle": 2.5}]


def test_trimmer_trims_once_a_crowd_of_flows_has_gone(monkeypatch):
    """Issue #20: memory goes back after a flood ends. The trim runs when the TCP flows have
    fallen TRIM_AFTER below their high-water mark and held still for one check, once per fall;
    glibc's malloc_trim is found."""
    from slirpy import observe
    t = observe.Trimmer()
    assert t._malloc_trim is not None  # glibc here
    calls = []
    monkeypatch.setattr(t, "_malloc_trim", lambda pad: calls.append(pad) or 1)
    assert not t.check(0) and not t.check(3000) and not t.check(3000 - observe.TRIM_AFTER + 1)
    assert not t.check(3000 - observe.TRIM_AFTER)  # still falling: not in the middle of it
    assert t.check(3000 - observe.TRIM_AFTER) and calls == [0] and t.trims == 1
    assert not t.check(100) and t.check(100) and t.trims == 2  # from the new mark (2488)
    assert not t.check(100) and not t.check(400) and not t.check(0)  # 400 -> 0: a small fall
    assert calls == [0, 0] and t.trims == 2
