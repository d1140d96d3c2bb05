"""_triowait.PumpWait on its own: both modes wait for the set's fds and the deadline; a test
clock turns the fast mode plain."""

from __future__ import annotations

import os
import select

import trio
import trio.testing

from slirpy._triowait import PumpWait


def _set():
    ep = select.epoll()
    r, w = os.pipe()
    ep.register(r, select.EPOLLIN)
    return ep, r, w


async def _wait_until_ready(pw, r, w):
    """The events the wait reports once w was written. Fast mode returns them; plain mode
    returns [] once the set is readable (the pump then polls it, as here)."""
    os.write(w, b"x")
    for _ in range(10):
        events = await pw.wait(trio.current_time() + 5)
        if events or not pw.fast:
            return events or pw._ep.poll(0)
    return []


async def test_fast_mode_sleeps_in_the_set_and_returns_its_events(monkeypatch):
    monkeypatch.delenv("SLIRPY_PLAIN_TRIO_WAITS", raising=False)
    ep, r, w = _set()
    pw = PumpWait(ep, trio.current_time)
    await pw.start()
    try:
        assert pw.fast and pw.trio_fd >= 0
        assert await _wait_until_ready(pw, r, w) == [(r, select.EPOLLIN)]
        t0 = trio.current_time()
        os.read(r, 1)
        events = []
        while not events and trio.current_time() < t0 + 0.05:
            events = await pw.wait(t0 + 0.05)  # the deadline ends the wait
        assert events == [] and trio.current_time() >= t0 + 0.05
    finally:
        pw.close()
        os.close(r)
        os.close(w)


async def test_plain_mode_waits_through_trio(monkeypatch):
    monkeypatch.setenv("SLIRPY_PLAIN_TRIO_WAITS", "1")
    ep, r, w = _set()
    pw = PumpWait(ep, trio.current_time)
    await pw.start()
    try:
        assert not pw.fast and pw.trio_fd == -1 and not pw.pending()
        assert await _wait_until_ready(pw, r, w) == [(r, select.EPOLLIN)]
        os.read(r, 1)
        t0 = trio.current_time()
        assert await pw.wait(t0 + 0.05) == [] and trio.current_time() >= t0 + 0.05
        assert pw.scope is None
    finally:
        pw.close()
        os.close(r)
        os.close(w)


def test_a_test_clock_turns_fast_mode_plain(monkeypatch):
    monkeypatch.delenv("SLIRPY_PLAIN_TRIO_WAITS", raising=False)

    async def main():
        ep, r, w = _set()
        pw = PumpWait(ep, trio.current_time)
        await pw.start()
        assert pw.fast
        t0 = trio.current_time()
        assert await pw.wait(t0 + 100) == []  # the autojump clock skips the 100 s
        assert not pw.fast and pw.trio_fd == -1 and trio.current_time() >= t0 + 100
        pw.close()
        os.close(r)
        os.close(w)
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
