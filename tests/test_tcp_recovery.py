"""Loss recovery toward the guest (slirpy/stack/tcp_recovery.py), each test one rule:

RFC 6298 (retransmission timer: the RTT estimator, its bounds, the backoff, Karn's rule),
RFC 5681 3.2 (fast retransmit at the third duplicate ACK), RFC 6582 (NewReno: recovery lasts
until everything sent at its start is acknowledged; a partial ACK resends the next hole) and
RFC 6675 / RFC 2018 (resend what the receiver has not SACKed below its highest SACKed byte, each
hole once per recovery). Sequence numbers are checked across the 2**32 wrap.
"""

import pytest

from slirpy.stack import seq
from slirpy.stack.tcp_recovery import (HOLES_PER_ACK, INIT_RTO, MAX_RETRIES, MAX_RTO, MIN_RTO,
                                       Recovery, retransmit_holes)

TOP = 2**32 - 1


def test_constants_are_the_rfc_6298_ones_and_linux_minimum():
    assert INIT_RTO == 1.0  # RFC 6298 2.1: 1 second before any measurement
    assert MAX_RTO >= 60.0  # RFC 6298 2.5: a maximum may be placed, at least 60 s
    assert MIN_RTO == 0.2  # Linux's TCP_RTO_MIN (RFC 6298 2.4's 1 s is relaxed by every stack)
    assert MAX_RETRIES == 8
    assert HOLES_PER_ACK == 16


def test_a_new_recovery_is_idle():
    r = Recovery()
    assert (r.rto, r.srtt, r.rttvar) == (1.0, None, 0.0)
    assert (r.retries, r.dupacks, r.recover, r.rexmit_hi, r.sacked) == (0, 0, None, 0, ())
    assert r.rtt_seq is None and r.rtt_t is None


def test_first_rtt_sample_sets_srtt_r_and_rttvar_half_r():
    # RFC 6298 2.2: SRTT <- R, RTTVAR <- R/2, RTO <- SRTT + max(G, K*RTTVAR), K = 4
    r = Recovery()
    r.rtt_seq, r.rtt_t = 1000, 5.0
    r.rtt_sample(0.5)
    assert r.srtt == 0.5 and r.rttvar == 0.25
    assert r.rto == pytest.approx(1.5)
    assert r.rtt_seq is None  # the timed segment is done: the next one may be timed


def test_later_rtt_samples_use_alpha_one_eighth_beta_one_quarter_and_the_old_srtt():
    # RFC 6298 2.3: RTTVAR <- 3/4 RTTVAR + 1/4 |SRTT - R'| (with the SRTT before this sample),
    # then SRTT <- 7/8 SRTT + 1/8 R'
    r = Recovery()
    r.rtt_sample(1.0)  # srtt 1, rttvar 0.5
    r.rtt_seq = 7
    r.rtt_sample(3.0)
    assert r.rttvar == pytest.approx(0.75 * 0.5 + 0.25 * 2.0)  # 0.875, |1 - 3| with the old srtt
    assert r.srtt == pytest.approx(0.875 * 1.0 + 0.125 * 3.0)  # 1.25
    assert r.rto == pytest.approx(1.25 + 4 * 0.875)
    assert r.rtt_seq is None
    r.rtt_sample(0.25)  # a shorter round trip: the absolute difference, not a negative one
    assert r.rttvar == pytest.approx(0.75 * 0.875 + 0.25 * 1.0)
    assert r.srtt == pytest.approx(0.875 * 1.25 + 0.125 * 0.25)


def test_rto_is_bounded_below_and_above():
    r = Recovery()
    r.rtt_sample(0.001)  # a loopback-fast guest: 0.001 + 4 * 0.0005 is far below the minimum
    assert r.rto == MIN_RTO
    r = Recovery()
    r.rtt_sample(40.0)  # 40 + 4 * 20 = 120 s: capped (RFC 6298 2.5)
    assert r.rto == MAX_RTO
    r = Recovery()
    r.rtt_sample(0.1)  # 0.1 + 0.2 = 0.3: within the bounds, taken as computed
    assert r.rto == pytest.approx(0.3)


def test_backoff_doubles_up_to_the_maximum():
    # RFC 6298 5.5: RTO <- RTO * 2, "a maximum value MAY be used"
    r = Recovery()
    r.backoff()
    assert r.rto == 2.0
    r.backoff()
    assert r.rto == 4.0
    for _ in range(10):
        r.backoff()
    assert r.rto == MAX_RTO
    r.rto = MAX_RTO / 2 + 1  # doubling past the cap stops at the cap
    r.backoff()
    assert r.rto == MAX_RTO


