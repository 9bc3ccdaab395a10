"""
Tests for L{lpxy.proxy.logformat}: the reference proxy's log line
(C{messages.md} section 3).
"""

from __future__ import annotations

import io
import re
import time
from datetime import datetime

from twisted.logger import Logger, LogLevel, LogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from lpxy.proxy.logformat import reference_line, reference_observer

# messages.md section 3, its example and regex.
EXAMPLE = (
    "[2026-11-29 21:51:40.313289] (0x00007fae89247840) [info] Successfully"
    " established websocket connection with proxy server: wss://127.0.0.1:47443"
)
REGEX = (
    r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6}\] \(0x[0-9a-f]{16}\) "
    r"\[(trace|debug|info|warning|error|fatal)\] (.*)$"
)


def local_timestamp(text: str) -> float:
    return time.mktime(datetime.strptime(text, "%Y-%m-%d %H:%M:%S.%f").timetuple()) + int(
        text.rsplit(".", 1)[1]
    ) / 1e6


class ReferenceLineTests(SynchronousTestCase):
    def test_example(self) -> None:
        """
        The sheet's example line comes out character for character: local
        time with six fractional digits, the thread id in 16 hex digits,
        the bare severity name.
        """
        event = {
            "log_format": "Successfully established websocket connection with proxy"
            " server: {url}",
            "url": "wss://127.0.0.1:47443",
            "log_level": LogLevel.info,
            "log_time": local_timestamp("2026-11-29 21:51:40.313289"),
        }
        self.assertEqual(reference_line(event, 0x00007FAE89247840), EXAMPLE + "\n")

    def test_severities(self) -> None:
        """
        Twisted's levels get Boost's names; critical is the reference's
        fatal.
        """
        names = []
        for level in (LogLevel.debug, LogLevel.info, LogLevel.warn, LogLevel.error,
                      LogLevel.critical):
            line = reference_line({"log_format": "x", "log_level": level, "log_time": 0.0})
            match = re.match(REGEX, line or "")
            assert match is not None, line
            names.append(match.group(1))
        self.assertEqual(names, ["debug", "info", "warning", "error", "fatal"])

    def test_failure(self) -> None:
        """
        A logged failure keeps its traceback, after the line.
        """
        stream = io.StringIO()
        log = Logger(observer=LogPublisher(reference_observer(stream)))
        log.failure("Something broke", Failure(ZeroDivisionError("division by zero")))
        first, *rest = stream.getvalue().splitlines()
        self.assertRegex(first, REGEX)
        self.assertTrue(first.endswith("[fatal] Something broke"), first)
        self.assertIn("ZeroDivisionError: division by zero", "\n".join(rest))
