"""
Tests for L{lpxy.tunnelservice.cluster}: what one node does when another
changed a tunnel, and the node leases.

Two brokers sharing one in-memory store stand for two nodes sharing a
database; the store's "another node changed this tunnel" is a direct call
of L{Broker.changed} on the other broker, as the PostgreSQL store's
notification makes it.
"""

from __future__ import annotations

from typing import Any

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, serverFromString
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase

from lpxy.tunnelservice.broker import ALL, Broker
from lpxy.tunnelservice.cluster import (
    DEFAULT_LEASE,
    MOVED,
    REPLACED,
    TOKEN_ROTATED,
    TUNNEL_CLOSED,
    Eviction,
    MemoryNodeRegistry,
    NodeLease,
    default_node_name,
    evictions,
    mark_lapsed,
)
from lpxy.tunnelservice.service import TunnelService
from lpxy.tunnelservice.store import DESTINATION, SOURCE, MemoryTunnelStore
from lpxy.wire import NEWEST_SUBPROTOCOL
from tests.support.tunnelservice import ListeningEndpoint, RecordingPeer

CT = "c" * 32


class TwoNodes(SynchronousTestCase):
    """Nodes C{a} and C{b} over one store, on one clock, with one event list."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.store = MemoryTunnelStore()
        self.a = Broker(self.clock, self.store, node="a")
        self.b = Broker(self.clock, self.store, node="b")
        self.events: list[tuple[object, ...]] = []
        self.opened = self.a.open_tunnel(["SSH"], lifetime_minutes=10)
        self.b.changed(self.opened.tunnel_id)
        self.tunnel_id = self.opened.tunnel_id

    def peer(self, name: str) -> RecordingPeer:
        return RecordingPeer(name, self.events)

    def both_on(self, broker: Broker) -> None:
        broker.connect(SOURCE, self.opened.source_token, CT, self.peer("s"))
        broker.connect(DESTINATION, self.opened.destination_token, CT, self.peer("d"))
        del self.events[:]

    def record(self):  # type: ignore[no-untyped-def]
        record = self.store.get(self.tunnel_id)
        assert record is not None
        return record


class EvictionsTests(TwoNodes):
    """L{evictions}, the pure rule."""

    def held(self) -> dict[str, bytes]:
        record = self.record()
        return {mode: record.end(mode).token_hash for mode in (SOURCE, DESTINATION)}

    def test_nothing_changed(self) -> None:
        self.both_on(self.b)
        self.assertEqual(evictions(self.record(), self.held(), "b"), [])

    def test_gone_or_closed(self) -> None:
        held = self.held()
        self.assertEqual(evictions(None, held, "b"), [
            Eviction(SOURCE, 1000, TUNNEL_CLOSED), Eviction(DESTINATION, 1000, TUNNEL_CLOSED),
        ])
        self.a.close_tunnel(self.tunnel_id)
        self.assertEqual(len(evictions(self.record(), held, "b")), 2)

    def test_rotated(self) -> None:
        held = self.held()
        self.a.rotate(self.tunnel_id, SOURCE)
        self.assertEqual(evictions(self.record(), held, "b"),
                         [Eviction(SOURCE, 1000, TOKEN_ROTATED)])

    def test_replaced_and_moved(self) -> None:
        """The end or its partner taken by another node: 1001, to follow."""
        self.a.connect(SOURCE, self.opened.source_token, CT, self.peer("s"))
        held = self.held()
        self.assertEqual(evictions(self.record(), held, "b"), [
            Eviction(SOURCE, 1001, REPLACED), Eviction(DESTINATION, 1001, MOVED),
        ])
        self.assertEqual(evictions(self.record(), held, "a"), [])


class ChangedTests(TwoNodes):
    """L{Broker.changed}: another node's change reaches this node's connections."""

    def test_close_elsewhere(self) -> None:
        """CloseTunnel on node a closes the peers node b holds, with 1000."""
        self.both_on(self.b)
        self.a.close_tunnel(self.tunnel_id)
        self.assertEqual(self.events, [])
        self.b.changed(self.tunnel_id)
        self.assertEqual(sorted(self.events), [
            ("d", "close", 1000, TUNNEL_CLOSED), ("s", "close", 1000, TUNNEL_CLOSED),
        ])
        self.assertEqual(self.b._live, {})
        # node b keeps it for the closed retention, then forgets it
        self.clock.advance(self.b.limits.closed_retention_seconds + 1)
        self.assertIsNone(self.store.get(self.tunnel_id))

    def test_rotation_elsewhere(self) -> None:
        """Rotation on node a closes the rotated end node b holds."""
        self.both_on(self.b)
        self.a.rotate(self.tunnel_id, SOURCE)
        self.b.changed(self.tunnel_id)
        self.assertEqual(self.events, [
            ("d", "left", "s"), ("s", "close", 1000, TOKEN_ROTATED),
        ])
        record = self.record()
        self.assertFalse(record.source.connected)
        self.assertTrue(record.destination.connected)
        self.assertEqual(record.destination.node, "b")

    def test_rotate_all_elsewhere(self) -> None:
        self.both_on(self.b)
        rotated = self.a.rotate(self.tunnel_id, ALL)
        self.b.changed(self.tunnel_id)
        self.assertEqual(
            sorted(e for e in self.events if e[1] == "close"),
            [("d", "close", 1000, TOKEN_ROTATED), ("s", "close", 1000, TOKEN_ROTATED)],
        )
        assert rotated.source_token is not None
        self.a.connect(SOURCE, rotated.source_token, None, self.peer("s2"))

    def test_expiry_of_a_tunnel_opened_elsewhere(self) -> None:
        """Node b expires a tunnel node a opened, closing the peers it holds."""
        self.both_on(self.b)
        self.clock.advance(10 * 60 - 1)
        self.assertEqual(self.events, [])
        self.clock.advance(1)
        # (whichever node's timer wrote the closed state first)
        self.assertEqual(sorted((e[0], e[2]) for e in self.events), [("d", 1000), ("s", 1000)])
        self.assertEqual(self.record().status, "CLOSED")
        self.a.changed(self.tunnel_id)
        self.b.changed(self.tunnel_id)
        self.assertEqual(len(self.events), 2)
        self.clock.advance(self.b.limits.closed_retention_seconds)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_moved(self) -> None:
        """
        An end arriving on another node (the load balancer moved the
        tunnel): the node holding its partner closes it with 1001, so it
        follows, and so does the one holding the end itself.
        """
        self.both_on(self.b)
        self.a.connect(DESTINATION, self.opened.destination_token, CT, self.peer("d2"))
        self.b.changed(self.tunnel_id)
        self.assertEqual(sorted(self.events), [
            ("d", "close", 1001, REPLACED), ("s", "close", 1001, MOVED),
        ])
        record = self.record()
        # b let go of its ends without undoing a's
        self.assertEqual((record.destination.connected, record.destination.node), (True, "a"))
        self.assertEqual((record.source.connected, record.source.node), (False, None))
        self.a.connect(SOURCE, self.opened.source_token, CT, self.peer("s2"))
        self.assertIn(("s2", "joined", "d2"), self.events)

    def test_old_connection_ending_late(self) -> None:
        """A connection ending on b after a took its end over leaves a's state."""
        self.b.connect(SOURCE, self.opened.source_token, CT, self.peer("s"))
        [attachment] = self.b._live.values()
        self.a.connect(SOURCE, self.opened.source_token, CT, self.peer("s2"))
        self.b.disconnect(attachment)
        self.assertEqual((self.record().source.connected, self.record().source.node), (True, "a"))

    def test_deleted_elsewhere(self) -> None:
        self.both_on(self.b)
        self.a.close_tunnel(self.tunnel_id, delete=True)
        self.b.changed(self.tunnel_id)
        self.assertEqual(len([e for e in self.events if e[1] == "close"]), 2)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class LeaseTests(TwoNodes):
    """L{NodeLease}: a node that stops renewing has its ends marked disconnected."""

    def test_lapsed_node(self) -> None:
        registry = MemoryNodeRegistry(self.clock)
        lease_a = NodeLease("a", registry, self.store, self.clock)
        lease_b = NodeLease("b", registry, self.store, self.clock)
        lease_a.startService()
        lease_b.startService()
        self.both_on(self.b)
        self.assertEqual(set(registry.leases), {"a", "b"})
        # b dies: its loop stops without a word
        lease_b._loop.stop()
        for _ in range(int(DEFAULT_LEASE)):
            self.clock.advance(1)
        self.assertTrue(self.record().source.connected)  # not before its lease ends
        self.clock.advance(2)
        record = self.record()
        self.assertEqual((record.source.connected, record.source.node), (False, None))
        self.assertFalse(record.destination.connected)
        self.assertEqual(set(registry.leases), {"a"})
        lease_a.stopService()
        self.assertEqual(registry.leases, {})

    def test_alive_after_all(self) -> None:
        """
        A node taken for dead (its lease lapsed while its database queue
        was slow) marks the ends it still holds connected again when it
        hears of the change.
        """
        self.both_on(self.b)
        self.assertEqual(mark_lapsed(self.store, "b", self.clock.seconds()), 2)
        self.assertFalse(self.record().source.connected)
        self.b.changed(self.tunnel_id)
        record = self.record()
        self.assertEqual((record.source.connected, record.source.node), (True, "b"))
        self.assertEqual((record.destination.connected, record.destination.node), (True, "b"))
        self.assertEqual(self.events, [])

    def test_database_failure_logged(self) -> None:
        """A failing registry is logged, and tried again at the next beat."""

        class Failing(MemoryNodeRegistry):
            calls = 0

            def renew(self, node: str, seconds: float):  # type: ignore[no-untyped-def]
                self.calls += 1
                raise RuntimeError("database down")

        registry = Failing(self.clock)
        lease = NodeLease("a", registry, self.store, self.clock)
        lease.startService()
        self.clock.advance(2)
        self.assertEqual(registry.calls, 2)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)
        lease.stopService()

    def test_default_name(self) -> None:
        import os

        self.assertTrue(default_node_name().endswith(f"-{os.getpid()}"))


