# -*- test-case-name: tests.test_pgstore -*-
"""
Tunnels kept in PostgreSQL (C{--db postgresql://...}), shared by several nodes.

A L{PostgresTunnelStore} is a L{SQLTunnelStore}: it answers from a view in
memory and writes every change through, whole tunnels in order, off the
reactor thread (one adbapi connection, psycopg 3). The schema and its
migrations are L{lpxy.tunnelservice.schema}'s, as for SQLite; nodes starting
together migrate one at a time (an advisory lock).

Several nodes share the database, and any node serves any API call, so a
node's view must follow the others' writes:

  - Every write transaction also sends C{NOTIFY lpxy_tunnels} with the payload
    C{"<origin> <tunnel id>"} for each tunnel it wrote (delivered on
    commit). Each store LISTENs on a connection of its own, in a thread, and
    reloads the tunnels other stores wrote into its view; a tunnel with a
    change of this node's still waiting to be written keeps this node's state
    (that write follows, whole: between two nodes changing one tunnel at the
    same moment the later write wins). A write that fails (the database
    restarting, say) is logged and tried again, 1 s later, then up to 30 s
    apart, with the tunnels' state as it is by then. When the listening
    connection is lost,
    the store reconnects (after 1 s, then up to 30 s apart) and reloads
    everything, since notifications were missed meanwhile.
  - Before a handshake is judged, L{PostgresTunnelStore.refresh_token} reads
    the tunnel of that token from the database (the broker's
    L{lpxy.tunnelservice.broker.Broker.refresh}): a handshake on node B right
    after OpenTunnel or a rotation on node A succeeds, and a token closed or
    rotated on A is refused on B, whether or not the notification came yet.
    Likewise an API call naming a tunnel (by id or ARN) waits for
    L{PostgresTunnelStore.refresh_tunnel}; ListTunnels answers from the view,
    as current as the notifications (milliseconds).
  - Creation numbers come from the C{tunnel_sequence} sequence, taken ahead
    in batches (L{RESERVE}) because the broker asks for one synchronously;
    across nodes the newest-first order is therefore that of the numbers
    each node took, close to but not exactly creation order.

B{The hook for other nodes' changes}: C{store.on_changed(callback)}, where
C{callback(tunnel_id: str, record: TunnelRecord | None) -> None} runs on the
reactor thread after the view holds another node's change of a tunnel
(C{record} is the view's record; L{None} once the tunnel was deleted), only
when the tunnel's stored state differs from what the view had; never for this
node's own changes. It returns a function that stops the calls. A cluster
uses it to close the live connections of a tunnel another node closed, or
of an end whose token another node rotated.

Unlike SQLite, a starting node does not mark every end disconnected: other
nodes' peers may be connected. Which node holds which connection is for the
cluster's node leases to track.

The password in a URL is never logged nor shown in an error (L{redact}).
"""

from __future__ import annotations

import collections
import os
import select
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import attrs
from twisted.enterprise import adbapi
from twisted.internet import defer
from twisted.python.failure import Failure

from lpxy.tunnelservice.schema import POSTGRESQL, SchemaError, migrate
from lpxy.tunnelservice.sqlstore import (
    SQLTunnelStore,
    StoreError,
    _Row,
    _row,
    _write,
    load_tunnels,
)
from lpxy.tunnelservice.store import MemoryTunnelStore, TunnelRecord

if TYPE_CHECKING:
    import psycopg

__all__ = [
    "CHANNEL",
    "RESERVE",
    "PostgresTunnelStore",
    "is_postgres_url",
    "open_postgres_store",
    "redact",
]

CHANNEL = "lpxy_tunnels"
"""The channel every write notifies and every store listens on."""
RESERVE = 64
"""Creation numbers a store takes from the sequence at a time."""
SCHEMES = ("postgresql://", "postgres://")
_MIGRATION_LOCK = int.from_bytes(b"lpxy-sch", "big")
_RECONNECT_DELAYS = (1.0, 2.0, 5.0, 10.0, 30.0)


def is_postgres_url(location: str) -> bool:
    """Whether C{--db} names a PostgreSQL database."""
    return location.startswith(SCHEMES)


