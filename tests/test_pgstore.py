"""
Tests for L{lpxy.tunnelservice.pgstore}: tunnels in PostgreSQL, the same
schema and migrations as SQLite, several nodes' stores on one database
following each other, and URLs that cannot be used. They run against a
throwaway server (L{tests.support.postgres}) and skip where PostgreSQL is
not installed.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.internet.threads import deferToThread
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import TestCase

from lpxy.tunnelservice.broker import Broker, ResourceNotFound
from lpxy.tunnelservice.pgstore import (
    RESERVE,
    PostgresTunnelStore,
    open_postgres_store,
    redact,
)
from lpxy.tunnelservice.schema import LATEST, POSTGRESQL, migrate
from lpxy.tunnelservice.sqlstore import StoreError, open_store
from lpxy.tunnelservice.store import CLOSED, DESTINATION, OPEN, SOURCE, TunnelRecord
from lpxy.tunnelservice.tokens import (
    CLOSED_TUNNEL,
    SPENT_TOKEN,
    UNKNOWN_TOKEN,
    HandshakeRefused,
)
from lpxy.wire import NEWEST_SUBPROTOCOL
from tests import test_sqlstore
from tests.support import postgres
from tests.support.installed import installed_copy, twistd_argv
from tests.support.processes import ChildProcess, spawn
from tests.support.tunnelservice import RecordingPeer, api_client, start_tunnelservice
from tests.test_sqlstore import fields, record


def rows(url: str, sql: str) -> list[tuple[Any, ...]]:
    import psycopg

    with psycopg.connect(url) as connection:
        return list(connection.execute(sql).fetchall())


Predicate = Callable[[TunnelRecord | None], bool]


class Node:
    """One node: a broker over its own store on the shared database."""

    def __init__(self, test: TestCase, url: str, name: str) -> None:
        self.store = open_postgres_store(url)
        test.addCleanup(self.store.close)
        self.clock = Clock()
        self.clock.advance(10_000)
        self.broker = Broker(self.clock, store=self.store)
        self.changes: list[tuple[str, str | None]] = []
        self._waiting: list[tuple[str, Predicate, defer.Deferred[TunnelRecord | None]]] = []
        self.store.on_changed(self._changed)

    def _changed(self, tunnel_id: str, record: TunnelRecord | None) -> None:
        self.changes.append((tunnel_id, None if record is None else record.status))
        for entry in list(self._waiting):
            if entry[0] == tunnel_id and entry[1](record):
                self._waiting.remove(entry)
                entry[2].callback(record)

    def until(
        self, tunnel_id: str, predicate: Predicate = lambda r: r is not None
    ) -> defer.Deferred[TunnelRecord | None]:
        """
        Fires with the view's record of the tunnel once it satisfies
        C{predicate}: at once if it does now, otherwise when another node's
        change makes it so.
        """
        now = self.store.get(tunnel_id)
        if predicate(now):
            return defer.succeed(now)
        d: defer.Deferred[TunnelRecord | None] = defer.Deferred()
        self._waiting.append((tunnel_id, predicate, d))
        return d


class TwoNodeTests(TestCase):
    """
    Two brokers, each over its own store on one database, see each other's
    work. (The management API answers a call once its change is written, as
    C{when_written} here.)
    """

    timeout = 30

    def setUp(self) -> None:
        self.url = url = postgres.database()
        self.a = Node(self, url, "a")
        self.b = Node(self, url, "b")
        self.events: list[tuple[object, ...]] = []

    def refusal(self, node: Node, mode: str, token: str) -> str:
        e = self.assertRaises(
            HandshakeRefused, node.broker.connect, mode, token, None,
            RecordingPeer("x", self.events),
        )
        return e.reason

    async def test_open_then_handshake_on_the_other_node(self) -> None:
        """
        A handshake on B at once after OpenTunnel on A succeeds: B reads the
        token's tunnel from the database before judging it.
        """
        opened = self.a.broker.open_tunnel(services=["SSH"])
        await self.a.store.when_written()
        await self.b.broker.refresh(opened.source_token)
        attachment = self.b.broker.connect(
            SOURCE, opened.source_token, None, RecordingPeer("s", self.events)
        )
        self.assertEqual((attachment.tunnel_id, attachment.services),
                         (opened.tunnel_id, ("SSH",)))
        # A hears of B's handshake: the end is spent and connected.
        record = await self.a.until(opened.tunnel_id, lambda r: r is not None and r.source.spent)
        assert record is not None
        self.assertEqual((record.source.spent, record.source.connected), (True, True))
        self.assertEqual(self.b.changes, [(opened.tunnel_id, OPEN)])

    async def test_open_reaches_the_other_view(self) -> None:
        first = self.a.broker.open_tunnel(thing_name="t")
        second = self.b.broker.open_tunnel(thing_name="t")
        await self.b.until(first.tunnel_id)
        await self.a.until(second.tunnel_id)
        for node in (self.a, self.b):
            self.assertEqual(node.broker.describe(first.tunnel_id).thing_name, "t")
            page, _ = node.broker.list_tunnels(thing_name="t")
            self.assertEqual({r.tunnel_id for r in page}, {first.tunnel_id, second.tunnel_id})
            self.assertEqual(node.store.open_count(), 2)
        self.assertNotEqual(
            self.a.broker.describe(first.tunnel_id).sequence,
            self.a.broker.describe(second.tunnel_id).sequence,
        )
        # Own changes are not reported back.
        self.assertNotIn(first.tunnel_id, [tid for tid, _ in self.a.changes])

    async def test_close_reaches_the_other_node(self) -> None:
        opened = self.a.broker.open_tunnel()
        await self.b.until(opened.tunnel_id)
        self.b.broker.close_tunnel(opened.tunnel_id)
        record = await self.a.until(
            opened.tunnel_id, lambda r: r is not None and r.status == CLOSED
        )
        assert record is not None
        self.assertEqual(self.a.broker.describe(opened.tunnel_id).status, CLOSED)
        self.assertEqual(self.refusal(self.a, SOURCE, opened.source_token), CLOSED_TUNNEL)
        self.assertEqual(self.a.store.open_count(), 0)

    async def test_closed_elsewhere_refused_before_the_notification(self) -> None:
        """
        A token closed on B is refused on A even if A's handshake comes
        before B's notification: A reads the tunnel first.
        """
        opened = self.a.broker.open_tunnel()
        await self.a.store.when_written()
        await self.b.broker.refresh(opened.source_token)
        self.b.broker.close_tunnel(opened.tunnel_id)
        await self.b.store.when_written()
        await self.a.broker.refresh(opened.source_token)
        self.assertEqual(self.refusal(self.a, SOURCE, opened.source_token), CLOSED_TUNNEL)

    async def test_rotation_reaches_the_other_node(self) -> None:
        opened = self.a.broker.open_tunnel()
        await self.b.until(opened.tunnel_id)
        old_hash = self.a.broker.describe(opened.tunnel_id).destination.token_hash
        rotated = self.b.broker.rotate(opened.tunnel_id, DESTINATION)
        assert rotated.destination_token is not None
        await self.a.until(
            opened.tunnel_id, lambda r: r is not None and r.destination.token_hash != old_hash
        )
        self.assertEqual(
            self.refusal(self.a, DESTINATION, opened.destination_token), UNKNOWN_TOKEN
        )
        self.a.broker.connect(
            DESTINATION, rotated.destination_token, None, RecordingPeer("d", self.events)
        )

    async def test_delete_reaches_the_other_node(self) -> None:
        opened = self.a.broker.open_tunnel()
        self.a.broker.tag(opened.tunnel_arn, [("k", "v")])
        await self.b.until(opened.tunnel_id, lambda r: r is not None and r.tags == {"k": "v"})
        self.assertEqual(self.b.broker.tags(opened.tunnel_arn), {"k": "v"})
        self.a.broker.close_tunnel(opened.tunnel_id, delete=True)
        await self.b.until(opened.tunnel_id, lambda r: r is None)
        self.assertRaises(ResourceNotFound, self.b.broker.describe, opened.tunnel_id)
        self.assertEqual(self.b.changes[-1], (opened.tunnel_id, None))

    async def test_both_nodes_write_one_tunnel(self) -> None:
        """
        Two nodes changing one tunnel at the same moment: both transactions
        commit (the row lock makes them take turns) and both views end with
        the later write.
        """
        opened = self.a.broker.open_tunnel()
        await self.b.until(opened.tunnel_id)
        self.a.broker.tag(opened.tunnel_arn, [("by", "a")])
        self.b.broker.tag(opened.tunnel_arn, [("by", "b")])
        await defer.gatherResults([self.a.store.when_written(), self.b.store.when_written()])
        self.assertEqual((self.a.store.failed_writes, self.b.store.failed_writes), (0, 0))
        stored = rows(self.url, "SELECT tag_value FROM tunnel_tags")
        self.assertEqual(len(stored), 1)
        last = {"by": stored[0][0]}
        for node in (self.a, self.b):
            await node.until(opened.tunnel_id, lambda r: r is not None and r.tags == last)

    async def test_sequence_numbers_unique_across_nodes(self) -> None:
        numbers = [self.a.store.next_sequence() for _ in range(RESERVE * 2)]
        numbers += [self.b.store.next_sequence() for _ in range(RESERVE * 2)]
        self.assertEqual(len(set(numbers)), len(numbers))


class _Answer(Protocol):
    """Sends a WebSocket upgrade request; fires C{answer} with the status and the body."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.answer: defer.Deferred[tuple[int, str]] = defer.Deferred()
        self.received = b""

    def connectionMade(self) -> None:
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if self.received.startswith(b"HTTP/1.1 101 ") and b"\r\n\r\n" in self.received:
            self.answer.callback((101, ""))
            self.transport.loseConnection()

    def connectionLost(self, reason: object = None) -> None:
        if not self.answer.called:
            head, _, body = self.received.partition(b"\r\n\r\n")
            self.answer.callback((int(head.split(b" ", 2)[1]), body.decode().strip()))


