# -*- test-case-name: tests.test_store -*-
"""
Where the broker keeps its tunnels.

The broker owns the rules; a store only keeps L{TunnelRecord}s and finds
them again, by tunnel id or by the hash of an access token. Records are
mutable: the broker changes one and then hands it back with
L{ITunnelStore.save}, which a persistent store would write out. Only token
hashes are ever stored, never tokens.

Everything that must outlive the broker lives here too: the creation
sequence numbers (which page tokens refer to) and how many tunnels are open,
so that a broker started over a persistent store carries on where the last
one stopped. What the broker keeps itself (live connections, timers) ends
with the process anyway.

L{MemoryTunnelStore} keeps nothing past the process; L{lpxy.tunnelservice.sqlstore}
keeps the same view in memory and writes it through to a database;
L{lpxy.tunnelservice.pgstore} shares one database between several nodes, so
another node may change the view: L{ITunnelStore.on_changed} tells of such
changes, and L{ITunnelStore.refresh_token} brings a token's tunnel up to
date before a handshake is judged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Protocol

import attrs
from twisted.internet import defer

__all__ = [
    "CLOSED",
    "DESTINATION",
    "OPEN",
    "SOURCE",
    "ChangeCallback",
    "EndRecord",
    "ITunnelStore",
    "MemoryTunnelStore",
    "TunnelRecord",
]

SOURCE = "source"
DESTINATION = "destination"
OPEN = "OPEN"
CLOSED = "CLOSED"


@attrs.define(eq=False)
class EndRecord:
    """
    One end (source or destination) of a tunnel.

    @ivar token_hash: the SHA-256 digest of the current access token.
    @ivar client_token_hash: the digest of the client token the first
        handshake set, or L{None}.
    @ivar spent: whether a handshake has used the current access token.
    @ivar connected: whether a peer is connected on this end now.
    @ivar last_updated_at: when C{connected} last changed (POSIX seconds).
    @ivar node: the name of the service node holding the connection, while
        C{connected} (several nodes share a database).
    """

    token_hash: bytes = attrs.field(repr=False)
    last_updated_at: float
    client_token_hash: bytes | None = attrs.field(default=None, repr=False)
    spent: bool = False
    connected: bool = False
    node: str | None = None


@attrs.define(eq=False)
class TunnelRecord:
    """Everything the service knows about one tunnel."""

    tunnel_id: str
    arn: str
    sequence: int
    """Creation order, for listing newest first and for page tokens."""
    description: str | None
    thing_name: str | None
    services: tuple[str, ...]
    lifetime_minutes: int
    created_at: float
    last_updated_at: float
    source: EndRecord
    destination: EndRecord
    tags: dict[str, str] = attrs.field(factory=dict)
    status: str = OPEN
    expires_at: float = attrs.field(
        default=attrs.Factory(
            lambda self: self.created_at + self.lifetime_minutes * 60, takes_self=True
        )
    )
    """When an open tunnel's lifetime ends (POSIX seconds)."""

    def end(self, mode: str) -> EndRecord:
        """The L{EndRecord} for C{mode} (L{SOURCE} or L{DESTINATION})."""
        return self.source if mode == SOURCE else self.destination


ChangeCallback = Callable[[str, "TunnelRecord | None"], None]
"""
Told of a change another node made: the tunnel id, and the record as the
view now holds it (L{None} once the tunnel is gone).
"""


