"""
Tests for L{lpxy.proxy.stats}: the summary SIGUSR2 logs, as a plain
function, the signal's installation with the service's lifecycle, and a
real C{localproxy} process answering SIGUSR2.
"""

from __future__ import annotations

import calendar
import signal
from typing import Any

from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from lpxy.proxy.channel import Channel, ServiceBinding
from lpxy.proxy.metrics import TunnelCounts
from lpxy.proxy.relay import LocalRelay, TunnelFlow
from lpxy.proxy.stats import (
    MAX_SHOWN_STREAMS,
    StatsSignal,
    StreamStats,
    TunnelStats,
    format_summary,
    snapshot,
)
from tests.support.apps import connect_client, start_app
from tests.support.installed import localproxy_argv
from tests.support.processes import spawn
from tests.support.proxies import cut_tunnel, make_config, start_pair, start_proxy, tcp
from tests.support.sockets import unused_port
from tests.support.tunnelservice import start_tunnelservice

NOON = calendar.timegm((2026, 11, 30, 12, 0, 0, 0, 0, 0))


def stream(connection: int, sent: int = 0, received: int = 0, age: float = 1.0) -> StreamStats:
    return StreamStats("SSH", 3, connection, "127.0.0.1:40000", sent, received, age)


class FormatTests(SynchronousTestCase):
    """L{format_summary}: one line saying all."""

    def test_connected(self) -> None:
        stats = TunnelStats(
            "source", NOON, 2, [stream(2, 10, 20, 75.0), stream(1, 1234, 5678, 12.34)],
            NOON + 3725,
        )
        self.assertEqual(
            format_summary(stats),
            "Tunnel summary (source): connected since 2026-11-30 12:00:00 UTC"
            " (1h02m05s), 2 reconnects; 2 open streams:"
            " service 'SSH' stream 3 connection 1 (127.0.0.1:40000): 1234 bytes sent,"
            " 5678 bytes received, open 12.3s;"
            " service 'SSH' stream 3 connection 2 (127.0.0.1:40000): 10 bytes sent,"
            " 20 bytes received, open 1m15s",
        )

    def test_disconnected(self) -> None:
        stats = TunnelStats("destination", None, 1, [], NOON)
        self.assertEqual(
            format_summary(stats),
            "Tunnel summary (destination): not connected, 1 reconnect; no open streams",
        )

    def test_long_lived(self) -> None:
        stats = TunnelStats("source", NOON, 0, [stream(1, age=2 * 86400 + 3 * 3600)], NOON + 90061)
        text = format_summary(stats)
        self.assertIn("(1d01h01m), 0 reconnects; 1 open stream:", text)
        self.assertIn("open 2d03h00m", text)

    def test_many_streams(self) -> None:
        """Past the limit, streams are counted, not listed."""
        streams = [stream(i) for i in range(1, MAX_SHOWN_STREAMS + 6)]
        text = format_summary(TunnelStats("source", NOON, 0, streams, NOON))
        self.assertIn(f"{MAX_SHOWN_STREAMS + 5} open streams", text)
        self.assertEqual(text.count("service 'SSH'"), MAX_SHOWN_STREAMS)
        self.assertTrue(text.endswith("; and 5 more"))


class FakeConnector:
    """What L{snapshot} reads of a connector."""

    def __init__(self, flow: TunnelFlow) -> None:
        self.relays = flow.relays
        self.session = type("S", (), {"mode": "source"})()
        self.counts = TunnelCounts(connected_since=100.0, connections=3)


class SnapshotTests(SynchronousTestCase):
    def test_from_relays(self) -> None:
        """Each live relay is a stream, with its bytes and age."""
        clock, flow = Clock(), TunnelFlow()
        clock.advance(100)
        channel = Channel(ServiceBinding("SSH", "SSH"), "SSH", 4, 2, b"")
        relay = LocalRelay(channel, None, flow, clock, peer_description="10.0.0.1:5")  # type: ignore[arg-type]
        relay.bytes_in, relay.bytes_out = 7, 9
        flow.add_relay(relay)
        stats = snapshot(FakeConnector(flow), 130.0)
        self.assertEqual(stats, TunnelStats(
            "source", 100.0, 2, [StreamStats("SSH", 4, 2, "10.0.0.1:5", 9, 7, 30.0)], 130.0,
        ))


class FakeSignals:
    """The part of the C{signal} module L{StatsSignal} uses, recording."""

    SIGUSR2 = 12
    SIG_DFL = "default"

    def __init__(self) -> None:
        self.handlers: dict[int, Any] = {12: "previous"}

    def signal(self, number: int, handler: Any) -> Any:
        previous, self.handlers[number] = self.handlers.get(number), handler
        return previous

    def getsignal(self, number: int) -> Any:
        return self.handlers.get(number)


class FakeReactor:
    def __init__(self) -> None:
        self.calls: list[Any] = []

    def callFromThread(self, f: Any, *args: Any) -> None:
        self.calls.append(f)


