# -*- test-case-name: tests.test_proxy_metrics -*-
"""
What the local proxy counts about its tunnel (L{TunnelCounts}), and the
Prometheus collector that reads it when scraped (L{ProxyCollector}).

The connector counts at events that happen once per connection or per
stream, never per record: the bytes each way are the relays' own
counters, read from the live relays when scraped and added to their
service's total when a relay ends.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import attrs

__all__ = ["ProxyCollector", "TunnelCounts"]


@attrs.define
class TunnelCounts:
    """
    The tunnel's history in numbers, kept by the connector.

    @ivar connected_since: when the current connection became usable
        (POSIX seconds), L{None} while not connected.
    @ivar connections: usable connections made.
    @ivar refusals: refused handshakes, by HTTP status.
    @ivar opened: streams (local connections) opened, by service id.
    @ivar resets: streams ended, by service id and the side that ended
        them (C{tunnel} or C{local}).
    @ivar ended_bytes: bytes of the ended streams, by service id:
        C{[sent into the tunnel, received from it]}.
    """

    connected_since: float | None = None
    connections: int = 0
    refusals: Counter[int] = attrs.field(factory=Counter)
    opened: Counter[str] = attrs.field(factory=Counter)
    resets: Counter[tuple[str, str]] = attrs.field(factory=Counter)
    ended_bytes: dict[str, list[int]] = attrs.field(factory=dict)

    @property
    def reconnects(self) -> int:
        """Usable connections made after the first."""
        return max(0, self.connections - 1)

    def connected(self, now: float) -> None:
        """A connection became usable."""
        self.connections += 1
        self.connected_since = now

    def disconnected(self) -> None:
        """The usable connection is gone."""
        self.connected_since = None

    def refused(self, status: int) -> None:
        """The service (or a web proxy) refused the handshake with C{status}."""
        self.refusals[status] += 1

    def stream_opened(self, service_id: str) -> None:
        """A stream of C{service_id} began."""
        self.opened[service_id] += 1

    def stream_ended(self, service_id: str, by: str, sent: int, received: int) -> None:
        """A stream ended, C{by} C{tunnel} or C{local}, having carried these bytes."""
        self.resets[(service_id, by)] += 1
        totals = self.ended_bytes.get(service_id)
        if totals is None:
            totals = self.ended_bytes[service_id] = [0, 0]
        totals[0] += sent
        totals[1] += received


class ProxyCollector:
    """
    A C{prometheus_client} collector of one local proxy's metrics.

    @param counts: the connector's L{TunnelCounts}.
    @param live: the relays alive now (each with C{channel},
        C{bytes_out} and C{bytes_in}).
    @param rtt: the round trip of the last ping answered on the current
        connection, in seconds, if any.
    """

    def __init__(
        self,
        counts: TunnelCounts,
        live: Callable[[], Iterable[Any]],
        rtt: Callable[[], float | None],
    ) -> None:
        self._counts = counts
        self._live = live
        self._rtt = rtt

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        counts = self._counts
        up = GaugeMetricFamily(
            "lpxy_proxy_tunnel_connected",
            "1 while the tunnel connection is up and usable, else 0.",
            value=0 if counts.connected_since is None else 1,
        )
        yield up
        if counts.connected_since is not None:
            yield GaugeMetricFamily(
                "lpxy_proxy_tunnel_connected_since_seconds",
                "When the current tunnel connection became usable (Unix time).",
                value=counts.connected_since,
            )
        yield CounterMetricFamily(
            "lpxy_proxy_reconnects",
            "Usable tunnel connections made after the first.",
            value=counts.reconnects,
        )
        refusals = CounterMetricFamily(
            "lpxy_proxy_handshake_refusals",
            "Tunnel handshakes refused, by HTTP status.",
            labels=["status"],
        )
        for status, count in sorted(counts.refusals.items()):
            refusals.add_metric([str(status)], count)
        yield refusals

        open_now: Counter[str] = Counter()
        live_bytes: dict[str, list[int]] = {}
        for relay in self._live():
            service_id = relay.channel.wire_service_id
            open_now[service_id] += 1
            totals = live_bytes.setdefault(service_id, [0, 0])
            totals[0] += relay.bytes_out
            totals[1] += relay.bytes_in
        services = sorted(set(counts.opened) | set(open_now))
        opened = CounterMetricFamily(
            "lpxy_proxy_streams_opened",
            "Streams (local connections through the tunnel) opened, by service id.",
            labels=["service_id"],
        )
        gauge = GaugeMetricFamily(
            "lpxy_proxy_streams_open",
            "Streams open now, by service id.",
            labels=["service_id"],
        )
        for service_id in services:
            opened.add_metric([service_id], counts.opened[service_id])
            gauge.add_metric([service_id], open_now[service_id])
        yield opened
        yield gauge
        resets = CounterMetricFamily(
            "lpxy_proxy_streams_reset",
            "Streams ended by a reset (the protocol's one way to end one), by"
            " service id and side: tunnel (the peer or the service reset it, or"
            " the tunnel connection was lost) or local (the local connection"
            " ended and the proxy sent the reset).",
            labels=["service_id", "by"],
        )
        for (service_id, by), count in sorted(counts.resets.items()):
            resets.add_metric([service_id, by], count)
        yield resets
        carried = CounterMetricFamily(
            "lpxy_proxy_bytes",
            "Stream bytes by service id and direction: sent (from local"
            " connections into the tunnel) or received (from the tunnel).",
            labels=["service_id", "direction"],
        )
        for service_id in sorted(set(counts.ended_bytes) | set(live_bytes)):
            ended = counts.ended_bytes.get(service_id, [0, 0])
            now = live_bytes.get(service_id, [0, 0])
            carried.add_metric([service_id, "sent"], ended[0] + now[0])
            carried.add_metric([service_id, "received"], ended[1] + now[1])
        yield carried
        rtt = self._rtt()
        if rtt is not None:
            yield GaugeMetricFamily(
                "lpxy_proxy_ping_rtt_seconds",
                "Round trip of the last ping answered on the current tunnel connection.",
                value=rtt,
            )