async def handshake(port: int, mode: str, token: str) -> tuple[int, str]:
    """What a tunnel service on C{port} answers a handshake with: status, body."""
    from twisted.internet import reactor

    request = (
        f"GET /tunnel?local-proxy-mode={mode} HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        f"Sec-WebSocket-Protocol: {NEWEST_SUBPROTOCOL}\r\naccess-token: {token}\r\n\r\n"
    ).encode()
    client = _Answer(request)
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
    return await client.answer


class HandshakeAcrossNodesTests(TestCase):
    """
    Two tunnel services on one database: a tunnel opened (or closed) through
    one is admitted (or refused) by the other's data plane at once, the
    handshake waiting for the database rather than for the notification.
    """

    timeout = 30

    async def start(self) -> None:
        url = postgres.database()
        self.a = await start_tunnelservice(self, store=open_postgres_store(url))
        self.b = await start_tunnelservice(self, store=open_postgres_store(url))

    async def test_opened_on_a_admitted_by_b(self) -> None:
        await self.start()
        opened = self.a.open_tunnel(["SSH"])
        await self.a.broker.store.when_written()  # as the API does before answering
        self.assertEqual(await handshake(self.b.port, SOURCE, opened.source_token), (101, ""))
        # The spent token, as B wrote it, is refused by A.
        await self.b.broker.store.when_written()
        self.assertEqual(
            await handshake(self.a.port, SOURCE, opened.source_token), (401, SPENT_TOKEN)
        )

    async def test_closed_on_a_refused_by_b(self) -> None:
        await self.start()
        opened = self.a.open_tunnel(["SSH"])
        self.a.close_tunnel(opened.tunnel_id)
        await self.a.broker.store.when_written()
        self.assertEqual(
            await handshake(self.b.port, DESTINATION, opened.destination_token),
            (401, CLOSED_TUNNEL),
        )