class ITunnelStore(Protocol):
    """
    Keeps tunnel records and the index from token hash to tunnel end.

    (A L{typing.Protocol} rather than a zope interface, so that mypy checks
    implementations without a plugin.)
    """

    def add(self, record: TunnelRecord) -> None:
        """Keep a new record."""
        ...

    def save(self, record: TunnelRecord) -> None:
        """Record that C{record} (already added) has changed."""
        ...

    def get(self, tunnel_id: str) -> TunnelRecord | None:
        """The record for C{tunnel_id}, or L{None}."""
        ...

    def remove(self, tunnel_id: str) -> None:
        """Forget a tunnel (nothing happens if it is unknown)."""
        ...

    def find_token(self, token_hash: bytes) -> tuple[TunnelRecord, str] | None:
        """The tunnel and end (L{SOURCE}/L{DESTINATION}) whose current token has this hash."""
        ...

    def newest_first(self) -> Iterator[TunnelRecord]:
        """Every record, the most recently created first."""
        ...

    def next_sequence(self) -> int:
        """
        A creation sequence number for a new record: higher than any this
        store has handed out before, even for records since removed.
        """
        ...

    def open_count(self) -> int:
        """How many stored records have the status L{OPEN}."""
        ...

    def when_written(self) -> defer.Deferred[None]:
        """
        Fire once every change handed to the store so far is kept (written
        and committed, for a persistent store); fail if writing one of them
        failed. The API answers a call that changed something only then.
        """
        ...

    def refresh_token(self, token_hash: bytes) -> defer.Deferred[None]:
        """
        Bring the view of the tunnel whose current token has this hash (or
        that the view thinks has it) up to date with what other nodes wrote,
        before a handshake with that token is judged. Fires at once where
        nobody else writes.
        """
        ...

    def refresh_tunnel(self, tunnel_id: str) -> defer.Deferred[None]:
        """
        Bring the view of one tunnel up to date with what other nodes wrote,
        before an API call naming it is answered. Fires at once where nobody
        else writes.
        """
        ...

    def on_changed(self, callback: ChangeCallback) -> Callable[[], None]:
        """
        Call C{callback} whenever a change made elsewhere (another node) has
        reached the view, after the view holds it; never for this store's
        own changes. Returns what stops the calls.
        """
        ...

    def close(self) -> defer.Deferred[None]:
        """
        Fire once every change handed to the store is kept as well as the
        store can keep it (written out, for a persistent store); the store
        takes no more changes after.
        """
        ...


class MemoryTunnelStore:
    """An L{ITunnelStore} in a few dictionaries; nothing survives a restart."""

    def __init__(self) -> None:
        self._tunnels: dict[str, TunnelRecord] = {}
        self._tokens: dict[bytes, tuple[str, str]] = {}
        self._indexed: dict[str, tuple[bytes, ...]] = {}
        self._open: set[str] = set()
        self._sequence = 0
        self._watchers: list[ChangeCallback] = []

    def _unindex(self, tunnel_id: str) -> None:
        for token_hash in self._indexed.pop(tunnel_id, ()):
            self._tokens.pop(token_hash, None)

    def _index(self, record: TunnelRecord) -> None:
        self._unindex(record.tunnel_id)
        hashes = []
        for mode in (SOURCE, DESTINATION):
            token_hash = record.end(mode).token_hash
            self._tokens[token_hash] = (record.tunnel_id, mode)
            hashes.append(token_hash)
        self._indexed[record.tunnel_id] = tuple(hashes)
        if record.status == OPEN:
            self._open.add(record.tunnel_id)
        else:
            self._open.discard(record.tunnel_id)

    def add(self, record: TunnelRecord) -> None:
        if record.tunnel_id in self._tunnels:
            raise KeyError(f"tunnel {record.tunnel_id} already stored")
        self._tunnels[record.tunnel_id] = record
        self._index(record)

    def save(self, record: TunnelRecord) -> None:
        if record.tunnel_id not in self._tunnels:
            raise KeyError(f"tunnel {record.tunnel_id} is not stored")
        self._tunnels[record.tunnel_id] = record
        self._index(record)

    def get(self, tunnel_id: str) -> TunnelRecord | None:
        return self._tunnels.get(tunnel_id)

    def remove(self, tunnel_id: str) -> None:
        self._tunnels.pop(tunnel_id, None)
        self._unindex(tunnel_id)
        self._open.discard(tunnel_id)

    def find_token(self, token_hash: bytes) -> tuple[TunnelRecord, str] | None:
        found = self._tokens.get(token_hash)
        if found is None:
            return None
        tunnel_id, mode = found
        return self._tunnels[tunnel_id], mode

    def newest_first(self) -> Iterator[TunnelRecord]:
        # Records are only ever appended, so insertion order is creation order.
        return reversed(self._tunnels.values())

    def next_sequence(self) -> int:
        self._sequence += 1
        return self._sequence

    def open_count(self) -> int:
        return len(self._open)

    def when_written(self) -> defer.Deferred[None]:
        return defer.succeed(None)

    def refresh_token(self, token_hash: bytes) -> defer.Deferred[None]:
        # Only this process writes: the view is the truth.
        return defer.succeed(None)

    def refresh_tunnel(self, tunnel_id: str) -> defer.Deferred[None]:
        return defer.succeed(None)

    def on_changed(self, callback: ChangeCallback) -> Callable[[], None]:
        self._watchers.append(callback)

        def stop() -> None:
            if callback in self._watchers:
                self._watchers.remove(callback)

        return stop

    def _tell(self, tunnel_id: str, record: TunnelRecord | None) -> None:
        """Tell the watchers of a change from elsewhere (see L{on_changed})."""
        for callback in list(self._watchers):
            callback(tunnel_id, record)

    def close(self) -> defer.Deferred[None]:
        return defer.succeed(None)
