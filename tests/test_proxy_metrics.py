"""
The local proxy's C{--metrics} endpoint, scraped with a real HTTP client
after real traffic through a loopback tunnel.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import attrs
from twisted.internet import reactor
from twisted.internet.protocol import Factory
from twisted.trial.unittest import TestCase

from lpxy.proxy.cli import parse
from lpxy.proxy.config import ProxyConfig
from lpxy.proxy.service import EXIT_CONFIG, EXIT_REJECTED, LocalProxyService
from tests.support.apps import connect_client, start_app
from tests.support.proxies import cut_tunnel, listener_ports, make_config, start_proxy, tcp
from tests.support.scrape import Samples, scrape
from tests.support.tunnelservice import start_tunnelservice

LOOPBACK = "tcp:0:interface=127.0.0.1"


def with_metrics(config: ProxyConfig, endpoint: str = LOOPBACK) -> ProxyConfig:
    return attrs.evolve(config, metrics=endpoint)


async def scrape_proxy(case: TestCase, proxy: LocalProxyService) -> Samples:
    assert proxy.metrics is not None and proxy.metrics.port is not None
    return await scrape(case, proxy.metrics.port.getHost().port)


class ProxyMetricsTests(TestCase):
    timeout = 30

    async def test_traffic(self) -> None:
        """
        A source and a destination count the stream, its bytes each way by
        service id, its end by side, the connection's state, a
        reconnection after a lost connection, and the last ping's round
        trip.
        """
        fixture = await start_tunnelservice(self)
        app_port, app = await start_app(self)
        opened = fixture.open_tunnel(["SSH1"])
        destination = await start_proxy(self, with_metrics(make_config(
            fixture, opened.destination_token, "destination",
            destination_apps={"SSH1": tcp(app_port)},
        )))
        source = await start_proxy(self, with_metrics(make_config(
            fixture, opened.source_token, "source", source_ports={"SSH1": 0},
        )))
        port = listener_ports(source)["SSH1"]

        client = await connect_client(self, port)
        assert client.transport is not None
        payload = os.urandom(300_000)
        client.transport.write(payload)
        self.assertEqual(await client.received(len(payload)), payload)

        for proxy in (source, destination):
            samples = await scrape_proxy(self, proxy)
            self.assertEqual(samples.get_value("lpxy_proxy_tunnel_connected"), 1)
            self.assertEqual(
                samples.get_value("lpxy_proxy_streams_opened_total", service_id="SSH1"), 1
            )
            self.assertEqual(samples.get_value("lpxy_proxy_streams_open", service_id="SSH1"), 1)
            self.assertEqual(
                samples.by_label("lpxy_proxy_bytes_total", "direction"),
                {"sent": len(payload), "received": len(payload)},
            )
            rtt = samples.get_value("lpxy_proxy_ping_rtt_seconds")
            assert rtt is not None
            self.assertTrue(0 <= rtt < 5, rtt)
            self.assertEqual(samples.get_value("lpxy_proxy_reconnects_total"), 0)

        # The source's WebSocket is cut: the stream dies with it, and the
        # proxy reconnects.
        cut_tunnel(source)
        await client.closed
        await source.client.whenConnected()
        await app.all_closed()
        for proxy in (source, destination):
            samples = await scrape_proxy(self, proxy)
            self.assertEqual(samples.get_value("lpxy_proxy_streams_open", service_id="SSH1"), 0)
            self.assertEqual(
                samples.by_label("lpxy_proxy_streams_reset_total", "by"), {"tunnel": 1}
            )
            # The ended stream's bytes stay counted.
            self.assertEqual(
                samples.by_label("lpxy_proxy_bytes_total", "direction"),
                {"sent": len(payload), "received": len(payload)},
            )
        samples = await scrape_proxy(self, source)
        self.assertEqual(samples.get_value("lpxy_proxy_reconnects_total"), 1)
        self.assertEqual(samples.get_value("lpxy_proxy_tunnel_connected"), 1)

        # A local client that leaves ends its stream on the local side.
        client = await connect_client(self, port)
        assert client.transport is not None
        client.transport.write(b"ping")
        await client.received(4)
        client.transport.loseConnection()
        await client.closed
        await app.all_closed()
        samples = await scrape_proxy(self, source)
        self.assertEqual(
            samples.by_label("lpxy_proxy_streams_reset_total", "by"), {"tunnel": 1, "local": 1}
        )
        self.assertEqual(
            samples.get_value("lpxy_proxy_streams_opened_total", service_id="SSH1"), 2
        )

    async def test_refused(self) -> None:
        """A refused handshake is counted by its status; the proxy is not connected."""
        fixture = await start_tunnelservice(self)
        proxy = await start_proxy(self, with_metrics(make_config(
            fixture, "not-a-token", "destination", destination_apps={"SSH1": tcp(1)},
        )), wait=False)
        self.assertEqual(await proxy.whenDone(), EXIT_REJECTED)
        samples = await scrape_proxy(self, proxy)
        self.assertEqual(samples.by_label("lpxy_proxy_handshake_refusals_total", "status"),
                         {"401": 1})
        self.assertEqual(samples.get_value("lpxy_proxy_tunnel_connected"), 0)
        self.assertIsNone(samples.get_value("lpxy_proxy_ping_rtt_seconds"))

    async def test_busy_port(self) -> None:
        """A metrics endpoint that cannot listen ends the proxy with status 1."""
        taken = reactor.listenTCP(0, Factory(), interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(taken.stopListening)
        fixture = await start_tunnelservice(self)
        opened = fixture.open_tunnel(["SSH1"])
        proxy = await start_proxy(self, with_metrics(make_config(
            fixture, opened.destination_token, "destination",
            destination_apps={"SSH1": tcp(1)},
        ), f"tcp:{taken.getHost().port}:interface=127.0.0.1"), wait=False)
        self.assertEqual(await proxy.whenDone(), EXIT_CONFIG)
        # The access token was not spent: the destination can still join.
        self.assertFalse(fixture.broker.describe(opened.tunnel_id).destination.spent)


class MetricsOptionTests(TestCase):
    def parse(self, *argv: str) -> tuple[ProxyConfig | None, str]:
        stderr = io.StringIO()
        try:
            config = parse(
                ["-r", "us-east-1", "-s", "5555", "-i", "c" * 32, *argv],
                stderr, environ={"AWSIOT_TUNNEL_ACCESS_TOKEN": "secret-token"},
                cwd=Path(self.mktemp()),
            )
        except SystemExit as e:
            self.assertEqual(e.code, 1)
            return None, stderr.getvalue()
        return config, stderr.getvalue()

    def test_endpoint(self) -> None:
        config, _ = self.parse("--metrics", "tcp:9100:interface=127.0.0.1")
        assert config is not None
        self.assertEqual(config.metrics, "tcp:9100:interface=127.0.0.1")
        config, _ = self.parse()
        assert config is not None
        self.assertIsNone(config.metrics)

    def test_bad_endpoint(self) -> None:
        """A bad endpoint is refused naming the option and an example."""
        config, error = self.parse("--metrics", "tcp:notaport")
        self.assertIsNone(config)
        self.assertIn("--metrics 'tcp:notaport':", error)
        self.assertIn("tcp:9100:interface=127.0.0.1", error)
