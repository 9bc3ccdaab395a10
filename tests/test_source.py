"""
Tests for L{lpxy.proxy.source}: listening per service on loopback.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import Protocol
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase

from lpxy.proxy.channel import ServiceBinding
from lpxy.proxy.source import ServiceListenerFactory, SourceListeners, bind_error
from tests.support.apps import Client


class Greeter(Protocol):
    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(b"hello")
        self.transport.loseConnection()


class SourceListenersTests(TestCase):
    @inlineCallbacks
    def test_listen_accept_refuse(self) -> Any:
        accepted: list[tuple[ServiceBinding, IAddress]] = []
        refuse = [False]

        def accept(binding: ServiceBinding, addr: IAddress) -> Protocol | None:
            accepted.append((binding, addr))
            return None if refuse[0] else Greeter()

        listeners = SourceListeners(reactor, "127.0.0.1", {"A": 0}, accept)
        self.addCleanup(listeners.stop)
        ports = yield listeners.start([ServiceBinding("A", "A"), ServiceBinding(None, "B")])
        self.assertEqual(sorted(ports), ["A", "B"])
        self.assertNotEqual(ports["A"], ports["B"])
        self.assertEqual(listeners.port_for("A"), ports["A"])

        client = Client()
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", ports["B"])
        yield endpoint.connect(_factory(client))
        yield client.closed
        self.assertEqual(bytes(client.data), b"hello")
        self.assertEqual(accepted[0][0], ServiceBinding(None, "B"))

        refuse[0] = True
        client = Client()
        yield TCP4ClientEndpoint(reactor, "127.0.0.1", ports["A"]).connect(_factory(client))
        yield client.closed
        self.assertEqual(bytes(client.data), b"")
        self.assertEqual(accepted[1][0], ServiceBinding("A", "A"))

    @inlineCallbacks
    def test_port_in_use_fails_and_closes_the_rest(self) -> Any:
        first = SourceListeners(reactor, "127.0.0.1", {"A": 0}, lambda b, a: None)
        self.addCleanup(first.stop)
        ports = yield first.start([ServiceBinding("A", "A")])
        second = SourceListeners(reactor, "127.0.0.1", {"B": 0, "A": ports["A"]},
                                 lambda b, a: None)
        with self.assertRaises(CannotListenError):
            yield second.start([ServiceBinding("B", "B"), ServiceBinding("A", "A")])
        self.assertIsNone(second.port_for("B"))


class BindFirstTests(TestCase):
    """
    L{SourceListeners.bind}: the configured ports bound before the services
    are known.
    """

    @inlineCallbacks
    def test_bound_ports_serve_their_service(self) -> Any:
        """
        A bound port closes its clients until L{SourceListeners.start}
        gives it its service, then serves it; a bound port whose service the
        tunnel lacks is closed.
        """
        first = SourceListeners(reactor, "127.0.0.1", {"A": 0, "B": 0}, lambda b, a: None)
        first_ports = yield first.start([ServiceBinding("A", "A"), ServiceBinding("B", "B")])
        yield first.stop()
        accepted: list[ServiceBinding] = []

        def accept(binding: ServiceBinding, addr: IAddress) -> Protocol:
            accepted.append(binding)
            return Greeter()

        listeners = SourceListeners(reactor, "127.0.0.1", dict(first_ports), accept)
        self.addCleanup(listeners.stop)
        listeners.bind()
        early = Client()
        yield TCP4ClientEndpoint(reactor, "127.0.0.1", first_ports["A"]).connect(
            _factory(early)
        )
        yield early.closed
        self.assertEqual((bytes(early.data), accepted), (b"", []))

        ports = yield listeners.start([ServiceBinding("A", "A")])
        self.assertEqual(ports, {"A": first_ports["A"]})
        client = Client()
        yield TCP4ClientEndpoint(reactor, "127.0.0.1", ports["A"]).connect(_factory(client))
        yield client.closed
        self.assertEqual((bytes(client.data), accepted), (b"hello", [ServiceBinding("A", "A")]))
        # B's port is free again.
        again = SourceListeners(reactor, "127.0.0.1", {"B": first_ports["B"]}, accept)
        again.bind()
        yield again.stop()

    @inlineCallbacks
    def test_busy_port(self) -> Any:
        """
        A busy port: L{CannotListenError}, in the reference's words; stopping
        closes the ports already bound.
        """
        holder = SourceListeners(reactor, "127.0.0.1", {"A": 0}, lambda b, a: None)
        self.addCleanup(holder.stop)
        held = yield holder.start([ServiceBinding("A", "A")])
        free = SourceListeners(reactor, "127.0.0.1", {"F": 0}, lambda b, a: None)
        free_port = (yield free.start([ServiceBinding("F", "F")]))["F"]
        yield free.stop()
        listeners = SourceListeners(
            reactor, "127.0.0.1", {"F": free_port, "A": held["A"]}, lambda b, a: None
        )
        error = self.assertRaises(CannotListenError, listeners.bind)
        self.assertEqual(
            bind_error(error),
            f"Could not bind to address: 127.0.0.1:{held['A']} -- Address already in use",
        )
        yield listeners.stop()
        # F was closed again.
        again = SourceListeners(reactor, "127.0.0.1", {"F": free_port}, lambda b, a: None)
        again.bind()
        yield again.stop()


class QuietListenersTests(TestCase):
    @inlineCallbacks
    def test_no_factory_lines(self) -> Any:
        """
        Listening, a client's connection and stopping log no "Starting
        factory" or "Stopping factory" for the listeners' factories.
        """
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        listeners = SourceListeners(reactor, "127.0.0.1", {"A": 0},
                                    lambda binding, addr: Greeter())
        ports = yield listeners.start([ServiceBinding("A", "A")])
        client = Client()
        yield TCP4ClientEndpoint(reactor, "127.0.0.1", ports["A"]).connect(_factory(client))
        yield client.closed
        yield listeners.stop()
        self.assertEqual(bytes(client.data), b"hello")
        self.assertTrue(any("starting on" in (formatEvent(e) or "") for e in events))
        self.assertEqual(
            [e for e in events if isinstance(e.get("factory"), ServiceListenerFactory)], []
        )


def _factory(protocol: Protocol) -> Any:
    from twisted.internet.protocol import Factory

    class One(Factory):
        def buildProtocol(self, addr: IAddress) -> Protocol:
            return protocol

    return One()


class BacklogTests(TestCase):
    def test_bound_and_started_ports_ask_for_a_long_backlog(self) -> None:
        """
        Every port of the source, bound early or at start, asks for a queue
        of 511 unaccepted connections, not Twisted's 50: a burst of clients
        waits instead of being refused.
        """
        from twisted.internet.testing import MemoryReactor

        memory = MemoryReactor()
        listeners = SourceListeners(memory, "127.0.0.1", {"A": 4000}, lambda b, a: None)
        listeners.bind()
        self.successResultOf(listeners.start([ServiceBinding("A", "A"), ServiceBinding(None, "B")]))
        self.assertEqual([(port, backlog) for port, _f, backlog, _i in memory.tcpServers],
                         [(4000, 511), (0, 511)])
