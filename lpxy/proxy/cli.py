# -*- test-case-name: tests.test_cli -*-
"""
The C{localproxy} console script: the options of C{twistd localproxy}, the
same service and exit statuses, logging to standard error.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, NoReturn

from twisted.internet.defer import Deferred
from twisted.internet.task import react
from twisted.python import usage

from lpxy.proxy.config import ProxyConfig
from lpxy.proxy.option_errors import with_trailer
from lpxy.proxy.tap import Options, ServiceFactory, default_service_factory
from lpxy.proxy.verbosity import start_console_logging

EXIT_USAGE = 1


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
    options = Options(environ=environ, cwd=cwd)
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
    service.startService()
    done: Deferred[int] = service.whenDone()

    def exit(status: int) -> None:
        if status:
            raise SystemExit(status)

    return done.addCallback(exit)


def main(
    argv: Sequence[str] | None = None,
    *,
    _react: Callable[..., Any] = react,
    _service_factory: ServiceFactory | None = None,
    _stderr: IO[str] | None = None,
    _start_logging: Callable[[int], None] = start_console_logging,
) -> NoReturn:
    """
    The C{localproxy} console script. Never returns: the process exits
    with the proxy's status.
    """
    stderr = sys.stderr if _stderr is None else _stderr
    config = parse(sys.argv[1:] if argv is None else argv, stderr)
    _start_logging(config.verbosity)
    factory = _service_factory or default_service_factory()
    _react(run, (config, factory))
    # react() always exits; this is for a test's stand-in.
    sys.exit(0)
