"""Host-to-guest port forwarding (`-p/--port` and the API socket's add/list/remove_hostfwd).

TCP: a listener per forward; each accepted socket goes to the TCP NAT's forward_inbound in its
own task (the TCP bridge is the NAT's job). UDP: a socket per forward, a per-client mapping to a
guest-side source port; the guest's replies come back through intercept_udp (the UDP NAT asks
it first).

Source address seen by the guest (stack/addrmap.py): a client on the host loopback appears as
the gateway (CIDR base + 2, or fd00::2); any other client keeps its own address. But a TCP
client on the host loopback is normally spliced (splice.py, docs/forwarding.md): the guest sees
it come from its own address, through a socket the helper opened in its namespace; the tap path
above is for the rest, for --disable-forward-splice and for add_hostfwd's "splice": false.

Guest address: IPv4 forwards go to CIDR base + 100 unless told otherwise. With -6, a forward
on an IPv6 host address (`[::]:P:G`, `[::1]:P:G`, API host_addr "::"/"::1") without an explicit
guest address goes to the guest's IPv6 address: fd00::100 (listed as such), which is what `-c`
makes the guest's SLAAC address (interface token ::100); if the guest is seen using other
fd00::/64 addresses and never fd00::100 (configured by someone else: EUI-64 or privacy
addresses), each new connection/mapping goes to the one it most recently used as a source
(stack.guest_ipv6). Without -6, IPv6 listeners lead to the IPv4 guest.
"""

from __future__ import annotations

import errno
import logging

import trio

from .config import IPV6_PREFIX
from . import errors
from .errors import ForwardError, StartupError
from .listeners import bind_forward, forward_conflict  # no trio: launch.run() binds before ready

GUEST_IPV6 = str(IPV6_PREFIX.network_address + 0x100)  # fd00::100

log = logging.getLogger(__name__)

UDP_IDLE = 60.0
UDP_MAX_MAPPINGS = 1024  # per forward
UDP_PORT_LO, UDP_PORT_HI = 32768, 60999
ALLOWED_HOST_ADDRS = ("0.0.0.0", "127.0.0.1", "::", "::1")


class _UdpMap:
    __slots__ = ("client", "gport", "src", "last", "gaddr", "bytes_in", "bytes_out")

    def __init__(self, client, gport, src, last, gaddr=None):
        self.client, self.gport, self.src, self.last = client, gport, src, last
        self.gaddr = gaddr  # the guest address this mapping sends to
        self.bytes_in = self.bytes_out = 0  # payload from / to the guest (list_flows)


class Forward:
    def __init__(self, fid, proto, host_addr, host_port, guest_addr, guest_port, sock,
                 default_guest=False, splice=True):
        self.id = fid
        self.splice = splice  # loopback clients spliced (splice.py); False: the tap path
        self.default_guest = default_guest  # an IPv6 default: follow the guest's address
        self.proto = proto
        self.host_addr = host_addr
        self.host_port = host_port
        self.guest_addr = guest_addr
        self.guest_port = guest_port
        self.raw = sock  # stdlib socket: sync sendto from the intercept
        self.sock = trio.socket.from_stdlib_socket(sock)
        self.cancel = trio.CancelScope()
        self.by_client: dict = {}
        self.by_gport: dict = {}

    def entry(self) -> dict:
        return {"id": self.id, "proto": self.proto, "host_addr": self.host_addr,
                "host_port": self.host_port, "guest_addr": self.guest_addr,
                "guest_port": self.guest_port}


