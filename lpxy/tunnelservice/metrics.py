# -*- test-case-name: tests.test_tunnelservice_metrics -*-
"""
The tunnel service's Prometheus collector: what the broker, the data
plane's factory and the management API count anyway, read when scraped.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from lpxy.tunnelservice.api import ManagementAPI
from lpxy.tunnelservice.broker import Broker
from lpxy.tunnelservice.dataplane import TunnelServerFactory

__all__ = ["ServiceCollector"]


class ServiceCollector:
    """
    A C{prometheus_client} collector of one tunnel service's metrics.

    @param broker: its tunnels and connected peers.
    @param data_plane: its refused handshakes.
    @param api: its API calls.
    """

    def __init__(
        self, broker: Broker, data_plane: TunnelServerFactory, api: ManagementAPI
    ) -> None:
        self._broker = broker
        self._data_plane = data_plane
        self._api = api

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        tunnels = GaugeMetricFamily(
            "lpxy_tunnelservice_tunnels",
            "Tunnels kept, by status (OPEN, or CLOSED and still described).",
            labels=["state"],
        )
        for state, count in sorted(self._broker.tunnels_by_status().items()):
            tunnels.add_metric([state], count)
        yield tunnels
        peers = GaugeMetricFamily(
            "lpxy_tunnelservice_peers_connected",
            "Tunnel ends with a local proxy connected now, by mode.",
            labels=["mode"],
        )
        for mode, count in sorted(self._broker.peers_by_mode().items()):
            peers.add_metric([mode], count)
        yield peers
        calls = CounterMetricFamily(
            "lpxy_tunnelservice_api_calls",
            "Management API requests answered, by operation and result (OK or"
            " the error's type).",
            labels=["operation", "result"],
        )
        for (operation, result), count in sorted(self._api.calls.items()):
            calls.add_metric([operation, result], count)
        yield calls
        refusals = CounterMetricFamily(
            "lpxy_tunnelservice_handshake_refusals",
            "Tunnel handshakes refused, by HTTP status.",
            labels=["status"],
        )
        for status, count in sorted(self._data_plane.refusals.items()):
            refusals.add_metric([str(status)], count)
        yield refusals
