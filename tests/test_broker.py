"""
Tests for L{lpxy.tunnelservice.broker}: tunnels, tokens, pairing, lifetime.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from lpxy.tunnelservice.broker import (
    ALL,
    Broker,
    InvalidRequest,
    LimitExceeded,
    Limits,
    ResourceNotFound,
)
from lpxy.tunnelservice.store import CLOSED, DESTINATION, OPEN, SOURCE, MemoryTunnelStore
from lpxy.tunnelservice.tokens import (
    CLIENT_TOKEN_MISMATCH,
    SPENT_TOKEN,
    HandshakeRefused,
    token_routing_key,
)
from tests.support.tunnelservice import RecordingPeer

CT1 = "a" * 32
CT2 = "b" * 32


class BrokerTestCase(SynchronousTestCase):
    """A broker on a L{Clock} with small limits, and L{RecordingPeer}s sharing one event list."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.broker = Broker(self.clock, limits=Limits(max_services=3, max_open_tunnels=5))
        self.events: list[tuple[object, ...]] = []

    def peer(self, name: str) -> RecordingPeer:
        return RecordingPeer(name, self.events)

    def refused(self, status: int, mode: str, token: str, client_token: str | None = None) -> str:
        e = self.assertRaises(
            HandshakeRefused, self.broker.connect, mode, token, client_token, self.peer("x")
        )
        self.assertEqual(e.status, status)
        return e.reason


class OpenTunnelTests(BrokerTestCase):
    """L{Broker.open_tunnel} and L{Broker.describe}: records, limits, no token kept or logged."""

    def test_open(self) -> None:
        opened = self.broker.open_tunnel(
            services=["SSH", "HTTP"], thing_name="thing", description="d",
            lifetime_minutes=10, tags=[("k", "v")],
        )
        record = self.broker.describe(opened.tunnel_id)
        arn = "arn:aws:iot:us-east-1:123456789012:tunnel/" + opened.tunnel_id
        self.assertEqual(record.arn, arn)
        self.assertEqual(opened.tunnel_arn, record.arn)
        self.assertEqual(record.services, ("SSH", "HTTP"))
        self.assertEqual(record.thing_name, "thing")
        self.assertEqual(record.description, "d")
        self.assertEqual(record.lifetime_minutes, 10)
        self.assertEqual(record.tags, {"k": "v"})
        self.assertEqual(record.status, OPEN)
        self.assertEqual(record.created_at, 1000)
        self.assertFalse(record.source.connected)
        self.assertNotEqual(opened.source_token, opened.destination_token)
        self.assertGreaterEqual(len(opened.source_token), 40)

    def test_tokens_not_kept(self) -> None:
        opened = self.broker.open_tunnel()
        record = self.broker.describe(opened.tunnel_id)
        for value in (repr(record), repr(opened), repr(record.source)):
            self.assertNotIn(opened.source_token, value)
            self.assertNotIn(opened.destination_token, value)
        self.assertNotIn(opened.source_token.encode(), record.source.token_hash)

    def test_too_many_services(self) -> None:
        self.assertRaises(LimitExceeded, self.broker.open_tunnel, services=["a", "b", "c", "d"])

    def test_duplicate_services(self) -> None:
        self.assertRaises(InvalidRequest, self.broker.open_tunnel, services=["a", "a"])

    def test_bad_lifetime(self) -> None:
        self.assertRaises(InvalidRequest, self.broker.open_tunnel, lifetime_minutes=0)
        self.assertRaises(InvalidRequest, self.broker.open_tunnel, lifetime_minutes=721)

    def test_open_tunnel_limit(self) -> None:
        ids = [self.broker.open_tunnel().tunnel_id for _ in range(5)]
        self.assertRaises(LimitExceeded, self.broker.open_tunnel)
        self.broker.close_tunnel(ids[0])
        self.broker.open_tunnel()
        self.assertRaises(LimitExceeded, self.broker.open_tunnel)

    def test_describe_unknown(self) -> None:
        self.assertRaises(ResourceNotFound, self.broker.describe, "nope")

    def test_logs_no_token(self) -> None:
        observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        opened = self.broker.open_tunnel(services=["SSH"])
        self.broker.connect(SOURCE, opened.source_token, CT1, self.peer("s"))
        self.broker.rotate(opened.tunnel_id, ALL)
        self.broker.close_tunnel(opened.tunnel_id)
        self.assertTrue(len(observer) >= 3)
        for event in observer:
            text = repr(event)
            self.assertNotIn(opened.source_token, text)
            self.assertNotIn(CT1, text)


