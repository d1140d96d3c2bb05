"""`python -m slirpy` and the `slirpy` console script.

`--help` and `--version` alone (as Podman and RootlessKit run them, before every start) are
answered from _usage.py without importing the argument parser or anything else: Python's own
start is then the whole cost. Every other command line goes to cli.main(), after _early.py has
forked the helper when the command line is a plain one (the tap is there ~20 ms sooner)."""

import sys

FAST = {"--help": "help", "-h": "help", "--version": "version", "-v": "version"}


def main() -> int:
    argv = sys.argv[1:]
    if len(argv) == 1 and argv[0] in FAST:
        from . import _usage
        sys.stdout.write(_usage.HELP if FAST[argv[0]] == "help" else _usage.version_text())
        sys.stdout.flush()
        return 0
    from . import _early
    _early.start(argv)  # the helper, forked before cli.py's imports when the argv is plain
    from .cli import main as cli_main
    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
