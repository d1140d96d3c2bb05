"""Shared atheris runner: each fuzz_*.py defines TARGET(data: bytes) and calls run(TARGET)."""

from __future__ import annotations

import sys

import atheris


def run(target):
    atheris.Setup(sys.argv, target)
    atheris.Fuzz()
