"""
Tests for L{lpxy.tunnelservice.sqlstore} and L{lpxy.tunnelservice.schema}:
tunnels kept in SQLite, written through off the reactor thread, read back
by the next run; the schema's upgrade path.
"""

from __future__ import annotations

import os
import sqlite3
from typing import Any

from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from lpxy.tunnelservice.broker import Broker, Limits, ResourceNotFound
from lpxy.tunnelservice.schema import LATEST, MIGRATIONS, SQLITE, SchemaError, migrate
from lpxy.tunnelservice.sqlstore import (
    SQLTunnelStore,
    StoreError,
    open_sqlite_store,
    open_store,
)
from lpxy.tunnelservice.store import (
    CLOSED,
    DESTINATION,
    OPEN,
    SOURCE,
    EndRecord,
    MemoryTunnelStore,
    TunnelRecord,
)
from lpxy.tunnelservice.tokens import (
    CLIENT_TOKEN_MISMATCH,
    CLOSED_TUNNEL,
    SPENT_TOKEN,
    UNKNOWN_TOKEN,
    HandshakeRefused,
)
from tests.support.tunnelservice import RecordingPeer


def record(tunnel_id: str, sequence: int, created_at: float = 1000.0) -> TunnelRecord:
    return TunnelRecord(
        tunnel_id=tunnel_id,
        arn="arn:" + tunnel_id,
        sequence=sequence,
        description="about " + tunnel_id,
        thing_name="thing-" + tunnel_id,
        services=("SSH", "HTTP"),
        lifetime_minutes=30,
        created_at=created_at,
        last_updated_at=created_at + 1,
        source=EndRecord(token_hash=tunnel_id.encode() + b"-s", last_updated_at=created_at),
        destination=EndRecord(
            token_hash=tunnel_id.encode() + b"-d", last_updated_at=created_at
        ),
        tags={"z": "1", "a": "2"},
    )


def fields(r: TunnelRecord) -> dict[str, Any]:
    """Everything a record holds, comparable."""
    ends = {
        mode: (e.token_hash, e.client_token_hash, e.spent, e.connected, e.last_updated_at,
               e.node)
        for mode in (SOURCE, DESTINATION)
        for e in (r.end(mode),)
    }
    return {
        "tunnel_id": r.tunnel_id, "arn": r.arn, "sequence": r.sequence,
        "description": r.description, "thing_name": r.thing_name,
        "services": r.services, "lifetime_minutes": r.lifetime_minutes,
        "created_at": r.created_at, "last_updated_at": r.last_updated_at,
        "expires_at": r.expires_at, "status": r.status,
        "tags": list(r.tags.items()), "ends": ends,
    }


