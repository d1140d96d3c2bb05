"""Events the stack hands to the glue through ``Stack.next_event()``.

Addresses are strings as ``ipaddress`` prints them ("10.0.2.100", "fd00::100"); a flow is
identified by an opaque integer ``flow`` id that the stack allocates and never reuses while the
flow is alive. Each event is a small slotted dataclass; the glue dispatches on its type.
"""

from __future__ import annotations

import dataclasses

_ev = dataclasses.dataclass(frozen=True, slots=True)


# ---- TCP, guest-initiated (outbound NAT) ------------------------------------------------------
@_ev
class TcpConnectRequest:
    """The guest sent a SYN to dst:dport. Glue dials the host side, then calls
    ``stack.accept_tcp(flow, now)`` on success or ``stack.reject_tcp(flow, reason, now)``."""

    flow: int
    family: int  # 4 or 6
    src: str
    sport: int
    dst: str
    dport: int


# ---- TCP, host-initiated (port forwarding) ----------------------------------------------------
@_ev
class TcpConnected:
    """A connection the glue opened into the guest with ``stack.connect_tcp`` is established."""

    flow: int


# ---- TCP, both kinds --------------------------------------------------------------------------
@_ev
class TcpReadable:
    """The guest sent data: ``stack.recv_tcp(flow, n)`` returns it (and reopens the window)."""

    flow: int


@_ev
class TcpWritable:
    """Room opened in the flow's send buffer toward the guest: ``stack.send_tcp`` accepts more."""

    flow: int


@_ev
class TcpGuestEof:
    """The guest sent FIN and all its data has been read with recv_tcp: shut down the host's
    write side."""

    flow: int


@_ev
class TcpReset:
    """The flow was reset by the guest (RST) or refused by it (RST to our SYN): close the host
    socket with SO_LINGER 0."""

    flow: int


@_ev
class TcpClosed:
    """The flow is gone from the stack (closed both ways, reset or timed out): release it."""

    flow: int


# ---- our own bugs -----------------------------------------------------------------------------
@_ev
class InternalError:
    """An exception inside the stack while it handled `flow` (a bug of ours, never the guest's
    bytes): the flow was reset and the error counted (``stats.dropped["tcp_internal_error"]``).
    The glue logs it, rate-limited. Under tests (``slirpy.stack.tcp.STRICT``) the exception is
    raised instead."""

    component: str  # "tcp"
    flow: int | None
    error: str  # type and message of the exception


# ---- UDP --------------------------------------------------------------------------------------
@_ev
class UdpDatagram:
    """A (reassembled) UDP datagram from the guest to dst:dport."""

    family: int
    src: str
    sport: int
    dst: str
    dport: int
    payload: bytes


# ---- ICMP -------------------------------------------------------------------------------------
@_ev
class IcmpEchoRequest:
    """An echo request from the guest to an address the stack does not answer itself."""

    family: int
    src: str
    dst: str
    ident: int
    seq: int
    payload: bytes
