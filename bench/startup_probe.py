"""
The C{localproxy} console script with a stopwatch, for L{bench.startup}.

Run by path (C{python bench/startup_probe.py ARGS}) with the installed lpxy
on C{PYTHONPATH}, it does what the console script pip writes does (import
L{lpxy.proxy.cli} and call its C{main}) and notes, on the clock the parent
shares (C{time.monotonic}), when each step of the start is done, with the
process's CPU time (all its threads, since exec) and RSS then: its own
first line, lpxy's modules, the reactor, the tunnel connection's DNS
query, TCP connect, TLS handshake and WebSocket upgrade, the listening
port, the tunnel ready. It imports nothing of its own beyond
what the interpreter has loaded already: each watched module is patched
just after it is imported (a finder on C{sys.meta_path}), sockets are seen
through audit hooks.

SIGUSR1 writes what it has (the events and a snapshot of memory:
C{/proc/self/smaps_rollup}, the loaded modules, the objects the garbage
collector tracks) as JSON to C{$LPXY_PROBE_OUT}. C{$LPXY_PROBE_T0} is the
parent's C{time.monotonic()} when it spawned this process.
"""

import os
import signal
import sys
import time

_T0 = float(os.environ.pop("LPXY_PROBE_T0", time.monotonic()))
_OUT = os.environ.pop("LPXY_PROBE_OUT", "")
_PAGE = os.sysconf("SC_PAGE_SIZE")

# Like the console script: the first entry of the path is the script's
# directory (bench/), which lpxy must not see.
del sys.path[0]

_events: list = []
_seen: set = set()


def _rss_kb() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE // 1024


def _rollup() -> dict:
    fields = {}
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                fields[parts[0].rstrip(":")] = int(parts[1])
    return fields


def mark(name: str, once: bool = True, rollup: bool = False) -> None:
    """Note that C{name} happened now (only its first time when C{once})."""
    if once:
        if name in _seen:
            return
        _seen.add(name)
    now = (time.monotonic() - _T0) * 1e3
    cpu = time.process_time() * 1e3
    _events.append([name, now, _rss_kb(), _rollup() if rollup else None, cpu])


mark("interpreter up (probe's first line)", rollup=True)


# -- patches applied just after a module is imported -------------------------


def _after_call(cls: type, method: str, event, when=lambda self: True) -> None:
    original = getattr(cls, method)

    def wrapper(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        if when(self):
            mark(event, rollup=event == READY)
        return result

    setattr(cls, method, wrapper)


def _before_call(cls: type, method: str, event: str) -> None:
    original = getattr(cls, method)

    def wrapper(self, *args, **kwargs):
        mark(event)
        return original(self, *args, **kwargs)

    setattr(cls, method, wrapper)


def _socket(module) -> None:
    original = module.socket.listen

    def listen(self, *args):
        result = original(self, *args)
        mark("listening (listen() returned)")
        return result

    module.socket.listen = listen


def _tls(module) -> None:
    cls = module.TLSMemoryBIOProtocol
    _before_call(cls, "makeConnection", "TCP connected, TLS handshake starts")
    _after_call(cls, "_checkHandshakeStatus", "TLS handshake done",
                lambda self: getattr(self, "_handshakeDone", False))


def _websocket(module) -> None:
    _before_call(module.WebSocketClientProtocol, "startHandshake",
                 "WebSocket upgrade request sent")


def _tunnel(module) -> None:
    _before_call(module.TunnelProtocol, "onOpen", "WebSocket open (upgrade answered)")


def _cli(module) -> None:
    parse, run = module.parse, module.run

    def timed_parse(*args, **kwargs):
        mark("lpxy.proxy.cli: parse starts")
        config = parse(*args, **kwargs)
        mark("options parsed and resolved", rollup=True)
        return config

    def timed_run(reactor, config, service_factory):
        mark("reactor running, service starts")

        def factory(*args, **kwargs):
            service = service_factory(*args, **kwargs)
            mark("service built")
            return service

        d = run(reactor, config, factory)
        mark("service started (connecting)")
        return d

    module.parse, module.run = timed_parse, timed_run


def _service(module) -> None:
    mark("lpxy.proxy.service imported", rollup=True)
    _after_call(module.LocalProxyService, "_usable", READY)


#: The tunnel is usable: WebSocket open and, for a source, the listening
#: ports handed to the tunnel's services (ClientService's prepareConnection).
READY = "tunnel ready (ports serve the tunnel)"


_WATCHED = {
    "socket": _socket,
    "twisted.protocols.tls": _tls,
    "autobahn.websocket.protocol": _websocket,
    "lpxy.proxy.cli": _cli,
    "lpxy.proxy.tunnel": _tunnel,
    "lpxy.proxy.service": _service,
}
# Modules whose import's end is only noted.
for _name in ("asyncio", "twisted.internet.defer", "OpenSSL.SSL", "twisted.internet.reactor",
              "google.protobuf", "autobahn.twisted.websocket", "lpxy.proxy.tap",
              "lpxy.proxy.config"):
    _WATCHED[_name] = lambda module, name=_name: mark(f"{name} imported")


class _Watch:
    """Runs C{_WATCHED[name]} on a module once it has been executed."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        if name not in _WATCHED:
            return None
        for finder in sys.meta_path:
            if finder is _Watch:
                continue
            find = getattr(finder, "find_spec", None)
            spec = find(name, path, target) if find is not None else None
            if spec is not None:
                break
        else:
            return None
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            _WATCHED[name](module)

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _Watch)


def _audit(event: str, args: tuple) -> None:
    if event == "socket.getaddrinfo":
        mark(f"DNS query for {args[0]!r} starts")
    elif event == "socket.connect":
        address = args[1]
        if isinstance(address, tuple) and len(address) >= 2 and address[0] != "0.0.0.0":
            mark("TCP connect starts")


sys.addaudithook(_audit)


# -- the snapshot ------------------------------------------------------------


def _layered_modules() -> list:
    return [name for name, module in list(sys.modules.items())
            if module is not None and name != "__main__"]


def _dump(number, frame) -> None:
    import gc
    import json

    mark("snapshot asked (SIGUSR1)", once=False, rollup=True)
    data = {
        "events": _events,
        "modules": _layered_modules(),
        "gc_objects": len(gc.get_objects()),
    }
    tmp = _OUT + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, _OUT)


signal.signal(signal.SIGUSR1, _dump)

sys.argv[0] = "localproxy"
from lpxy.proxy.cli import main  # noqa: E402

sys.exit(main())