class LifetimeTests(BrokerTestCase):
    """Closing, expiry, deletion and stopping: peers closed, timers set and cancelled."""

    def test_close(self) -> None:
        opened = self.broker.open_tunnel()
        self.broker.connect(SOURCE, opened.source_token, None, self.peer("s"))
        self.broker.connect(DESTINATION, opened.destination_token, None, self.peer("d"))
        del self.events[:]
        self.clock.advance(5)
        self.broker.close_tunnel(opened.tunnel_id)
        self.assertEqual(self.events, [
            ("s", "close", 1000, "tunnel closed"),
            ("d", "close", 1000, "tunnel closed"),
        ])
        record = self.broker.describe(opened.tunnel_id)
        self.assertEqual(record.status, CLOSED)
        self.assertEqual(record.last_updated_at, 1005)
        self.assertFalse(record.source.connected)
        self.assertFalse(record.destination.connected)
        # only the removal of the closed tunnel, three hours on, is left
        [removal] = self.clock.getDelayedCalls()
        self.assertEqual(removal.getTime(), 1005 + 3 * 3600)

    def test_closed_tunnels_are_forgotten(self) -> None:
        opened = self.broker.open_tunnel(lifetime_minutes=1)
        self.clock.advance(60)
        self.assertEqual(self.broker.describe(opened.tunnel_id).status, CLOSED)
        self.clock.advance(3 * 3600 - 1)
        self.assertEqual(self.broker.list_tunnels()[0][0].tunnel_id, opened.tunnel_id)
        self.clock.advance(1)
        self.assertRaises(ResourceNotFound, self.broker.describe, opened.tunnel_id)
        self.assertEqual(self.broker.list_tunnels(), ([], None))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_closed_refuses_handshakes(self) -> None:
        opened = self.broker.open_tunnel()
        self.broker.close_tunnel(opened.tunnel_id)
        self.refused(401, SOURCE, opened.source_token)

    def test_close_twice_and_delete(self) -> None:
        opened = self.broker.open_tunnel()
        self.broker.close_tunnel(opened.tunnel_id)
        self.broker.close_tunnel(opened.tunnel_id)
        self.broker.close_tunnel(opened.tunnel_id, delete=True)
        self.assertRaises(ResourceNotFound, self.broker.describe, opened.tunnel_id)
        self.assertRaises(ResourceNotFound, self.broker.close_tunnel, opened.tunnel_id)
        self.refused(401, SOURCE, opened.source_token)

    def test_delete_open(self) -> None:
        opened = self.broker.open_tunnel()
        self.broker.connect(SOURCE, opened.source_token, None, self.peer("s"))
        self.broker.close_tunnel(opened.tunnel_id, delete=True)
        self.assertEqual(self.events, [("s", "close", 1000, "tunnel closed")])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_expiry(self) -> None:
        opened = self.broker.open_tunnel(lifetime_minutes=2)
        self.broker.connect(SOURCE, opened.source_token, None, self.peer("s"))
        self.clock.advance(119)
        self.assertEqual(self.broker.describe(opened.tunnel_id).status, OPEN)
        self.clock.advance(1)
        self.assertEqual(self.broker.describe(opened.tunnel_id).status, CLOSED)
        self.assertEqual(self.events, [("s", "close", 1000, "tunnel lifetime expired")])
        self.refused(401, DESTINATION, opened.destination_token)

    def test_stop(self) -> None:
        opened = self.broker.open_tunnel()
        self.broker.connect(SOURCE, opened.source_token, None, self.peer("s"))
        self.broker.connect(DESTINATION, opened.destination_token, None, self.peer("d"))
        del self.events[:]
        self.broker.stop()
        self.assertEqual(sorted(self.events), [
            ("d", "close", 1001, "service shutting down"),
            ("s", "close", 1001, "service shutting down"),
        ])
        self.assertEqual(self.clock.getDelayedCalls(), [])


