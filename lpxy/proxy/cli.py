# -*- test-case-name: tests.test_cli -*-
"""
The C{localproxy} console script: the options of C{twistd localproxy}, the
same service and exit statuses, logging to standard error.

Nothing heavy is imported before it is needed: C{localproxy -V} (or
C{--version}) alone answers before Twisted is imported at all.
"""

from __future__ import annotations

import gc
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import IO, TYPE_CHECKING, Any, NoReturn

from lpxy.proxy import VERSION_LINE

if TYPE_CHECKING:
    from pathlib import Path

    from twisted.internet.defer import Deferred

    from lpxy.proxy.config import ProxyConfig
    from lpxy.proxy.tap import ServiceFactory

EXIT_USAGE = 1

# Whether main paused the garbage collector for the start (see _pause_collection).
_collection_paused = False

_VERSION_ONLY = (["-V"], ["--version"])


def parse(
    argv: Sequence[str],
    stderr: IO[str],
    environ: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> ProxyConfig:
    """
    Parse the command line; a usage error goes to C{stderr} as the
    reference writes it (its reason, then lpxy's line naming the option
    and the fix, then C{Try 'localproxy --help' for a list of options.})
    with exit status 1. C{--help}, C{--version} and
    C{--export-default-settings} exit 0 from inside.
    """
    from twisted.python import usage

    from lpxy.proxy import tap
    from lpxy.proxy.option_errors import with_trailer

    options = tap.Options(environ=environ, cwd=cwd)
    try:
        options.parseOptions(list(argv))
    except usage.UsageError as e:
        stderr.write(with_trailer(str(e)) + "\n")
        stderr.flush()
        sys.exit(EXIT_USAGE)
    config: ProxyConfig = options["proxy-config"]
    return config


def run(reactor: Any, config: ProxyConfig, service_factory: ServiceFactory) -> Deferred[None]:
    """
    Start the proxy service on C{reactor}; stop it when the reactor shuts
    down. The result fires when the proxy ends on its own: with L{None}
    for status 0, failing with L{SystemExit} otherwise (what
    L{twisted.internet.task.react} turns into the exit status).
    """
    service = service_factory(config, reactor)
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    if config.stdio_service is not None and hasattr(signal, "SIGHUP"):
        _stop_on_hangup(reactor)
    service.startService()
    _resume_collection()
    done: Deferred[int] = service.whenDone()

    def exit(status: int) -> None:
        if status:
            raise SystemExit(status)

    return done.addCallback(exit)


def _pause_collection() -> None:
    """
    No garbage collection while the proxy starts: importing Twisted,
    Autobahn, pyOpenSSL and protobuf builds some 55,000 objects that live
    as long as the process and hardly any garbage, so the collector's
    passes over them are wasted work: about 80 of the 480 ms of CPU a
    source spends until its tunnel is ready (bench/startup.py).
    L{_resume_collection} ends the pause.
    """
    global _collection_paused
    if gc.isenabled():
        gc.disable()
        _collection_paused = True


def _resume_collection() -> None:
    """
    Once the service has started: freeze what the start built, so later
    collections never scan it again (collecting it first would cost what
    the pause saved), and collect as usual from then on. The start's few
    cycles of garbage stay, once: about 0.7 MB of RSS.
    """
    global _collection_paused
    if _collection_paused:
        _collection_paused = False
        gc.freeze()
        gc.enable()


def _stop_on_hangup(reactor: Any) -> None:
    """
    ssh ends its ProxyCommand with SIGHUP: stop as on SIGTERM (the stream
    closed, the tunnel connection closed cleanly, status 0).
    """

    from twisted.internet.error import ReactorNotRunning
    from twisted.logger import Logger

    def stop() -> None:
        Logger(namespace=__name__).info("Received SIGHUP, shutting down.")
        try:
            reactor.stop()
        except ReactorNotRunning:
            pass

    signal.signal(signal.SIGHUP, lambda number, frame: reactor.callFromThread(stop))


def main(
    argv: Sequence[str] | None = None,
    *,
    _react: Callable[..., Any] | None = None,
    _service_factory: ServiceFactory | None = None,
    _stderr: IO[str] | None = None,
    _stdout: IO[str] | None = None,
    _start_logging: Callable[..., None] | None = None,
) -> NoReturn:
    """
    The C{localproxy} console script. Never returns: the process exits
    with the proxy's status.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if args in _VERSION_ONLY:
        # What the options would print, without importing them.
        stdout = sys.stdout if _stdout is None else _stdout
        stdout.write(VERSION_LINE + "\n")
        stdout.flush()
        sys.exit(0)
    if _react is None:
        # (A test's stand-in reactor runs in the test's own process, whose
        # collector is not ours to pause.)
        _pause_collection()
    stderr = sys.stderr if _stderr is None else _stderr
    config = parse(args, stderr)
    if _start_logging is None:
        from lpxy.proxy.verbosity import start_console_logging

        _start_logging = start_console_logging
    _start_logging(config.verbosity, log_format=config.log_format)
    if _service_factory is None:
        from lpxy.proxy.tap import default_service_factory

        _service_factory = default_service_factory()
    if _react is None:
        from twisted.internet.task import react

        _react = react
    _react(run, (config, _service_factory))
    # react() always exits; this is for a test's stand-in.
    sys.exit(0)
