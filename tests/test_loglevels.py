"""
Tests for L{lpxy.loglevels}: level names and the level filter.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import LogLevel, PredicateResult
from twisted.trial.unittest import SynchronousTestCase

from lpxy.loglevels import LEVEL_NAMES, LevelFilter, filtered, parse_level


def event(level: LogLevel | None, text: str = "hello") -> dict[str, Any]:
    e: dict[str, Any] = {"log_format": text, "log_namespace": "x"}
    if level is not None:
        e["log_level"] = level
    return e


class ParseLevelTests(SynchronousTestCase):
    """Level names, as C{--log-level} takes them."""

    def test_names(self) -> None:
        self.assertEqual(
            [parse_level(name) for name in LEVEL_NAMES],
            [LogLevel.critical, LogLevel.error, LogLevel.warn, LogLevel.info, LogLevel.debug],
        )
        self.assertEqual(parse_level(" Warn "), LogLevel.warn)

    def test_bad(self) -> None:
        e = self.assertRaises(ValueError, parse_level, "verbose", "--level")
        self.assertEqual(
            str(e), "--level must be one of critical, error, warn, info, debug, not 'verbose'"
        )


class LevelFilterTests(SynchronousTestCase):
    """L{LevelFilter} in front of an observer, over a list of events."""

    def test_filtered(self) -> None:
        """
        Events at or above the lowest level pass, in order; events without
        a level count as info.
        """
        events = [event(LogLevel.debug, "d"), event(LogLevel.info, "i"), event(None, "none"),
                  event(LogLevel.warn, "w"), event(LogLevel.error, "e"),
                  event(LogLevel.critical, "c")]
        expected = {
            LogLevel.debug: ["d", "i", "none", "w", "e", "c"],
            LogLevel.info: ["i", "none", "w", "e", "c"],
            LogLevel.warn: ["w", "e", "c"],
            LogLevel.error: ["e", "c"],
            LogLevel.critical: ["c"],
        }
        for lowest, texts in expected.items():
            seen: list[dict[str, Any]] = []
            observer = filtered(seen.append, LevelFilter(lowest))
            for e in events:
                observer(e)
            self.assertEqual([e["log_format"] for e in seen], texts, lowest)

    def test_nothing(self) -> None:
        self.assertIs(LevelFilter(None)(event(LogLevel.critical)), PredicateResult.no)

    def test_default_info(self) -> None:
        self.assertIs(LevelFilter()(event(LogLevel.debug)), PredicateResult.no)
        self.assertIs(LevelFilter()(event(LogLevel.info)), PredicateResult.maybe)
