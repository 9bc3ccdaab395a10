# -*- test-case-name: tests.test_stats -*-
"""
Stats on demand: SIGUSR2 logs one summary of the tunnel (SIGUSR1 is
twistd's log rotation).

L{TunnelStats} is what the summary says, taken from the connector by
L{snapshot}; L{format_summary} writes it as one line, a plain function;
L{StatsSignal} is the service that installs the signal handler while the
proxy runs and puts the previous one back when it stops.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from attrs import frozen
from twisted.application.service import Service
from twisted.logger import Logger

__all__ = ["StatsSignal", "StreamStats", "TunnelStats", "format_summary", "snapshot"]

#: The most streams one summary names; the rest are counted.
MAX_SHOWN_STREAMS = 32


@frozen
class StreamStats:
    """One open local connection of the tunnel."""

    service_id: str
    stream_id: int
    connection_id: int
    peer: str
    bytes_sent: int
    bytes_received: int
    age: float


@frozen
class TunnelStats:
    """
    The tunnel at one moment: since when the current connection is usable
    (L{None} while disconnected), how often it reconnected, and the open
    streams.
    """

    mode: str
    connected_since: float | None
    reconnects: int
    streams: Sequence[StreamStats]
    now: float


def _duration(seconds: float) -> str:
    whole = int(max(0.0, seconds))
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h{minutes:02d}m"
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{max(0.0, seconds):.1f}s"


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def format_summary(stats: TunnelStats) -> str:
    """The summary as one log line."""
    if stats.connected_since is None:
        state = "not connected"
    else:
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(stats.connected_since))
        state = f"connected since {since} ({_duration(stats.now - stats.connected_since)})"
    parts = [
        f"Tunnel summary ({stats.mode}): {state}, {_plural(stats.reconnects, 'reconnect')}",
    ]
    streams = sorted(stats.streams, key=lambda s: (s.service_id, s.stream_id, s.connection_id))
    if not streams:
        parts.append("no open streams")
    else:
        shown = [
            f"service {s.service_id!r} stream {s.stream_id} connection {s.connection_id}"
            f" ({s.peer}): {s.bytes_sent} bytes sent, {s.bytes_received} bytes received,"
            f" open {_duration(s.age)}"
            for s in streams[:MAX_SHOWN_STREAMS]
        ]
        more = len(streams) - len(shown)
        if more:
            shown.append(f"and {more} more")
        parts.append(f"{_plural(len(streams), 'open stream')}: " + "; ".join(shown))
    return "; ".join(parts)


def snapshot(connector: Any, now: float) -> TunnelStats:
    """
    The tunnel as L{lpxy.proxy.connector.ProxyConnector} C{connector} has
    it at time C{now}: its L{TunnelCounts<lpxy.proxy.metrics.TunnelCounts>}
    and open relays, what the Prometheus metrics read too.
    """
    streams = [
        StreamStats(
            service_id=relay.channel.wire_service_id,
            stream_id=relay.channel.stream_id,
            connection_id=relay.channel.connection_id,
            peer=str(relay.peer_description),
            bytes_sent=relay.bytes_out,
            bytes_received=relay.bytes_in,
            age=now - relay.started,
        )
        for relay in connector.relays
    ]
    counts = connector.counts
    return TunnelStats(
        mode=connector.session.mode,
        connected_since=counts.connected_since,
        reconnects=counts.reconnects,
        streams=streams,
        now=now,
    )


class StatsSignal(Service):
    """
    While running, SIGUSR2 makes C{report} run in the reactor thread (the
    handler itself only hands it over). Where there is no SIGUSR2 (Windows)
    or this is not the main thread, nothing is installed.

    @param report: logs the summary.
    @param reactor: runs C{report} (C{callFromThread}).
    @param signals: the C{signal} module; for tests.
    """

    _log = Logger()

    def __init__(self, report: Callable[[], None], reactor: Any, signals: Any = signal) -> None:
        self._report = report
        self._reactor = reactor
        self._signals = signals
        self._previous: Any = None
        self._installed = False

    def _handler(self, number: int, frame: Any) -> None:
        self._reactor.callFromThread(self._report)

    def startService(self) -> None:
        super().startService()
        number = getattr(self._signals, "SIGUSR2", None)
        if number is None or threading.current_thread() is not threading.main_thread():
            return
        self._previous = self._signals.signal(number, self._handler)
        self._installed = True

    def stopService(self) -> Any:
        if self._installed:
            self._installed = False
            number = self._signals.SIGUSR2
            # Another proxy in this process may have installed its own since.
            if self._signals.getsignal(number) == self._handler:
                previous = self._previous
                self._signals.signal(
                    number, previous if previous is not None else self._signals.SIG_DFL
                )
            self._previous = None
        return super().stopService()
