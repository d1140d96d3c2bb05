"""The TCP state machine's table (slirpy/stack/tcp_state.py) against RFC 9293 3.3.2 (Figure 5).

The engine's states are the RFC's, seen from our side of the guest's connection, plus the two
of the module docstring (SYN_PENDING before the SYN-ACK, DRAINING before TIME-WAIT). Each test
states one arrow of the RFC's diagram (or one of the two additions), and what no diagram allows.
"""

from types import SimpleNamespace

import pytest

from slirpy.stack import tcp_state
from slirpy.stack.tcp_state import (CONNECTED, FIN_UNACKED, GUEST_CLOSED, HANDSHAKE, HOST_CLOSED,
                                    RCV_OPEN, SHOWN, SND_OPEN, TRANSITIONS, TcpEvent as E,
                                    TcpState as S, TcpStateError, move)


def _go(state, *events):
    f = SimpleNamespace(id=7, state=state)
    for e in events:
        move(f, e)
    return f.state


def test_states_are_their_names():
    for s in S:
        assert s == s.name and str(s) == s.name
    assert len(S) == 12


def test_passive_open_rfc_listen_syn_rcvd_established():
    # LISTEN -> rcv SYN -> SYN-RECEIVED (ours waits for the host connect) -> rcv ACK of SYN
    assert _go(S.CLOSED, E.GUEST_SYN) is S.SYN_PENDING
    assert _go(S.CLOSED, E.GUEST_SYN, E.ACCEPT) is S.SYN_RCVD
    assert _go(S.CLOSED, E.GUEST_SYN, E.ACCEPT, E.ESTABLISHED) is S.ESTABLISHED


def test_active_open_rfc_syn_sent_established():
    # CLOSED -> active OPEN, snd SYN -> SYN-SENT -> rcv SYN,ACK -> ESTABLISHED
    assert _go(S.CLOSED, E.CONNECT) is S.SYN_SENT
    assert _go(S.CLOSED, E.CONNECT, E.ESTABLISHED) is S.ESTABLISHED


def test_close_during_the_handshake_is_queued():
    # RFC 9293 3.10.4 CLOSE in SYN-SENT / SYN-RECEIVED: queued until ESTABLISHED
    for s in (S.SYN_PENDING, S.SYN_SENT, S.SYN_RCVD):
        assert _go(s, E.HOST_CLOSE) is s


def test_active_close_rfc_fin_wait_1_fin_wait_2_time_wait():
    # ESTABLISHED -> CLOSE, snd FIN -> FIN-WAIT-1 -> rcv ACK of FIN -> FIN-WAIT-2
    # -> rcv FIN -> TIME-WAIT (here through DRAINING, once the host has the guest's bytes)
    assert _go(S.ESTABLISHED, E.HOST_CLOSE) is S.FIN_WAIT_1
    assert _go(S.FIN_WAIT_1, E.FIN_ACKED) is S.FIN_WAIT_2
    assert _go(S.FIN_WAIT_2, E.GUEST_FIN) is S.DRAINING
    assert _go(S.DRAINING, E.DRAINED) is S.TIME_WAIT


def test_simultaneous_close_rfc_fin_wait_1_closing():
    # FIN-WAIT-1 -> rcv FIN -> CLOSING -> rcv ACK of FIN -> TIME-WAIT (through DRAINING)
    assert _go(S.FIN_WAIT_1, E.GUEST_FIN) is S.CLOSING
    assert _go(S.CLOSING, E.FIN_ACKED) is S.DRAINING


def test_passive_close_rfc_close_wait_last_ack():
    # ESTABLISHED -> rcv FIN -> CLOSE-WAIT -> CLOSE, snd FIN -> LAST-ACK -> rcv ACK of FIN
    assert _go(S.ESTABLISHED, E.GUEST_FIN) is S.CLOSE_WAIT
    assert _go(S.CLOSE_WAIT, E.HOST_CLOSE) is S.LAST_ACK
    assert _go(S.LAST_ACK, E.FIN_ACKED) is S.DRAINING


def test_every_state_but_closed_can_be_closed_and_closed_cannot():
    for s in S:
        if s is S.CLOSED:
            assert (s, E.CLOSE) not in TRANSITIONS
        else:
            assert _go(s, E.CLOSE) is S.CLOSED


def test_the_table_has_exactly_the_rfc_arrows_and_no_other():
    # 17 arrows above plus CLOSE from the 11 open states
    assert len(TRANSITIONS) == 17 + 11


