"""The TCP connection states (RFC 9293 3.3.2) and the one table of the moves between them.

Every state change of a flow in stack/tcp.py goes through `move()`, and `move()` allows exactly
the moves listed in TRANSITIONS; any other is a bug of ours and raises TcpStateError (under
tests it surfaces, in production the engine resets that flow: tcp.py `_internal_error`). Guest
segments never cause an illegal move: the engine decides from the state which of them matter.

Two states are not in the RFC, both because the engine sits between the guest and a host socket:

  SYN_PENDING   the guest's SYN came (RFC: LISTEN -> SYN-RECEIVED) but the SYN-ACK waits until
                the host connect succeeded; a refused connect is answered with RST or ICMP.
  DRAINING      both FINs are exchanged and ours is acknowledged (RFC: TIME-WAIT, or CLOSED
                after LAST-ACK), but guest bytes still wait in the receive buffer for the host
                socket; TIME_WAIT follows once the host has taken them (TcpGuestEof pushed).

Who closes: "host_close" is the host side's EOF (shutdown_tcp: our FIN to the guest, sent once
the data before it is), "guest_fin" the guest's FIN taken in sequence. A host close before the
handshake ends is queued (RFC 9293 3.10.4) and taken on "established".

list_flows / get_stats show SHOWN[state]: the states of a connection that is closing but still
carries data (FIN_WAIT_1 ... DRAINING) show as "ESTABLISHED", as before these states existed.
"""

from __future__ import annotations

import enum


class TcpState(enum.StrEnum):
    """Each state is also its name as a string ('f.state == "TIME_WAIT"' holds), so tests and
    tools that read a flow's state keep working; the engine compares members with `is`."""

    CLOSED = "CLOSED"  # not in the engine's tables (a new flow, or one removed)
    SYN_PENDING = "SYN_PENDING"
    SYN_SENT = "SYN_SENT"  # port forwarding: our SYN to the guest
    SYN_RCVD = "SYN_RCVD"  # our SYN-ACK sent
    ESTABLISHED = "ESTABLISHED"
    FIN_WAIT_1 = "FIN_WAIT_1"  # the host closed first: our FIN queued or sent, not acknowledged
    FIN_WAIT_2 = "FIN_WAIT_2"  # ... acknowledged; the guest may still send
    CLOSE_WAIT = "CLOSE_WAIT"  # the guest closed first; the host may still send
    CLOSING = "CLOSING"  # both closed, the host first; our FIN not acknowledged
    LAST_ACK = "LAST_ACK"  # both closed, the guest first; our FIN not acknowledged
    DRAINING = "DRAINING"  # both closed, acknowledged; the host still takes the last guest bytes
    TIME_WAIT = "TIME_WAIT"  # tcp.TIME_WAIT_LEN: late segments answered, a new SYN replaces it


class TcpEvent(enum.IntEnum):
    GUEST_SYN = 0  # a SYN for an unknown 4-tuple
    CONNECT = 1  # connect_tcp: port forwarding opens a connection into the guest
    ACCEPT = 2  # accept_tcp: the host connect succeeded, SYN-ACK to the guest
    ESTABLISHED = 3  # the handshake completed (the guest's SYN-ACK, or its ACK of ours)
    HOST_CLOSE = 4  # shutdown_tcp: the host sent EOF
    GUEST_FIN = 5  # the guest's FIN, in sequence
    FIN_ACKED = 6  # the guest acknowledged our FIN
    DRAINED = 7  # the host took the guest's last bytes (TcpGuestEof pushed)
    CLOSE = 8  # reset either way, refused, timed out, TIME_WAIT over: the flow is removed


S, E = TcpState, TcpEvent

# (state, event) -> next state: every move a flow may make, and no other.
TRANSITIONS: dict[tuple[TcpState, TcpEvent], TcpState] = {
    (S.CLOSED, E.GUEST_SYN): S.SYN_PENDING,
    (S.CLOSED, E.CONNECT): S.SYN_SENT,
    (S.SYN_PENDING, E.ACCEPT): S.SYN_RCVD,
    (S.SYN_PENDING, E.HOST_CLOSE): S.SYN_PENDING,  # queued
    (S.SYN_SENT, E.ESTABLISHED): S.ESTABLISHED,
    (S.SYN_SENT, E.HOST_CLOSE): S.SYN_SENT,  # queued
    (S.SYN_RCVD, E.ESTABLISHED): S.ESTABLISHED,
    (S.SYN_RCVD, E.HOST_CLOSE): S.SYN_RCVD,  # queued
    (S.ESTABLISHED, E.HOST_CLOSE): S.FIN_WAIT_1,
    (S.ESTABLISHED, E.GUEST_FIN): S.CLOSE_WAIT,
    (S.FIN_WAIT_1, E.FIN_ACKED): S.FIN_WAIT_2,
    (S.FIN_WAIT_1, E.GUEST_FIN): S.CLOSING,
    (S.FIN_WAIT_2, E.GUEST_FIN): S.DRAINING,
    (S.CLOSE_WAIT, E.HOST_CLOSE): S.LAST_ACK,
    (S.CLOSING, E.FIN_ACKED): S.DRAINING,
    (S.LAST_ACK, E.FIN_ACKED): S.DRAINING,
    (S.DRAINING, E.DRAINED): S.TIME_WAIT,
    **{(s, E.CLOSE): S.CLOSED for s in S if s is not S.CLOSED},
}

# what each state allows, for the engine's per-segment decisions (frozensets: a C-level test)
HANDSHAKE = frozenset({S.SYN_PENDING, S.SYN_SENT, S.SYN_RCVD})
# synchronized and not yet TIME_WAIT: segments are sent and retransmitted
CONNECTED = frozenset({S.ESTABLISHED, S.FIN_WAIT_1, S.FIN_WAIT_2, S.CLOSE_WAIT, S.CLOSING,
                       S.LAST_ACK, S.DRAINING})
RCV_OPEN = frozenset({S.ESTABLISHED, S.FIN_WAIT_1, S.FIN_WAIT_2})  # the guest may still send
SND_OPEN = frozenset({S.SYN_SENT, S.SYN_RCVD, S.ESTABLISHED, S.CLOSE_WAIT})  # the host may
GUEST_CLOSED = frozenset({S.CLOSE_WAIT, S.CLOSING, S.LAST_ACK, S.DRAINING, S.TIME_WAIT})
HOST_CLOSED = frozenset({S.FIN_WAIT_1, S.FIN_WAIT_2, S.CLOSING, S.LAST_ACK, S.DRAINING,
                         S.TIME_WAIT})
FIN_UNACKED = frozenset({S.FIN_WAIT_1, S.CLOSING, S.LAST_ACK})  # our FIN owed or in flight

SHOWN = {s: s.name for s in S}
for _s in (S.FIN_WAIT_1, S.FIN_WAIT_2, S.CLOSE_WAIT, S.CLOSING, S.LAST_ACK, S.DRAINING):
    SHOWN[_s] = "ESTABLISHED"
del _s


class TcpStateError(Exception):
    """A move TRANSITIONS does not allow: a bug in the engine, never the guest's doing."""


def move(f, event: TcpEvent) -> TcpState:
    """f.state becomes the state TRANSITIONS gives for (f.state, event), or TcpStateError."""
    nxt = TRANSITIONS.get((f.state, event))
    if nxt is None:
        raise TcpStateError(f"flow {f.id}: {event.name} in {f.state.name}")
    f.state = nxt
    return nxt