def query(path: str, sql: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(path) as connection:
        rows = connection.execute(sql).fetchall()
    connection.close()
    return rows


class StoreTestCase(TestCase):
    """Opens SQLite stores on one temporary file; cleanups close them."""

    def setUp(self) -> None:
        self.path = self.mktemp()

    def open(self) -> SQLTunnelStore:
        store = open_sqlite_store(self.path)
        self.addCleanup(store.close)
        return store

    async def reopen(self, store: SQLTunnelStore) -> SQLTunnelStore:
        """Close C{store} (writing what is pending) and open the file again."""
        await store.close()
        return self.open()


class SQLTunnelStoreTests(StoreTestCase):
    """Every change is written through and read back by the next run."""

    async def test_round_trip(self) -> None:
        store = self.open()
        a, b = record("a", 1), record("b", 2)
        a.source.client_token_hash = b"client"
        a.source.spent = True
        a.source.connected = True
        a.source.node = "node-1"
        b.status = CLOSED
        store.add(a)
        store.add(b)
        expected = [fields(b), fields(a)]
        # Nobody is connected after a restart.
        expected[1]["ends"][SOURCE] = (b"a-s", b"client", True, False, 1000.0, None)
        again = await self.reopen(store)
        self.assertEqual([fields(r) for r in again.newest_first()], expected)
        self.assertEqual(again.open_count(), 1)
        found = again.find_token(b"a-s")
        assert found is not None
        self.assertEqual((found[0].tunnel_id, found[1]), ("a", SOURCE))
        self.assertEqual(query(self.path, "SELECT connected FROM tunnel_ends"), [(0,)] * 4)

    async def test_save_writes_the_whole_new_state(self) -> None:
        store = self.open()
        r = record("a", 1)
        store.add(r)
        r.source.token_hash = b"rotated"
        r.services = ("VNC",)
        r.tags = {"a": "3", "new": "4"}
        r.status = CLOSED
        r.last_updated_at = 5000.0
        store.save(r)
        again = await self.reopen(store)
        stored = again.get("a")
        assert stored is not None
        self.assertEqual(fields(stored), fields(r))
        self.assertIsNone(again.find_token(b"a-s"))
        self.assertIsNotNone(again.find_token(b"rotated"))

    async def test_remove(self) -> None:
        store = self.open()
        store.add(record("a", 1))
        store.add(record("b", 2))
        store.remove("a")
        store.remove("unknown")
        again = await self.reopen(store)
        self.assertEqual([r.tunnel_id for r in again.newest_first()], ["b"])
        for table in ("tunnel_ends", "tunnel_services", "tunnel_tags"):
            self.assertEqual(
                query(self.path, f"SELECT DISTINCT tunnel_id FROM {table}"), [("b",)]
            )

    async def test_sequence_survives_removal(self) -> None:
        store = self.open()
        numbers = [store.next_sequence() for _ in range(3)]
        store.add(record("a", numbers[-1]))
        store.remove("a")
        again = await self.reopen(store)
        self.assertGreater(again.next_sequence(), numbers[-1])

    async def test_changes_during_a_write_are_batched(self) -> None:
        """
        The first change starts a transaction at once; the changes made
        while it runs go in one more, each tunnel as it is by then.
        """
        store = self.open()
        transactions: list[list[str]] = []
        run = store._pool.runInteraction

        def counting(f: Any, dialect: Any, changes: Any, *rest: Any) -> Any:
            transactions.append([tunnel_id for tunnel_id, _ in changes])
            return run(f, dialect, changes, *rest)

        store._pool.runInteraction = counting  # type: ignore[method-assign]
        r = record("a", store.next_sequence())
        store.add(r)
        for i in range(10):
            r.tags[f"k{i}"] = str(i)
            store.save(r)
            store.add(record(f"t{i}", store.next_sequence()))
        await store.when_written()
        self.assertEqual(transactions, [["a"], ["a"] + [f"t{i}" for i in range(10)]])
        again = await self.reopen(store)
        stored = again.get("a")
        assert stored is not None
        self.assertEqual(fields(stored), fields(r))
        self.assertEqual(again.next_sequence(), 12)

    async def test_failed_write_logged_and_repaired(self) -> None:
        """
        A transaction that fails is logged and the memory view carries on;
        the tunnel's next change writes its whole state again.
        """
        store = self.open()
        store.add(record("a", 1))
        clash = record("b", 2)
        clash.source.token_hash = b"a-s"  # the database keeps token digests unique
        store.add(clash)
        # Whoever waits for those changes learns they are not kept.
        await self.assertFailure(store.when_written(), sqlite3.IntegrityError)
        self.assertEqual(len(self.flushLoggedErrors(sqlite3.IntegrityError)), 1)
        self.assertEqual(store.failed_writes, 1)
        self.assertIsNotNone(store.get("b"))
        clash.source.token_hash = b"b-s"
        store.save(clash)
        again = await self.reopen(store)
        self.assertEqual([r.tunnel_id for r in again.newest_first()], ["b", "a"])

    async def test_close_writes_pending_changes(self) -> None:
        store = self.open()
        for i in range(5):
            store.add(record(f"t{i}", i + 1))
        await store.close()
        self.assertEqual(query(self.path, "SELECT count(*) FROM tunnels"), [(5,)])
        store.add(record("late", 9))
        self.assertEqual(query(self.path, "SELECT count(*) FROM tunnels"), [(5,)])


class SchemaTests(StoreTestCase):
    """Versions, the upgrade from version 1, and databases this code cannot use."""

    def version(self) -> int:
        return int(query(self.path, "SELECT version FROM schema_version")[0][0])

    async def test_new_database_at_latest(self) -> None:
        await self.open().close()
        self.assertEqual(self.version(), LATEST)
        self.assertEqual([m.version for m in MIGRATIONS], list(range(1, LATEST + 1)))
        await self.open().close()
        self.assertEqual(query(self.path, "SELECT count(*) FROM schema_version"), [(1,)])

    def make_v1(self) -> None:
        """A database as version 1 wrote it: deadlines derived, not stored."""
        connection = sqlite3.connect(self.path)
        self.assertEqual(migrate(connection.cursor(), SQLITE, target=1), (0, 1))
        connection.executescript("""
            INSERT INTO tunnels VALUES ('old', 'arn:old', 7, NULL, 'thing', 10,
                                        100.0, 150.0, 'OPEN');
            INSERT INTO tunnel_ends VALUES ('old', 'source', x'01', x'02', 1, 1, 120.0);
            INSERT INTO tunnel_ends VALUES ('old', 'destination', x'03', NULL, 0, 0, 100.0);
            INSERT INTO tunnel_services VALUES ('old', 0, 'SSH');
            INSERT INTO tunnel_tags VALUES ('old', 0, 'k', 'v');
            INSERT INTO counters VALUES ('last_sequence', 9);
        """)
        connection.commit()
        connection.close()

    async def test_upgrade_from_v1(self) -> None:
        self.make_v1()
        store = self.open()
        self.assertEqual(self.version(), LATEST)
        old = store.get("old")
        assert old is not None
        self.assertEqual(old.expires_at, 100.0 + 10 * 60)
        self.assertEqual(
            (old.status, old.services, old.tags, old.thing_name),
            (OPEN, ("SSH",), {"k": "v"}, "thing"),
        )
        self.assertEqual(
            (old.source.client_token_hash, old.source.spent, old.source.connected),
            (b"\x02", True, False),
        )
        self.assertEqual(store.find_token(b"\x03"), (old, DESTINATION))
        self.assertEqual(store.next_sequence(), 10)
        indexes = query(self.path, "SELECT name FROM sqlite_master WHERE type = 'index'")
        self.assertIn(("tunnels_by_expiry",), indexes)

    async def test_newer_schema_refused(self) -> None:
        await self.open().close()
        query(self.path, f"UPDATE schema_version SET version = {LATEST + 1}")
        e = self.assertRaises(StoreError, open_sqlite_store, self.path)
        self.assertIn(f"schema version {LATEST + 1}, newer than this lpxy knows", str(e))
        self.assertEqual(self.version(), LATEST + 1)

    async def test_failed_upgrade_changes_nothing(self) -> None:
        self.make_v1()
        query(self.path, "CREATE INDEX tunnels_by_expiry ON tunnel_tags (tag_key)")
        self.assertRaises(StoreError, open_sqlite_store, self.path)
        self.assertEqual(self.version(), 1)
        columns = [row[1] for row in query(self.path, "PRAGMA table_info(tunnels)")]
        self.assertNotIn("expires_at", columns)

    def test_not_a_database(self) -> None:
        with open(self.path, "wb") as f:
            f.write(b"not sqlite at all" * 100)
        e = self.assertRaises(StoreError, open_sqlite_store, self.path)
        self.assertIn(repr(os.path.abspath(self.path)), str(e))

    def test_unopenable(self) -> None:
        e = self.assertRaises(StoreError, open_sqlite_store, self.mktemp() + "/missing/db")
        self.assertIn("cannot open", str(e))

    async def test_one_service_per_file(self) -> None:
        store = self.open()
        e = self.assertRaises(StoreError, open_sqlite_store, self.path)
        self.assertIn("in use by another tunnel service", str(e))
        self.assertIn("--db", str(e))
        await self.reopen(store)

    def test_absolute_path(self) -> None:
        """
        A relative path is resolved at once, not where the working
        directory is when the pool connects.
        """
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.assertFalse(os.path.isabs(self.path))
        self.successResultOf(open_sqlite_store(self.path).close())
        paths = [e["path"] for e in events if "Tunnel state in" in e["log_format"]]
        self.assertEqual(paths, [os.path.abspath(self.path)])

    def test_file_mode(self) -> None:
        self.successResultOf(open_sqlite_store(self.path).close())
        self.assertEqual(os.stat(self.path).st_mode & 0o777, 0o600)

    def test_migrate_refuses_newer(self) -> None:
        connection = sqlite3.connect(":memory:")
        cursor = connection.cursor()
        migrate(cursor, SQLITE)
        cursor.execute("UPDATE schema_version SET version = 99")
        self.assertRaises(SchemaError, migrate, cursor, SQLITE)
        connection.close()


class OpenStoreTests(SynchronousTestCase):
    """L{open_store}: what C{--db} can name."""

    def test_memory(self) -> None:
        self.assertIsInstance(open_store(":memory:"), MemoryTunnelStore)
        self.assertNotIsInstance(open_store(":memory:"), SQLTunnelStore)

    def test_path(self) -> None:
        store = open_store(self.mktemp())
        self.assertIsInstance(store, SQLTunnelStore)
        self.successResultOf(store.close())

    def test_other_url_refused(self) -> None:
        e = self.assertRaises(StoreError, open_store, "mysql://user:pw@db/tunnels")
        self.assertIn("give a SQLite file (a path), a postgresql:// URL or :memory:", str(e))
        self.assertNotIn("pw", str(e))



class BrokerRestartTests(StoreTestCase):
    """
    A broker over a SQLite store, stopped and started again over the same
    file (with time moving on in between): tunnels, tokens, client tokens,
    tags and deadlines carry on.
    """

    def setUp(self) -> None:
        super().setUp()
        self.clock = Clock()
        self.clock.advance(10_000)
        self.events: list[tuple[object, ...]] = []
        self.broker = Broker(self.clock, store=self.open())

    async def restart(self, after: float = 0.0, limits: Limits | None = None) -> None:
        """
        Stop the broker, let C{after} seconds pass, start a new one on the
        file (with C{limits} if given).
        """
        self.broker.stop()
        await self.broker.store.close()
        now = self.clock.seconds()
        self.clock = Clock()
        self.clock.advance(now + after)
        self.broker = Broker(self.clock, store=self.open(), limits=limits)

    def peer(self, name: str) -> RecordingPeer:
        return RecordingPeer(name, self.events)

    def stored_ids(self) -> list[str]:
        """The tunnel ids in the database, oldest first."""
        found = query(self.path, "SELECT tunnel_id FROM tunnels ORDER BY sequence")
        return [row[0] for row in found]

    def refusal(self, mode: str, token: str, client_token: str | None) -> str:
        e = self.assertRaises(
            HandshakeRefused, self.broker.connect, mode, token, client_token, self.peer("x")
        )
        return e.reason

    async def test_client_tokens_reconnect(self) -> None:
        opened = self.broker.open_tunnel(services=["SSH"], tags=[("team", "a")])
        self.broker.connect(SOURCE, opened.source_token, "client-s", self.peer("s"))
        self.broker.connect(DESTINATION, opened.destination_token, None, self.peer("d"))
        await self.restart(after=60)
        record = self.broker.describe(opened.tunnel_id)
        self.assertEqual(record.status, OPEN)
        self.assertEqual((record.source.connected, record.destination.connected), (False, False))
        self.assertEqual(self.broker.tags(opened.tunnel_arn), {"team": "a"})
        self.assertEqual(record.services, ("SSH",))
        # The destination had no client token: its access token stays spent.
        self.assertEqual(
            self.refusal(DESTINATION, opened.destination_token, None), SPENT_TOKEN
        )
        self.assertEqual(
            self.refusal(SOURCE, opened.source_token, "another"), CLIENT_TOKEN_MISMATCH
        )
        attachment = self.broker.connect(
            SOURCE, opened.source_token, "client-s", self.peer("s2")
        )
        self.assertEqual(attachment.tunnel_id, opened.tunnel_id)
        await self.restart()
        self.assertTrue(self.broker.describe(opened.tunnel_id).source.spent)

    async def test_expiry_rearmed(self) -> None:
        opened = self.broker.open_tunnel(lifetime_minutes=10)
        await self.restart(after=4 * 60)
        self.clock.advance(6 * 60 - 1)
        self.assertEqual(self.broker.describe(opened.tunnel_id).status, OPEN)
        self.broker.connect(SOURCE, opened.source_token, "c", self.peer("s"))
        self.clock.advance(1)
        self.assertEqual(self.broker.describe(opened.tunnel_id).status, CLOSED)
        self.assertEqual(self.events, [("s", "close", 1000, "tunnel lifetime expired")])
        await self.restart()
        self.assertEqual(self.broker.describe(opened.tunnel_id).status, CLOSED)

    async def test_expired_while_stopped(self) -> None:
        opened = self.broker.open_tunnel(lifetime_minutes=10)
        kept = self.broker.open_tunnel(lifetime_minutes=20)
        await self.restart(after=15 * 60)
        record = self.broker.describe(opened.tunnel_id)
        self.assertEqual(record.status, CLOSED)
        self.assertEqual(record.last_updated_at, self.clock.seconds())
        self.assertEqual(self.refusal(SOURCE, opened.source_token, "c"), CLOSED_TUNNEL)
        self.assertEqual(self.broker.describe(kept.tunnel_id).status, OPEN)
        await self.restart()
        self.assertEqual(self.broker.describe(opened.tunnel_id).status, CLOSED)

    async def test_closed_kept_for_retention_across_restart(self) -> None:
        retention = Limits().closed_retention_seconds
        gone = self.broker.open_tunnel()
        shown = self.broker.open_tunnel()
        self.broker.close_tunnel(gone.tunnel_id)
        self.clock.advance(100)
        self.broker.close_tunnel(shown.tunnel_id)
        await self.restart(after=retention - 150)  # 50 s before the first goes
        self.assertEqual(self.broker.describe(gone.tunnel_id).status, CLOSED)
        await self.restart(after=50)
        self.assertRaises(ResourceNotFound, self.broker.describe, gone.tunnel_id)
        self.assertEqual(self.broker.describe(shown.tunnel_id).status, CLOSED)
        self.clock.advance(99)
        self.assertEqual(self.broker.describe(shown.tunnel_id).status, CLOSED)
        self.clock.advance(1)
        self.assertRaises(ResourceNotFound, self.broker.describe, shown.tunnel_id)
        await self.restart()
        self.assertEqual(self.broker.list_tunnels(), ([], None))

    async def test_closed_limit_across_restart(self) -> None:
        await self.restart(limits=Limits(max_closed_tunnels=2))
        opened = [self.broker.open_tunnel() for _ in range(5)]
        for tunnel in opened[:3]:
            self.clock.advance(1)
            self.broker.close_tunnel(tunnel.tunnel_id)
        self.assertRaises(ResourceNotFound, self.broker.describe, opened[0].tunnel_id)
        await self.restart(limits=Limits(max_closed_tunnels=2))
        self.assertRaises(ResourceNotFound, self.broker.describe, opened[0].tunnel_id)
        self.assertEqual(self.broker.describe(opened[1].tunnel_id).status, CLOSED)
        # The bound holds on: the next closed one forgets the longest closed.
        self.clock.advance(1)
        self.broker.close_tunnel(opened[3].tunnel_id)
        self.assertRaises(ResourceNotFound, self.broker.describe, opened[1].tunnel_id)
        # A lower bound after a restart forgets the longest closed at once,
        # before any tunnel whose lifetime ended while the service was stopped.
        expiring = self.broker.open_tunnel(lifetime_minutes=1)
        await self.restart(after=60, limits=Limits(max_closed_tunnels=1))
        self.assertEqual(
            [r.tunnel_id for r in self.broker.list_tunnels()[0]],
            [expiring.tunnel_id, opened[4].tunnel_id],
        )
        await self.restart(limits=Limits(max_closed_tunnels=1))
        self.assertEqual(
            [r.tunnel_id for r in self.broker.store.newest_first()],
            [expiring.tunnel_id, opened[4].tunnel_id],
        )
        self.assertEqual(
            self.stored_ids(), [opened[4].tunnel_id, expiring.tunnel_id]
        )

    async def test_rotation_and_listing_carry_on(self) -> None:
        first = self.broker.open_tunnel(thing_name="t")
        rotated = self.broker.rotate(first.tunnel_id, SOURCE)
        self.broker.untag(first.tunnel_arn, ["none"])
        self.broker.tag(first.tunnel_arn, [("k", "v")])
        await self.restart()
        self.assertEqual(self.refusal(SOURCE, first.source_token, None), UNKNOWN_TOKEN)
        assert rotated.source_token is not None
        self.broker.connect(SOURCE, rotated.source_token, None, self.peer("s"))
        second = self.broker.open_tunnel(thing_name="t")
        page, token = self.broker.list_tunnels(thing_name="t", max_results=1)
        self.assertEqual([r.tunnel_id for r in page], [second.tunnel_id])
        await self.restart()
        page, _ = self.broker.list_tunnels(thing_name="t", next_token=token)
        self.assertEqual([r.tunnel_id for r in page], [first.tunnel_id])
        self.assertEqual(self.broker.tags(first.tunnel_arn), {"k": "v"})

    async def test_deleted_stays_deleted(self) -> None:
        opened = self.broker.open_tunnel()
        self.broker.close_tunnel(opened.tunnel_id, delete=True)
        await self.restart()
        self.assertRaises(ResourceNotFound, self.broker.describe, opened.tunnel_id)
