"""CI smoke: every atheris harness in fuzz/ runs a bounded number of inputs and exits 0."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

FUZZ = pathlib.Path(__file__).resolve().parent.parent / "fuzz"
HARNESSES = sorted(p.name for p in FUZZ.glob("fuzz_*.py"))
RUNS = {"fuzz_stack.py": 15000, "fuzz_reassembly.py": 8000}


def test_harnesses_exist():
    assert "fuzz_stack.py" in HARNESSES and "fuzz_dhcp.py" in HARNESSES and len(HARNESSES) >= 10


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    try:
        import atheris  # noqa: F401
    except ImportError:
        pytest.skip("LOUD: atheris is not installed; fuzz smoke cannot run")
    subprocess.run([sys.executable, str(FUZZ / "make_corpus.py")], check=True,
                   capture_output=True, timeout=120)
    src = FUZZ / "corpus"
    for d in src.iterdir():
        if d.is_dir():
            shutil.copytree(d, root / d.name)
    return root


@pytest.mark.parametrize("harness", HARNESSES)
def test_harness_runs_clean(harness, corpus, tmp_path):
    name = harness[len("fuzz_"):-3]
    seeds = corpus / name
    work = tmp_path / "work"
    work.mkdir()
    args = [sys.executable, str(FUZZ / harness), f"-atheris_runs={RUNS.get(harness, 4000)}",
            "-max_len=2048", str(work)]
    if seeds.is_dir():
        args.append(str(seeds))
    env = dict(os.environ, PYTHONPATH=str(FUZZ.parent))  # this checkout's slirpy, not an installed one
    r = subprocess.run(args, cwd=FUZZ, capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Done" in r.stderr