class ApiAcrossNodesTests(TestCase):
    """
    The management API of two services on one database: a call naming a
    tunnel reads it from the database first, so it finds a tunnel another
    node opened a moment ago even before the notification (here: never, B's
    listener stopped).
    """

    timeout = 60

    async def test_calls_naming_a_tunnel_opened_elsewhere(self) -> None:
        url = postgres.database()
        a = await start_tunnelservice(self, store=open_postgres_store(url))
        b_store = open_postgres_store(url)
        b = await start_tunnelservice(self, store=b_store)
        assert b_store._listener is not None
        await b_store._listener.stop()
        b_store._listener = None

        def calls() -> dict[str, Any]:
            on_a, on_b = api_client(a.api_url), api_client(b.api_url)
            opened = on_a.open_tunnel(destinationConfig={"services": ["SSH"]})
            tunnel_id = opened["tunnelId"]
            described = on_b.describe_tunnel(tunnelId=tunnel_id)["tunnel"]
            on_b.tag_resource(resourceArn=opened["tunnelArn"], tags=[{"key": "k", "value": "v"}])
            tags = on_a.list_tags_for_resource(resourceArn=opened["tunnelArn"])["tags"]
            on_b.close_tunnel(tunnelId=tunnel_id)
            closed = on_a.describe_tunnel(tunnelId=tunnel_id)["tunnel"]
            return {"described": described, "tags": tags, "closed": closed}

        result = await deferToThread(calls)
        self.assertEqual(result["described"]["status"], "OPEN")
        self.assertEqual(result["described"]["destinationConfig"]["services"], ["SSH"])
        self.assertEqual(result["tags"], [{"key": "k", "value": "v"}])
        self.assertEqual(result["closed"]["status"], "CLOSED")


