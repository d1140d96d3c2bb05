"""The slirp4netns-compatible API socket (`-a/--api-socket PATH`).

One JSON request per connection: read until EOF (or 64 KiB), reply with one JSON object, close.
Replies and error strings follow slirp4netns api.c byte for byte (compact JSON, no newline).
"""

from __future__ import annotations

import errno
import ipaddress
import json
import logging
import os

import trio

from .listeners import _live, open_api_listener  # noqa: F401
from .logutil import RateLimited
from .errors import ForwardError
from .portfwd import ALLOWED_HOST_ADDRS

log = logging.getLogger(__name__)
_busy = RateLimited(log, logging.WARNING, interval=30.0)

MAX_REQUEST = 64 * 1024
READ_TIMEOUT = 5.0
MAX_CLIENTS = 64


def _dump(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _err(desc: str) -> bytes:
    return _dump({"error": {"desc": desc}})


def _is_port(v) -> bool:
    return type(v) is int and 1 <= v <= 65535


def handle_request(api, raw: bytes) -> bytes:
    """Pure request -> reply bytes (the socket plumbing is in ApiServer). ``api``: what the
    requests reach (an ApiServer): .config, .portfwd, .observer."""
    try:
        req = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return _err("bad request: cannot parse JSON")
    if not isinstance(req, dict):
        return _err("bad request: json_object() failed")
    execute = req.get("execute")
    if not isinstance(execute, str):
        return _err("bad request: no execute found")
    args = req.get("arguments")
    if execute == "add_hostfwd":
        return _add(api, args)
    if execute == "list_hostfwd":
        return _dump({"entries": api.portfwd.list()})
    if execute == "remove_hostfwd":
        if not isinstance(args, dict) or type(args.get("id")) is not int:
            return _err("bad request: remove_hostfwd: bad arguments.id")
        try:
            api.portfwd.remove(args["id"])
        except ForwardError:
            return _err("bad request: remove_hostfwd: bad arguments.id")
        return _dump({"return": {}})
    if execute in ("add_rule", "list_rules", "remove_rule"):  # slirpy's own: the egress policy
        return _rules(api, execute, args)
    if execute in ("get_stats", "list_flows"):  # slirpy's own, read-only
        try:
            if execute == "get_stats":  # counters, flows by state, buffers, uptime
                return _dump({"return": api.observer.stats()})
            return _dump({"return": {"flows": api.observer.flows()}})  # open TCP/UDP/ICMP flows
        except Exception:  # introspection must never take the API down
            _busy.log(execute, "%s failed", execute, exc_info=True)
            return _err(f"bad request: {execute}: internal error")
    return _err("bad request: unknown execute")


def _rules(api, execute: str, args) -> bytes:
    """add_rule {"action": "allow"|"deny", "rule": RULE[, "index": N]} -> {"id", "flows_reset"};
    remove_rule {"id": N} -> {"flows_reset"}; list_rules -> {"default", "rules": [...], ...}.
    flows_reset: the open outbound flows the changed table denies, ended (egress.py)."""
    from .stack.policy import RuleError
    egress = getattr(api, "egress", None)
    p = f"bad request: {execute}: "
    if egress is None:
        return _err(p + "no egress policy")
    if execute == "list_rules":
        return _dump({"return": egress.rules()})
    if execute == "remove_rule":
        if not isinstance(args, dict) or type(args.get("id")) is not int:
            return _err(p + "bad arguments.id")
        try:
            reset = egress.remove(args["id"])
        except KeyError:
            return _err(p + "bad arguments.id")
        return _dump({"return": {"flows_reset": reset}})
    if not isinstance(args, dict) or args.get("action") not in ("allow", "deny"):
        return _err(p + "bad arguments.action")
    if not isinstance(args.get("rule"), str):
        return _err(p + "bad arguments.rule")
    index = args.get("index")
    if index is not None and type(index) is not int:
        return _err(p + "bad arguments.index")
    try:
        rid, reset = egress.add(args["action"], args["rule"], index)
    except RuleError as e:
        what = "index" if str(e).startswith("index") else "rule"
        if "full" in str(e):
            return _err(p + str(e))
        return _err(p + f"bad arguments.{what}: {e}")
    return _dump({"return": {"id": rid, "flows_reset": reset}})


def _add(api, args) -> bytes:
    p = "bad request: add_hostfwd: "
    if not isinstance(args, dict):  # as api.c: arguments.proto is the first lookup to fail
        return _err(p + "bad arguments.proto")
    proto = args.get("proto")
    if proto not in ("tcp", "udp") or not isinstance(proto, str):
        return _err(p + "bad arguments.proto")
    host_addr = args.get("host_addr", "0.0.0.0")
    if host_addr == "":  # Podman sends "" for an unset address; api.c takes it as the default
        host_addr = "0.0.0.0"
    if not isinstance(host_addr, str) or host_addr not in ALLOWED_HOST_ADDRS:
        return _err(p + "bad arguments.host_addr")
    if not _is_port(args.get("host_port")):
        return _err(p + "bad arguments.host_port")
    cfg = api.config
    guest_addr = args.get("guest_addr", None)
    follow = False
    if (guest_addr is None and "guest_addr" not in args) or guest_addr == "":
        # "" is what Podman sends (api.c: the default guest)
        guest_addr, follow = api.portfwd.default_guest_addr(host_addr)  # -6, IPv6: fd00::100
    if not isinstance(guest_addr, str):
        return _err(p + "bad arguments.guest_addr")
    try:
        g = ipaddress.ip_address(guest_addr)
    except ValueError:
        return _err(p + "bad arguments.guest_addr")
    if isinstance(g, ipaddress.IPv4Address):
        ok = g in cfg.cidr and g not in (cfg.cidr.network_address, cfg.cidr.broadcast_address,
                                         cfg.gateway, cfg.dns)
    else:
        from .config import IPV6_DNS, IPV6_GATEWAY, IPV6_PREFIX
        ok = cfg.enable_ipv6 and g in IPV6_PREFIX and g not in (IPV6_GATEWAY, IPV6_DNS)
    if not ok:
        return _err(p + "bad arguments.guest_addr")
    if not _is_port(args.get("guest_port")):
        return _err(p + "bad arguments.guest_port")
    splice = args.get("splice", True)  # slirpy's own: false = loopback clients via the tap too
    if not isinstance(splice, bool):
        return _err(p + "bad arguments.splice")
    try:
        fid = api.portfwd.add(proto, host_addr, args["host_port"], str(g), args["guest_port"],
                              follow, **({} if splice else {"splice": False}))
    except ForwardError as e:
        log.warning("add_hostfwd refused: %s", e)
        return _err(p + "slirp_add_hostfwd failed")
    return _dump({"return": {"id": fid}})


# open_listener and _live live in listeners.py (no trio: launch.run() opens the socket before
# ready); the names stay here for the tests.
open_listener = open_api_listener


class ApiServer:
    """needs: the config, the port forwarder (add/list/remove_hostfwd), the observer (get_stats,
    list_flows), ``prebound`` (the socket opened before ready, or None), the egress policy
    (add/list/remove_rule)."""

    def __init__(self, config, portfwd, observer, prebound=None, path: str | None = None,
                 egress=None):
        self.config = config
        self.egress = egress  # add/list/remove_rule (egress.Egress), None: not wired
        self.portfwd = portfwd
        self.observer = observer
        self.prebound = prebound
        self.path = path if path is not None else config.api_socket
        self.active = 0
        self.served = 0
        self.refused = 0

    async def serve(self, task_status=trio.TASK_STATUS_IGNORED):
        if not self.path:
            task_status.started()
            return
        pre = self.prebound
        raw = pre.take("api") if pre is not None and pre.api_path == self.path else None
        if raw is None:
            raw = open_listener(self.path)
            ino = os.stat(self.path).st_ino
        else:
            ino = pre.api_ino  # opened before ready
        sock = trio.socket.from_stdlib_socket(raw)
        try:
            async with trio.open_nursery() as nursery:
                task_status.started()
                while True:
                    try:
                        conn, _ = await sock.accept()
                    except OSError as e:
                        if e.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EINTR):
                            continue  # that client gave up; the listener is fine
                        if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                            await trio.sleep(0.1)
                            continue
                        raise
                    if self.active >= MAX_CLIENTS:
                        self.refused += 1
                        _busy.log("busy", "api socket: %d clients at once, connection refused", MAX_CLIENTS)
                        conn.close()
                        continue
                    self.active += 1
                    nursery.start_soon(self._client, conn)
        finally:
            sock.close()
            try:
                if os.stat(self.path).st_ino == ino:
                    os.unlink(self.path)
            except OSError:
                pass

    async def _client(self, conn):
        try:
            with conn:
                buf = bytearray()
                too_big = False
                with trio.move_on_after(READ_TIMEOUT) as cs:
                    while True:
                        chunk = await conn.recv(65536)
                        if not chunk:
                            break
                        buf += chunk
                        if len(buf) > MAX_REQUEST:
                            too_big = True
                            break
                if cs.cancelled_caught:
                    return
                reply = _err("bad request: too large message") if too_big else \
                    handle_request(self, bytes(buf))
                self.served += 1
                with trio.move_on_after(READ_TIMEOUT):
                    view = memoryview(reply)
                    while view:
                        n = await conn.send(view)
                        view = view[n:]
        except OSError:
            pass
        finally:
            self.active -= 1
