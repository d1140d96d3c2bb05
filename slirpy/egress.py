"""Egress policy glue: the rule table (stack/policy.py) as the daemon's component.

The decision itself is sans-IO (``Policy.check``, called by the address rules,
stack/addrmap.py, only when a flow is created). This module adds what needs the daemon:
- ``log_denied``: a refused flow is logged at INFO, once per rule per LOG_INTERVAL seconds
  (logutil.RateLimited; the next line says how many were suppressed);
- ``Egress``: the API's add_rule / remove_rule / list_rules. A change applies to new flows at
  once; the open flows the guest made that the changed table now denies are ended: TCP with an
  RST both ways (the guest's connection fails with ECONNRESET), a UDP or ping flow's host socket
  closed (its next datagram is a new flow, refused by ICMP administratively prohibited).
  Forwarded (inbound) connections are never touched: they are not egress.
"""

from __future__ import annotations

import logging

from .logutil import RateLimited

log = logging.getLogger(__name__)
LOG_INTERVAL = 10.0
_denied = RateLimited(log, logging.INFO, interval=LOG_INTERVAL)


def log_denied(rid, text, proto, family, dst, dport) -> None:
    """Policy.on_deny: one INFO line per rule (and one for the default) per LOG_INTERVAL."""
    where = (f"[{dst}]" if family == 6 else dst) + (f":{dport}" if proto != "icmp" else "")
    _denied.log(("policy", rid), "egress policy: %s to %s refused by %s", proto, where,
                f"rule {rid} ({text})" if rid is not None else "--default-deny")


class Egress:
    """needs: the policy (stack/policy.py), the TCP, UDP and ICMP NATs (their open flows).
    offers: add(), remove(), rules() for the API; stats() for get_stats."""

    def __init__(self, policy, tcp_nat, udp_nat, icmp_nat):
        self.policy = policy
        self.tcp_nat, self.udp_nat, self.icmp_nat = tcp_nat, udp_nat, icmp_nat

    def add(self, action: str, rule: str, index: int | None = None) -> tuple[int, dict]:
        """-> (the rule's id, the flows reset). RuleError: a bad rule, index or a full table."""
        from .stack.policy import RuleError
        try:
            rid = self.policy.add(action, rule, index)
        except RuleError as e:
            if "full" in str(e):
                self.policy.refused += 1
            raise
        log.info("egress policy: rule %d added: %s %s", rid, action, rule)
        return rid, self.reset_denied()

    def remove(self, rid: int) -> dict:
        """-> the flows reset (removing an allow can deny). KeyError: no such rule."""
        self.policy.remove(rid)
        log.info("egress policy: rule %d removed", rid)
        return self.reset_denied()

    def rules(self) -> dict:
        return self.policy.stats()

    def stats(self) -> dict:
        return self.policy.stats()

    def reset_denied(self) -> dict:
        """End the open outbound flows that the table denies now; -> {"tcp": n, "udp": n,
        "icmp": n}."""
        denies = self.policy.denies
        out = {"tcp": self.tcp_nat.reset_outbound(lambda fam, dst, dport:
                                                  denies("tcp", fam, dst, dport))}
        for proto, nat in (("udp", self.udp_nat), ("icmp", self.icmp_nat)):
            gone = []
            for key in [k for k, *_ in nat.table.items()]:
                if proto == "udp":
                    fam, _src, _sport, dst, dport = key
                else:
                    fam, _src, _ident, dst = key
                    dport = 0
                if denies(proto, fam, dst, dport):
                    gone.append(key)
            for key in gone:
                nat.table.remove(key)
                nat.stats.drop(f"{proto}_policy_reset")
            out[proto] = len(gone)
        if any(out.values()):
            log.info("egress policy: open flows the rules now deny ended: %s", out)
        return out