class PostgresBrokerRestartTests(test_sqlstore.BrokerRestartTests):
    """L{BrokerRestartTests}, over PostgreSQL instead of SQLite."""

    def open(self) -> Any:
        if not hasattr(self, "url"):
            self.url = postgres.database()
        store = open_postgres_store(self.url)
        self.addCleanup(store.close)
        return store

    def stored_ids(self) -> list[str]:
        return [row[0] for row in rows(self.url, "SELECT tunnel_id FROM tunnels ORDER BY sequence")]


class SchemaTests(TestCase):
    """The same schema versions as SQLite, and the upgrade of older databases."""

    def setUp(self) -> None:
        self.url = postgres.database()

    async def test_new_database_at_latest(self) -> None:
        await open_postgres_store(self.url).close()
        await open_postgres_store(self.url).close()
        self.assertEqual(rows(self.url, "SELECT version FROM schema_version"), [(LATEST,)])

    async def test_upgrade_from_v2_keeps_numbering(self) -> None:
        import psycopg

        with psycopg.connect(self.url) as connection:
            with connection.cursor() as cursor:
                self.assertEqual(migrate(cursor, POSTGRESQL, target=2), (0, 2))
                cursor.execute("INSERT INTO counters VALUES ('last_sequence', 41)")
        store = open_postgres_store(self.url)
        self.addCleanup(store.close)
        self.assertEqual(store.next_sequence(), 42)
        self.assertEqual(rows(self.url, "SELECT version FROM schema_version"), [(LATEST,)])

    async def test_newer_schema_refused(self) -> None:
        await open_postgres_store(self.url).close()
        postgres.server().sql(
            f"UPDATE schema_version SET version = {LATEST + 1}", dbname(self.url)
        )
        e = self.assertRaises(StoreError, open_postgres_store, self.url)
        self.assertIn("newer than this lpxy knows", str(e))

    async def test_round_trip(self) -> None:
        store = open_postgres_store(self.url)
        r = record("a", store.next_sequence())
        r.source.client_token_hash = b"\x00client\xff"
        r.source.spent = True
        # Other nodes' peers stay connected while this one restarts.
        r.destination.connected = True
        r.destination.node = "node-2"
        store.add(r)
        await store.close()
        again = open_postgres_store(self.url)
        self.addCleanup(again.close)
        kept = again.get("a")
        assert kept is not None
        self.assertEqual(fields(kept), fields(r))
        self.assertEqual(kept.status, OPEN)


