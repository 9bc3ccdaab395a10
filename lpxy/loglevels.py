# -*- test-case-name: tests.test_loglevels -*-
"""
Filtering a process's log by level, shared by the local proxy's C{-v} and
the tunnel service's C{--log-level}.

One L{LevelFilter} sits in front of an observer (L{filtered}); under
twistd, in front of the observer twistd makes from its own options
(L{filter_twistd_log}, through L{lpxy._process.TwistdLog}), so
C{--logfile}, C{-n} and SIGUSR1's log rotation stay twistd's.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from typing import Any

from twisted.logger import FilteringLogObserver, ILogFilterPredicate, LogLevel, PredicateResult
from zope.interface import implementer  # type: ignore[import-untyped]

from lpxy._process import TWISTD_LOG, TwistdLog

__all__ = ["LEVEL_NAMES", "LevelFilter", "filter_twistd_log", "filtered", "parse_level"]

#: The names C{--log-level} takes, from the quietest.
LEVEL_NAMES = ("critical", "error", "warn", "info", "debug")


def parse_level(name: str, option: str = "--log-level") -> LogLevel:
    """
    The level named C{name} (one of L{LEVEL_NAMES}, any case).

    @raise ValueError: naming C{option} and the names it takes.
    """
    wanted = name.strip().lower()
    if wanted not in LEVEL_NAMES:
        raise ValueError(f"{option} must be one of {', '.join(LEVEL_NAMES)}, not {name!r}")
    return LogLevel.levelWithName(wanted)


@implementer(ILogFilterPredicate)
class LevelFilter:
    """
    Lets through the log events at or above L{lowest} (L{None}: none).
    Events without a level count as info.
    """

    def __init__(self, lowest: LogLevel | None = LogLevel.info) -> None:
        self.lowest = lowest

    def __call__(self, event: Mapping[str, Any]) -> PredicateResult:
        if self.lowest is None:
            return PredicateResult.no
        level = event.get("log_level", LogLevel.info)
        return PredicateResult.maybe if level >= self.lowest else PredicateResult.no


def filtered(observer: Any, predicate: Any) -> Any:
    """
    C{observer}, an L{ILogObserver}, seeing only what C{predicate} (an
    L{ILogFilterPredicate}) lets through.
    """
    predicates: list[Any] = [predicate]
    return FilteringLogObserver(observer, predicates)


def filter_twistd_log(
    server_options: MutableMapping[str, Any],
    predicate: Any,
    twistd_log: TwistdLog = TWISTD_LOG,
) -> None:
    """
    Make twistd's log observer show only what C{predicate} lets through.
    Call it from the subcommand's C{postOptions}, given twistd's own
    options, whichever route twistd logs by (C{--syslog} included).
    """
    twistd_log.wrap(server_options, lambda observer: filtered(observer, predicate))
