"""
End to end on loopback: tunnelservice + destination proxy + source proxy +
applications, real sockets, one reactor, for each protocol version and the
backward-compatible pairs.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.protocol import Factory
from twisted.trial.unittest import TestCase

from lpxy.frames import Message
from lpxy.proxy.config import UnixTarget
from tests.support.apps import AppFactory, AppProtocol, Pusher, connect_client, start_app
from tests.support.logs import LogRecorder
from tests.support.proxies import (
    V1,
    V2,
    V3,
    RecordTap,
    cut_tunnel,
    make_config,
    start_pair,
    start_proxy,
    tcp,
)
from tests.support.sockets import buffered
from tests.support.tunnelservice import start_tunnelservice
from tests.support.waiting import gather, turns


class EchoTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def echo_through(self, services: list[str] | None, *, source: str = V3,
                     destination: str = V3, client_type: str | None = None,
                     size: int = 200_000) -> Any:
        fixture = yield start_tunnelservice(self)
        app_port, _ = yield Deferred.fromCoroutine(start_app(self))
        key = services[0] if services else ""
        _, _, ports, *_ = yield Deferred.fromCoroutine(start_pair(
            self, fixture, services, {key: tcp(app_port)},
            source_subprotocol=source, destination_subprotocol=destination,
            client_type=client_type,
        ))
        for _ in range(2):
            client = yield Deferred.fromCoroutine(connect_client(self, ports[key]))
            payload = os.urandom(size)
            client.transport.write(payload)
            got = yield client.received(size)
            self.assertEqual(got, payload)
            client.transport.loseConnection()
            yield client.closed

    def test_single_port_v3(self) -> Any:
        return self.echo_through(["SSH"])

    def test_unnamed_no_services(self) -> Any:
        return self.echo_through(None)

    def test_v2(self) -> Any:
        return self.echo_through(["SSH"], source=V2, destination=V2)

    def test_v1(self) -> Any:
        return self.echo_through(None, source=V1, destination=V1)

    def test_v3_source_y_v2_to_v2(self) -> Any:
        return self.echo_through(["SSH"], source=V3, destination=V2, client_type="V2")

    def test_v3_source_y_v1_to_v1(self) -> Any:
        return self.echo_through(None, source=V3, destination=V1, client_type="V1")

    def test_v2_source_to_v1(self) -> Any:
        return self.echo_through(None, source=V2, destination=V1)

    @inlineCallbacks
    def test_two_services_distinct_data(self) -> Any:
        fixture = yield start_tunnelservice(self)
        port_a, _ = yield Deferred.fromCoroutine(start_app(self))
        port_b, _ = yield Deferred.fromCoroutine(start_app(self))
        _, _, ports, *_ = yield Deferred.fromCoroutine(start_pair(
            self, fixture, ["A", "B"], {"A": tcp(port_a), "B": tcp(port_b)},
        ))
        a = yield Deferred.fromCoroutine(connect_client(self, ports["A"]))
        b = yield Deferred.fromCoroutine(connect_client(self, ports["B"]))
        data_a, data_b = b"A" * 300_000, b"B" * 300_000
        a.transport.write(data_a)
        b.transport.write(data_b)
        got = yield gather(a.received(len(data_a)), b.received(len(data_b)))
        self.assertEqual(got, [data_a, data_b])
        # Ending A's stream (a STREAM_RESET each way) leaves B flowing.
        a.transport.loseConnection()
        yield a.closed
        b.transport.write(b"still here")
        got = yield b.received(len(data_b) + 10)
        self.assertEqual(got[-10:], b"still here")

    @inlineCallbacks
    def test_v3_many_connections(self) -> Any:
        fixture = yield start_tunnelservice(self)
        app_port, app = yield Deferred.fromCoroutine(start_app(self))
        _, _, ports, *_ = yield Deferred.fromCoroutine(start_pair(
            self, fixture, ["SSH"], {"SSH": tcp(app_port)},
        ))
        clients = []
        for _ in range(32):
            client = yield Deferred.fromCoroutine(connect_client(self, ports["SSH"]))
            clients.append(client)
        payloads = [os.urandom(100_000) for _ in clients]
        for client, payload in zip(clients, payloads, strict=True):
            client.transport.write(payload)
        got = yield gather(*(c.received(len(p)) for c, p in zip(clients, payloads, strict=True)))
        self.assertEqual(got, payloads)
        self.assertEqual(len(app.accepted), 32)

    @inlineCallbacks
    def test_v2_new_client_replaces_stream(self) -> Any:
        fixture = yield start_tunnelservice(self)
        app_port, app = yield Deferred.fromCoroutine(start_app(self))
        _, _, ports, *_ = yield Deferred.fromCoroutine(start_pair(
            self, fixture, ["SSH"], {"SSH": tcp(app_port)},
            source_subprotocol=V2, destination_subprotocol=V2,
        ))
        first = yield Deferred.fromCoroutine(connect_client(self, ports["SSH"]))
        first.transport.write(b"one")
        yield first.received(3)
        second = yield Deferred.fromCoroutine(connect_client(self, ports["SSH"]))
        yield first.closed
        second.transport.write(b"two")
        got = yield second.received(3)
        self.assertEqual(got, b"two")
        # The destination replaced the first stream's app connection too.
        yield app.accepted[0].closed
        self.assertEqual(len(app.accepted), 2)
        self.assertEqual(app.live, {app.accepted[1]})

    @inlineCallbacks
    def test_v3_connection_limit(self) -> Any:
        fixture = yield start_tunnelservice(self)
        app_port, _ = yield Deferred.fromCoroutine(start_app(self))
        destination, source, ports, *_ = yield Deferred.fromCoroutine(start_pair(
            self, fixture, ["SSH"], {"SSH": tcp(app_port)}, max_active_connections=2,
        ))
        kept = []
        for _ in range(2):
            client = yield Deferred.fromCoroutine(connect_client(self, ports["SSH"]))
            client.transport.write(b"hi")
            yield client.received(2)
            kept.append(client)
        refused = yield Deferred.fromCoroutine(connect_client(self, ports["SSH"]))
        yield refused.closed
        for client in kept:
            client.transport.write(b"!")
            got = yield client.received(3)
            self.assertEqual(got, b"hi!")
        # Every local socket of both proxies has Nagle off.
        relays = source.connector.flow.relays | destination.connector.flow.relays
        self.assertEqual(len(relays), 4)
        for relay in relays:
            self.assertTrue(relay.transport.getTcpNoDelay())

    @inlineCallbacks
    def test_unix_socket_app(self) -> Any:
        fixture = yield start_tunnelservice(self)
        path = self.mktemp()
        app = AppFactory()
        listening = reactor.listenUNIX(path, app)  # type: ignore[attr-defined]
        self.addCleanup(lambda: gather(listening.stopListening(), app.all_closed()))
        _, _, ports, *_ = yield Deferred.fromCoroutine(start_pair(
            self, fixture, ["SSH"], {"SSH": UnixTarget(path)},
        ))
        client = yield Deferred.fromCoroutine(connect_client(self, ports["SSH"]))
        client.transport.write(b"over unix")
        got = yield client.received(9)
        self.assertEqual(got, b"over unix")


class FailureTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def refused(self, subprotocol: str) -> Any:
        """
        The destination cannot reach its application: it resets the stream
        (V2: STREAM_RESET) or the connection (V3: CONNECTION_RESET), and
        that closes the source's client, which got nothing.
        """
        fixture = yield start_tunnelservice(self)
        port = reactor.listenTCP(0, Factory(), interface="127.0.0.1")  # type: ignore[attr-defined]
        number = port.getHost().port
        yield port.stopListening()
        _, source, ports, *_ = yield Deferred.fromCoroutine(start_pair(
            self, fixture, ["SSH"], {"SSH": tcp(number)},
            source_subprotocol=subprotocol, destination_subprotocol=subprotocol,
        ))
        tap = RecordTap(source)
        client = yield Deferred.fromCoroutine(connect_client(self, ports["SSH"]))
        client.transport.write(b"hello?")
        yield client.closed
        self.assertEqual(bytes(client.data), b"")
        self.assertEqual(
            [(m.type, m.serviceId, m.streamId) for m in tap.messages],
            [(Message.STREAM_RESET if subprotocol == V2 else Message.CONNECTION_RESET,
              "SSH", 1)],
        )
        # Only that stream ended: the proxy carries on.
        self.assertNoResult(source.whenDone())
        self.assertIsNotNone(source.connector.protocol)

    def test_refused_destination_app(self) -> Any:
        return self.refused(V3)

    def test_refused_destination_app_v2(self) -> Any:
        return self.refused(V2)

    @inlineCallbacks
    def test_close_tunnel_exits_zero(self) -> Any:
        fixture = yield start_tunnelservice(self)
        app_port, _ = yield Deferred.fromCoroutine(start_app(self))
        destination, source, ports, tunnel_id = yield Deferred.fromCoroutine(start_pair(
            self, fixture, ["SSH"], {"SSH": tcp(app_port)},
        ))
        client = yield Deferred.fromCoroutine(connect_client(self, ports["SSH"]))
        client.transport.write(b"ping")
        yield client.received(4)
        fixture.close_tunnel(tunnel_id)
        statuses = yield gather(source.whenDone(), destination.whenDone())
        self.assertEqual(statuses, [0, 0])
        yield client.closed

    @inlineCallbacks
    def test_rejected_token_exits_two_without_retry(self) -> Any:
        fixture = yield start_tunnelservice(self)
        config = make_config(fixture, "not-a-token", "source", source_ports={"SSH": 0},
                             retry_delay_ms=1)
        service = yield Deferred.fromCoroutine(start_proxy(self, config, wait=False))
        status = yield service.whenDone()
        self.assertEqual(status, 2)
        self.assertFalse(service.client.running)

    @inlineCallbacks
    def test_cut_and_reconnect(self) -> Any:
        fixture = yield start_tunnelservice(self)
        app_port, _ = yield Deferred.fromCoroutine(start_app(self))
        _destination, source, ports, *_ = yield Deferred.fromCoroutine(start_pair(
            self, fixture, ["SSH"], {"SSH": tcp(app_port)},
        ))
        client = yield Deferred.fromCoroutine(connect_client(self, ports["SSH"]))
        client.transport.write(b"before")
        yield client.received(6)
        # Cut the source's WebSocket: its streams die, it reconnects (the
        # generated client token makes the access token reusable).
        protocol = cut_tunnel(source)
        yield client.closed
        # The client saw its socket close after the proxy saw the loss, so
        # this waits for the next connection, ready (SERVICE_IDS included).
        yield source.client.whenConnected()
        self.assertIsNot(source.connector.protocol, protocol)
        self.assertTrue(source.connector.session.ready)
        client = yield Deferred.fromCoroutine(connect_client(self, ports["SSH"]))
        client.transport.write(b"after")
        got = yield client.received(5)
        self.assertEqual(got, b"after")


class SlowReaderTests(TestCase):
    timeout = 120

    @inlineCallbacks
    def test_memory_bounded(self) -> Any:
        total = 64 * 1024 * 1024
        samples: list[int] = []
        done: Deferred[None] = Deferred()

        class Slow(AppFactory):
            def on_data(self, protocol: AppProtocol, data: bytes) -> None:
                transport: Any = protocol.transport
                samples.append(measure())
                if protocol.received >= total:
                    if not done.called:
                        done.callback(None)
                    return
                transport.pauseProducing()
                turns(4).addCallback(lambda _: transport.resumeProducing())

        fixture = yield start_tunnelservice(self)
        app_port, _ = yield Deferred.fromCoroutine(
            start_app(self, factory=Slow(echo=False))
        )
        destination, source, ports, *_ = yield Deferred.fromCoroutine(start_pair(
            self, fixture, ["BULK"], {"BULK": tcp(app_port)},
        ))

        def measure() -> int:
            worst = 0
            for proxy in (source, destination):
                held = sum(buffered(r.transport) + r.pending_size
                           for r in proxy.connector.flow.relays)
                protocol = proxy.connector.protocol
                if protocol is not None:
                    held += buffered(protocol.transport)
                worst = max(worst, held)
            return worst

        client = yield Deferred.fromCoroutine(connect_client(self, ports["BULK"]))
        pusher = Pusher(client.transport, total)
        pusher.resumeProducing()
        yield done
        self.assertGreater(len(samples), 100)
        # Without flow control the destination would hold most of the 64 MB.
        self.assertLess(max(samples), 2 * 1024 * 1024)
        self.assertEqual(pusher.sent, total)


class CleanStopTests(TestCase):
    """
    Stopping a proxy (SIGTERM under twistd) closes its WebSocket with the
    close handshake done: the service has answered and closed TCP first
    (RFC 6455 section 7.1.1) by the time stopService fires.
    """

    async def test_stopWaitsForTheClosingHandshake(self) -> None:
        fixture = await start_tunnelservice(self)
        app_port, _ = await start_app(self)
        pair = await start_pair(self, fixture, ["ECHO"], {"ECHO": tcp(app_port)})
        logs = LogRecorder(self)

        await pair.source.stopService()

        self.assertFalse(fixture.broker.describe(pair.tunnel_id).end("source").connected)
        [line] = logs.texts("Peer disconnected: source")
        self.assertIn("(1000 local proxy stopping;", line)
