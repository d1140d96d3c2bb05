"""Keep modules the daemon never uses out of memory, although a dependency imports them.

trio imports `ssl` and `hmac` (hence `hashlib`) at package import for its TLS and DTLS streams;
slirpy uses neither, and loading them maps and initialises libssl and libcrypto: ~5 MB of the
idle daemon's RSS and a few ms of start-up. defer() puts a stand-in into sys.modules for each
module not imported yet; the first attribute anyone asks of it imports the real module (and the
stand-in takes on its contents), so nothing breaks if some path does use it after all.
"""

from __future__ import annotations

import importlib
import sys
import types


class _Deferred(types.ModuleType):
    def __getattr__(self, attr):
        name = self.__name__
        if sys.modules.get(name) is self:
            del sys.modules[name]
        real = importlib.import_module(name)
        self.__dict__.update(real.__dict__)
        return getattr(real, attr)


def defer(*names: str) -> None:
    for name in names:
        if name not in sys.modules:
            sys.modules[name] = _Deferred(name)


def is_deferred(name: str) -> bool:
    return isinstance(sys.modules.get(name), _Deferred)


class known_libraries:
    """`with known_libraries(): import trio`: trio's thread cache asks ctypes.util.find_library
    ("pthread") at import, which runs `ldconfig -p` (a fork and exec of the whole process, a
    few ms, tens under load). While the block runs, a library that dlopen() finds under its
    usual soname is answered with that name; anything else goes to find_library as before."""

    SONAMES = {"pthread": "libpthread.so.0", "c": "libc.so.6"}

    def __enter__(self):
        import ctypes
        import ctypes.util
        self.mod, self.orig = ctypes.util, ctypes.util.find_library
        orig, sonames = self.orig, self.SONAMES

        def find_library(name):
            soname = sonames.get(name)
            if soname is not None:
                try:
                    ctypes.CDLL(soname)
                    return soname
                except OSError:
                    pass
            return orig(name)

        ctypes.util.find_library = find_library
        return self

    def __exit__(self, *exc):
        self.mod.find_library = self.orig
