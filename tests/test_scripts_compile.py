"""The scripts outside the package that no other test imports (bench/, fuzz/, .ci/) at least
compile: a bad merge of bench/netbench.py once left it unparseable and only a bench run showed it."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPTS = sorted([*ROOT.glob("bench/*.py"), *ROOT.glob("fuzz/*.py"), *ROOT.glob(".ci/*.py")])


def test_there_are_scripts():
    assert len(SCRIPTS) >= 10, SCRIPTS


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_script_compiles(path):
    compile(path.read_text(), str(path), "exec")


def test_netbench_help_runs():
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "netbench.py"), "--help"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "--only" in r.stdout, r.stderr


@pytest.mark.parametrize("script", ["bench/run", ".ci/run", "tests/install-deps.sh",
                                    "fuzz/campaign.sh"])
def test_shell_scripts_parse(script):
    r = subprocess.run(["bash", "-n", str(ROOT / script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
