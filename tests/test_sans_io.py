"""slirpy/stack/ must stay sans-IO: walk every module's imports (AST, so lazy imports count too)."""

from __future__ import annotations

import ast
import pathlib

FORBIDDEN = {"trio", "socket", "os", "select", "time", "asyncio", "threading", "selectors",
             "subprocess", "signal"}
STACK = pathlib.Path(__file__).resolve().parent.parent / "slirpy" / "stack"


def _package(path: pathlib.Path) -> list[str]:
    """The dotted package a module in this tree belongs to, as a list: slirpy/stack/tcp.py ->
    ["slirpy", "stack"]."""
    parts = path.resolve().relative_to(STACK.parent.parent).parts[:-1]
    return list(parts)


def _imports(path: pathlib.Path, package: list[str] | None = None):
    """(line, absolute module name) of every import in path; relative imports are resolved
    against package (by default the file's own), so `from ..nat import x` counts as slirpy.nat."""
    tree = ast.parse(path.read_text(), str(path))
    if package is None:
        package = _package(path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - (node.level - 1)] if node.level <= len(package) else []
            if node.module:
                yield node.lineno, ".".join(base + [node.module])
            else:  # from . import x, y: each name is a module of base
                for alias in node.names:
                    yield node.lineno, ".".join(base + [alias.name])
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id == "__import__"):
            yield node.lineno, "__import__(...)"


def test_stack_imports_no_io_or_clock():
    files = sorted(STACK.rglob("*.py"))
    assert len(files) >= 3, files
    bad = []
    for path in files:
        for lineno, name in _imports(path):
            root = name.split(".")[0]
            if root in FORBIDDEN or name == "__import__(...)":
                bad.append(f"{path.relative_to(STACK.parent.parent)}:{lineno} imports {name}")
            if root == "slirpy" and not (name.startswith("slirpy.stack") or name == "slirpy.config"):
                bad.append(f"{path.relative_to(STACK.parent.parent)}:{lineno} imports glue {name}")
    assert not bad, "\n".join(bad)


def test_the_walker_catches_a_violation(tmp_path):
    p = tmp_path / "m.py"
    p.write_text("def f():\n    import time\n    from socket import socket\n"
                 "from ..nat import TcpNat\nfrom . import wire\nfrom .. import daemon\n")
    names = sorted(n for _, n in _imports(p, ["slirpy", "stack"]))
    assert names == ["slirpy.daemon", "slirpy.nat", "slirpy.stack.wire", "socket", "time"]