class PortForwarder:
    """needs: the daemon (config, stack, flush), the address rules, the TCP NAT (which bridges
    accepted connections), ``prebound`` (listeners.Prebound: the -p sockets bound before ready,
    or None). offers: add/remove/list (the API), intercept_udp (the UDP NAT), the table."""

    def __init__(self, daemon, addrs, tcp_nat, prebound=None, splicer=None):
        self.daemon = daemon
        self.splicer = splicer  # splice.Splicer: loopback TCP clients, in the kernel
        self.addrs = addrs
        self.tcp_nat = tcp_nat
        self.prebound = prebound
        self.forwards: dict[int, Forward] = {}
        self._next_id = 1
        self._nursery = None
        self._next_udp_port = UDP_PORT_LO

    # ------------------------------------------------------------------------------ table
    def list(self) -> list[dict]:
        return [f.entry() for f in sorted(self.forwards.values(), key=lambda f: f.id)]

    def _bind(self, proto: str, host_addr: str, host_port: int):
        return bind_forward(proto, host_addr, host_port)

    def guest_for(self, fwd: Forward) -> str:
        """The guest address a new connection/mapping of ``fwd`` goes to now."""
        if fwd.default_guest:
            return self.daemon.stack.guest_ipv6(fwd.guest_addr) or fwd.guest_addr
        return fwd.guest_addr

    def default_guest_addr(self, host_addr: str) -> tuple[str, bool]:
        """(guest address, follows the guest) for a forward given without one."""
        cfg = self.daemon.config
        if cfg.enable_ipv6 and ":" in host_addr:
            return GUEST_IPV6, True
        return str(cfg.guest), False

    def add(self, proto, host_addr, host_port, guest_addr, guest_port,
            default_guest=False, sock=None, splice=True) -> int:
        """sock: the forward's socket when it was bound before ready (listeners.Prebound)."""
        if proto not in ("tcp", "udp"):
            raise ForwardError(f"bad proto {proto!r}")
        if forward_conflict([(f.proto, f.host_addr, f.host_port) for f in self.forwards.values()],
                            proto, host_addr, host_port):
            raise ForwardError(f"port {host_addr}:{host_port}/{proto}: already forwarded")
        if sock is None:
            sock = self._bind(proto, host_addr, host_port)
        fwd = Forward(self._next_id, proto, host_addr, host_port, str(guest_addr), guest_port, sock,
                      default_guest, splice)
        self._next_id += 1
        self.forwards[fwd.id] = fwd
        if self._nursery is not None:
            self._nursery.start_soon(self._run, fwd)
        log.info("forward %d added: %s %s:%d -> %s:%d", fwd.id, proto, host_addr, host_port,
                 fwd.guest_addr, guest_port)
        return fwd.id

    def remove(self, fid) -> None:
        fwd = self.forwards.pop(fid, None)
        if fwd is None:
            raise ForwardError(f"no forward with id {fid}")
        fwd.cancel.cancel()
        fwd.sock.close()  # the host port is closed now; accepted connections live on
        log.info("forward %d removed: %s %s:%d", fid, fwd.proto, fwd.host_addr, fwd.host_port)

    # ------------------------------------------------------------------------------ tasks
    async def serve(self, task_status=trio.TASK_STATUS_IGNORED):
        cfg = self.daemon.config
        pre = self.prebound
        socks = pre.take("ports") if pre is not None else None  # bound before ready
        for i, pf in enumerate(cfg.ports):
            if pf.guest_addr:
                guest, follow = pf.guest_addr, False
            else:
                guest, follow = self.default_guest_addr(pf.host_addr)
            try:
                self.add(pf.proto, pf.host_addr, pf.host_port, guest, pf.guest_port, follow,
                         sock=socks[i] if socks else None)
            except ForwardError as e:
                for fid in list(self.forwards):
                    self.remove(fid)
                raise StartupError(f"--port {pf.host_port}: {e}") from None
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for fwd in list(self.forwards.values()):
                nursery.start_soon(self._run, fwd)
            task_status.started()
            await trio.sleep_forever()

    async def _run(self, fwd: Forward):
        with fwd.cancel:
            try:
                if fwd.proto == "tcp":
                    await self._accept_loop(fwd)
                else:
                    await self._udp_loop(fwd)
            except (OSError, trio.ClosedResourceError) as e:
                if fwd.id in self.forwards:
                    log.warning("forward %d stopped: %s", fwd.id, e)

    async def _accept_loop(self, fwd: Forward):
        while True:
            try:
                conn, peer = await fwd.sock.accept()
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self.daemon.stack.stats.drop("portfwd_accept_" + errno.errorcode[e.errno])
                    await trio.sleep(0.1)
                    continue
                if e.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue
                raise
            self._nursery.start_soon(self._inbound, fwd, conn, peer)

    async def _inbound(self, fwd, conn, peer):
        gfamily = 6 if ":" in fwd.guest_addr else 4
        gaddr = self.guest_for(fwd)
        sp = self.splicer
        if fwd.splice and sp is not None and sp.wants(peer[0]):
            try:
                if await sp.take(conn, gfamily, gaddr, fwd.guest_port, fwd.id, peer):
                    return
            except Exception:  # a bug: the tap path still serves the client
                if errors.STRICT:
                    raise
                log.exception("forward splice %s -> %s:%d", peer, gaddr, fwd.guest_port)
                sp.fallbacks["internal_error"] += 1
                if conn.fileno() < 0:
                    return
        src = self.addrs.guest_visible_source(gfamily, peer[0])
        try:
            await self.tcp_nat.forward_inbound(conn, gfamily, src, peer[1], gaddr, fwd.guest_port)
        except Exception:  # a bridge failure must not take the forwarder down
            if errors.STRICT:
                raise
            log.exception("forward_inbound %s -> %s:%d", peer, gaddr, fwd.guest_port)
            conn.close()

    # ------------------------------------------------------------------------------- UDP
    def _alloc_udp_port(self, fwd: Forward) -> int | None:
        span = UDP_PORT_HI - UDP_PORT_LO + 1
        for _ in range(span):
            p = self._next_udp_port
            self._next_udp_port = UDP_PORT_LO + (p + 1 - UDP_PORT_LO) % span
            if p not in fwd.by_gport:
                return p
        return None

    def _expire(self, fwd: Forward, now: float) -> None:
        for key, m in list(fwd.by_client.items()):
            if now - m.last > UDP_IDLE:
                del fwd.by_client[key]
                fwd.by_gport.pop(m.gport, None)

    async def _udp_loop(self, fwd: Forward):
        d = self.daemon
        gfamily = 6 if ":" in fwd.guest_addr else 4
        while True:
            try:
                data, peer = await fwd.sock.recvfrom(65535)
            except OSError as e:
                # a queued ICMP error from an earlier reply to a vanished client must not end
                # the forward: count it and keep serving
                if e.errno == errno.EBADF:
                    raise
                d.stack.stats.drop("portfwd_udp_recv_" + errno.errorcode.get(e.errno, "err"))
                continue
            now = d.now()
            client = peer[:2]
            m = fwd.by_client.get(client)
            if m is None:
                self._expire(fwd, now)
                if len(fwd.by_client) >= UDP_MAX_MAPPINGS:
                    oldest = min(fwd.by_client.values(), key=lambda x: x.last)
                    del fwd.by_client[oldest.client]
                    fwd.by_gport.pop(oldest.gport, None)
                    d.stack.stats.drop("portfwd_udp_evict")
                gport = self._alloc_udp_port(fwd)
                if gport is None:
                    d.stack.stats.drop("portfwd_udp_no_port")
                    continue
                src = self.addrs.guest_visible_source(gfamily, peer[0])
                m = _UdpMap(client, gport, src, now, self.guest_for(fwd))
                fwd.by_client[client] = m
                fwd.by_gport[gport] = m
            m.last = now
            m.bytes_out += len(data)
            d.stack.send_udp(gfamily, m.src, m.gport, m.gaddr or fwd.guest_addr, fwd.guest_port,
                             data, now)
            d.flush()

    def intercept_udp(self, ev) -> bool:
        """A guest datagram that answers one of our UDP forwards' clients goes to that client
        (True); anything else is not ours (False)."""
        for fwd in self.forwards.values():
            if fwd.proto != "udp" or ev.sport != fwd.guest_port:
                continue
            if ev.src != fwd.guest_addr and not fwd.default_guest:
                continue
            m = fwd.by_gport.get(ev.dport)
            if m is None or m.src != ev.dst or ev.src != (m.gaddr or fwd.guest_addr):
                continue
            m.last = self.daemon.now()
            m.bytes_in += len(ev.payload)
            try:
                fwd.raw.sendto(ev.payload, m.client)
            except OSError:
                self.daemon.stack.stats.drop("portfwd_udp_send")
            return True
        return False
