"""
Tests for L{lpxy.tunnelservice.service}: the connection registry, and the
ports as L{StreamServerEndpointService}s (without sockets: endpoints that
answer as told).
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.error import CannotListenError, ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http import HTTPChannel

from lpxy.tunnelservice.service import Connections, TunnelService
from tests.support.logs import LogRecorder


class ConnectionsTests(SynchronousTestCase):
    """L{Connections} closing what it tracks."""

    def test_close_all_lets_http_channel_go_first(self) -> None:
        """
        An HTTP channel is its transport's producer; closing it must
        unregister that first, or a transport that paused it (a response
        over the buffer's mark) would drain and never close.
        """
        channel = HTTPChannel()
        channel.timeOut = None
        transport = StringTransport()
        channel.makeConnection(transport)
        channel.pauseProducing()  # as the transport does with a full buffer
        self.assertIs(transport.producer, channel)
        connections = Connections()
        connections.add(channel)
        closed = connections.close_all()
        self.assertTrue(transport.disconnecting)
        self.assertIsNone(transport.producer)
        self.assertNoResult(closed)
        channel.connectionLost(Failure(ConnectionDone()))
        connections.discard(channel)
        self.successResultOf(closed)

    def test_nothing_open(self) -> None:
        self.successResultOf(Connections().close_all())


class FakePort:
    """A listening port on 127.0.0.1 that records being stopped."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.stopped = False

    def getHost(self) -> IPv4Address:
        return IPv4Address("TCP", "127.0.0.1", self.port)

    def stopListening(self) -> None:
        self.stopped = True


class FakeEndpoint:
    """A server endpoint whose listen returns C{result} (a Deferred)."""

    def __init__(self, result: defer.Deferred[Any]) -> None:
        self.result = result
        self.factories: list[Any] = []

    def listen(self, factory: Any) -> defer.Deferred[Any]:
        self.factories.append(factory)
        return self.result


class RunningReactor(MemoryReactorClock):
    """A memory reactor that says it runs, and records being stopped."""

    def __init__(self) -> None:
        super().__init__()
        self.running = True

    def stop(self) -> None:
        self.running = False


class PortTests(SynchronousTestCase):
    """Each endpoint a child L{StreamServerEndpointService}; failing to listen fails the start."""

    def setUp(self) -> None:
        self.logs = LogRecorder(self)
        self.reactor = RunningReactor()

    def service(self, *endpoints: FakeEndpoint) -> TunnelService:
        return TunnelService(self.reactor, list(endpoints))

    def test_listening(self) -> None:
        ports = [FakePort(8080), FakePort(8081)]
        endpoints = [FakeEndpoint(defer.succeed(p)) for p in ports]
        service = self.service(*endpoints)
        self.assertEqual(len(list(service)), 2)
        service.privilegedStartService()
        service.startService()
        self.assertEqual([e.factories for e in endpoints], [[service.factory]] * 2)
        self.assertEqual(
            self.logs.texts("Tunnel service listening on"),
            ["Tunnel service listening on 127.0.0.1 port 8080",
             "Tunnel service listening on 127.0.0.1 port 8081"],
        )
        self.assertEqual(len(self.logs.texts("The management API is open")), 1)
        self.successResultOf(service.stopService())
        self.assertTrue(all(p.stopped for p in ports))

    def test_cannot_listen(self) -> None:
        """A port that cannot listen at the start: one line, and twistd exits 1."""
        error = CannotListenError("127.0.0.1", 8080, OSError(98, "Address already in use"))
        first = FakeEndpoint(defer.succeed(FakePort(8079)))
        failing = FakeEndpoint(defer.fail(error))
        never = FakeEndpoint(defer.Deferred())
        service = self.service(first, failing, never)
        e = self.assertRaises(SystemExit, service.startService)
        self.assertEqual(str(e), f"tunnelservice: {error}")
        self.assertEqual(
            self.logs.texts("cannot listen"), [f"Tunnel service cannot listen: {error}"]
        )
        self.assertEqual(never.factories, [])  # the start ended at the failure
        self.successResultOf(service.stopService())
        self.assertTrue(self.reactor.running)

    def test_fails_later(self) -> None:
        """A listen that fails after the start is logged, and stops the reactor."""
        later: defer.Deferred[Any] = defer.Deferred()
        service = self.service(FakeEndpoint(later))
        service.startService()
        self.assertTrue(self.reactor.running)
        later.errback(CannotListenError("127.0.0.1", 8080, OSError(98, "in use")))
        self.assertEqual(len(self.logs.texts("Tunnel service could not listen")), 1)
        self.assertEqual(len(self.flushLoggedErrors(CannotListenError)), 1)
        self.assertFalse(self.reactor.running)
        self.successResultOf(service.stopService())
