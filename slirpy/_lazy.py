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