def dbname(url: str) -> str:
    return url.split("/")[3].split("?")[0]


class URLTests(TestCase):
    """URLs that cannot be used: clear errors, never the password."""

    def test_redact(self) -> None:
        self.assertEqual(redact("postgresql://u:pw@h:5/db"), "postgresql://u:***@h:5/db")
        self.assertEqual(redact("postgres://h/db?password=pw&x=1"),
                         "postgres://h/db?password=***&x=1")
        self.assertEqual(redact("postgresql://u@h/db"), "postgresql://u@h/db")

    def test_unreachable(self) -> None:
        e = self.assertRaises(
            StoreError, open_store, "postgresql://u:Secret99@127.0.0.1:1/db?connect_timeout=2"
        )
        self.assertIn("cannot use postgresql://u:***@127.0.0.1:1/db", str(e))
        self.assertNotIn("Secret99", str(e))

    def test_malformed(self) -> None:
        e = self.assertRaises(StoreError, open_store, "postgresql://u:Secret99@h/db?nonsense=1")
        self.assertIn("nonsense", str(e))
        self.assertNotIn("Secret99", str(e))

    def test_wrong_password(self) -> None:
        server = postgres.server()
        url = server.tcp_url("postgres", password="Wrong-Secret")
        e = self.assertRaises(StoreError, open_store, url)
        self.assertIn("password authentication failed", str(e))
        self.assertNotIn("Wrong-Secret", str(e))

    async def test_postgres_scheme(self) -> None:
        """C{postgres://} names a PostgreSQL database as C{postgresql://} does."""
        url = postgres.database().replace("postgresql://", "postgres://", 1)
        store = open_store(url)
        self.assertIsInstance(store, PostgresTunnelStore)
        await store.close()

    def test_psycopg_missing(self) -> None:
        """Without psycopg: what to install, naming the extra."""
        saved = sys.modules.get("psycopg")
        sys.modules["psycopg"] = None  # type: ignore[assignment]

        def restore() -> None:
            if saved is None:
                del sys.modules["psycopg"]
            else:
                sys.modules["psycopg"] = saved

        self.addCleanup(restore)
        e = self.assertRaises(StoreError, open_store, "postgresql://h/db")
        self.assertIn("pip install 'lpxy[postgresql]'", str(e))

    async def test_password_never_logged(self) -> None:
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        server = postgres.server()
        store = open_store(server.tcp_url(dbname(postgres.database())))
        assert isinstance(store, PostgresTunnelStore)
        self.assertIn(postgres.PASSWORD_USER, store._shown)
        self.assertNotIn(postgres.PASSWORD, store._shown)
        text = repr([dict(e) for e in events])
        self.assertIn("Tunnel state in", text)
        self.assertNotIn(postgres.PASSWORD, text)
        await store.close()


class ListenerTests(TestCase):
    """The listening connection lost: reconnected, and everything reloaded."""

    timeout = 30

    async def test_reconnects_and_reloads(self) -> None:
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        url = postgres.database()
        a, b = Node(self, url, "a"), Node(self, url, "b")
        postgres.server().sql(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            f"WHERE datname = '{dbname(url)}' AND query = 'LISTEN lpxy_tunnels'"
        )
        # Opened while (or just before) B's listener is gone: B's resync finds it.
        opened = a.broker.open_tunnel(thing_name="while-away")
        await a.store.when_written()
        record = await b.until(opened.tunnel_id)
        assert record is not None
        self.assertEqual(record.thing_name, "while-away")
        texts = [e["log_format"] for e in events]
        self.assertTrue(any("Lost the connection listening" in t for t in texts), texts)
        self.assertTrue(any("Listening again" in t for t in texts), texts)
        # And it listens again: a later change arrives as a notification.
        a.broker.close_tunnel(opened.tunnel_id)
        await b.until(opened.tunnel_id, lambda r: r is not None and r.status == CLOSED)