def redact(url: str) -> str:
    """C{url} with its password (in the authority or the query) shown as C{***}."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if parts.password is not None:
            userinfo, _, hostinfo = netloc.rpartition("@")
            user = userinfo.partition(":")[0]
            netloc = f"{user}:***@{hostinfo}"
        query = parts.query
        if query:
            pairs = parse_qsl(query, keep_blank_values=True)
            query = urlencode(
                [(k, "***" if k == "password" else v) for k, v in pairs], safe="/*"
            )
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    except ValueError:
        return url.partition("://")[0] + "://***"


def _secrets(url: str) -> list[str]:
    """The passwords in C{url}, to keep them out of error messages."""
    found = []
    try:
        parts = urlsplit(url)
        if parts.password:
            found.append(parts.password)
        found += [v for k, v in parse_qsl(parts.query) if k == "password" and v]
    except ValueError:
        pass
    return found


def _scrubbed(message: str, url: str) -> str:
    for secret in _secrets(url):
        message = message.replace(secret, "***")
    return message.strip()


def _psycopg() -> Any:
    try:
        import psycopg
    except ImportError:
        raise StoreError(
            "PostgreSQL needs psycopg 3: pip install 'lpxy[postgresql]'"
        ) from None
    return psycopg


def _conninfo(url: str) -> str:
    """The connection string for C{url}, with lpxy's defaults where it sets none."""
    psycopg = _psycopg()
    try:
        given = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.Error as e:
        raise StoreError(f"{redact(url)}: {_scrubbed(str(e), url)}") from None
    defaults = {
        "connect_timeout": 10,
        "application_name": "lpxy-tunnelservice",
        # A dead server is noticed by the listening connection in about a minute.
        "keepalives_idle": 30,
        "keepalives_interval": 10,
        "keepalives_count": 3,
    }
    extra = {k: v for k, v in defaults.items() if k not in given}
    return str(psycopg.conninfo.make_conninfo(url, **extra))


def _pg_write(
    cursor: Any, changes: Sequence[tuple[str, _Row | None]], origin: str
) -> None:
    # In one order on every node: two nodes' transactions locking the same
    # tunnels in different orders would deadlock.
    changes = sorted(changes, key=lambda change: change[0])
    _write(cursor, POSTGRESQL, changes, None)
    cursor.executemany(
        "SELECT pg_notify(%s, %s)", [(CHANNEL, f"{origin} {tid}") for tid, _ in changes]
    )


def _snapshot(cursor: Any) -> None:
    # Every query of the transaction sees one moment: no tunnel half-written.
    cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")


def _read_tunnels(cursor: Any, tunnel_ids: Sequence[str] | None) -> list[TunnelRecord]:
    _snapshot(cursor)
    return load_tunnels(cursor, POSTGRESQL, tunnel_ids)


def _read_token(
    cursor: Any, token_hash: bytes, known: Sequence[str]
) -> tuple[list[str], list[TunnelRecord]]:
    _snapshot(cursor)
    cursor.execute("SELECT tunnel_id FROM tunnel_ends WHERE token_hash = %s", (token_hash,))
    ids = sorted({*known, *(row[0] for row in cursor.fetchall())})
    return ids, load_tunnels(cursor, POSTGRESQL, ids)


def _take_numbers(cursor: Any, count: int) -> list[int]:
    cursor.execute(
        "SELECT nextval('tunnel_sequence') FROM generate_series(1, %s)", (count,)
    )
    return sorted(int(row[0]) for row in cursor.fetchall())


def _copy_into(old: TunnelRecord, new: TunnelRecord) -> None:
    for field in attrs.fields(TunnelRecord):
        setattr(old, field.name, getattr(new, field.name))


