"""Per-file mutation score of slirpy/stack/ from mutmut's results (mutants/**/*.py.meta).

    python3 tests/mutation_report.py [--base OTHER_CHECKOUT] [FILE.py ...]

``--base``: results of an earlier run (another checkout's mutants/ of the same source) under
this one's: a mutant this run did not test keeps the verdict it had there. That is how a run
of only the earlier survivors, after tests were added, becomes a whole file's score.

Score = killed (incl. timeouts) / (mutants - accepted equivalents). The accepted equivalents are
the lines "- `mutant name`: why" of docs/mutation.md; mutant numbers hold for the commit named
there (mutmut numbers the mutants of a function in order, so editing a function renumbers them).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KILLED = {1, 3, 36, -24, 24, 152, 255}  # killed, pytest internal error, timeouts (SIGXCPU)
TIMEOUT = {36, -24, 24, 152, 255}


def equivalents() -> dict[str, str]:
    doc = ROOT / "docs" / "mutation.md"
    if not doc.exists():
        return {}
    return dict(re.findall(r"^- `(slirpy\.stack\.[\w.]+__mutmut_\d+)`: (.+)$",
                           doc.read_text(), re.M))


def _codes(meta: Path) -> dict:
    return json.loads(meta.read_text())["exit_code_by_key"] if meta.exists() else {}


def main(argv: list[str]) -> int:
    eq = equivalents()
    base = None
    if argv[:1] == ["--base"]:
        base, argv = Path(argv[1]), argv[2:]
    want = set(argv)
    rows, tot = [], [0, 0, 0, 0, 0, 0]
    for meta in sorted((ROOT / "mutants" / "slirpy" / "stack").glob("*.py.meta")):
        name = meta.name[:-5]
        if want and name not in want:
            continue
        codes = _codes(meta)
        if base is not None:
            old = _codes(base / "mutants" / "slirpy" / "stack" / meta.name)
            codes = {k: (c if c is not None else old.get(k)) for k, c in codes.items()}
        if not codes or all(c is None for c in codes.values()):
            continue
        n = len(codes)
        unchecked = sum(c is None for c in codes.values())
        killed = sum(c in KILLED for c in codes.values())
        timeouts = sum(c in TIMEOUT for c in codes.values())
        equiv = [k for k, c in codes.items() if c not in KILLED and c is not None and k in eq]
        alive = [k for k, c in codes.items() if c not in KILLED and c is not None and k not in eq]
        denom = n - unchecked - len(equiv)
        score = 100.0 * killed / denom if denom else 100.0
        rows.append((name, n, unchecked, killed, timeouts, len(equiv), len(alive), score, alive))
        for i, v in enumerate((n, unchecked, killed, timeouts, len(equiv), len(alive))):
            tot[i] += v
    print("| file | mutants | not run | killed (timeouts) | equivalent | survived | score |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, n, unchecked, killed, timeouts, equiv, alive, score, _ in rows:
        print(f"| {name} | {n} | {unchecked} | {killed} ({timeouts}) | {equiv} | {alive} | "
              f"{score:.1f}% |")
    n, unchecked, killed, timeouts, equiv, alive = tot
    denom = n - unchecked - equiv
    print(f"| **all** | {n} | {unchecked} | {killed} ({timeouts}) | {equiv} | {alive} | "
          f"{100.0 * killed / denom if denom else 100.0:.1f}% |")
    for name, *_, survivors in rows:
        for k in survivors:
            print("survived:", k)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