class ClosedLimitTests(SynchronousTestCase):
    """At most L{Limits.max_closed_tunnels} closed tunnels are kept; the longest closed go first."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.broker = Broker(self.clock, limits=Limits(max_closed_tunnels=2))

    def kept(self) -> list[str]:
        return [record.tunnel_id for record in self.broker.list_tunnels()[0]]

    def test_next_closed_forgets_the_longest_closed(self) -> None:
        # Closed in another order than opened: the count goes by closing.
        first, second, third = (self.broker.open_tunnel() for _ in range(3))
        for opened in (second, first, third):
            self.clock.advance(1)
            self.broker.close_tunnel(opened.tunnel_id)
        self.assertRaises(ResourceNotFound, self.broker.describe, second.tunnel_id)
        self.assertEqual(self.kept(), [third.tunnel_id, first.tunnel_id])
        # The forgotten tunnel's removal timer went with it.
        self.assertEqual(len(self.clock.getDelayedCalls()), 2)

    def test_open_tunnels_are_never_forgotten(self) -> None:
        opened = [self.broker.open_tunnel() for _ in range(4)]
        for tunnel in opened[1:]:
            self.broker.close_tunnel(tunnel.tunnel_id)
        self.assertEqual(self.kept(), [opened[3].tunnel_id, opened[2].tunnel_id,
                                       opened[0].tunnel_id])
        self.assertEqual(self.broker.describe(opened[0].tunnel_id).status, OPEN)

    def test_expiry_and_deletion_count(self) -> None:
        expiring = self.broker.open_tunnel(lifetime_minutes=1)
        deleted, closed, last = (self.broker.open_tunnel() for _ in range(3))
        self.clock.advance(60)
        self.broker.close_tunnel(deleted.tunnel_id)
        self.broker.close_tunnel(deleted.tunnel_id, delete=True)
        self.broker.close_tunnel(closed.tunnel_id)
        # Two closed (the expired one and closed); a deleted one takes no place.
        self.assertEqual(
            self.kept(), [last.tunnel_id, closed.tunnel_id, expiring.tunnel_id]
        )
        self.broker.close_tunnel(last.tunnel_id)
        self.assertEqual(self.kept(), [last.tunnel_id, closed.tunnel_id])

    def test_retention_still_ends_them(self) -> None:
        opened = self.broker.open_tunnel()
        self.broker.close_tunnel(opened.tunnel_id)
        self.clock.advance(3 * 3600)
        self.assertEqual(self.kept(), [])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_forgotten_ones_leave_the_store(self) -> None:
        store = MemoryTunnelStore()
        broker = Broker(self.clock, store=store, limits=Limits(max_closed_tunnels=1))
        first, second = broker.open_tunnel(), broker.open_tunnel()
        broker.close_tunnel(first.tunnel_id)
        broker.close_tunnel(second.tunnel_id)
        self.assertIsNone(store.get(first.tunnel_id))
        self.assertEqual([r.tunnel_id for r in store.newest_first()], [second.tunnel_id])


class TokenTests(BrokerTestCase):
    """Handshakes as the token rules say: spending, client tokens, replacement, rotation."""

    def setUp(self) -> None:
        super().setUp()
        self.opened = self.broker.open_tunnel(services=["SSH"])

    def test_unknown_token(self) -> None:
        self.refused(401, SOURCE, "not a token")

    def test_mode_mismatch(self) -> None:
        self.refused(400, DESTINATION, self.opened.source_token)

    def test_spent_without_client_token(self) -> None:
        a = self.broker.connect(SOURCE, self.opened.source_token, None, self.peer("s"))
        self.assertEqual(a.services, ("SSH",))
        self.assertEqual(a.tunnel_id, self.opened.tunnel_id)
        self.assertEqual(self.refused(401, SOURCE, self.opened.source_token), SPENT_TOKEN)
        self.assertEqual(self.refused(401, SOURCE, self.opened.source_token, CT1), SPENT_TOKEN)

    def test_spent_after_disconnect(self) -> None:
        a = self.broker.connect(SOURCE, self.opened.source_token, None, self.peer("s"))
        self.broker.disconnect(a)
        self.assertEqual(self.refused(401, SOURCE, self.opened.source_token), SPENT_TOKEN)

    def test_client_token_reconnects(self) -> None:
        a = self.broker.connect(SOURCE, self.opened.source_token, CT1, self.peer("s1"))
        self.broker.disconnect(a)
        b = self.broker.connect(SOURCE, self.opened.source_token, CT1, self.peer("s2"))
        self.assertNotEqual(a.channel_id, b.channel_id)
        self.assertTrue(self.broker.describe(self.opened.tunnel_id).source.connected)

    def test_client_token_mismatch(self) -> None:
        self.broker.connect(SOURCE, self.opened.source_token, CT1, self.peer("s"))
        self.assertEqual(
            self.refused(401, SOURCE, self.opened.source_token, CT2), CLIENT_TOKEN_MISMATCH
        )
        self.assertEqual(
            self.refused(401, SOURCE, self.opened.source_token, None), CLIENT_TOKEN_MISMATCH
        )

    def test_replacement(self) -> None:
        self.broker.connect(SOURCE, self.opened.source_token, CT1, self.peer("s1"))
        d = self.broker.connect(DESTINATION, self.opened.destination_token, None, self.peer("d"))
        self.assertEqual(self.events, [("s1", "joined", "d"), ("d", "joined", "s1")])
        del self.events[:]
        s2 = self.broker.connect(SOURCE, self.opened.source_token, CT1, self.peer("s2"))
        self.assertEqual(self.events, [
            ("d", "left", "s1"),
            ("s1", "close", 1000, "replaced by a new connection"),
            ("d", "joined", "s2"),
            ("s2", "joined", "d"),
        ])
        self.assertIs(d.partner, s2.peer)
        self.assertIs(s2.partner, d.peer)

    def test_disconnect_of_replaced_is_ignored(self) -> None:
        s1 = self.broker.connect(SOURCE, self.opened.source_token, CT1, self.peer("s1"))
        s2 = self.broker.connect(SOURCE, self.opened.source_token, CT1, self.peer("s2"))
        self.broker.disconnect(s1)
        record = self.broker.describe(self.opened.tunnel_id)
        self.assertTrue(record.source.connected)
        self.assertFalse(record.destination.connected)
        self.broker.disconnect(s2)  # the live one
        self.assertFalse(record.source.connected)

    def test_partner_left(self) -> None:
        s = self.broker.connect(SOURCE, self.opened.source_token, None, self.peer("s"))
        d = self.broker.connect(DESTINATION, self.opened.destination_token, None, self.peer("d"))
        del self.events[:]
        self.broker.disconnect(s)
        self.assertEqual(self.events, [("d", "left", "s")])
        self.assertIsNone(d.partner)

    def test_connection_state(self) -> None:
        s = self.broker.connect(SOURCE, self.opened.source_token, None, self.peer("s"))
        record = self.broker.describe(self.opened.tunnel_id)
        self.assertTrue(record.source.connected)
        self.assertFalse(record.destination.connected)
        self.clock.advance(7)
        self.broker.disconnect(s)
        self.assertFalse(record.source.connected)
        self.assertEqual(record.source.last_updated_at, 1007)

    def test_rotate_source(self) -> None:
        self.broker.connect(SOURCE, self.opened.source_token, CT1, self.peer("s"))
        self.broker.connect(DESTINATION, self.opened.destination_token, None, self.peer("d"))
        del self.events[:]
        rotated = self.broker.rotate(self.opened.tunnel_id, SOURCE)
        self.assertIsNone(rotated.destination_token)
        self.assertIsNotNone(rotated.source_token)
        self.assertEqual(self.events, [
            ("d", "left", "s"),
            ("s", "close", 1000, "access token rotated"),
        ])
        self.refused(401, SOURCE, self.opened.source_token, CT1)
        # the new token is fresh: any client token may claim it
        assert rotated.source_token is not None
        self.broker.connect(SOURCE, rotated.source_token, CT2, self.peer("s2"))
        self.assertTrue(self.broker.describe(self.opened.tunnel_id).source.connected)

    def test_rotation_keeps_routing_key(self) -> None:
        """
        Rotated tokens carry the tunnel's routing key, as the first ones do,
        so that a load balancer sends them to the node the tunnel is on.
        """
        key = token_routing_key(self.opened.source_token)
        self.assertIsNotNone(key)
        self.assertEqual(token_routing_key(self.opened.destination_token), key)
        rotated = self.broker.rotate(self.opened.tunnel_id, ALL)
        assert rotated.source_token is not None and rotated.destination_token is not None
        self.assertEqual(token_routing_key(rotated.source_token), key)
        self.assertEqual(token_routing_key(rotated.destination_token), key)
        other = self.broker.open_tunnel(["SSH"])
        self.assertNotEqual(token_routing_key(other.source_token), key)

    def test_rotate_all_and_destination(self) -> None:
        rotated = self.broker.rotate(self.opened.tunnel_id, ALL)
        self.assertIsNotNone(rotated.source_token)
        self.assertIsNotNone(rotated.destination_token)
        rotated2 = self.broker.rotate(self.opened.tunnel_id, DESTINATION, services=["A", "B"],
                                      thing_name="t")
        self.assertIsNone(rotated2.source_token)
        self.assertEqual(self.broker.describe(self.opened.tunnel_id).services, ("A", "B"))
        assert rotated.source_token is not None
        self.broker.connect(SOURCE, rotated.source_token, None, self.peer("s"))

    def test_rotate_errors(self) -> None:
        self.assertRaises(ResourceNotFound, self.broker.rotate, "nope", ALL)
        self.assertRaises(LimitExceeded, self.broker.rotate, self.opened.tunnel_id,
                          DESTINATION, services=["a", "b", "c", "d"])
        self.broker.close_tunnel(self.opened.tunnel_id)
        self.assertRaises(ResourceNotFound, self.broker.rotate, self.opened.tunnel_id, ALL)


class ListAndTagTests(BrokerTestCase):
    """Listing newest first in pages, by thing name, and tagging by ARN."""

    def test_list_newest_first_paged(self) -> None:
        broker = Broker(self.clock)
        ids = [broker.open_tunnel(thing_name="t" if i % 2 else None).tunnel_id for i in range(7)]
        page, token = broker.list_tunnels(max_results=3)
        self.assertEqual([r.tunnel_id for r in page], ids[::-1][:3])
        self.assertIsNotNone(token)
        broker.open_tunnel()  # a new tunnel does not disturb paging
        page2, token2 = broker.list_tunnels(max_results=3, next_token=token)
        self.assertEqual([r.tunnel_id for r in page2], ids[::-1][3:6])
        page3, token3 = broker.list_tunnels(max_results=3, next_token=token2)
        self.assertEqual([r.tunnel_id for r in page3], ids[:1])
        self.assertIsNone(token3)

    def test_list_thing_name(self) -> None:
        ids = [self.broker.open_tunnel(thing_name=n).tunnel_id for n in ("a", "b", "a")]
        page, token = self.broker.list_tunnels(thing_name="a")
        self.assertEqual([r.tunnel_id for r in page], [ids[2], ids[0]])
        self.assertIsNone(token)

    def test_list_exact_page(self) -> None:
        self.broker.open_tunnel()
        page, token = self.broker.list_tunnels(max_results=1)
        self.assertEqual(len(page), 1)
        self.assertIsNone(token)

    def test_bad_next_token(self) -> None:
        self.assertRaises(InvalidRequest, self.broker.list_tunnels, next_token="junk")

    def test_tags(self) -> None:
        opened = self.broker.open_tunnel(tags=[("a", "1")])
        arn = opened.tunnel_arn
        self.broker.tag(arn, [("b", "2"), ("a", "3")])
        self.assertEqual(self.broker.tags(arn), {"a": "3", "b": "2"})
        self.broker.untag(arn, ["a", "zzz"])
        self.assertEqual(self.broker.tags(arn), {"b": "2"})
        for call in (lambda a: self.broker.tag(a, []), lambda a: self.broker.untag(a, []),
                     self.broker.tags):
            self.assertRaises(ResourceNotFound, call, arn + "x")
            self.assertRaises(ResourceNotFound, call, "arn:other")


class StoreStateTests(SynchronousTestCase):
    """
    What must outlive a broker is in its store: a new broker over the same
    store (as after a restart with a persistent store) carries on.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.store = MemoryTunnelStore()
        self.limits = Limits(max_open_tunnels=2)

    def broker(self) -> Broker:
        return Broker(self.clock, store=self.store, limits=self.limits)

    def test_open_count_from_store(self) -> None:
        first = self.broker()
        a = first.open_tunnel()
        first.open_tunnel()
        second = self.broker()
        self.assertRaises(LimitExceeded, second.open_tunnel)
        second.close_tunnel(a.tunnel_id)
        self.assertEqual(self.store.open_count(), 1)
        second.open_tunnel()
        self.assertRaises(LimitExceeded, first.open_tunnel)

    def test_sequence_from_store(self) -> None:
        first = self.broker()
        a = first.open_tunnel()
        first.close_tunnel(a.tunnel_id, delete=True)
        b = first.open_tunnel()
        second = self.broker()
        c = second.open_tunnel()
        page, token = second.list_tunnels(max_results=1)
        self.assertEqual([r.tunnel_id for r in page], [c.tunnel_id])
        page, token = second.list_tunnels(max_results=1, next_token=token)
        self.assertEqual([r.tunnel_id for r in page], [b.tunnel_id])
        self.assertIsNone(token)
        self.assertEqual(
            [self.store.get(t.tunnel_id).sequence for t in (b, c)],  # type: ignore[union-attr]
            [2, 3],
        )
