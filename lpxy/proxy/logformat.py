# -*- test-case-name: tests.test_logformat -*-
"""
The reference proxy's log line, for the C{localproxy} console script, so
that parsers written for the reference read lpxy's standard error too::

    [2026-11-29 21:51:40.313289] (0x00007fae89247840) [info] Listening for new connection on port 22

Local time with microseconds, the thread id as C{0x} and 16 hex digits,
then Boost's bare severity name (L{SEVERITY}) and the message.
"""

from __future__ import annotations

import threading
from datetime import datetime
from typing import IO, Any

from twisted.logger import FileLogObserver, LogEvent, LogLevel, eventAsText

__all__ = ["SEVERITY", "reference_line", "reference_observer"]

#: Boost's names for Twisted's levels (C{critical} is the reference's C{fatal}).
SEVERITY = {
    LogLevel.debug: "debug",
    LogLevel.info: "info",
    LogLevel.warn: "warning",
    LogLevel.error: "error",
    LogLevel.critical: "fatal",
}


def reference_line(event: LogEvent, thread_id: int | None = None) -> str | None:
    """
    C{event} as the reference writes a log record, ending in a newline; a
    failure's traceback follows on the next lines.
    """
    text = eventAsText(event, includeTimestamp=False, includeSystem=False)
    if not text:
        return None
    when = datetime.fromtimestamp(event.get("log_time") or 0.0)
    level: Any = event.get("log_level", LogLevel.info)
    ident = threading.get_ident() if thread_id is None else thread_id
    return (
        f"[{when:%Y-%m-%d %H:%M:%S.%f}] (0x{ident:016x}) "
        f"[{SEVERITY.get(level, 'info')}] {text}\n"
    )


def reference_observer(stream: IO[str]) -> FileLogObserver:
    """An observer writing L{reference_line}s to C{stream}."""
    return FileLogObserver(stream, reference_line)