class _LaggingStore(MemoryTunnelStore):
    """
    A node's view that lacks what another node wrote until a handshake's
    refresh brings it in (C{elsewhere} is the other node's view), which
    the test lets happen by firing L{refreshing}.
    """

    def __init__(self, elsewhere: MemoryTunnelStore) -> None:
        super().__init__()
        self.elsewhere = elsewhere
        self.refreshing: list[defer.Deferred[None]] = []

    def refresh_token(self, token_hash: bytes) -> defer.Deferred[None]:
        d: defer.Deferred[None] = defer.Deferred()

        def reload(_: None) -> None:
            found = self.elsewhere.find_token(token_hash)
            if found is not None and self.get(found[0].tunnel_id) is None:
                self.add(found[0])

        d.addCallback(reload)
        self.refreshing.append(d)
        return d


class HandshakeRefreshTests(TestCase):
    """A handshake is judged on the view as the store's refresh leaves it."""

    async def setUp(self) -> None:
        self.other = MemoryTunnelStore()
        elsewhere = Broker(reactor, self.other, node="a")
        self.addCleanup(elsewhere.stop)
        self.opened = elsewhere.open_tunnel(["SSH"])
        self.store = _LaggingStore(self.other)
        endpoint = ListeningEndpoint(serverFromString(reactor, "tcp:0:interface=127.0.0.1"))
        self.service = TunnelService(reactor, [endpoint], store=self.store, node="b")
        self.service.startService()
        self.addCleanup(self.service.stopService)
        self.port = (await endpoint.listening).getHost().port

    def handshake(self) -> tuple[Any, defer.Deferred[Any]]:
        factory = WebSocketClientFactory(
            f"ws://127.0.0.1:{self.port}/tunnel?local-proxy-mode=source",
            protocols=[NEWEST_SUBPROTOCOL], headers={"access-token": self.opened.source_token},
        )
        opened: defer.Deferred[Any] = defer.Deferred()

        class Client(WebSocketClientProtocol):
            def onOpen(self) -> None:
                opened.callback(self)

            def onClose(self, wasClean: bool, code: Any, reason: Any) -> None:
                if not opened.called:
                    opened.errback(RuntimeError(reason))

        factory.protocol = Client
        connecting = TCP4ClientEndpoint(reactor, "127.0.0.1", self.port).connect(factory)
        return connecting, opened

    async def refresh_requested(self) -> defer.Deferred[None]:
        while not self.store.refreshing:
            await deferLater(reactor, 0.01, lambda: None)
        return self.store.refreshing.pop()

    async def test_admitted_after_refresh(self) -> None:
        """A tunnel another node opened is found once the view is refreshed."""
        _, opened = self.handshake()
        refresh = await self.refresh_requested()
        self.assertFalse(opened.called)
        refresh.callback(None)
        client = await opened
        self.assertEqual(list(self.service.broker._live), [(self.opened.tunnel_id, SOURCE)])
        self.assertEqual(self.store.get(self.opened.tunnel_id).source.node, "b")  # type: ignore[union-attr]
        client.sendClose(1000)
        await deferLater(reactor, 0.1, lambda: None)

    async def test_gone_during_refresh(self) -> None:
        """
        A peer gone while the view was refreshed leaves no connection
        behind (the service, not reading meanwhile, finds out when it
        answers).
        """
        connecting, opened = self.handshake()
        opened.addErrback(lambda _: None)
        refresh = await self.refresh_requested()
        client = await connecting
        client.transport.abortConnection()
        await deferLater(reactor, 0.05, lambda: None)
        refresh.callback(None)
        for _ in range(100):
            if not self.service.broker._live:
                break
            await deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(self.service.broker._live, {})
        self.assertFalse(self.store.get(self.opened.tunnel_id).source.connected)  # type: ignore[union-attr]