def test_a_timeout_voids_timing_recovery_and_sack_and_backs_off():
    # RFC 6298 5.5 (back off), Karn's algorithm (RFC 6298 3: no sample from a retransmitted
    # segment), RFC 6582 (a timeout ends fast recovery), RFC 6675 5.1 / RFC 2018 8 (after a
    # timeout the SACK information is not trusted)
    r = Recovery()
    r.rto = 0.5
    r.rtt_seq, r.rtt_t = 100, 1.0
    r.dupacks, r.recover, r.sacked = 5, 900, ((200, 300),)
    r.go_back_n()
    assert r.rto == 1.0
    assert r.rtt_seq is None
    assert r.recover is None and r.dupacks == 0 and r.sacked == ()


def test_fast_retransmit_at_the_third_duplicate_ack_not_before():
    # RFC 5681 3.2: "the arrival of 3 duplicate ACKs" triggers the retransmission
    r = Recovery()
    r.rtt_seq = 555
    assert r.on_dupack(1000, 5000, False) is False
    assert r.on_dupack(1000, 5000, False) is False
    assert r.recover is None and r.rtt_seq == 555
    assert r.on_dupack(1000, 5000, False) is True
    assert r.dupacks == 3
    # RFC 6582 3.2 step 2: recover <- the highest sequence number transmitted
    assert r.recover == 5000
    assert r.rexmit_hi == 1000  # nothing resent in this recovery yet: holes start at snd_una
    assert r.rtt_seq is None  # Karn: the retransmitted range is not timed


def test_in_recovery_further_dupacks_resend_only_when_sack_shows_new_holes():
    r = Recovery()
    for _ in range(3):
        r.on_dupack(1000, 5000, False)
    assert r.on_dupack(1000, 5000, False) is False  # no new information: nothing more to send
    assert r.on_dupack(1000, 5000, True) is True  # new SACK blocks reveal more holes
    assert r.recover == 5000  # still the same recovery: not restarted by later dupacks


def test_dupacks_with_sack_news_before_the_third_do_not_start_recovery():
    r = Recovery()
    assert r.on_dupack(1000, 5000, True) is False
    assert r.on_dupack(1000, 5000, True) is False
    assert r.recover is None


def test_third_dupack_while_already_recovering_does_not_restart_it():
    # RFC 6582 4.1: no new recovery for duplicate ACKs that belong to the current one
    r = Recovery()
    r.recover, r.rexmit_hi = 4000, 3000
    assert r.on_dupack(3500, 6000, False) is False
    assert r.on_dupack(3500, 6000, False) is False
    assert r.on_dupack(3500, 6000, False) is False
    assert r.recover == 4000 and r.rexmit_hi == 3000


def test_new_ack_resets_dupacks_and_the_retry_count():
    # RFC 5681 3.2 (dupack count restarts), RFC 6298 5.3 / RFC 9293 3.8.3 (progress: the
    # connection is alive, the give-up count starts over)
    r = Recovery()
    r.dupacks, r.retries = 2, 5
    assert r.on_new_ack(2000) is False
    assert r.dupacks == 0 and r.retries == 0


def test_full_ack_ends_recovery_partial_ack_continues_it():
    # RFC 6582 3.2 steps 5 and 6
    r = Recovery()
    r.recover = 5000
    assert r.on_new_ack(3000) is True  # partial: below recover, the next hole is lost too
    assert r.recover == 5000
    assert r.on_new_ack(5000) is False  # exactly recover: everything of the recovery is acked
    assert r.recover is None
    r.recover = 5000
    assert r.on_new_ack(6000) is False
    assert r.recover is None


def test_full_ack_across_the_wrap():
    r = Recovery()
    r.recover = 10  # recovery started just after the wrap
    assert r.on_new_ack(TOP - 5) is True  # before the wrap: partial
    assert r.on_new_ack(10) is False
    assert r.recover is None


class _Sender:
    def __init__(self, end):
        self.sent, self.end = [], end

    def __call__(self, start, n):
        if not seq.lt(start, self.end):
            return False
        self.sent.append((start, n))
        return True


def test_without_sack_one_segment_at_snd_una_is_resent():
    # RFC 5681 3.2 step 4 / RFC 6582: retransmit the segment the duplicate ACKs point at
    r = Recovery()
    r.rexmit_hi = 1000
    out = _Sender(10_000)
    retransmit_holes(r, 1000, 500, out)
    assert out.sent == [(1000, 500)]
    assert r.rexmit_hi == 1500
    # the same segment is not resent again within the recovery (rexmit_hi is past snd_una)
    retransmit_holes(r, 1000, 500, out)
    assert out.sent == [(1000, 500)]


def test_sack_holes_below_the_highest_sacked_byte_are_resent_in_order_once():
    # RFC 6675 4 (NextSeg rule 1): send the lowest unSACKed bytes below the highest SACKed
    r = Recovery()
    r.rexmit_hi = 1000
    r.sacked = ((3000, 4000), (1500, 2000))  # unordered, as the guest may send them
    out = _Sender(10_000)
    retransmit_holes(r, 1000, 400, out)
    # holes 1000-1500 (two segments of at most one MSS) and 2000-3000 (three); nothing above 4000
    assert out.sent == [(1000, 400), (1400, 100), (2000, 400), (2400, 400), (2800, 200)]
    assert r.rexmit_hi == 3000
    out.sent.clear()
    retransmit_holes(r, 1000, 400, out)  # each hole once per recovery
    assert out.sent == []


