"""
Tests for L{lpxy.tunnelservice.store}: the store interface, run against
every store C{--db} can name (memory, SQLite, PostgreSQL).
"""

from __future__ import annotations

from twisted.trial.unittest import TestCase

from lpxy.tunnelservice.pgstore import open_postgres_store
from lpxy.tunnelservice.sqlstore import SQLTunnelStore, open_sqlite_store
from lpxy.tunnelservice.store import (
    CLOSED,
    DESTINATION,
    SOURCE,
    EndRecord,
    ITunnelStore,
    MemoryTunnelStore,
    TunnelRecord,
)


def record(tunnel_id: str, sequence: int) -> TunnelRecord:
    return TunnelRecord(
        tunnel_id=tunnel_id,
        arn="arn:" + tunnel_id,
        sequence=sequence,
        description=None,
        thing_name=None,
        services=(),
        lifetime_minutes=720,
        created_at=1.0,
        last_updated_at=1.0,
        source=EndRecord(token_hash=tunnel_id.encode() + b"-s", last_updated_at=1.0),
        destination=EndRecord(token_hash=tunnel_id.encode() + b"-d", last_updated_at=1.0),
    )


class StoreContract:
    """
    What every L{ITunnelStore} does: records, the token index, order,
    sequence and open count, as seen through the interface.
    """

    store: ITunnelStore

    def open(self) -> ITunnelStore:
        raise NotImplementedError

    def setUp(self) -> None:
        self.store = self.open()
        self.addCleanup(self.store.close)  # type: ignore[attr-defined]

    def test_add_get_remove(self) -> None:
        r = record("a", 1)
        self.store.add(r)
        self.assertIs(self.store.get("a"), r)
        self.assertIsNone(self.store.get("b"))
        self.store.remove("a")
        self.assertIsNone(self.store.get("a"))
        self.assertIsNone(self.store.find_token(b"a-s"))
        self.store.remove("a")

    def test_add_twice(self) -> None:
        self.store.add(record("a", 1))
        self.assertRaises(KeyError, self.store.add, record("a", 2))

    def test_save_unknown(self) -> None:
        self.assertRaises(KeyError, self.store.save, record("a", 1))

    def test_find_token(self) -> None:
        r = record("a", 1)
        self.store.add(r)
        self.assertEqual(self.store.find_token(b"a-s"), (r, SOURCE))
        self.assertEqual(self.store.find_token(b"a-d"), (r, DESTINATION))
        self.assertIsNone(self.store.find_token(b"nope"))

    def test_save_reindexes_tokens(self) -> None:
        r = record("a", 1)
        self.store.add(r)
        r.source.token_hash = b"new"
        self.store.save(r)
        self.assertIsNone(self.store.find_token(b"a-s"))
        self.assertEqual(self.store.find_token(b"new"), (r, SOURCE))
        self.assertEqual(self.store.find_token(b"a-d"), (r, DESTINATION))

    def test_newest_first(self) -> None:
        for i, name in enumerate("abc"):
            self.store.add(record(name, i + 1))
        self.store.save(self.store.get("a"))  # type: ignore[arg-type]
        self.assertEqual([r.tunnel_id for r in self.store.newest_first()], ["c", "b", "a"])

    def test_tokens_not_in_repr(self) -> None:
        self.assertNotIn("a-s", repr(record("a", 1)))

    def test_next_sequence(self) -> None:
        numbers = [self.store.next_sequence() for _ in range(3)]
        self.assertEqual(numbers, sorted(set(numbers)))
        r = record("a", numbers[-1])
        self.store.add(r)
        self.store.remove("a")
        self.assertGreater(self.store.next_sequence(), numbers[-1])

    def test_open_count(self) -> None:
        self.assertEqual(self.store.open_count(), 0)
        for name in "abc":
            self.store.add(record(name, self.store.next_sequence()))
        self.assertEqual(self.store.open_count(), 3)
        r = self.store.get("b")
        assert r is not None
        r.status = CLOSED
        self.store.save(r)
        self.assertEqual(self.store.open_count(), 2)
        self.store.save(r)
        self.assertEqual(self.store.open_count(), 2)
        self.store.remove("b")
        self.store.remove("a")
        self.assertEqual(self.store.open_count(), 1)
        closed = record("d", self.store.next_sequence())
        closed.status = CLOSED
        self.store.add(closed)
        self.assertEqual(self.store.open_count(), 1)

    def test_on_changed_not_for_own_changes(self) -> None:
        """
        The hook tells of other writers' changes only: this store's own
        never call it, and the function it returns stops the calls.
        """
        calls: list[object] = []
        stop = self.store.on_changed(lambda tunnel_id, r: calls.append(tunnel_id))
        r = record("a", self.store.next_sequence())
        self.store.add(r)
        r.status = CLOSED
        self.store.save(r)
        self.store.remove("a")
        self.assertEqual(calls, [])
        stop()
        stop()

    async def test_refresh_token_keeps_own_view(self) -> None:
        r = record("a", self.store.next_sequence())
        self.store.add(r)
        await self.store.refresh_token(b"a-s")
        self.assertEqual(self.store.find_token(b"a-s"), (r, SOURCE))
        await self.store.refresh_token(b"unknown")
        self.assertIsNone(self.store.find_token(b"unknown"))


class PersistentStoreContract(StoreContract):
    """What a store that writes through keeps for the next run."""

    store: SQLTunnelStore

    async def reopen(self) -> SQLTunnelStore:
        await self.store.close()
        self.store = self.open()  # type: ignore[assignment]
        self.addCleanup(self.store.close)  # type: ignore[attr-defined]
        return self.store

    async def test_kept_for_the_next_run(self) -> None:
        numbers = [self.store.next_sequence() for _ in range(3)]
        for name, number in zip("abc", numbers, strict=True):
            self.store.add(record(name, number))
        b = self.store.get("b")
        assert b is not None
        b.status = CLOSED
        b.destination.token_hash = b"rotated"
        b.tags = {"k": "v"}
        self.store.save(b)
        self.store.remove("c")
        again = await self.reopen()
        self.assertEqual([r.tunnel_id for r in again.newest_first()], ["b", "a"])
        kept = again.get("b")
        assert kept is not None
        self.assertEqual((kept.status, kept.tags), (CLOSED, {"k": "v"}))
        self.assertEqual(again.find_token(b"rotated"), (kept, DESTINATION))
        self.assertIsNone(again.find_token(b"b-d"))
        self.assertGreater(again.next_sequence(), numbers[-1])
        self.assertEqual(again.open_count(), 1)


class MemoryTunnelStoreTests(StoreContract, TestCase):
    """L{MemoryTunnelStore}."""

    def open(self) -> ITunnelStore:
        return MemoryTunnelStore()


class SQLiteTunnelStoreTests(PersistentStoreContract, TestCase):
    """L{SQLTunnelStore} on SQLite."""

    def open(self) -> ITunnelStore:
        if not hasattr(self, "path"):
            self.path = self.mktemp()
        return open_sqlite_store(self.path)


class PostgresTunnelStoreTests(PersistentStoreContract, TestCase):
    """L{lpxy.tunnelservice.pgstore.PostgresTunnelStore} (skipped without PostgreSQL)."""

    def open(self) -> ITunnelStore:
        if not hasattr(self, "url"):
            from tests.support.postgres import database

            self.url = database()
        return open_postgres_store(self.url)
