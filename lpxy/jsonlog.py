# -*- test-case-name: tests.test_jsonlog -*-
"""
JSON log lines, one object a line, for log pipelines (Loki, Elasticsearch,
journald's JSON export)::

    {"time": "2026-11-30T01:38:51.123456+00:00", "level": "info",
     "namespace": "lpxy.proxy.connector.ProxyConnector",
     "message": "Connected as source with subprotocol aws.iot.securetunneling-3.0",
     "fields": {"mode": "source", "subprotocol": "aws.iot.securetunneling-3.0"}}

C{time} is UTC to the microsecond, C{level} Twisted's level name (C{debug},
C{info}, C{warn}, C{error}, C{critical}), C{message} the text the other
formats show, C{fields} the event's own values (what the message was made
from, and any others the event carries), and C{traceback} a failure's,
when there is one. Twisted's bookkeeping keys (C{log_*}) and its legacy
ones are left out. Secrets never reach an event (design.md), so none
reaches a line.

The C{localproxy} console script writes these with C{--log-format json};
twistd writes them given C{--logger=lpxy.jsonlog.observer} (L{observer}).
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import MutableMapping
from datetime import datetime, timezone
from typing import IO, Any

from twisted.logger import FileLogObserver, LogEvent, LogLevel, formatEvent

__all__ = ["OBSERVER_NAME", "json_line", "json_observer", "log_json_under_twistd", "observer"]

# Keys of events from Twisted's legacy log (twisted.python.log.msg and
# err): the message, time and failure are already in the object.
_LEGACY = frozenset({"message", "format", "isError", "time", "failure", "why"})
_DEPTH = 4


def _plain(value: Any, depth: int = 0) -> Any:
    """C{value} as JSON can hold it: containers kept (a few levels deep), the rest as text."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if depth < _DEPTH:
        if isinstance(value, (list, tuple, set, frozenset)):
            return [_plain(item, depth + 1) for item in value]
        if isinstance(value, dict):
            return {str(key): _plain(item, depth + 1) for key, item in value.items()}
    return str(value)


def json_line(event: LogEvent) -> str:
    """C{event} as one line of JSON, ending in a newline."""
    level: Any = event.get("log_level", LogLevel.info)
    when = datetime.fromtimestamp(event.get("log_time") or 0.0, timezone.utc)
    record: dict[str, Any] = {
        "time": when.isoformat(timespec="microseconds"),
        "level": getattr(level, "name", str(level)),
        "namespace": event.get("log_namespace"),
        "message": formatEvent(event),
        "fields": {
            str(key): _plain(value)
            for key, value in event.items()
            if not str(key).startswith("log_") and key not in _LEGACY
        },
    }
    failure = event.get("log_failure")
    if failure is not None:
        try:
            record["traceback"] = failure.getTraceback()
        except Exception:
            record["traceback"] = str(failure)
    return json.dumps(record, ensure_ascii=False) + "\n"


def json_observer(stream: IO[str]) -> FileLogObserver:
    """An observer writing L{json_line}s to C{stream}."""
    return FileLogObserver(stream, json_line)


def observer() -> FileLogObserver:
    """
    twistd's C{--logger} factory: JSON lines on standard output (where
    C{twistd -n} writes its own), e.g. for systemd's journal or a
    container's log::

        twistd -n --logger=lpxy.jsonlog.observer localproxy -r us-east-1 -d SSH1=22
    """
    # twistd makes the observer before it redirects sys.stdout into the log,
    # and the real stream is the one wanted.
    return json_observer(sys.stdout)


#: The dotted name of L{observer}, for twistd's C{--logger}.
OBSERVER_NAME = f"{__name__}.observer"


def log_json_under_twistd(server_options: MutableMapping[str, Any], option: str) -> None:
    """
    Make twistd log JSON lines on standard output (its C{--logger} set to
    L{observer}): what C{option} (C{--log-format json}) asks of a twistd
    subcommand. Call it from the subcommand's C{postOptions}, before its log
    is wrapped.

    @raise ValueError: naming C{option}, when twistd was told to log
        elsewhere (C{--logfile}, C{--syslog}, another C{--logger}).
    """
    for name, given in (
        ("--logfile", server_options.get("logfile") not in (None, "-")),
        ("--syslog", bool(server_options.get("syslog"))),
        ("--logger", server_options.get("logger") not in (None, OBSERVER_NAME)),
    ):
        if given:
            raise ValueError(
                f"{option} json writes JSON lines to standard output: give it"
                f" without twistd's {name}"
            )
    server_options["logger"] = OBSERVER_NAME
