"""
Tests for L{lpxy.tunnelservice.store}.
"""

from twisted.trial.unittest import SynchronousTestCase

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


class MemoryTunnelStoreTests(SynchronousTestCase):
    """L{MemoryTunnelStore}: records, the token index, order, sequence and open count."""

    def setUp(self) -> None:
        self.store: ITunnelStore = MemoryTunnelStore()

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
