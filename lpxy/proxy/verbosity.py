# -*- test-case-name: tests.test_verbosity -*-
"""
How loud the local proxy logs (C{-v}), under C{twistd localproxy} and the
C{localproxy} console script alike.

C{-v} applies to every log event of the process, Twisted's and Autobahn's
included, through one L{VerbosityFilter}: in front of the console
script's standard error observer (L{start_console_logging}), and in front
of the observer twistd makes from its own options (L{filter_twistd_logging},
through L{lpxy.loglevels.filter_twistd_log}).

Twisted's own chatter about listening ports (C{ServiceListenerFactory
starting on 5555}, C{(TCP Port 5555 Closed)}) counts as debug
(L{is_noise}): the proxy says what it listens on in the reference's words.
The console script writes the reference's log line format
(L{lpxy.proxy.logformat}).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping, MutableMapping
from typing import IO, Any

from twisted.logger import (
    ILogFilterPredicate,
    LogBeginner,
    LogLevel,
    PredicateResult,
    formatEvent,
    globalLogBeginner,
)
from zope.interface import implementer  # type: ignore[import-untyped]

from lpxy._process import TWISTD_LOG, TwistdLog
from lpxy.jsonlog import json_observer
from lpxy.loglevels import filter_twistd_log, filtered
from lpxy.proxy.logformat import reference_observer

DEFAULT_VERBOSITY = 4
TRACE = 6

_LEVELS = {
    1: LogLevel.critical,
    2: LogLevel.error,
    3: LogLevel.warn,
    4: LogLevel.info,
    5: LogLevel.debug,
}


def level_for(verbosity: int) -> LogLevel | None:
    """
    The lowest level C{-v verbosity} shows: 0 nothing (L{None}), 1
    critical, 2 error, 3 warn, 4 info, 5 and more debug (6 and more also
    trace, which is debug with per-record detail).
    """
    if verbosity <= 0:
        return None
    return _LEVELS.get(verbosity, LogLevel.debug)


# What twisted.internet.tcp.Port says (through the legacy log) when it
# starts and stops listening.
_PORT_CHATTER = re.compile(r"^(\S+ starting on \S+|\(\S+ Port \S+ Closed\))$")


def is_noise(event: Mapping[str, Any]) -> bool:
    """Twisted's own line about a port starting or stopping to listen."""
    if event.get("log_namespace") != "log_legacy":
        return False
    return bool(_PORT_CHATTER.match(formatEvent(dict(event))))


@implementer(ILogFilterPredicate)
class VerbosityFilter:
    """
    Lets through the log events C{-v} asks for. Events without a level
    count as info, Twisted's port chatter (L{is_noise}) as debug.

    @ivar verbosity: C{-v} as given, 0..255.
    """

    def __init__(self, verbosity: int = DEFAULT_VERBOSITY) -> None:
        self.verbosity = verbosity

    def __call__(self, event: Mapping[str, Any]) -> PredicateResult:
        wanted = level_for(self.verbosity)
        if wanted is None:
            return PredicateResult.no
        level = event.get("log_level", LogLevel.info)
        if level < wanted:
            return PredicateResult.no
        if wanted > LogLevel.debug and is_noise(event):
            return PredicateResult.no
        return PredicateResult.maybe


def start_console_logging(
    verbosity: int,
    stream: IO[str] | None = None,
    beginner: LogBeginner = globalLogBeginner,
    log_format: str = "reference",
) -> None:
    """
    Log to C{stream} (standard error) at C{verbosity}, in the reference's
    line format or, with C{log_format} C{json}, as JSON lines
    (L{lpxy.jsonlog}): what the console script does.
    """
    out = sys.stderr if stream is None else stream
    observer = json_observer(out) if log_format == "json" else reference_observer(out)
    beginner.beginLoggingTo(
        [filtered(observer, VerbosityFilter(verbosity))], redirectStandardIO=False
    )


def filter_twistd_logging(
    server_options: MutableMapping[str, Any],
    verbosity: int,
    twistd_log: TwistdLog = TWISTD_LOG,
) -> None:
    """
    Make twistd's log observer honour C{verbosity}. Call it from the
    subcommand's C{postOptions}, given twistd's own options, whichever
    route twistd logs by (C{--syslog} included).
    """
    filter_twistd_log(server_options, VerbosityFilter(verbosity), twistd_log)