class _Listener:
    """
    A thread LISTENing on its own connection, handing the notifications'
    payloads to the reactor thread; it reconnects when the connection is
    lost and says so, since notifications were missed meanwhile.
    """

    def __init__(
        self,
        reactor: Any,
        connect: Callable[[], psycopg.Connection[Any]],
        connection: psycopg.Connection[Any],
        notified: Callable[[list[str]], None],
        lost: Callable[[str], None],
        relistening: Callable[[], None],
    ) -> None:
        self._reactor = reactor
        self._connect = connect
        self._connection: psycopg.Connection[Any] | None = connection
        self._notified = notified
        self._lost = lost
        self._relistening = relistening
        self._wake_r, self._wake_w = os.pipe()
        self._done: defer.Deferred[None] = defer.Deferred()
        self._thread = threading.Thread(
            target=self._run, name="lpxy PostgreSQL listener", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> defer.Deferred[None]:
        """Stop the thread; fires once its connection is closed."""
        os.write(self._wake_w, b"x")
        return self._done

    def _woken(self, timeout: float | None, fd: int | None = None) -> bool:
        watched = [self._wake_r] if fd is None else [self._wake_r, fd]
        ready, _, _ = select.select(watched, [], [], timeout)
        return self._wake_r in ready

    def _run(self) -> None:
        psycopg = _psycopg()
        failures = 0
        try:
            while True:
                connection = self._connection
                try:
                    if connection is None:
                        connection = self._connection = self._connect()
                        connection.execute(f"LISTEN {CHANNEL}")
                        failures = 0
                        self._reactor.callFromThread(self._relistening)
                    if self._woken(None, connection.fileno()):
                        return
                    payloads = [n.payload for n in connection.notifies(timeout=0)]
                    if payloads:
                        self._reactor.callFromThread(self._notified, payloads)
                except psycopg.Error as e:
                    self._reactor.callFromThread(self._lost, str(e))
                    self._close()
                    delay = _RECONNECT_DELAYS[min(failures, len(_RECONNECT_DELAYS) - 1)]
                    failures += 1
                    if self._woken(delay):
                        return
        finally:
            self._close()
            os.close(self._wake_r)
            os.close(self._wake_w)
            self._reactor.callFromThread(self._done.callback, None)

    def _close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            try:
                connection.close()
            except Exception:  # already broken: nothing to release
                pass


class PostgresTunnelStore(SQLTunnelStore):
    """
    An L{ITunnelStore} in PostgreSQL, kept coherent with the other nodes
    writing the same database (see the module docstring).

    @param pool: a connection pool with exactly one connection (and thread).
    @param records: the stored tunnels (from L{load_tunnels}).
    @param numbers: creation numbers already taken from the sequence.
    @param take_numbers: takes more, blocking, when the reserve ran out.
    @param shown: the database URL without its password, for log lines.
    @param clock: schedules the retry of a failed write.
    """

    def __init__(
        self,
        pool: adbapi.ConnectionPool,
        records: Iterable[TunnelRecord] = (),
        numbers: Iterable[int] = (),
        take_numbers: Callable[[int], list[int]] = lambda count: [],
        shown: str = "PostgreSQL",
        clock: Any = None,
    ) -> None:
        super().__init__(pool, POSTGRESQL, records)
        if clock is None:
            from twisted.internet import reactor as clock
        self._clock = clock
        self._retry: Any = None
        self._retries = 0
        self._failed_ids: set[str] = set()
        self.origin = os.urandom(8).hex()
        """This store's name in the notifications it sends."""
        self._numbers: collections.deque[int] = collections.deque(numbers)
        self._take_numbers = take_numbers
        self._taking = False
        self._shown = shown
        self._ordered: list[TunnelRecord] | None = None
        self._stale: set[str] = set()
        self._stale_all = False
        self._reloading = False
        self._waiting_reload: list[defer.Deferred[None]] = []
        self._listener: _Listener | None = None
        self.reloads = 0
        """How many reload transactions ran (for tests)."""

    def listen(self, listener: _Listener) -> None:
        """Follow other nodes' changes through C{listener} (already LISTENing)."""
        self._listener = listener
        listener.start()

    # The view, kept in sequence order

    def add(self, record: TunnelRecord) -> None:
        super().add(record)
        self._ordered = None

    def remove(self, tunnel_id: str) -> None:
        super().remove(tunnel_id)
        self._ordered = None

    def newest_first(self) -> Any:
        if self._ordered is None:
            self._ordered = sorted(
                self._tunnels.values(), key=lambda r: r.sequence, reverse=True
            )
        return iter(self._ordered)

    # Creation numbers

    def next_sequence(self) -> int:
        if not self._numbers:
            self._log.warn(
                "Took creation numbers from {db} while opening a tunnel: "
                "tunnels are opened faster than the reserve of {reserve} refills",
                db=self._shown, reserve=RESERVE,
            )
            self._numbers.extend(self._take_numbers(RESERVE))
        number = self._numbers.popleft()
        self._sequence = max(self._sequence, number)
        if len(self._numbers) < RESERVE // 2 and not self._taking and not self._closing:
            self._taking = True
            d = self._pool.runInteraction(_take_numbers, RESERVE)
            d.addCallback(self._numbers.extend)
            d.addErrback(
                lambda f: self._log.failure("Could not take creation numbers from {db}",
                                            f, db=self._shown)
            )
            d.addBoth(lambda _: setattr(self, "_taking", False))
        return number

    # Writes

    def _transaction(
        self, changes: list[tuple[str, _Row | None]], last_sequence: int | None
    ) -> defer.Deferred[None]:
        d = self._pool.runInteraction(_pg_write, changes, self.origin)
        d.addCallback(self._write_succeeded)
        return d

    def _write_succeeded(self, result: None) -> None:
        self._retries = 0

    def _write_failed(self, failure: Failure, tunnel_ids: list[str]) -> None:
        # The database may be restarting or failing over: write these
        # tunnels' state (as it is by then) again, less often each time.
        super()._write_failed(failure, tunnel_ids)
        if self._closing:
            return
        delay = _RECONNECT_DELAYS[min(self._retries, len(_RECONNECT_DELAYS) - 1)]
        self._retries += 1
        self._failed_ids.update(tunnel_ids)
        if self._retry is None or not self._retry.active():
            self._retry = self._clock.callLater(delay, self._write_again)

    def _write_again(self) -> None:
        failed, self._failed_ids = self._failed_ids, set()
        if self._closing:
            return
        for tunnel_id in failed:
            if tunnel_id not in self._pending:
                self._pending[tunnel_id] = self._tunnels.get(tunnel_id)
        self._flush()

    # Other nodes' changes

    def _notified(self, payloads: list[str]) -> None:
        for payload in payloads:
            origin, _, tunnel_id = payload.partition(" ")
            if origin != self.origin and tunnel_id:
                self._stale.add(tunnel_id)
        self._reload()

    def _listener_lost(self, why: str) -> None:
        self._log.warn(
            "Lost the connection listening for other nodes' changes in {db} ({why}); "
            "reconnecting", db=self._shown, why=why,
        )

    def _relistening(self) -> None:
        self._log.info(
            "Listening again for other nodes' changes in {db}; reloading every tunnel",
            db=self._shown,
        )
        self._stale_all = True
        self._reload()

    def resync(self) -> defer.Deferred[None]:
        """Reload every tunnel from the database (fires once the view has them)."""
        self._stale_all = True
        return self._reload()

    def _reload(self) -> defer.Deferred[None]:
        """Reload the stale tunnels, one transaction at a time."""
        if self._closing:
            return defer.succeed(None)
        if self._reloading:
            return self.when_reloaded()
        if not (self._stale or self._stale_all):
            return defer.succeed(None)
        ids: list[str] | None = None if self._stale_all else sorted(self._stale)
        self._stale, self._stale_all = set(), False
        self._reloading = True
        self.reloads += 1
        d = self._pool.runInteraction(_read_tunnels, ids)
        d.addCallback(lambda records: self._apply(ids, records))
        d.addErrback(self._reload_failed, ids)
        d.addBoth(self._reloaded)
        return self.when_reloaded()

    def _reload_failed(self, failure: Failure, ids: list[str] | None) -> None:
        self._log.failure(
            "Could not reload tunnels changed by other nodes from {db}", failure,
            db=self._shown,
        )
        # Try again with the next notification (or the next resync).
        if ids is None:
            self._stale_all = True
        else:
            self._stale.update(ids)

    def when_reloaded(self) -> defer.Deferred[None]:
        """Fire once no reload runs or waits."""
        if not self._reloading and not (self._stale or self._stale_all):
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._waiting_reload.append(d)
        return d

    def _reloaded(self, _: object) -> None:
        self._reloading = False
        if self._stale or self._stale_all:
            self._reload()
            return
        waiting, self._waiting_reload = self._waiting_reload, []
        for d in waiting:
            d.callback(None)

    def _apply(self, ids: Iterable[str] | None, records: list[TunnelRecord]) -> None:
        """Put the database's state of C{ids} (every tunnel if L{None}) into the view."""
        if self._closing:
            return
        found = {record.tunnel_id: record for record in records}
        names = set(found) | (set(self._tunnels) if ids is None else set(ids))
        for tunnel_id in sorted(names):
            if self._changing(tunnel_id):
                continue  # this node's newer state is on its way to the database
            new, old = found.get(tunnel_id), self._tunnels.get(tunnel_id)
            if new is None:
                if old is None:
                    continue
                MemoryTunnelStore.remove(self, tunnel_id)
                self._ordered = None
                self._tell(tunnel_id, None)
            elif old is None:
                MemoryTunnelStore.add(self, new)
                self._ordered = None
                self._tell(tunnel_id, new)
            elif _row(old) != _row(new):
                _copy_into(old, new)
                MemoryTunnelStore.save(self, old)
                self._ordered = None
                self._tell(tunnel_id, old)

    def refresh_token(self, token_hash: bytes) -> defer.Deferred[None]:
        """
        Read the tunnel whose token has this hash (in the database, or in the
        view) from the database into the view. If the database cannot be
        read, the view answers (logged).
        """
        if self._closing:
            return defer.succeed(None)
        found = self.find_token(token_hash)
        known = [] if found is None else [found[0].tunnel_id]
        d = self._pool.runInteraction(_read_token, token_hash, known)
        d.addCallback(lambda result: self._apply(*result))

        def failed(failure: Failure) -> None:
            self._log.failure(
                "Could not read a handshake's tunnel from {db}; judging it on what "
                "this node knows", failure, db=self._shown,
            )

        d.addErrback(failed)
        return d

    def refresh_tunnel(self, tunnel_id: str) -> defer.Deferred[None]:
        """
        Read one tunnel from the database into the view, before an API call
        naming it is answered. If the database cannot be read, the view
        answers (logged).
        """
        if self._closing:
            return defer.succeed(None)
        d = self._pool.runInteraction(_read_tunnels, [tunnel_id])
        d.addCallback(lambda records: self._apply([tunnel_id], records))

        def failed(failure: Failure) -> None:
            self._log.failure(
                "Could not read tunnel {tunnel_id} from {db}; answering with what this "
                "node knows", failure, tunnel_id=tunnel_id, db=self._shown,
            )

        d.addErrback(failed)
        return d

    @defer.inlineCallbacks
    def close(self) -> Any:
        """Stop listening, write what is pending, then close the connections."""
        if self._closing:
            return
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
            self._write_again()
        if self._listener is not None:
            listener, self._listener = self._listener, None
            yield listener.stop()
        yield self.when_reloaded()
        yield super().close()


def _connect_error(url: str, e: Exception) -> StoreError:
    return StoreError(f"cannot use {redact(url)}: {_scrubbed(str(e), url)}")


def open_postgres_store(url: str, reactor: Any = None) -> PostgresTunnelStore:
    """
    Connect to the PostgreSQL database at C{url}, bring its schema to the
    latest version and read it: this blocks, and is meant for startup.

    @raise StoreError: psycopg is missing, the URL is malformed, the database
        cannot be reached or used, or its schema is newer than this code.
    """
    if reactor is None:
        from twisted.internet import reactor
    psycopg = _psycopg()
    shown = redact(url)
    conninfo = _conninfo(url)

    def connect() -> Any:
        return psycopg.connect(conninfo, autocommit=True)

    listening = None
    try:
        with psycopg.connect(conninfo) as connection:
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
                found, now = migrate(cursor, POSTGRESQL)
            connection.commit()
            # Listening before reading: nothing written meanwhile is missed.
            listening = connect()
            listening.execute(f"LISTEN {CHANNEL}")
            with connection.cursor() as cursor:
                records = _read_tunnels(cursor, None)
                numbers = _take_numbers(cursor, RESERVE)
            connection.commit()
    except SchemaError as e:
        if listening is not None:
            listening.close()
        raise StoreError(f"{shown}: {e}") from None
    except (psycopg.Error, StoreError) as e:
        if listening is not None:
            listening.close()
        raise _connect_error(url, e) from None

    def take_numbers(count: int) -> list[int]:
        try:
            with psycopg.connect(conninfo, autocommit=True) as connection:
                with connection.cursor() as cursor:
                    return _take_numbers(cursor, count)
        except psycopg.Error as e:
            raise _connect_error(url, e) from None

    pool = adbapi.ConnectionPool(
        "psycopg", conninfo, cp_min=1, cp_max=1, cp_noisy=False,
        cp_reconnect=True, cp_reactor=reactor,
    )
    store = PostgresTunnelStore(pool, records, numbers, take_numbers, shown, reactor)
    store.listen(_Listener(
        reactor, connect, listening, store._notified,
        lambda why: store._listener_lost(_scrubbed(why, url)), store._relistening,
    ))
    store._log.info(
        "Tunnel state in {db} (schema version {version}{upgraded}): {count} tunnels",
        db=shown,
        version=now,
        upgraded="" if found == now else f", upgraded from {found}",
        count=len(records),
    )
    return store