class TwistdTests(TestCase):
    """C{twistd -n tunnelservice --db postgresql://...} from the installed copy."""

    timeout = 60

    def setUp(self) -> None:
        installed_copy()

    def spawn(self, db: str) -> ChildProcess:
        return spawn(self, twistd_argv(
            "-n", "--pidfile=", "tunnelservice", "--port", "tcp:0:interface=127.0.0.1",
            "--db", db,
        ))

    async def test_unreachable(self) -> None:
        """One line naming --db, without the password; exit status 1."""
        process = self.spawn("postgresql://lpxy:Secret99@127.0.0.1:1/db?connect_timeout=2")
        self.assertEqual(await process.ended, 1)
        self.assertIn("tunnelservice: --db: cannot use postgresql://lpxy:***@127.0.0.1:1/db",
                      process.output)
        self.assertNotIn("Secret99", process.output)
        self.assertNotIn("Traceback", process.output)

    async def test_serves_from_postgres(self) -> None:
        """Two nodes on one database: a tunnel opened through one is described by the other."""
        url = postgres.server().tcp_url(dbname(postgres.database()))
        first, second = self.spawn(url), self.spawn(url)
        ports = []
        for process in (first, second):
            await process.wait_for("Tunnel service ready")
            self.assertNotIn(postgres.PASSWORD, process.output)
            self.assertIn(f"postgresql://{postgres.PASSWORD_USER}:***@", process.output)
            found = re.search(r"Tunnel service listening on 127\.0\.0\.1 port (\d+)",
                              process.output)
            assert found is not None
            ports.append(int(found.group(1)))

        def open_on_one_describe_on_other() -> Any:
            opened = api_client(f"http://127.0.0.1:{ports[0]}").open_tunnel(
                destinationConfig={"services": ["SSH"]}
            )
            return api_client(f"http://127.0.0.1:{ports[1]}").describe_tunnel(
                tunnelId=opened["tunnelId"]
            )

        described = await deferToThread(open_on_one_describe_on_other)
        self.assertEqual(described["tunnel"]["status"], "OPEN")
        self.assertEqual(described["tunnel"]["destinationConfig"]["services"], ["SSH"])
        for process in (first, second):
            process.signal("TERM")
            self.assertEqual(await process.ended, 0)


class WriteRetryTests(TestCase):
    """A failed write is tried again later, with the tunnel's state by then."""

    async def test_failed_write_retried(self) -> None:
        url = postgres.database()
        store = open_postgres_store(url)
        self.addCleanup(store.close)
        clock = store._clock = Clock()
        store.add(record("a", store.next_sequence()))
        clash = record("b", store.next_sequence())
        clash.source.token_hash = b"a-s"  # token digests are unique in the database
        store.add(clash)
        import psycopg

        with self.assertRaises(psycopg.errors.UniqueViolation):
            await store.when_written()
        self.assertEqual(len(self.flushLoggedErrors(psycopg.errors.UniqueViolation)), 1)
        self.assertEqual(store.failed_writes, 1)
        self.assertEqual(rows(url, "SELECT tunnel_id FROM tunnels"), [("a",)])
        # Repaired in memory, without a save: the retry writes it.
        clash.source.token_hash = b"b-s"
        self.assertEqual(clock.getDelayedCalls()[0].getTime(), 1.0)
        clock.advance(1)
        await store.when_written()
        self.assertEqual(
            rows(url, "SELECT tunnel_id FROM tunnels ORDER BY sequence"), [("a",), ("b",)]
        )
        self.assertEqual(clock.getDelayedCalls(), [])
