"""Introspection for the API (`get_stats`, `list_flows`) and the `Observer` daemon component.

The Observer is given the parts it reports on (daemon.wire); it costs nothing per packet: it
runs only when a client asks, or once every WATCH_INTERVAL seconds.

The Observer logs the start, a one-line summary at exit, and -- from a periodic diff of the drop
counters, not from the packet path -- "cap reached" warnings (rate-limited per reason).
"""

from __future__ import annotations

import collections
import logging
import os
import resource
import time

import trio

from . import __version__
from .logutil import RateLimited

log = logging.getLogger(__name__)

WATCH_INTERVAL = 2.0
TRIM_AFTER = 512  # TCP flows closed since the last high-water mark that make a trim worth it
_PAGE = os.sysconf("SC_PAGE_SIZE")
# drop reasons that mean a limit was hit (a cap, a full queue, an eviction, a rate limit)
_CAP_WORDS = ("cap", "full", "evict", "rate_limited", "too_many", "no_port", "denied")


def is_cap_reason(reason: str) -> bool:
    return any(w in reason for w in _CAP_WORDS)


def collect_stats(obs: "Observer") -> dict:
    d, stack = obs.daemon, obs.daemon.stack
    st = stack.stats.as_dict()
    out = dict(st)
    out["uptime"] = round(time.monotonic() - obs.started, 3)
    out["dropped_total"] = sum(st.get("dropped", {}).values())

    flows = {}
    tcp = stack.tcp
    states: collections.Counter = collections.Counter()
    sbuf = rbuf = ooo = 0
    if tcp is not None:
        states, sbuf, rbuf, ooo = tcp.tally()
    flows["tcp"] = {"open": sum(states.values()), "states": dict(sorted(states.items())),
                    "max": tcp.max_flows}
    for proto, nat in (("udp", obs.udp_nat), ("icmp", obs.icmp_nat)):
        table = nat.table
        flows[proto] = {"open": len(table), "max": table.cap, "expired": table.expired,
                        "evicted": table.evicted}
    out["flows"] = flows

    fwds = list(obs.portfwd.forwards.values())
    out["forwards"] = {"tcp": sum(1 for f in fwds if f.proto == "tcp"),
                       "udp": sum(1 for f in fwds if f.proto == "udp"),
                       "udp_mappings": sum(len(f.by_client) for f in fwds)}
    sp = getattr(obs.portfwd, "splicer", None)  # loopback TCP clients spliced (splice.py)
    out["forward_splice"] = sp.status() if sp is not None else None

    reass = stack._reass
    out["reassembly"] = {"entries": len(reass), "bytes": reass.bytes_held,
                         "max_entries": reass.max_entries, "max_bytes": reass.max_bytes}

    tap = d.tap  # None before the loop runs
    out["buffers"] = {"tcp_send_bytes": sbuf, "tcp_recv_bytes": rbuf, "tcp_ooo_bytes": ooo,
                      **tcp.mem_stats(),  # tcp_mem_bytes (the engine's running total), ...
                      "tap_write_queue": len(tap.queue) if tap is not None else 0,
                      "tap_write_queue_bytes": tap.queue_bytes if tap is not None else 0,
                      "stack_frames_queued": len(stack._out),
                      "stack_events_queued": len(stack._events),
                      "unresolved_frames": len(stack._unresolved)}

    dns = obs.dns
    out["dns"] = {"answered": dns.answered, "servfail": dns.servfails, "inflight": dns.inflight,
                  **dns.status()}  # upstreams in use and where they come from
    out["pcap"] = obs.pcap.status() if obs.pcap.path else None
    egress = getattr(obs, "egress", None)
    # the egress policy: each rule with its hits, the default and its hits
    out["policy"] = egress.stats() if egress is not None else None
    out["memory"] = memory_stats()
    return out


