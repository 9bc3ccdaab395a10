"""
Tests for L{lpxy.proxy.destination}: connecting to the local application
with retries on a C{Clock}, never blocking, leaving no delayed call behind.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    UNIXClientEndpoint,
)
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from lpxy.proxy.channel import Channel, ServiceBinding
from lpxy.proxy.config import TcpTarget, UnixTarget
from lpxy.proxy.destination import AppConnector, describe_target
from lpxy.proxy.relay import LocalRelay, TunnelFlow
from tests.support.logs import LogRecorder
from tests.support.recorders import FakeWebSocket, Sink
from tests.support.waiting import turns


class FakeEndpoint:
    """Connection attempts the test completes by hand."""

    def __init__(self) -> None:
        self.attempts: list[tuple[Deferred[Any], Factory]] = []

    def connect(self, factory: Factory) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.attempts.append((d, factory))
        return d

    def succeed(self) -> StringTransport:
        d, factory = self.attempts[-1]
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        d.callback(protocol)
        return transport

    def fail(self) -> None:
        d, _ = self.attempts[-1]
        d.errback(ConnectionRefusedError())


class Connector(AppConnector):
    def __init__(self, endpoint: FakeEndpoint, **kw: Any) -> None:
        super().__init__(None, **kw)
        self.fake = endpoint

    def endpoint_for(self, target: Any) -> Any:
        return self.fake


class AppConnectorTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.endpoint = FakeEndpoint()
        self.flow = TunnelFlow()
        self.ws = FakeWebSocket()
        self.flow.attach(self.ws)
        self.sink = Sink()
        self.failed: list[bool] = []

    def tearDown(self) -> None:
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def start(self, **kw: Any) -> LocalRelay:
        connector = Connector(self.endpoint, clock=self.clock, **kw)
        channel = Channel(ServiceBinding("S", "S"), "S", 1, 1, b"")
        relay = LocalRelay(channel, self.sink, self.flow, self.clock, buffer_limit=4)
        connector.connect(relay, TcpTarget("localhost", 22), lambda: self.failed.append(True))
        return relay

    def test_connects_and_flushes_what_waited(self) -> None:
        relay = self.start()
        relay.deliver(b"early")
        self.assertEqual(self.ws.calls, ["pause"])
        transport = self.endpoint.succeed()
        self.assertEqual(transport.value(), b"early")
        self.assertEqual(self.ws.calls, ["pause", "resume"])
        self.assertEqual(relay.peer_description, "localhost:22")
        self.assertIsNone(relay.abandon)

    def test_retries_then_gives_up(self) -> None:
        relay = self.start(retry_count=2, retry_delay=2.5)
        relay.deliver(b"waiting!")
        self.endpoint.fail()
        self.assertEqual(len(self.endpoint.attempts), 1)
        self.clock.advance(2.5)
        self.endpoint.fail()
        self.clock.advance(2.5)
        self.assertEqual(self.failed, [])
        self.endpoint.fail()
        self.assertEqual(len(self.endpoint.attempts), 3)
        self.assertEqual(self.failed, [True])
        self.assertEqual(relay.pending_size, 0)
        self.assertFalse(self.flow.reading_paused)

    def test_no_retry(self) -> None:
        self.start(retry_count=0)
        self.endpoint.fail()
        self.assertEqual(self.failed, [True])

    def test_forever(self) -> None:
        relay = self.start(retry_count=-1, retry_delay=1)
        for _ in range(50):
            self.endpoint.fail()
            self.clock.advance(1)
        self.assertEqual((len(self.endpoint.attempts), self.failed), (51, []))
        relay.close()

    def test_close_while_waiting_to_retry(self) -> None:
        relay = self.start(retry_count=3)
        self.endpoint.fail()
        relay.close()
        self.assertEqual(self.failed, [])

    def test_close_while_connecting(self) -> None:
        relay = self.start()
        relay.close()
        d, _ = self.endpoint.attempts[0]
        self.assertTrue(d.called)
        self.assertEqual(self.failed, [])
        self.clock.advance(10)
        self.assertEqual(len(self.endpoint.attempts), 1)

    def test_endpoints(self) -> None:
        connector = AppConnector(reactor)
        self.assertIsInstance(connector.endpoint_for(TcpTarget("::1", 22)), TCP6ClientEndpoint)
        self.assertIsInstance(
            connector.endpoint_for(TcpTarget("127.0.0.1", 22)), TCP4ClientEndpoint
        )
        self.assertIsInstance(
            connector.endpoint_for(TcpTarget("localhost", 22)), HostnameEndpoint
        )
        self.assertIsInstance(
            connector.endpoint_for(UnixTarget("/run/app.sock")), UNIXClientEndpoint
        )
        self.assertEqual(describe_target(TcpTarget("::1", 22)), "[::1]:22")
        self.assertEqual(describe_target(UnixTarget("/run/app.sock")), "/run/app.sock")


class RefusedOnLoopbackTests(TestCase):
    @inlineCallbacks
    def test_refused_app(self) -> Any:
        """
        An application that refuses (a real loopback port): each refusal is
        a real one, the retry waits on a C{Clock}; after the last attempt
        the relay drops what it kept and the stream is reported failed,
        once, with nothing left scheduled.
        """
        logs = LogRecorder(self)
        port = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
        number = port.getHost().port
        yield port.stopListening()
        clock = Clock()
        ws = FakeWebSocket()
        flow = TunnelFlow()
        flow.attach(ws)
        channel = Channel(ServiceBinding("S", "S"), "S", 1, 1, b"")
        relay = LocalRelay(channel, Sink(), flow, clock, buffer_limit=4)
        failed: list[bool] = []
        connector = AppConnector(reactor, retry_count=1, retry_delay=2.5, clock=clock)
        connector.connect(relay, TcpTarget("127.0.0.1", number), lambda: failed.append(True))
        relay.deliver(b"waiting")
        self.assertEqual(ws.calls, ["pause"])

        yield logs.when("Cannot connect to 127.0.0.1")
        # The line comes just before the retry is scheduled.
        yield turns(1)
        self.assertEqual(failed, [])
        self.assertEqual([c.getTime() for c in clock.getDelayedCalls()], [2.5])
        clock.advance(2.5)
        yield logs.when("Giving up connecting to 127.0.0.1")
        yield turns(1)
        self.assertEqual(failed, [True])
        self.assertEqual(clock.getDelayedCalls(), [])
        self.assertEqual(relay.pending_size, 0)
        self.assertEqual(ws.calls, ["pause", "resume"])
        self.assertIsNone(relay.transport)


class QuietStreamTests(TestCase):
    def test_no_factory_lines(self) -> Deferred[None]:
        """
        A stream's connection to the application opens and closes with its
        own lines only: no "Starting factory" or "Stopping factory".
        """
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        closed: Deferred[None] = Deferred()

        class App(Protocol):
            def connectionMade(self) -> None:
                assert self.transport is not None
                self.transport.loseConnection()

        class AppFactory(Factory):
            noisy = False
            protocol = App

        port = reactor.listenTCP(0, AppFactory(), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        flow = TunnelFlow()
        flow.attach(FakeWebSocket())
        channel = Channel(ServiceBinding("S", "S"), "S", 1, 1, b"")

        class ClosedSink(Sink):
            def local_closed(self, channel: Channel) -> None:
                super().local_closed(channel)
                closed.callback(None)

        sink = ClosedSink()
        relay = LocalRelay(channel, sink, flow, reactor)
        connector = AppConnector(reactor, retry_count=0, retry_delay=0)
        connector.connect(relay, TcpTarget("127.0.0.1", port.getHost().port),
                          lambda: self.fail("not connected"))

        def check(_: object) -> None:
            self.assertEqual(sink.closed, [channel])
            self.assertTrue(any("Stream closed" in e.get("log_format", "") for e in events))
            factory_lines = [
                e for e in events
                if e.get("log_format", "").startswith(("Starting factory", "Stopping factory"))
            ]
            self.assertEqual(factory_lines, [])

        # Stopping the factory comes after the connection is lost.
        return closed.addCallback(lambda _: deferLater(reactor, 0, check, None))
