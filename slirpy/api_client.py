"""`slirpy-api`: talk to a slirpy (or slirp4netns) API socket.

    slirpy-api --socket PATH add tcp|udp [ADDR:]HOSTPORT:GUESTPORT [--guest-addr A]
    slirpy-api --socket PATH list | remove ID | raw JSON
    slirpy-api --socket PATH stats [--json] | flows [--json]
    slirpy-api --socket PATH rules list | rules add allow|deny RULE [--index N] | rules remove ID

`stats` and `flows` print tables for people; with `--json` they print the reply's `return` object
as JSON (one line) for machines. The other commands print the raw reply, as slirp4netns's API does.
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


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse would print two lines of usage and exit 2
        raise _UsageError(message)


def main(argv=None) -> int:
    try:
        return _main(argv)
    except _UsageError as e:
        sys.stderr.write(f"slirpy-api: error: {e} (see slirpy-api --help)\n")
        return 1


def _main(argv) -> int:
    ap = _Parser(prog="slirpy-api", description="slirpy API socket client")
    ap.add_argument("--socket", "-a", required=True, help="API socket path")
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("add", help="add a host forward")
    a.add_argument("proto", choices=["tcp", "udp"])
    a.add_argument("spec", help="[ADDR:]HOSTPORT:GUESTPORT")
    a.add_argument("--guest-addr")
    sub.add_parser("list")
    r = sub.add_parser("remove")
    r.add_argument("id", type=int)
    st = sub.add_parser("stats", help="counters, flows by state, buffers, uptime")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    fl = sub.add_parser("flows", help="open TCP/UDP/ICMP flows")
    fl.add_argument("--json", action="store_true", help="machine-readable output")
    ru = sub.add_parser("rules", help="the egress policy: list, add or remove a rule")
    rsub = ru.add_subparsers(dest="rules_cmd", required=True)
    rsub.add_parser("list")
    ra = rsub.add_parser("add", help="a rule, last unless --index (0: first)")
    ra.add_argument("action", choices=["allow", "deny"])
    ra.add_argument("rule", help="[tcp|udp|icmp:]ADDR[/PREFIX][:PORT[-PORT]]")
    ra.add_argument("--index", type=int)
    rr = rsub.add_parser("remove")
    rr.add_argument("id", type=int)
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
    elif ns.cmd == "rules":
        if ns.rules_cmd == "list":
            req = b'{"execute":"list_rules"}'
        elif ns.rules_cmd == "add":
            args = {"action": ns.action, "rule": ns.rule}
            if ns.index is not None:
                args["index"] = ns.index
            req = json.dumps({"execute": "add_rule", "arguments": args}).encode()
        else:
            req = json.dumps({"execute": "remove_rule", "arguments": {"id": ns.id}}).encode()
    elif ns.cmd == "stats":
        req = b'{"execute":"get_stats"}'
    elif ns.cmd == "flows":
        req = b'{"execute":"list_flows"}'
    else:
        req = ns.json.encode()
    try:
        reply = call(ns.socket, req)
    except OSError as e:
        sys.stderr.write(f"slirpy-api: error: {ns.socket}: {e.strerror or e}\n")
        return 1
    try:
        obj = json.loads(reply)
    except ValueError:
        obj = None
    ok = isinstance(obj, dict) and "error" not in obj
    if ns.cmd == "rules" and ns.rules_cmd == "list" and ok and isinstance(obj.get("return"), dict):
        sys.stdout.write(format_rules(obj["return"]))
        return 0
    if ns.cmd in ("stats", "flows") and ok and isinstance(obj.get("return"), dict):
        ret = obj["return"]
        if ns.json:
            sys.stdout.write(json.dumps(ret, separators=(",", ":")) + "\n")
        elif ns.cmd == "stats":
            sys.stdout.write(format_stats(ret))
        else:
            sys.stdout.write(format_flows(ret.get("flows", [])))
        return 0
    sys.stdout.write(reply.decode(errors="replace") + "\n")
    return 0 if ok else 1


def _table(headers: list[str], rows: list[list]) -> str:
    cells = [[str(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    right = [all(isinstance(r[i], (int, float)) for r in rows) and rows != [] for i in range(len(headers))]

    def line(vals):
        return "  ".join(v.rjust(w) if r else v.ljust(w)
                         for v, w, r in zip(vals, widths, right)).rstrip() + "\n"
    return line(headers) + "".join(line(r) for r in cells)


def _fmt_bytes(n) -> str:
    if not isinstance(n, (int, float)):
        return str(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def format_stats(s: dict) -> str:
    out = []
    up = s.get("uptime", 0)
    out.append(f"uptime      {up:.1f} s\n" if isinstance(up, (int, float)) else f"uptime      {up}\n")
    out.append(_table(["", "frames", "bytes"], [
        ["in (from guest)", s.get("frames_in", 0), s.get("bytes_in", 0)],
        ["out (to guest)", s.get("frames_out", 0), s.get("bytes_out", 0)]]))
    flows = s.get("flows", {})
    rows = []
    for proto in ("tcp", "udp", "icmp"):
        f = flows.get(proto)
        if not isinstance(f, dict):
            continue
        states = f.get("states")
        detail = " ".join(f"{k}={v}" for k, v in states.items()) if isinstance(states, dict) else \
            f"expired={f.get('expired', 0)} evicted={f.get('evicted', 0)}"
        rows.append([proto, f.get("open", 0), "-" if f.get("max") is None else f.get("max"), detail])
    if rows:
        out.append("\n" + _table(["flows", "open", "max", "detail"], rows))
    fw = s.get("forwards")
    if isinstance(fw, dict):
        out.append(f"\nforwards    tcp={fw.get('tcp', 0)} udp={fw.get('udp', 0)} "
                   f"udp_mappings={fw.get('udp_mappings', 0)}\n")
    sp = s.get("forward_splice")
    if isinstance(sp, dict) and (sp.get("enabled") or sp.get("total")):
        fb = sp.get("fallbacks") or {}
        out.append(f"splice      active={sp.get('active', 0)} total={sp.get('total', 0)} "
                   f"to_guest={_fmt_bytes(sp.get('bytes_to_guest', 0))} "
                   f"from_guest={_fmt_bytes(sp.get('bytes_from_guest', 0))} "
                   f"helper={'alive' if sp.get('helper_alive') else 'gone'}"
                   + (" fallbacks " + " ".join(f"{k}={v}" for k, v in fb.items())
                      if isinstance(fb, dict) and fb else "") + "\n")
    r = s.get("reassembly")
    if isinstance(r, dict):
        out.append(f"reassembly  {r.get('entries', 0)}/{r.get('max_entries')} datagrams, "
                   f"{_fmt_bytes(r.get('bytes', 0))} of {_fmt_bytes(r.get('max_bytes'))}\n")
    b = s.get("buffers")
    if isinstance(b, dict):
        out.append("buffers     " + " ".join(f"{k}={v}" for k, v in b.items()) + "\n")
    if isinstance(s.get("dns"), dict):
        out.append("dns         " + " ".join(f"{k}={v}" for k, v in s["dns"].items()) + "\n")
    if isinstance(s.get("dhcp"), dict) and any(s["dhcp"].values()):
        out.append("dhcp        " + " ".join(f"{k}={v}" for k, v in s["dhcp"].items()) + "\n")
    pol = s.get("policy")
    if isinstance(pol, dict) and (pol.get("rules") or pol.get("default") == "deny"):
        out.append("\n" + format_rules(pol))
    if isinstance(s.get("pcap"), dict):
        p = s["pcap"]
        out.append(f"pcap        {p.get('file')}: {p.get('frames')} frames, {p.get('bytes')} bytes"
                   f"{' (stopped)' if p.get('stopped') else ''}\n")
    dropped = s.get("dropped", {})
    if isinstance(dropped, dict) and dropped:
        out.append("\n" + _table(["dropped", "count"], sorted(
            ([k, v] for k, v in dropped.items()), key=lambda kv: (-kv[1] if isinstance(kv[1], int) else 0, kv[0]))))
    else:
        out.append("\ndropped     none\n")
    return "".join(out)


def format_rules(p: dict) -> str:
    """list_rules (and get_stats' policy) for people: the rules in order, then the default."""
    rows = [[r.get("id", "?"), r.get("action", "?"), r.get("rule", "?"), r.get("hits", 0)]
            for r in p.get("rules", []) if isinstance(r, dict)]
    rows.append(["-", p.get("default", "?"), "(default)", p.get("default_hits", 0)])
    return _table(["id", "action", "rule", "hits"], rows)


def format_flows(flows: list) -> str:
    def ep(addr, port):
        if port is None:
            return str(addr)
        return f"[{addr}]:{port}" if ":" in str(addr) else f"{addr}:{port}"
    rows = []
    for f in flows:
        if not isinstance(f, dict):
            continue
        sport = f.get("sport")
        if f.get("proto") == "icmp":
            src, dst = f"{f.get('src')} id={sport}", str(f.get("dst"))
        else:
            src, dst = ep(f.get("src"), sport), ep(f.get("dst"), f.get("dport"))
        rows.append([f.get("proto", "?"), src, dst, f.get("state", "?"),
                     f.get("bytes_in", 0), f.get("bytes_out", 0)])
    return _table(["proto", "guest", "remote", "state", "bytes_in", "bytes_out"], rows) + \
        f"{len(rows)} flow{'s' if len(rows) != 1 else ''}\n"


if __name__ == "__main__":
    sys.exit(main())
