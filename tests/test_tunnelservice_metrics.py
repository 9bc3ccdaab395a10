"""
The tunnel service's C{--metrics} endpoint, scraped with a real HTTP
client after real API calls (boto3) and real tunnel ends (local proxies).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.threads import deferToThread
from twisted.python.usage import UsageError
from twisted.trial.unittest import TestCase

from lpxy.tunnelservice.service import TunnelService
from lpxy.tunnelservice.tap import Options
from tests.support.apps import start_app
from tests.support.proxies import make_config, start_pair, start_proxy, tcp
from tests.support.scrape import Samples, request, scrape
from tests.support.tunnelservice import ServiceFixture, api_client, start_tunnelservice


async def scrape_service(case: TestCase, fixture: ServiceFixture) -> Samples:
    metrics = fixture.service.metrics
    assert metrics is not None and metrics.port is not None
    return await scrape(case, metrics.port.getHost().port)


class ServiceMetricsTests(TestCase):
    timeout = 60

    async def test_scrape(self) -> None:
        """
        Tunnels by state, connected peers, API calls by operation and
        result, and refused handshakes by status, as they happened.
        """
        fixture = await start_tunnelservice(self, metrics="tcp:0:interface=127.0.0.1")
        client: Any = await deferToThread(api_client, fixture.api_url)

        def calls() -> str:
            opened = client.open_tunnel(destinationConfig={"services": ["SSH1"]})
            client.open_tunnel()
            client.close_tunnel(tunnelId=opened["tunnelId"])
            try:
                client.describe_tunnel(tunnelId="no-such-tunnel")
            except client.exceptions.ResourceNotFoundException:
                pass
            return str(opened["tunnelId"])

        await deferToThread(calls)
        app_port, _ = await start_app(self)
        await start_pair(self, fixture, ["SSH1"], {"SSH1": tcp(app_port)})
        refused = await start_proxy(self, make_config(
            fixture, "not-a-token", "source", source_ports={"SSH1": 0},
            connect_retry_count=0,
        ), wait=False)
        await refused.whenDone()

        samples = await scrape_service(self, fixture)
        # Two tunnels through the API (one closed) and one for the pair.
        self.assertEqual(samples.by_label("lpxy_tunnelservice_tunnels", "state"),
                         {"OPEN": 2, "CLOSED": 1})
        self.assertEqual(samples.by_label("lpxy_tunnelservice_peers_connected", "mode"),
                         {"source": 1, "destination": 1})
        api_calls = {
            (dict(labels)["operation"], dict(labels)["result"]): value
            for (name, labels), value in samples.items()
            if name == "lpxy_tunnelservice_api_calls_total"
        }
        self.assertEqual(api_calls, {
            ("OpenTunnel", "OK"): 2,
            ("CloseTunnel", "OK"): 1,
            ("DescribeTunnel", "ResourceNotFoundException"): 1,
        })
        self.assertEqual(
            samples.by_label("lpxy_tunnelservice_handshake_refusals_total", "status"),
            {"401": 1},
        )

    async def test_unknown_paths_and_operations(self) -> None:
        """
        Only /metrics is served. A request naming no known operation is
        counted as C{unknown}, whatever name it gave.
        """
        fixture = await start_tunnelservice(self, metrics="tcp:0:interface=127.0.0.1")
        metrics = fixture.service.metrics
        assert metrics is not None
        code, _, _ = await request(self, metrics.port.getHost().port, b"/")
        self.assertEqual(code, 404)
        for target in (b"IoTSecuredTunneling.MadeUp1", b"IoTSecuredTunneling.MadeUp2"):
            code, _, _ = await request(
                self, fixture.port, b"/", b"POST",
                {b"x-amz-target": [target],
                 b"content-type": [b"application/x-amz-json-1.1"]}, b"{}",
            )
            self.assertEqual(code, 400)
        samples = await scrape_service(self, fixture)
        self.assertEqual(
            samples.get_value("lpxy_tunnelservice_api_calls_total",
                              operation="unknown", result="UnknownOperationException"),
            2,
        )
        self.assertEqual(samples.by_label("lpxy_tunnelservice_peers_connected", "mode"),
                         {"source": 0, "destination": 0})


class MetricsOptionTests(TestCase):
    def test_option(self) -> None:
        options = Options()
        options.parseOptions(["--metrics", "tcp:9100:interface=127.0.0.1", "--db", ":memory:"])
        self.assertEqual(options["metrics"], "tcp:9100:interface=127.0.0.1")

    def test_bad_endpoint(self) -> None:
        """A bad endpoint is refused naming the option and an example."""
        with self.assertRaises(UsageError) as caught:
            Options().parseOptions(["--metrics", "tcp:notaport"])
        self.assertIn("--metrics 'tcp:notaport':", str(caught.exception))
        self.assertIn("tcp:9100:interface=127.0.0.1", str(caught.exception))

    def test_busy_port(self) -> None:
        """A metrics port that cannot listen fails the start, naming --metrics."""
        from twisted.internet import reactor
        from twisted.internet.protocol import Factory

        taken = reactor.listenTCP(0, Factory(), interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(taken.stopListening)
        service = TunnelService(
            reactor, ["tcp:0:interface=127.0.0.1"],
            metrics=f"tcp:{taken.getHost().port}:interface=127.0.0.1",
        )
        self.addCleanup(service.stopService)
        with self.assertRaises(SystemExit) as caught:
            service.startService()
        self.assertIn("--metrics tcp:", str(caught.exception))
