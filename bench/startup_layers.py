"""
The layers a proxy's modules belong to, and the memory each layer costs.

L{layer_of} sorts a module (or a source file) into one of L{LAYERS}.
Run by path (C{python bench/startup_layers.py MODULES.json [--traced]}) in
a fresh interpreter, it imports the given modules (those a running proxy
had loaded, in their order) one layer at a time, bottom up, and prints, as
JSON, each layer's RSS growth and import time: the memory a layer costs
on top of those below it, with the standard library modules it is the
first to need. With C{--traced} it reports instead what
C{tracemalloc} saw Python allocate for each layer (module objects, code,
classes, data), the rest of its RSS being native: shared libraries,
their relocations and C heaps. It imports only the standard library.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time
from collections.abc import Callable

#: (layer, module-name prefixes), bottom up: the order the layers are
#: imported in, each needing only those before it.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("asyncio (twisted.internet.defer), stdlib ssl",
     ("asyncio", "concurrent", "ssl", "_ssl", "_asyncio")),
    ("zope.interface, attrs, other Twisted dependencies",
     ("zope", "attr", "attrs", "automat", "constantly", "hyperlink", "incremental",
      "typing_extensions", "idna")),
    ("Twisted core (python, logger, defer)",
     ("twisted.python", "twisted.logger", "twisted.internet.defer", "twisted.internet._idna",
      "twisted.copyright", "twisted._version", "twisted.plugin", "twisted")),
    ("pyOpenSSL, cryptography, service_identity",
     ("OpenSSL", "cryptography", "service_identity", "pyasn1", "pyasn1_modules",
      "_cffi_backend")),
    ("Twisted reactor, TCP and TLS transports",
     ("twisted.internet", "twisted.protocols")),
    ("Twisted application, usage",
     ("twisted.application",)),
    ("Twisted web, spread (a metrics endpoint)",
     ("twisted.web", "twisted.spread", "twisted.cred")),
    ("prometheus_client", ("prometheus_client",)),
    ("protobuf, lpxy._proto", ("google", "lpxy._proto")),
    ("NVX (cffi, pycparser: autobahn's accelerators)",
     ("autobahn.nvx", "cffi", "pycparser", "_nvx_")),
    ("txaio, autobahn WebSocket", ("txaio", "autobahn.websocket", "autobahn.util",
                                   "autobahn.exception", "autobahn._version")),
    ("autobahn.twisted package (WAMP, serializers)",
     ("autobahn.twisted", "autobahn.wamp", "autobahn", "cbor2", "msgpack", "umsgpack",
      "ujson", "flatbuffers", "nacl", "zlmdb")),
    ("botocore", ("botocore", "dateutil", "urllib3", "jmespath", "six")),
    ("lpxy", ("lpxy",)),
]
STDLIB = "other standard library"
OTHER = "other third-party modules"


def layer_of(module: str) -> str:
    """The layer of the module named C{module}: its longest matching prefix's."""
    best, found = -1, None
    for layer, prefixes in LAYERS:
        for prefix in prefixes:
            matches = (module.startswith(prefix) if prefix.endswith("_")
                       else module == prefix or module.startswith(prefix + "."))
            if matches and len(prefix) > best:
                best, found = len(prefix), layer
    if found is not None:
        return found
    top = module.split(".")[0]
    if top in sys.stdlib_module_names or top in sys.builtin_module_names:
        return STDLIB
    return OTHER


def _rss_kb() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def measure(modules: list[str], size_kb: Callable[[], int] | None = None
            ) -> list[dict[str, object]]:
    """
    Import C{modules} layer by layer, bottom up; each layer's cost in
    C{size_kb} (by default the RSS) and milliseconds. A layer's figures
    include the standard library modules it is the first to pull in
    (counted as C{stdlib}); what no layer pulled in comes last.
    """
    size_kb = size_kb or _rss_kb
    order = [layer for layer, _ in LAYERS] + [STDLIB, OTHER]
    rows: list[dict[str, object]] = [
        {"layer": "interpreter (python -c)", "rss_kb": size_kb(), "ms": 0.0, "modules": 0,
         "stdlib": 0}]
    for layer in order:
        wanted = [m for m in modules if layer_of(m) == layer and m not in sys.modules]
        loaded = set(sys.modules)
        before, started = size_kb(), time.perf_counter()
        for name in wanted:
            if name in sys.modules:
                continue
            try:
                importlib.import_module(name)
            except Exception:
                continue
        pulled = [m for m in set(sys.modules) - loaded if layer_of(m) == STDLIB]
        rows.append({
            "layer": layer,
            "rss_kb": size_kb() - before,
            "ms": (time.perf_counter() - started) * 1e3,
            "modules": len(wanted),
            "stdlib": len(pulled) if layer != STDLIB else 0,
        })
    return rows


if __name__ == "__main__":
    del sys.path[0]  # bench/: the modules come from the installed copy
    with open(sys.argv[1]) as f:
        wanted = json.load(f)
    if sys.argv[2:] == ["--traced"]:
        import tracemalloc

        tracemalloc.start(1)

        def traced_kb() -> int:
            return tracemalloc.get_traced_memory()[0] // 1024

        rows = measure(wanted, traced_kb)
        total = traced_kb()
    else:
        rows = measure(wanted)
        total = _rss_kb()
    sys.stdout.write(json.dumps({"rows": rows, "total_kb": total}) + "\n")
