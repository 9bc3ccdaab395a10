# -*- test-case-name: tests.test_sqlstore -*-
"""
Tunnels kept in a database: SQLite by default.

A L{SQLTunnelStore} is a L{MemoryTunnelStore} that writes through. The
whole state is read once, at startup (L{open_store}); from then on every
read is answered from memory, and every change (an API call, a handshake, a
connection ending: never a relayed record) queues that tunnel's complete
current state to be written. Writes run off the reactor thread, one
transaction at a time and in order, through a one-thread
L{twisted.enterprise.adbapi.ConnectionPool}; changes that arrive while a
transaction runs are written together by the next one, and a tunnel changed
twice in between is written once, as it is now. Because every write is a
whole tunnel's state, a failed transaction (logged) is repaired by the next
change of the same tunnel. L{SQLTunnelStore.when_written} fires once the
transaction holding every change so far has committed (and fails if it
failed): the API answers a call that changed state only then, so a service
killed right after a 2xx has lost nothing.

The SQL is the backend-neutral one of L{lpxy.tunnelservice.schema}; only
L{open_store} knows SQLite. Another backend needs its L{Dialect}, a DB-API
module for adbapi and an opener.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from twisted.enterprise import adbapi
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from lpxy.tunnelservice.schema import SQLITE, Dialect, SchemaError, migrate
from lpxy.tunnelservice.store import (
    DESTINATION,
    SOURCE,
    EndRecord,
    ITunnelStore,
    MemoryTunnelStore,
    TunnelRecord,
)

__all__ = [
    "DEFAULT_DB",
    "MEMORY",
    "SQLTunnelStore",
    "StoreError",
    "load",
    "open_sqlite_store",
    "open_store",
]

DEFAULT_DB = "tunnelservice.sqlite3"
MEMORY = ":memory:"

_MODES = (SOURCE, DESTINATION)
_LAST_SEQUENCE = "last_sequence"


class StoreError(Exception):
    """The database cannot be opened, read or upgraded."""


# One tunnel's state as plain values, taken on the reactor thread.
_Row = tuple[
    tuple[Any, ...],  # tunnels row
    tuple[tuple[Any, ...], ...],  # tunnel_ends rows
    tuple[tuple[Any, ...], ...],  # tunnel_services rows
    tuple[tuple[Any, ...], ...],  # tunnel_tags rows
]


def _row(record: TunnelRecord) -> _Row:
    tid = record.tunnel_id
    return (
        (tid, record.arn, record.sequence, record.description, record.thing_name,
         record.lifetime_minutes, record.created_at, record.last_updated_at,
         record.status, record.expires_at),
        tuple(
            (tid, mode, end.token_hash, end.client_token_hash, end.spent,
             end.connected, end.last_updated_at, end.node)
            for mode in _MODES
            for end in (record.end(mode),)
        ),
        tuple((tid, i, name) for i, name in enumerate(record.services)),
        tuple((tid, i, key, value) for i, (key, value) in enumerate(record.tags.items())),
    )


_CHILD_TABLES = ("tunnel_ends", "tunnel_services", "tunnel_tags")
_TUNNEL_COLUMNS = (
    "tunnel_id", "arn", "sequence", "description", "thing_name", "lifetime_minutes",
    "created_at", "last_updated_at", "status", "expires_at",
)


def _write(
    cursor: Any,
    dialect: Dialect,
    changes: Sequence[tuple[str, _Row | None]],
    last_sequence: int | None,
) -> None:
    """
    Write a batch of whole-tunnel states (L{None}: deleted) in one transaction.

    A tunnel's row is upserted before its ends, services and tags are
    replaced: on a database several writers share, the upsert locks the row,
    so that two nodes writing one tunnel at once take turns instead of
    clashing on its keys (the later write wins, whole).
    """
    sql = dialect.sql
    upsert = sql(
        f"INSERT INTO tunnels ({', '.join(_TUNNEL_COLUMNS)}) "
        f"VALUES ({', '.join('?' for _ in _TUNNEL_COLUMNS)}) "
        "ON CONFLICT (tunnel_id) DO UPDATE SET "
        + ", ".join(f"{c} = excluded.{c}" for c in _TUNNEL_COLUMNS[1:])
    )
    for tunnel_id, row in changes:
        if row is not None:
            cursor.execute(upsert, row[0])
        for table in _CHILD_TABLES:
            cursor.execute(sql(f"DELETE FROM {table} WHERE tunnel_id = ?"), (tunnel_id,))
        if row is None:
            cursor.execute(sql("DELETE FROM tunnels WHERE tunnel_id = ?"), (tunnel_id,))
            continue
        _, ends, services, tags = row
        cursor.executemany(sql(
            "INSERT INTO tunnel_ends (tunnel_id, mode, token_hash, client_token_hash, "
            "spent, connected, last_updated_at, node) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
        ), ends)
        cursor.executemany(sql(
            "INSERT INTO tunnel_services (tunnel_id, position, name) VALUES (?, ?, ?)"
        ), services)
        cursor.executemany(sql(
            "INSERT INTO tunnel_tags (tunnel_id, position, tag_key, tag_value) "
            "VALUES (?, ?, ?, ?)"
        ), tags)
    if last_sequence is not None:
        cursor.execute(sql("DELETE FROM counters WHERE name = ?"), (_LAST_SEQUENCE,))
        cursor.execute(
            sql("INSERT INTO counters (name, value) VALUES (?, ?)"),
            (_LAST_SEQUENCE, last_sequence),
        )


def load(cursor: Any, dialect: Dialect) -> tuple[list[TunnelRecord], int]:
    """
    Read every tunnel (oldest first) and the last creation sequence number
    from a database at the latest schema version.
    """
    records = load_tunnels(cursor, dialect)
    cursor.execute(dialect.sql("SELECT value FROM counters WHERE name = ?"), (_LAST_SEQUENCE,))
    found = cursor.fetchall()
    last = int(found[0][0]) if found else 0
    return records, max([last, *(record.sequence for record in records)])


def load_tunnels(
    cursor: Any, dialect: Dialect, tunnel_ids: Sequence[str] | None = None
) -> list[TunnelRecord]:
    """
    Read the tunnels named (every tunnel if L{None}), oldest first; a
    tunnel the database does not have is left out.
    """
    if tunnel_ids is not None and not tunnel_ids:
        return []
    where = ""
    args: tuple[str, ...] = ()
    if tunnel_ids is not None:
        where = dialect.sql(f" WHERE tunnel_id IN ({', '.join('?' for _ in tunnel_ids)})")
        args = tuple(tunnel_ids)
    ends: dict[str, dict[str, EndRecord]] = {}
    cursor.execute(
        "SELECT tunnel_id, mode, token_hash, client_token_hash, spent, connected, "
        "last_updated_at, node FROM tunnel_ends" + where, args
    )
    for (tid, mode, token_hash, client_hash, spent, connected, updated,
         node) in cursor.fetchall():
        ends.setdefault(tid, {})[mode] = EndRecord(
            token_hash=bytes(token_hash),
            client_token_hash=None if client_hash is None else bytes(client_hash),
            spent=bool(spent),
            connected=bool(connected),
            last_updated_at=float(updated),
            node=node,
        )
    services: dict[str, list[str]] = {}
    cursor.execute(
        "SELECT tunnel_id, name FROM tunnel_services" + where
        + " ORDER BY tunnel_id, position", args
    )
    for tid, name in cursor.fetchall():
        services.setdefault(tid, []).append(name)
    tags: dict[str, dict[str, str]] = {}
    cursor.execute(
        "SELECT tunnel_id, tag_key, tag_value FROM tunnel_tags" + where
        + " ORDER BY tunnel_id, position", args
    )
    for tid, key, value in cursor.fetchall():
        tags.setdefault(tid, {})[key] = value
    records = []
    cursor.execute(
        f"SELECT {', '.join(_TUNNEL_COLUMNS)} FROM tunnels" + where + " ORDER BY sequence",
        args,
    )
    for (tid, arn, sequence, description, thing_name, lifetime, created, updated,
         status, expires_at) in cursor.fetchall():
        both = ends.get(tid, {})
        if set(both) != set(_MODES):
            raise StoreError(f"tunnel {tid} does not have both ends in the database")
        records.append(TunnelRecord(
            tunnel_id=tid,
            arn=arn,
            sequence=int(sequence),
            description=description,
            thing_name=thing_name,
            services=tuple(services.get(tid, ())),
            lifetime_minutes=int(lifetime),
            created_at=float(created),
            last_updated_at=float(updated),
            source=both[SOURCE],
            destination=both[DESTINATION],
            tags=tags.get(tid, {}),
            status=status,
            expires_at=float(expires_at),
        ))
    return records


class SQLTunnelStore(MemoryTunnelStore):
    """
    An L{ITunnelStore} answering from memory and writing every change
    through to a database, in order, off the reactor thread.

    @param pool: a connection pool with exactly one connection (and thread).
    @param dialect: the SQL dialect of the pool's database.
    @param records: the stored tunnels, oldest first (from L{load}).
    @param last_sequence: the last creation sequence number handed out.
    @param release: called once the pool is closed (to give up a lock).
    """

    _log = Logger()

    def __init__(
        self,
        pool: adbapi.ConnectionPool,
        dialect: Dialect,
        records: Iterable[TunnelRecord] = (),
        last_sequence: int = 0,
        release: Callable[[], None] = lambda: None,
    ) -> None:
        super().__init__()
        self._release = release
        for record in records:
            super().add(record)
        self._sequence = last_sequence
        self._pool = pool
        self._dialect = dialect
        self._pending: dict[str, TunnelRecord | None] = {}
        self._in_flight: frozenset[str] = frozenset()
        """The tunnels the running transaction writes."""
        self._sequence_changed = False
        self._writing = False
        self._closing = False
        # Who waits for the changes no transaction has taken yet, and for
        # the transaction running now.
        self._waiting_next: list[defer.Deferred[None]] = []
        self._waiting_running: list[defer.Deferred[None]] = []
        self.failed_writes = 0
        """How many transactions failed (each is logged)."""

    def _changed(self, tunnel_id: str, record: TunnelRecord | None) -> None:
        if self._closing:
            self._log.error(
                "Tunnel {tunnel_id} changed after the store was closed; not written",
                tunnel_id=tunnel_id,
            )
            return
        # A later change of the same tunnel supersedes a pending one (each
        # is the whole state); order between tunnels does not matter.
        self._pending[tunnel_id] = record
        self._flush()

    def add(self, record: TunnelRecord) -> None:
        super().add(record)
        self._changed(record.tunnel_id, record)

    def save(self, record: TunnelRecord) -> None:
        super().save(record)
        self._changed(record.tunnel_id, record)

    def remove(self, tunnel_id: str) -> None:
        known = self.get(tunnel_id) is not None
        super().remove(tunnel_id)
        if known:
            self._changed(tunnel_id, None)

    def next_sequence(self) -> int:
        number = super().next_sequence()
        self._sequence_changed = True
        return number

    def _flush(self) -> None:
        if self._writing or not (self._pending or self._sequence_changed):
            return
        # Snapshot on the reactor thread: records keep changing meanwhile.
        changes = [
            (tunnel_id, None if record is None else _row(record))
            for tunnel_id, record in self._pending.items()
        ]
        last_sequence = self._sequence if self._sequence_changed else None
        self._in_flight = frozenset(self._pending)
        self._pending = {}
        self._sequence_changed = False
        self._writing = True
        waiting, self._waiting_next = self._waiting_next, []
        self._waiting_running = waiting
        d = self._transaction(changes, last_sequence)
        d.addBoth(self._written, [tunnel_id for tunnel_id, _ in changes], waiting)

    def _transaction(
        self, changes: list[tuple[str, _Row | None]], last_sequence: int | None
    ) -> defer.Deferred[None]:
        """Run the transaction writing C{changes} (and the counter, if given)."""
        return self._pool.runInteraction(_write, self._dialect, changes, last_sequence)

    def _changing(self, tunnel_id: str) -> bool:
        """Whether a change of this tunnel waits to be written or is being written."""
        return tunnel_id in self._pending or tunnel_id in self._in_flight

    def _write_failed(self, failure: Failure, tunnel_ids: list[str]) -> None:
        self.failed_writes += 1
        self._log.failure(
            "Could not write the state of tunnels {tunnel_ids} to the database; "
            "their next change writes it again",
            failure,
            tunnel_ids=tunnel_ids,
        )

    def _written(
        self, result: object, tunnel_ids: list[str], waiting: list[defer.Deferred[None]]
    ) -> None:
        self._writing = False
        self._waiting_running = []
        self._in_flight = frozenset()
        if isinstance(result, Failure):
            self._write_failed(result, tunnel_ids)
        for d in waiting:
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(None)
        self._flush()

    @property
    def dialect(self) -> Dialect:
        """The SQL dialect of the store's database."""
        return self._dialect

    def interaction(self, work: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        """
        Run C{work(cursor, *args)} in a transaction on the store's connection,
        off the reactor thread, after the writes queued before it (the node
        leases of L{lpxy.tunnelservice.cluster} share the connection).
        """
        return self._pool.runInteraction(work, *args)

    def when_written(self) -> defer.Deferred[None]:
        """
        Fire once the transaction holding every change made so far has
        committed; fail (the failure is logged already) if it did not.
        """
        d: defer.Deferred[None] = defer.Deferred()
        if self._pending or self._sequence_changed:
            self._waiting_next.append(d)
            # A new sequence number alone has not started a transaction.
            self._flush()
        elif self._writing:
            self._waiting_running.append(d)
        else:
            d.callback(None)
        return d

    @defer.inlineCallbacks
    def close(self) -> Any:
        """Write what is pending, then close the database connection."""
        if self._closing:
            return
        # A failed write was logged; closing goes on.
        yield self.when_written().addErrback(lambda _: None)
        self._closing = True
        self._pool.close()
        self._release()


def _sqlite_connection_opened(connection: sqlite3.Connection) -> None:
    connection.execute("PRAGMA foreign_keys = ON")


def _lock(path: str) -> Callable[[], None]:
    """
    Take the exclusive lock that says a service uses the database at
    C{path} (creating the file, readable by its owner only); return what
    releases it. The system releases it when the process ends, however.
    """
    try:
        import fcntl
    except ImportError:  # not POSIX: no guard against a second service
        return lambda: None
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as e:
        raise StoreError(f"cannot open {path!r}: {e.strerror}") from None
    try:
        # flock, not SQLite's own fcntl locks, which a connection drops
        # when it closes; closing this descriptor (after the pool) drops it.
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise StoreError(
            f"{path!r} is in use by another tunnel service: give each service its own --db"
        ) from None
    return lambda: os.close(fd)


def open_sqlite_store(path: str, reactor: Any = None) -> SQLTunnelStore:
    """
    Open (creating or upgrading it as needed) the SQLite database at
    C{path} and read it: this blocks, and is meant for startup. The store
    holds the file locked until it is closed, so that a second service
    cannot use it meanwhile.

    @raise StoreError: the file cannot be opened, is in use by another
        service, is not a database of this service, or has a newer schema.
    """
    # The pool connects later, in its thread, maybe after twistd changed
    # the working directory (--rundir).
    path = os.path.abspath(path)
    release = _lock(path)
    try:
        records, last_sequence = _read(path)
    except BaseException:
        release()
        raise
    pool = adbapi.ConnectionPool(
        "sqlite3", path, timeout=10, check_same_thread=False,
        cp_min=1, cp_max=1, cp_noisy=False,
        cp_openfun=_sqlite_connection_opened, cp_reactor=reactor,
    )
    return SQLTunnelStore(pool, SQLITE, records, last_sequence, release)


def _read(path: str) -> tuple[list[TunnelRecord], int]:
    """Bring the database at C{path} to the latest schema and read it."""
    try:
        connection = sqlite3.connect(path, timeout=10, isolation_level=None)
    except sqlite3.Error as e:
        raise StoreError(f"cannot open {path!r}: {e}") from None
    try:
        cursor = connection.cursor()
        # WAL: a writer never blocks a reader, and a committed transaction
        # survives the process being killed.
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("BEGIN IMMEDIATE")
        try:
            found, now = migrate(cursor, SQLITE)
            # Nobody is connected to a service that has just started.
            cursor.execute(
                "UPDATE tunnel_ends SET connected = ?, node = NULL WHERE connected", (False,)
            )
            records, last_sequence = load(cursor, SQLITE)
        except BaseException:
            connection.rollback()
            raise
        connection.commit()
    except SchemaError as e:
        raise StoreError(f"{path!r}: {e}") from None
    except sqlite3.Error as e:
        raise StoreError(f"cannot use {path!r} as the service's database: {e}") from None
    finally:
        connection.close()
    SQLTunnelStore._log.info(
        "Tunnel state in {path} (schema version {version}{upgraded}): "
        "{count} tunnels",
        path=path,
        version=now,
        upgraded="" if found == now else f", upgraded from {found}",
        count=len(records),
    )
    for record in records:
        for mode in _MODES:
            record.end(mode).connected = False
            record.end(mode).node = None
    return records, last_sequence


def open_store(location: str, reactor: Any = None) -> ITunnelStore:
    """
    The store C{--db} names: C{:memory:} for none that outlives the
    process, a C{postgresql://} (or C{postgres://}) URL for a PostgreSQL
    database several nodes can share, otherwise the path of a SQLite database.

    @raise StoreError: as L{open_sqlite_store} or L{open_postgres_store}.
    """
    if location == MEMORY:
        return MemoryTunnelStore()
    from lpxy.tunnelservice.pgstore import is_postgres_url, open_postgres_store, redact

    if is_postgres_url(location):
        return open_postgres_store(location, reactor)
    if "://" in location:
        raise StoreError(
            f"{redact(location)!r}: give a SQLite file (a path), a postgresql:// URL "
            "or :memory:"
        )
    return open_sqlite_store(location, reactor)