@pytest.mark.parametrize("state,event", [
    (S.CLOSED, E.ESTABLISHED), (S.CLOSED, E.GUEST_FIN), (S.SYN_PENDING, E.ESTABLISHED),
    (S.SYN_SENT, E.ACCEPT), (S.SYN_RCVD, E.GUEST_FIN), (S.ESTABLISHED, E.FIN_ACKED),
    (S.FIN_WAIT_2, E.HOST_CLOSE), (S.CLOSE_WAIT, E.GUEST_FIN), (S.TIME_WAIT, E.GUEST_FIN),
    (S.DRAINING, E.FIN_ACKED), (S.TIME_WAIT, E.DRAINED), (S.LAST_ACK, E.HOST_CLOSE),
])
def test_a_move_the_table_does_not_allow_raises_and_leaves_the_state(state, event):
    f = SimpleNamespace(id=42, state=state)
    with pytest.raises(TcpStateError) as e:
        move(f, event)
    assert f.state is state
    assert str(e.value) == f"flow 42: {event.name} in {state.name}"


def test_move_returns_and_stores_the_next_state():
    f = SimpleNamespace(id=1, state=S.ESTABLISHED)
    assert move(f, E.GUEST_FIN) is S.CLOSE_WAIT
    assert f.state is S.CLOSE_WAIT


def test_the_state_sets():
    assert HANDSHAKE == {S.SYN_PENDING, S.SYN_SENT, S.SYN_RCVD}
    # synchronized (RFC 9293 3.10.7.4: ESTABLISHED ... TIME-WAIT), TIME-WAIT aside
    assert CONNECTED == {S.ESTABLISHED, S.FIN_WAIT_1, S.FIN_WAIT_2, S.CLOSE_WAIT, S.CLOSING,
                         S.LAST_ACK, S.DRAINING}
    # RFC 9293 3.10.7.4 "seventh, process the segment text": ESTABLISHED, FIN-WAIT-1/2 only
    assert RCV_OPEN == {S.ESTABLISHED, S.FIN_WAIT_1, S.FIN_WAIT_2}
    # RFC 9293 3.10.2 SEND: allowed in SYN-SENT/RECEIVED (queued), ESTABLISHED, CLOSE-WAIT
    assert SND_OPEN == {S.SYN_SENT, S.SYN_RCVD, S.ESTABLISHED, S.CLOSE_WAIT}
    # the guest's FIN was received in exactly the states after rcv FIN in the diagram
    assert GUEST_CLOSED == {S.CLOSE_WAIT, S.CLOSING, S.LAST_ACK, S.DRAINING, S.TIME_WAIT}
    assert HOST_CLOSED == {S.FIN_WAIT_1, S.FIN_WAIT_2, S.CLOSING, S.LAST_ACK, S.DRAINING,
                           S.TIME_WAIT}
    assert FIN_UNACKED == {S.FIN_WAIT_1, S.CLOSING, S.LAST_ACK}


def test_state_sets_agree_with_the_table():
    # a state whose guest FIN arrived is reached only through GUEST_FIN (or the states after)
    for (s, e), nxt in TRANSITIONS.items():
        if e is E.GUEST_FIN:
            assert nxt in GUEST_CLOSED and s in RCV_OPEN
        if e is E.FIN_ACKED:
            assert s in FIN_UNACKED and nxt not in FIN_UNACKED
        if e is E.HOST_CLOSE and s not in HANDSHAKE:
            assert s in SND_OPEN and nxt in HOST_CLOSED


def test_closing_states_that_still_carry_data_show_as_established():
    shown = {s: SHOWN[s] for s in S}
    for s in (S.FIN_WAIT_1, S.FIN_WAIT_2, S.CLOSE_WAIT, S.CLOSING, S.LAST_ACK, S.DRAINING):
        assert shown.pop(s) == "ESTABLISHED"
    assert shown == {s: s.name for s in shown}
    assert not hasattr(tcp_state, "_s")  # the loop variable is not left in the module


def test_event_numbers_are_stable():
    assert [e.value for e in E] == list(range(9))
    assert [e.name for e in E] == ["GUEST_SYN", "CONNECT", "ACCEPT", "ESTABLISHED", "HOST_CLOSE",
                                   "GUEST_FIN", "FIN_ACKED", "DRAINED", "CLOSE"]
