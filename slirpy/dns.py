"""The DNS forwarder at CIDR base + 3 (and fd00::3), port 53 over UDP.

Queries are forwarded to the host's resolvers (``/etc/resolv.conf``) or to
``config.dns_upstreams`` when given. Loopback resolvers (127.0.0.53) work because the daemon lives
in the host namespace.

Following the host's resolver: resolv.conf is re-read (opened by its path, so through its whole
symlink chain as it is now) at most once a second, on demand, and compared by content: a file
rewritten in place or renamed over, a symlink re-pointed or replaced by a file are all seen (under
--enable-sandbox too: sandbox.py keeps the directories the chain passes through). A change of
servers is logged once at INFO (old -> new), a chain that now leads elsewhere once at INFO, a
resolv.conf that cannot be read once at WARNING (and again INFO when it can); ``status()`` (in
get_stats) shows the servers in use and where they came from.

Design choices:
- one host socket per query (connected to the upstream): transaction ids of concurrent guest
  queries cannot collide and no id rewriting is needed; the reply must carry the query's id.
- fallback: each upstream gets UPSTREAM_TIMEOUT seconds, then the next one is tried (at most
  MAX_TRIES upstreams); when none answers, the guest gets SERVFAIL built from its query.
- limits: a token bucket (RATE per second, BURST) and MAX_INFLIGHT concurrent queries; excess
  queries are dropped and counted (``dns_rate_limited``, ``dns_too_many_inflight``).
- TCP DNS to .3:53 is handled by nat.py using ``upstreams()``.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import struct

import trio

from .logutil import RateLimited

log = logging.getLogger(__name__)
_problem = RateLimited(log, logging.WARNING, interval=30.0)  # resolver problems, per kind

RESOLV_CONF = "/etc/resolv.conf"
UPSTREAM_TIMEOUT = 1.5
MAX_TRIES = 3
MAX_INFLIGHT = 256
RATE = 200.0  # queries per second, sustained
BURST = 400
MAX_QUERY = 4096

_HDR = struct.Struct("!HHHHHH")


def parse_resolv_conf(text: str) -> list[tuple[str, int]]:
    """Nameservers from resolv.conf text, in order; IPv6 ones (with %scope dropped) included."""
    out: list[tuple[str, int]] = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].split(";", 1)[0].strip()
        parts = line.split()
        if len(parts) < 2 or parts[0] != "nameserver":
            continue
        addr = parts[1].split("%", 1)[0]
        try:
            ip = ipaddress.ip_address(addr)
        except ValueError:
            continue
        if ip.is_unspecified:
            ip = ipaddress.ip_address("127.0.0.1" if ip.version == 4 else "::1")
        if (str(ip), 53) not in out:
            out.append((str(ip), 53))
    return out


def fmt_upstream(host: str, port: int) -> str:
    """127.0.0.53, 127.0.0.1:5353, [::1]:5353"""
    if port == 53:
        return host
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def fmt_upstreams(ups) -> str:
    return ", ".join(fmt_upstream(h, p) for h, p in ups) or "none"


class TokenBucket:
    """rate tokens per second, up to burst; ``take(now)`` -> bool. Clock comes in as ``now``."""

    def __init__(self, rate: float, burst: float, now: float = 0.0):
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.t = now

    def take(self, now: float) -> bool:
        if now > self.t:
            self.tokens = min(self.burst, self.tokens + (now - self.t) * self.rate)
            self.t = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


def parse_query_untrusted(q: bytes) -> tuple[int, int] | None:
    """(id, end of first question) if q looks like a DNS query; end is 12 when no question
    can be quoted. None when it is not a query at all (too short, QR set)."""
    if len(q) < 12:
        return None
    qid, flags, qd, _an, _ns, _ar = _HDR.unpack_from(q)
    if flags & 0x8000:
        return None
    if qd < 1:
        return qid, 12
    off = 12
    for _ in range(128):
        if off >= len(q):
            return qid, 12
        n = q[off]
        if n == 0:
            off += 1
            break
        if n & 0xC0:
            return qid, 12  # compression in a question: do not quote
        off += 1 + n
    else:
        return qid, 12
    if off + 4 > len(q):
        return qid, 12
    return qid, off + 4


def build_servfail(q: bytes) -> bytes | None:
    """A SERVFAIL response to query q, quoting its first question when parseable."""
    p = parse_query_untrusted(q)
    if p is None:
        return None
    qid, end = p
    flags = _HDR.unpack_from(q)[1]
    rflags = 0x8000 | (flags & 0x7800) | (flags & 0x0100) | 0x0080 | 2  # QR, opcode, RD, RA, rcode
    return _HDR.pack(qid, rflags, 1 if end > 12 else 0, 0, 0, 0) + q[12:end]


class DnsForwarder:
    def __init__(self, daemon, resolv_conf: str = RESOLV_CONF):
        self.daemon = daemon
        self.resolv_conf = resolv_conf
        self.stats = daemon.stack.stats
        self._checked = float("-inf")
        self._resolv: list[tuple[str, int]] = []
        self._final: str | None = None  # where resolv.conf's chain led at the last read
        self._error: str | None = None  # why the last read failed, None when it worked
        self.changes = 0  # times the servers from resolv.conf changed after the first read
        self.bucket = TokenBucket(RATE, BURST, daemon.now())
        self.inflight = 0
        self.timeout = UPSTREAM_TIMEOUT
        self.answered = 0
        self.servfails = 0
        if not daemon.config.dns_upstreams and not daemon.config.disable_dns:
            self.upstreams()  # the first read and its log line, before any sandbox

    def upstreams(self) -> list[tuple[str, int]]:
        cfg = self.daemon.config
        if cfg.dns_upstreams:
            return list(cfg.dns_upstreams)
        now = self.daemon.now()
        if now - self._checked >= 1.0:
            self._checked = now
            self._reread()
        return list(self._resolv)

    def _reread(self) -> None:
        """Read resolv.conf again; log what changed (servers, where the chain leads, readable)."""
        path = self.resolv_conf
        first = self._final is None and self._error is None
        final = os.path.realpath(path)
        if not first and final != self._final:
            log.info("dns: %s now leads to %s (was %s)", path, final, self._final)
        self._final = final
        try:
            with open(path, "rb") as f:
                text = f.read(65536).decode("utf-8", "replace")
        except OSError as e:
            why = e.strerror or str(e)
            if why != self._error:
                where = "" if final == path else f" (-> {final})"
                log.warning("dns: cannot read %s%s: %s; guest queries get SERVFAIL until it can "
                            "be read%s", path, where, why, self._outside_sandbox(final))
            self._error = why
            new: list[tuple[str, int]] = []
        else:
            if self._error is not None:
                log.info("dns: %s can be read again", path)
            self._error = None
            new = parse_resolv_conf(text)
        if first:
            log.info("dns: upstreams %s (from %s%s)", fmt_upstreams(new), path,
                     "" if final == path else f" -> {final}")
        elif new != self._resolv:
            self.changes += 1
            log.info("dns: upstreams changed: %s -> %s (from %s%s)", fmt_upstreams(self._resolv),
                     fmt_upstreams(new), path, "" if final == path else f" -> {final}")
        self._resolv = new

    def _outside_sandbox(self, final: str) -> str:
        paths = self.daemon.sandbox_paths  # set by sandbox.lockdown
        if paths is None or any(final == p or final.startswith(p.rstrip("/") + "/") for p in paths):
            return ""
        return (f"; the sandbox only holds {', '.join(paths)}: to follow a resolv.conf that "
                "leads elsewhere since the start, restart slirpy")

    def status(self) -> dict:
        """For get_stats: the servers in use and where they come from."""
        cfg = self.daemon.config
        if cfg.disable_dns:
            return {"upstreams": [], "source": "--disable-dns"}
        if cfg.dns_upstreams:
            return {"upstreams": [fmt_upstream(h, p) for h, p in cfg.dns_upstreams],
                    "source": "--dns-upstream"}
        ups = self.upstreams()
        return {"upstreams": [fmt_upstream(h, p) for h, p in ups], "source": self.resolv_conf,
                "resolv_conf_target": self._final, "resolv_conf_error": self._error,
                "changes": self.changes}

    def handle_query(self, ev) -> None:
        """A UdpDatagram to .3:53 (called by UdpNat)."""
        d = self.daemon
        q = bytes(ev.payload)
        if len(q) > MAX_QUERY or parse_query_untrusted(q) is None:
            self.stats.drop("dns_bad_query")
            return
        if not self.bucket.take(d.now()):
            self.stats.drop("dns_rate_limited")
            return
        if self.inflight >= MAX_INFLIGHT:
            self.stats.drop("dns_too_many_inflight")
            return
        self.inflight += 1
        d.nursery.start_soon(self._forward, ev, q)

    async def _forward(self, ev, q: bytes) -> None:
        d = self.daemon
        try:
            reply = None
            for host, port in self.upstreams()[:MAX_TRIES]:
                reply = await self._ask(host, port, q)
                if reply is not None:
                    break
            if reply is None:
                ups = self.upstreams()
                if ups or self._error is None:  # (an unreadable resolv.conf was logged already)
                    _problem.log("servfail", "dns: no upstream answered (%s); guest gets SERVFAIL",
                                 ", ".join(f"{h}:{p}" for h, p in ups[:MAX_TRIES]) or
                                 "none configured: --dns-upstream or nameserver in "
                                 f"{self.resolv_conf}")
                reply = build_servfail(q)
                self.servfails += 1
                self.stats.drop("dns_servfail")
            else:
                self.answered += 1
            if reply is not None:
                d.stack.send_udp(ev.family, ev.dst, 53, ev.src, ev.sport, reply, d.now())
                d.flush()
        finally:
            self.inflight -= 1

    async def _ask(self, host: str, port: int, q: bytes) -> bytes | None:
        cfg = self.daemon.config
        try:
            fam = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
        except ValueError:
            return None
        try:
            s = trio.socket.socket(fam, socket.SOCK_DGRAM)
        except OSError as e:  # EMFILE/ENFILE: this query fails over, the daemon lives on
            self.stats.drop("dns_socket_failed")
            log.debug("dns socket: %s", e)
            return None
        with s:
            try:
                bind = cfg.outbound_addr if fam == socket.AF_INET else cfg.outbound_addr6
                if bind is not None and not ipaddress.ip_address(host).is_loopback:
                    await s.bind((str(bind), 0))
                await s.connect((host, port))
                await s.send(q)
            except OSError as e:
                _problem.log(("send", host, port), "dns upstream %s:%d: %s", host, port, e)
                return None
            with trio.move_on_after(self.timeout):
                while True:
                    try:
                        r = await s.recv(65535)
                    except OSError:
                        return None  # ECONNREFUSED etc.: next upstream now
                    if len(r) >= 12 and r[:2] == q[:2] and r[2] & 0x80:
                        return r
                    self.stats.drop("dns_bad_reply")
        return None
