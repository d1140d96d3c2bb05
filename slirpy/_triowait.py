"""How the daemon's pump goes idle: `PumpWait.wait(deadline)`, in one of two ways.

fast: the pump sleeps in its own epoll set, which also holds trio's epoll fd, with poll()
until the stack's timer or trio's next deadline; whenever trio's fd is ready (something another
task waits for), or a task is scheduled, the pump yields to trio. That saves trio's per-wait
registration, scheduling and deadline bookkeeping (a third of the daemon's CPU on a
request/response). It reads non-public fields of trio's run loop (the runner's epoll backend,
its deadlines, its clock, its autojump and wait_all_tasks_blocked state, is_guest), all in this
module; `_runner()` checks each before use, and any other trio gets plain mode. The suite runs
on trio 0.35; pyproject.toml keeps trio below 0.36 until a newer one has been tested.

plain: trio's public API only: wait_readable on the pump's epoll fd in a cancel scope that ends
at the stack's timer (a flush in another task may move it earlier: `scope`). Chosen when the
fields are not the known ones, with SLIRPY_PLAIN_TRIO_WAITS=1, and from the first idle wait
under a test clock (autojump, wait_all_tasks_blocked: trio must see every wait).
"""

from __future__ import annotations

import math
import os
import select

import trio


def _runner():
    """The running trio loop's runner when its epoll backend is the one we know, else None."""
    if os.environ.get("SLIRPY_PLAIN_TRIO_WAITS"):
        return None
    try:
        from trio._core import _run
        runner = _run.GLOBAL_RUN_CONTEXT.runner
        ok = (isinstance(runner.io_manager._epoll, select.epoll) and not runner.is_guest
              and callable(runner.deadlines.next_deadline)
              and callable(runner.clock.deadline_to_sleep_time))
        runner.waiting_for_idle, runner.clock_autojump_threshold  # noqa: B018 -- they exist
    except Exception:  # another trio, another backend: correct either way, only slower
        return None
    return runner if ok else None


class _Scheduled(trio.abc.Instrument):
    """Tasks scheduled and not yet stepped: trio's run queue and the rest of the batch it is
    running, which no public field shows. The pump sleeps only when this is empty."""

    def __init__(self):
        self.tasks: set = set()

    def task_scheduled(self, task):
        self.tasks.add(task)

    def before_task_step(self, task):
        self.tasks.discard(task)


class PumpWait:
    """The pump's idle wait on its epoll set ``ep``. ``trio_fd``: trio's epoll fd, in ``ep``
    in fast mode (-1 in plain mode): ready means another task has work."""

    def __init__(self, ep: select.epoll, now):
        self._ep = ep
        self._now = now
        self.trio_fd = -1
        self.scope: trio.CancelScope | None = None  # plain mode, while waiting
        self._runner = None
        self._sched: _Scheduled | None = None
        self._pending: set = set()

    @property
    def fast(self) -> bool:
        return self._runner is not None

    async def start(self) -> None:
        """In the running loop: fast mode if trio's internals are the known ones."""
        runner = _runner()
        if runner is None:
            return
        self._runner = runner
        self.trio_fd = runner.io_manager._epoll.fileno()
        self._ep.register(self.trio_fd, select.EPOLLIN)
        self._sched = _Scheduled()
        self._pending = self._sched.tasks
        trio.lowlevel.add_instrument(self._sched)
        # tasks scheduled before the instrument came are not in its set: two checkpoints and
        # every one of them has stepped (the rest of this batch, then the next)
        await trio.lowlevel.checkpoint()
        await trio.lowlevel.checkpoint()

    def pending(self) -> bool:
        """Another task is scheduled (fast mode): a busy pump yields at once."""
        return bool(self._pending)

    async def wait(self, deadline: float | None) -> list:
        """Idle: until something in the set is ready, the deadline (the stack's timer; None:
        none) or, in fast mode, trio's next deadline or another task's turn. Returns the
        set's events, or [] when the caller should simply look again."""
        runner = self._runner
        if runner is not None and (runner.waiting_for_idle or
                                   runner.clock_autojump_threshold != math.inf):
            self._to_plain()  # a test clock
            runner = None
        if runner is None:
            with trio.CancelScope(deadline=math.inf if deadline is None else deadline) as cs:
                self.scope = cs  # a flush in another task moves it earlier
                await trio.lowlevel.wait_readable(self._ep.fileno())
            self.scope = None
            return []
        if self._pending:
            await trio.lowlevel.checkpoint()
            return []
        timeout = runner.clock.deadline_to_sleep_time(runner.deadlines.next_deadline())
        if deadline is not None:
            timeout = min(timeout, deadline - self._now())
        if timeout <= 0:
            await trio.lowlevel.checkpoint()
            return []
        # a timeout returns []: ours runs at the top of the pump, trio's at its checkpoint
        return self._ep.poll(-1 if timeout == math.inf else timeout)

    def _to_plain(self) -> None:
        """From now on through trio (and trio's fd leaves our set: epoll sets may not loop)."""
        self._ep.unregister(self.trio_fd)
        self.close()
        self._runner, self.trio_fd, self._pending = None, -1, set()

    def close(self) -> None:
        if self._sched is not None:
            trio.lowlevel.remove_instrument(self._sched)
            self._sched = None
