"""Shared test setup.

In CI (CI=true) a skipped test fails the run: nothing may be silently skipped there.
Locally a skip prints its reason loudly in the summary (-ra in pyproject.toml).

The TCP engine's catch-alls (a guest can never crash the daemon: our own bugs are counted as
tcp_internal_error) and the glue's (`<proto>_glue_error`) re-raise in tests run in this process,
so a bug cannot hide behind a counter and every "never raises" test can fail.
"""

from __future__ import annotations

import os

import pytest

from slirpy import errors
from slirpy.stack import tcp

# our own bugs are loud in tests: an exception inside the TCP engine or a glue handler is
# raised, not counted
tcp.STRICT = True
errors.STRICT = True

_skipped: list[str] = []


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped:
        _skipped.append(item.nodeid)


def pytest_sessionfinish(session, exitstatus):
    if _skipped and os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        tr = session.config.pluginmanager.get_plugin("terminalreporter")
        if tr is not None:
            tr.write_line(
                f"ERROR: {len(_skipped)} test(s) skipped in CI, where nothing may be skipped:",
                red=True,
            )
            for nodeid in _skipped:
                tr.write_line(f"  SKIPPED {nodeid}", red=True)
        session.exitstatus = 1