def memory_stats() -> dict:
    """The process's resident set now (None where /proc is gone: --enable-sandbox) and its peak."""
    rss = None
    try:
        with open("/proc/self/statm", "rb") as f:
            rss = int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        pass
    return {"rss_bytes": rss,
            "rss_peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def collect_flows(obs: "Observer") -> list[dict]:
    """Open flows: TCP from the engine, UDP and ICMP from their NAT tables.
    bytes_in: payload from the guest; bytes_out: payload to the guest."""
    out = [{"proto": "tcp", **f} for f in obs.daemon.stack.tcp.flows()]
    now = obs.daemon.now()
    for proto, nat in (("udp", obs.udp_nat), ("icmp", obs.icmp_nat)):
        for key, v, deadline, timeout in nat.table.items():
            if proto == "udp":
                fam, src, sport, dst, dport = key
            else:
                fam, src, ident, dst = key
                sport, dport = ident, None
            out.append({"proto": proto, "family": fam, "src": src, "sport": sport, "dst": dst,
                        "dport": dport, "state": "ACTIVE",
                        "bytes_in": v.bytes_in, "bytes_out": v.bytes_out,
                        "idle": round(max(0.0, now - (deadline - timeout)), 3),
                        "expires_in": round(max(0.0, deadline - now), 3)})
    sp = getattr(obs.portfwd, "splicer", None)
    if sp is not None:
        out += sp.flows()  # spliced forwarded connections: the kernel carries their bytes
    for fwd in list(obs.portfwd.forwards.values()):
        if fwd.proto != "udp":
            continue
        for m in list(fwd.by_client.values()):  # forwarded UDP: the guest is the server
            gaddr = m.gaddr or fwd.guest_addr
            out.append({"proto": "udp", "family": 6 if ":" in gaddr else 4, "src": gaddr,
                        "sport": fwd.guest_port, "dst": m.src, "dport": m.gport,
                        "state": "FORWARDED", "forward": fwd.id,
                        "client": f"{m.client[0]}:{m.client[1]}",
                        "bytes_in": m.bytes_in, "bytes_out": m.bytes_out,
                        "idle": round(max(0.0, now - m.last), 3)})
    return out


class Trimmer:
    """Gives memory back after a crowd of flows closed (issue #20: RSS stayed at 475 MB after a
    20,000-connection flood ended). Python's own free lists go with a full gc; malloc's with
    glibc's malloc_trim(0) through ctypes (None elsewhere: musl has none, nothing to do).
    check() runs every WATCH_INTERVAL: once the TCP flows have fallen TRIM_AFTER below their
    high-water mark and held still since the last check (a full gc takes tens of ms with many
    objects: not in the middle of the guest's burst of RSTs, whose frames would wait), it
    trims and starts a new mark."""

    def __init__(self):
        self._peak = 0
        self._last = -1
        self.trims = 0
        self._malloc_trim = None
        try:
            import ctypes  # already loaded (helper.py); CDLL(None) needs no file: fine in a sandbox
            fn = ctypes.CDLL(None).malloc_trim
            fn.argtypes, fn.restype = (ctypes.c_size_t,), ctypes.c_int
            self._malloc_trim = fn
        except (ImportError, OSError, AttributeError):
            pass

    def check(self, flows: int, compact=()) -> bool:
        last, self._last = self._last, flows
        if flows >= self._peak:
            self._peak = flows
            return False
        if self._peak - flows < TRIM_AFTER or flows != last:
            return False
        self._peak = flows
        self.trim(compact)
        return True

    def trim(self, compact=()) -> None:
        """compact: callables run first (tables and heaps rebuilt at their present size)."""
        import gc
        for fn in compact:
            fn()
        gc.collect()
        if self._malloc_trim is not None:
            self._malloc_trim(0)
        self.trims += 1


class Observer:
    """Daemon component: start line, cap warnings from counter diffs, exit summary, memory
    trimmed after a crowd of flows closed (Trimmer); and what the API's get_stats and
    list_flows read (stats(), flows()).

    needs: the daemon (config, stack, tap, now, compact) and the parts it reports on."""

    def __init__(self, daemon, *, tcp_nat, udp_nat, icmp_nat, portfwd, dns, pcap, egress=None):
        self.daemon = daemon
        self.egress = egress  # the egress policy's rules and hits (None: not wired)
        self.tcp_nat, self.udp_nat, self.icmp_nat = tcp_nat, udp_nat, icmp_nat
        self.portfwd, self.dns, self.pcap = portfwd, dns, pcap
        self.started = time.monotonic()
        self._last: dict = {}
        self._caps = RateLimited(log, logging.WARNING, interval=30.0)
        self._other = RateLimited(log, logging.DEBUG, interval=30.0)
        self.trimmer = Trimmer()
        cfg = daemon.config
        where = cfg.target if cfg.command is None else "-- " + " ".join(cfg.command)
        log.info("slirpy %s starting: %s tap=%s mtu=%d cidr=%s%s%s", __version__, where,
                 cfg.tap_name, cfg.mtu, cfg.cidr, " ipv6" if cfg.enable_ipv6 else "",
                 f" api={cfg.api_socket}" if cfg.api_socket else "")

    def stats(self) -> dict:
        return collect_stats(self)

    def flows(self) -> list[dict]:
        return collect_flows(self)

    def _compactors(self) -> list:
        return [self.daemon.stack.tcp.compact, self.tcp_nat.compact, self.daemon.compact]

    def check(self) -> None:
        """Diff the drop counters since the last check; log limits that were hit."""
        stats = self.daemon.stack.stats
        for reason, n in list(stats.dropped.items()):
            delta = n - self._last.get(reason, 0)
            if delta <= 0:
                continue
            self._last[reason] = n
            if is_cap_reason(reason):
                self._caps.log(reason, "limit reached: %s (+%d, %d in total)", reason, delta, n)
            else:
                self._other.log(reason, "dropped: %s (+%d, %d in total)", reason, delta, n)

    async def serve(self, task_status=trio.TASK_STATUS_IGNORED):
        task_status.started()
        try:
            while True:
                await trio.sleep(WATCH_INTERVAL)
                self.check()
                tcp = self.daemon.stack.tcp
                if self.trimmer.check(len(tcp._flows), self._compactors()):
                    log.debug("memory trimmed after flows closed")
        finally:
            self.check()
            s = collect_stats(self)
            log.info("exit after %.1fs: frames in/out %d/%d, bytes in/out %d/%d, %d dropped",
                     s["uptime"], s.get("frames_in", 0), s.get("frames_out", 0),
                     s.get("bytes_in", 0), s.get("bytes_out", 0), s["dropped_total"])