def test_holes_already_resent_are_skipped_and_blocks_below_them_ignored():
    r = Recovery()
    r.rexmit_hi = 2200  # this recovery already resent up to 2200
    r.sacked = ((1500, 2000), (3000, 3500))
    out = _Sender(10_000)
    retransmit_holes(r, 1000, 1000, out)
    assert out.sent == [(2200, 800)]
    assert r.rexmit_hi == 3000


def test_at_most_budget_segments_per_ack():
    r = Recovery()
    r.rexmit_hi = 0
    r.sacked = ((10_000, 11_000),)
    out = _Sender(20_000)
    retransmit_holes(r, 0, 100, out, budget=3)
    assert out.sent == [(0, 100), (100, 100), (200, 100)]
    assert r.rexmit_hi == 300
    out.sent.clear()
    retransmit_holes(r, 0, 100, out)  # the default budget: HOLES_PER_ACK segments
    assert len(out.sent) == HOLES_PER_ACK
    assert out.sent[0] == (300, 100)


def test_budget_counts_across_holes():
    r = Recovery()
    r.sacked = ((200, 300), (500, 600))
    out = _Sender(10_000)
    retransmit_holes(r, 0, 100, out, budget=2)
    assert out.sent == [(0, 100), (100, 100)]
    out.sent.clear()
    retransmit_holes(r, 0, 100, out, budget=3)
    assert out.sent == [(300, 100), (400, 100)]
    assert r.rexmit_hi == 500


def test_nothing_left_to_send_stops():
    r = Recovery()
    r.sacked = ((5000, 6000),)
    out = _Sender(300)  # only 300 bytes are still held
    retransmit_holes(r, 0, 100, out)
    assert out.sent == [(0, 100), (100, 100), (200, 100)]
    assert r.rexmit_hi == 300


def test_holes_across_the_wrap():
    una = TOP - 299  # 300 bytes before the wrap
    r = Recovery()
    r.rexmit_hi = una
    r.sacked = ((seq.add(una, 500), seq.add(una, 700)),)
    out = _Sender(seq.add(una, 10_000))
    retransmit_holes(r, una, 200, out)
    assert out.sent == [(una, 200), (seq.add(una, 200), 200), (seq.add(una, 400), 100)]
    assert r.rexmit_hi == seq.add(una, 500)


def test_in_recovery_each_dupack_with_new_sack_information_resends():
    # RFC 6675 5 (step C): during recovery every ACK that brings SACK news lets NextSeg send;
    # the fourth duplicate ACK is the first one after the fast retransmit
    r = Recovery()
    for _ in range(3):
        r.on_dupack(1000, 5000, False)
    assert r.on_dupack(1000, 5000, True) is True


def test_after_a_partial_ack_the_first_dupack_with_sack_news_resends():
    # RFC 6675 5 step C: in recovery, every ACK that brings SACK news lets NextSeg send; a
    # partial ACK (RFC 6582) restarts the duplicate count but not the recovery, so the next
    # duplicate ACKs that reveal holes do not wait for a "third" again
    r = Recovery()
    for _ in range(3):
        r.on_dupack(1000, 5000, False)
    assert r.on_new_ack(2000) is True  # partial: the recovery goes on
    assert r.dupacks == 0 and r.recover == 5000
    assert r.on_dupack(2000, 5000, False) is False  # no news: nothing to send
    assert r.on_dupack(2000, 5000, True) is True
    assert r.on_dupack(2000, 5000, True) is True  # the third after the partial ACK: news again
    assert r.recover == 5000  # the same recovery, not restarted


def test_never_resend_below_snd_una():
    # an ACK moved past what this recovery resent: the bytes below snd_una are acknowledged
    r = Recovery()
    r.rexmit_hi = 1000
    r.sacked = ((3000, 4000),)
    out = _Sender(10_000)
    retransmit_holes(r, 2000, 1000, out)
    assert out.sent == [(2000, 1000)]
    assert r.rexmit_hi == 3000


def test_sacked_bytes_are_not_resent_when_blocks_nest():
    # RFC 2883 4: a D-SACK first block may lie inside a later block; bytes any block covers
    # are never resent (RFC 6675 IsLost/NextSeg only pick unSACKed bytes)
    r = Recovery()
    r.sacked = ((2000, 3000), (1500, 5000))
    out = _Sender(10_000)
    retransmit_holes(r, 1000, 1000, out)
    assert out.sent == [(1000, 500)]
    assert r.rexmit_hi == 1500


def test_the_budget_left_after_one_hole_goes_to_the_next():
    r = Recovery()
    r.sacked = ((200, 300), (400, 500))
    out = _Sender(10_000)
    retransmit_holes(r, 0, 100, out, budget=3)
    assert out.sent == [(0, 100), (100, 100), (300, 100)]
    assert r.rexmit_hi == 400
