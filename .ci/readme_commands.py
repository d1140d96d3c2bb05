"""Print the commands of README.md's first ```sh block, one per line (comments and blank lines
left out). .ci/run runs exactly these; tests/test_readme.py checks the same block."""

import sys


def commands(text: str) -> list[str]:
    lines = text.splitlines()
    start = lines.index("```sh") + 1
    end = lines.index("```", start)
    return [ln.strip() for ln in lines[start:end] if ln.strip() and not ln.lstrip().startswith("#")]


if __name__ == "__main__":
    with open(sys.argv[1], encoding="utf-8") as f:
        print("\n".join(commands(f.read())))
