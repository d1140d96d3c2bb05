"""Loss recovery toward the guest: one Recovery per flow (stack/tcp.py's `_Flow.rec`).

What is measured and decided here, what is sent is the engine's business (as aioquic keeps its
loss recovery apart from the connection):

  - the RTT estimate and the retransmission timeout (RFC 6298): `rtt_sample`, `backoff`;
  - the count of timeouts in a row that ends a flow (`retries`, MAX_RETRIES);
  - duplicate ACKs and fast recovery (RFC 5681 3.2, RFC 6582): `on_dupack` says when to resend;
  - which holes to resend from the guest's SACK blocks (RFC 2018 / RFC 6675 in part):
    `retransmit_holes`, each hole once per recovery (`rexmit_hi`).

Sequence numbers are 32-bit and compared with stack/seq.py. No I/O, no clock: times come in.
"""

from __future__ import annotations

from . import seq

MIN_RTO, MAX_RTO, INIT_RTO = 0.2, 60.0, 1.0
MAX_RETRIES = 8
HOLES_PER_ACK = 16  # segments one ACK may make us resend


class Recovery:
    __slots__ = ("rto", "srtt", "rttvar", "retries", "rtt_seq", "rtt_t", "dupacks", "recover",
                 "rexmit_hi", "sacked")

    def __init__(self):
        self.rto, self.srtt, self.rttvar = INIT_RTO, None, 0.0
        self.retries = 0  # timeouts in a row (or zero-window probes), reset by progress
        self.rtt_seq = self.rtt_t = None  # the one segment being timed: its end and send time
        self.dupacks = 0
        self.recover = None  # fast recovery until snd_una reaches this (RFC 6582)
        self.rexmit_hi = 0  # highest byte retransmitted in this recovery
        self.sacked = ()  # the guest's latest SACK blocks within (snd_una, snd_max]

    def rtt_sample(self, r):
        """RFC 6298 2.2-2.3: a measured round trip of r seconds."""
        if self.srtt is None:
            self.srtt, self.rttvar = r, r / 2
        else:
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - r)
            self.srtt = 0.875 * self.srtt + 0.125 * r
        self.rto = min(MAX_RTO, max(MIN_RTO, self.srtt + 4 * self.rttvar))
        self.rtt_seq = None

    def backoff(self):
        """RFC 6298 5.5: the timer expired, the next one waits twice as long (up to MAX_RTO)."""
        self.rto = min(MAX_RTO, self.rto * 2)

    def go_back_n(self):
        """A retransmission timeout: the recovery in progress, the timing and the SACK
        information are void (the engine resends from snd_una)."""
        self.rtt_seq = None
        self.backoff()
        self.recover = None
        self.dupacks = 0
        self.sacked = ()

    def on_dupack(self, snd_una, snd_max, sack_news):
        """One more duplicate ACK; True when holes are to be resent now: at the third (a
        recovery starts, lasting until snd_max is acknowledged) and, within a recovery, at
        every one whose SACK blocks reveal more of them (RFC 6675 5 step C: each ACK in
        recovery lets NextSeg send; after a partial ACK too, when the count starts over)."""
        self.dupacks += 1
        if self.dupacks == 3 and self.recover is None:
            self.recover = snd_max
            self.rexmit_hi = snd_una
            self.rtt_seq = None
            return True
        return self.recover is not None and sack_news

    def on_new_ack(self, ackno):
        """An ACK of new data; True when a recovery goes on (a partial ACK, RFC 6582: the next
        hole is lost too, resend it without waiting)."""
        self.dupacks = 0
        self.retries = 0
        if self.recover is not None:
            if seq.ge(ackno, self.recover):
                self.recover = None
            else:
                return True
        return False


def retransmit_holes(rec, snd_una, mss, resend, budget=HOLES_PER_ACK):
    """Resend what the guest has not SACKed between max(snd_una, rexmit_hi) and its highest
    SACKed byte (or the one segment at snd_una without SACK), each hole once per recovery.
    resend(start, n) -> bool sends up to n bytes (at most one segment) from sequence start;
    False: nothing there to send."""
    start = snd_una if seq.ge(snd_una, rec.rexmit_hi) else rec.rexmit_hi
    blocks = sorted((b for b in rec.sacked if seq.gt(b[1], start)),
                    key=lambda b: seq.sub(b[0], start))
    if not blocks:
        if start == snd_una:
            resend(start, mss)
            rec.rexmit_hi = seq.add(start, mss)
        return
    cur = start
    for left, right in blocks:
        while seq.lt(cur, left) and budget > 0:
            n = min(mss, seq.sub(left, cur))
            if not resend(cur, n):
                return
            budget -= 1
            cur = seq.add(cur, n)
            rec.rexmit_hi = cur
        if seq.gt(right, cur):
            cur = right
        if budget <= 0:
            return