class StatsSignalTests(SynchronousTestCase):
    def test_lifecycle(self) -> None:
        """
        Installed at start; the handler hands the report to the reactor;
        the previous handler is back at stop.
        """
        signals, reactor = FakeSignals(), FakeReactor()
        reports: list[bool] = []
        service = StatsSignal(lambda: reports.append(True), reactor, signals)
        service.startService()
        handler = signals.handlers[12]
        self.assertNotEqual(handler, "previous")
        handler(12, None)
        self.assertEqual(reports, [])
        reactor.calls[0]()
        self.assertEqual(reports, [True])
        service.stopService()
        self.assertEqual(signals.handlers[12], "previous")

    def test_replaced_since(self) -> None:
        """A handler installed since is left alone."""
        signals = FakeSignals()
        service = StatsSignal(lambda: None, FakeReactor(), signals)
        service.startService()
        signals.signal(12, "newer")
        service.stopService()
        self.assertEqual(signals.handlers[12], "newer")

    def test_real_signal_restored(self) -> None:
        """With the real module, the process's handler is restored at stop."""
        before = signal.getsignal(signal.SIGUSR2)
        service = StatsSignal(lambda: None, FakeReactor())
        service.startService()
        self.assertNotEqual(signal.getsignal(signal.SIGUSR2), before)
        service.stopService()
        self.assertEqual(signal.getsignal(signal.SIGUSR2), before)

    if not hasattr(signal, "SIGUSR2"):
        test_real_signal_restored.skip = "no SIGUSR2 here"  # type: ignore[attr-defined]


class ProcessTests(TestCase):
    """A real C{localproxy} answers SIGUSR2 with the summary."""

    timeout = 120

    async def test_sigusr2(self) -> None:
        app_port, app = await start_app(self)
        fixture = await start_tunnelservice(self)
        opened = fixture.open_tunnel(["SSH"])
        await start_proxy(self, make_config(
            fixture, opened.destination_token, "destination",
            destination_apps={"SSH": tcp(app_port)},
        ))
        port = unused_port()
        child = spawn(
            self,
            localproxy_argv("-e", f"ws://127.0.0.1:{fixture.port}", "-s", f"SSH={port}",
                            "-b", "127.0.0.1"),
            {"AWSIOT_TUNNEL_ACCESS_TOKEN": opened.source_token},
        )
        await child.wait_for(f"Listening for new connection on port {port}")
        connected = app.next_connection()
        client = await connect_client(self, port)
        assert client.transport is not None
        client.transport.write(b"ping")
        self.assertEqual(await client.received(4), b"ping")
        await connected
        assert child.transport is not None
        child.transport.signalProcess(signal.SIGUSR2)
        await child.wait_for("Tunnel summary (source): connected since")
        line = next(
            line for line in child.output.splitlines() if "Tunnel summary" in line
        )
        self.assertIn("0 reconnects; 1 open stream: service 'SSH' stream 1 connection 1", line)
        self.assertIn("4 bytes sent, 4 bytes received", line)
        child.signal("TERM")
        self.assertEqual(await child.ended, 0, child.output)


def collected(proxy: Any) -> dict[tuple[str, tuple[str, ...]], float]:
    """The proxy's Prometheus samples, by name and label values."""
    return {
        (sample.name, tuple(sample.labels.values())): sample.value
        for family in proxy.collector().collect()
        for sample in family.samples
    }


class AgreementTests(TestCase):
    """The summary reads what the Prometheus metrics read."""

    timeout = 30

    async def test_after_reconnect(self) -> None:
        """
        After a lost connection and a new stream, the summary's connected
        since, reconnects, open streams and their bytes are the metrics'.
        """
        app_port, app = await start_app(self)
        fixture = await start_tunnelservice(self)
        pair = await start_pair(self, fixture, ["SSH"], {"SSH": tcp(app_port)})
        source, port = pair.source, pair.ports["SSH"]
        # A first stream dies with the tunnel connection, cut.
        first = await connect_client(self, port)
        assert first.transport is not None
        first.transport.write(b"first")
        self.assertEqual(await first.received(5), b"first")
        cut_tunnel(source)
        await first.closed
        await source.client.whenConnected()
        await app.all_closed()
        client = await connect_client(self, port)
        assert client.transport is not None
        client.transport.write(b"ping")
        self.assertEqual(await client.received(4), b"ping")

        stats = snapshot(source.connector, reactor.seconds())  # type: ignore[attr-defined]
        metrics = collected(source)
        self.assertEqual(stats.reconnects, 1)
        self.assertEqual(stats.reconnects, metrics[("lpxy_proxy_reconnects_total", ())])
        self.assertEqual(
            stats.connected_since, metrics[("lpxy_proxy_tunnel_connected_since_seconds", ())]
        )
        [stream_stats] = stats.streams
        self.assertEqual(metrics[("lpxy_proxy_streams_open", ("SSH",))], 1)
        self.assertEqual((stream_stats.bytes_sent, stream_stats.bytes_received), (4, 4))
        # The metrics' totals add the ended stream's bytes to the open one's.
        self.assertEqual(metrics[("lpxy_proxy_bytes_total", ("SSH", "sent"))], 5 + 4)
        self.assertEqual(metrics[("lpxy_proxy_bytes_total", ("SSH", "received"))], 5 + 4)
