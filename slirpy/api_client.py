"""`slirpy-api`: talk to a slirpy (or slirp4netns) API socket.

    slirpy-api --socket PATH add tcp|udp [ADDR:]HOSTPORT:GUESTPORT [--guest-addr A]
    slirpy-api --socket PATH list | remove ID | stats | raw JSON
"""

from __future__ import annotations

import argparse
import json
import socket
import sys

from .portspec import PortSpecError, parse_port_spec


def call(path: str, request: bytes, timeout: float = 10.0) -> bytes:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(path)
        s.sendall(request)
        s.shutdown(socket.SHUT_WR)
        out = bytearray()
        while True:
            b = s.recv(65536)
            if not b:
                return bytes(out)
            out += b
    finally:
        s.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="slirpy-api", description="slirpy API socket client")
    ap.add_argument("--socket", "-a", required=True, help="API socket path")
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("add", help="add a host forward")
    a.add_argument("proto", choices=["tcp", "udp"])
    a.add_argument("spec", help="[ADDR:]HOSTPORT:GUESTPORT")
    a.add_argument("--guest-addr")
    sub.add_parser("list")
    r = sub.add_parser("remove")
    r.add_argument("id", type=int)
    sub.add_parser("stats")
    w = sub.add_parser("raw")
    w.add_argument("json")
    ns = ap.parse_args(argv)
    if ns.cmd == "add":
        try:
            pf = parse_port_spec(f"{ns.spec}/{ns.proto}")
        except PortSpecError as e:
            sys.stderr.write(f"slirpy-api: error: {e}\n")
            return 1
        args = {"proto": pf.proto, "host_addr": pf.host_addr, "host_port": pf.host_port,
                "guest_port": pf.guest_port}
        if ns.guest_addr:
            args["guest_addr"] = ns.guest_addr
        req = json.dumps({"execute": "add_hostfwd", "arguments": args}).encode()
    elif ns.cmd == "list":
        req = b'{"execute":"list_hostfwd"}'
    elif ns.cmd == "remove":
        req = json.dumps({"execute": "remove_hostfwd", "arguments": {"id": ns.id}}).encode()
    elif ns.cmd == "stats":
        req = b'{"execute":"get_stats"}'
    else:
        req = ns.json.encode()
    try:
        reply = call(ns.socket, req)
    except OSError as e:
        sys.stderr.write(f"slirpy-api: error: {ns.socket}: {e.strerror or e}\n")
        return 1
    sys.stdout.write(reply.decode(errors="replace") + "\n")
    try:
        obj = json.loads(reply)
    except ValueError:
        return 1
    return 1 if not isinstance(obj, dict) or "error" in obj else 0


if __name__ == "__main__":
    sys.exit(main())
