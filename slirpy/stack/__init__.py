"""The sans-IO protocol core.

Nothing in this package performs I/O or reads a clock: it imports no trio, socket, os, select,
time, asyncio or threading (tests/test_sans_io.py enforces it). Time comes in as ``now``
(float seconds, any monotonic origin).

The glue drives a :class:`slirpy.stack.stack.Stack` like this::

    stack.receive_frame(buf, now)        # one Ethernet frame from the tap (bytes or memoryview)
    for frame in stack.frames_to_send(now):  # frames for the tap, in order
        ...
    while (ev := stack.next_event()) is not None:   # events for the glue (slirpy.stack.events)
        ...
    deadline = stack.get_timer()         # earliest deadline, or None
    stack.handle_timer(now)              # when now >= deadline

and calls back into it (accept_tcp, reject_tcp, send_tcp, recv_tcp, ...; see Stack's docstrings).
Guest bytes enter only through ``*_untrusted`` parsers, which never raise on hostile input: they
return ``None``/a drop reason, and the caller counts it in ``stats.dropped[reason]``.
"""
