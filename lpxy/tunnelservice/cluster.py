# -*- test-case-name: tests.test_cluster -*-
"""
The tunnel service as one of several nodes sharing a database.

HAProxy sends both ends of a tunnel to one node (the access tokens' routing
key, L{lpxy.tunnelservice.tokens}); any node answers any API call. So an
API call often changes a tunnel whose connections live on another node.
Each end's record says which node holds its connection (L{EndRecord.node});
when the store hears that another node changed a tunnel, the broker asks
L{evictions} which of its own connections of that tunnel must go:

  - the tunnel is closed (CloseTunnel or expiry) or gone: 1000, as on one node;
  - the end's token was rotated: 1000, as on one node;
  - the end is now held by another node (a newer connection replaced it
    there), or the other end is (the load balancer moved the tunnel, after a
    node joined or died): 1001, so that the proxy reconnects at once and
    finds its partner where the load balancer now sends both. Not 1000, as
    for a replaced connection on one node: a node's view of another's ends
    can be stale for a moment (nodes write whole tunnels), and 1000 would
    end the proxy for good.

A node that dies cannot say that its connections are gone. Each node holds
a lease in the database (L{NodeLease}), renewed every few seconds; a node
that finds another's lease expired marks that node's ends disconnected
(L{mark_lapsed}), so DescribeTunnel tells the truth again. The proxies of a
dead node's tunnels reconnect meanwhile, through HAProxy, to the remaining
nodes, which take the ends over whatever the lease says.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping
from typing import Any, Protocol, cast

import attrs
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from lpxy._ws import Clock
from lpxy.tunnelservice.store import (
    DESTINATION,
    OPEN,
    SOURCE,
    EndRecord,
    ITunnelStore,
    TunnelRecord,
)
from lpxy.wire import CLOSE_GOING_AWAY, CLOSE_NORMAL

__all__ = [
    "DEFAULT_HEARTBEAT",
    "DEFAULT_LEASE",
    "Eviction",
    "INodeRegistry",
    "MemoryNodeRegistry",
    "NodeLease",
    "SQLNodeRegistry",
    "default_node_name",
    "evictions",
    "mark_lapsed",
]

DEFAULT_HEARTBEAT = 2.0
"""Seconds between a node's lease renewals."""
DEFAULT_LEASE = 10.0
"""Seconds a node's lease lasts: after this without a renewal it is taken for dead."""

TUNNEL_CLOSED = "tunnel closed"
TOKEN_ROTATED = "access token rotated"
REPLACED = "replaced by a new connection"
MOVED = "tunnel moved to another node"


def default_node_name() -> str:
    """This process's node name unless given: the host name and the process id."""
    return f"{socket.gethostname()}-{os.getpid()}"


@attrs.frozen
class Eviction:
    """One of this node's connections to close, with its code and reason."""

    mode: str
    code: int
    reason: str


def _held_elsewhere(end: EndRecord, node: str) -> bool:
    return end.connected and end.node is not None and end.node != node


def evictions(
    record: TunnelRecord | None, held: Mapping[str, bytes], node: str
) -> list[Eviction]:
    """
    Which of node C{node}'s connections of a tunnel must close now that its
    record, as another node left it, is C{record} (L{None}: deleted).

    @param held: the ends this node holds a connection of, each with the
        digest of the access token that admitted it.
    """
    if record is None or record.status != OPEN:
        return [Eviction(mode, CLOSE_NORMAL, TUNNEL_CLOSED) for mode in held]
    found = []
    for mode, token_hash in held.items():
        end = record.end(mode)
        partner = record.end(DESTINATION if mode == SOURCE else SOURCE)
        if end.token_hash != token_hash:
            found.append(Eviction(mode, CLOSE_NORMAL, TOKEN_ROTATED))
        elif _held_elsewhere(end, node):
            found.append(Eviction(mode, CLOSE_GOING_AWAY, REPLACED))
        elif _held_elsewhere(partner, node):
            found.append(Eviction(mode, CLOSE_GOING_AWAY, MOVED))
    return found


def mark_lapsed(store: ITunnelStore, node: str, now: float) -> int:
    """
    Node C{node} is gone without a word (its lease lapsed): mark the ends it
    held disconnected in C{store}. Return how many there were.
    """
    changed = {}
    count = 0
    for record in store.newest_first():
        for mode in (SOURCE, DESTINATION):
            end = record.end(mode)
            if end.node == node:
                end.connected = False
                end.node = None
                end.last_updated_at = now
                changed[record.tunnel_id] = record
                count += 1
    for record in changed.values():
        store.save(record)
    return count


class INodeRegistry(Protocol):
    """Where nodes keep their leases: a table of the shared database."""

    def renew(self, node: str, seconds: float) -> defer.Deferred[None]:
        """
        Record that C{node} lives for C{seconds} from when this is recorded
        (not from when it was asked: the database may be slow).
        """
        ...

    def lapsed(self) -> defer.Deferred[list[str]]:
        """The nodes whose lease has ended."""
        ...

    def forget(self, node: str) -> defer.Deferred[None]:
        """Drop C{node}'s lease."""
        ...


class MemoryNodeRegistry:
    """An L{INodeRegistry} in a dictionary, for nodes in one process (tests)."""

    def __init__(self, clock: Clock) -> None:
        self.leases: dict[str, float] = {}
        self._clock = clock

    def renew(self, node: str, seconds: float) -> defer.Deferred[None]:
        self.leases[node] = self._clock.seconds() + seconds
        return defer.succeed(None)

    def lapsed(self) -> defer.Deferred[list[str]]:
        now = self._clock.seconds()
        return defer.succeed(sorted(n for n, until in self.leases.items() if until < now))

    def forget(self, node: str) -> defer.Deferred[None]:
        self.leases.pop(node, None)
        return defer.succeed(None)


class SQLNodeRegistry:
    """
    An L{INodeRegistry} in the C{node_leases} table of the database a SQL
    store (L{lpxy.tunnelservice.sqlstore.SQLTunnelStore}) writes. Leases are
    in each node's own clock: the nodes' clocks must agree (NTP) to well
    within a lease.
    """

    def __init__(self, store: Any) -> None:
        self._store = store
        self._sql = store.dialect.sql

    def renew(self, node: str, seconds: float) -> defer.Deferred[None]:
        sql = self._sql(
            "INSERT INTO node_leases (node, lease_until) VALUES (?, ?) "
            "ON CONFLICT (node) DO UPDATE SET lease_until = excluded.lease_until"
        )

        def run(cursor: Any) -> None:
            # From now, in the database's thread: not from when it was queued.
            cursor.execute(sql, (node, time.time() + seconds))

        d: defer.Deferred[None] = self._store.interaction(run)
        return d

    def _run(self, statement: str, args: tuple[Any, ...]) -> defer.Deferred[None]:
        sql = self._sql(statement)

        def run(cursor: Any) -> None:
            cursor.execute(sql, args)

        d: defer.Deferred[None] = self._store.interaction(run)
        return d

    def lapsed(self) -> defer.Deferred[list[str]]:
        statement = self._sql("SELECT node FROM node_leases WHERE lease_until < ? ORDER BY node")

        def read(cursor: Any) -> list[str]:
            cursor.execute(statement, (time.time(),))
            return [row[0] for row in cursor.fetchall()]

        d: defer.Deferred[list[str]] = self._store.interaction(read)
        return d

    def forget(self, node: str) -> defer.Deferred[None]:
        return self._run("DELETE FROM node_leases WHERE node = ?", (node,))


class NodeLease(Service):
    """
    Keeps this node's lease and clears up after nodes whose lease lapsed.

    Every C{heartbeat} seconds it renews this node's lease for C{lease}
    seconds, then asks the registry for lapsed leases; for each, that node's
    ends are marked disconnected in the store, and the lease is dropped. Stopping
    drops this node's own lease (its connections were closed with 1001).
    A failure of the database is logged and tried again at the next beat.
    """

    _log = Logger()

    def __init__(
        self,
        node: str,
        registry: INodeRegistry,
        store: ITunnelStore,
        clock: Clock,
        heartbeat: float = DEFAULT_HEARTBEAT,
        lease: float = DEFAULT_LEASE,
    ) -> None:
        self.node = node
        self._registry = registry
        self._store = store
        self._clock = clock
        self._lease = lease
        self._loop = LoopingCall(self._beat)
        self._loop.clock = cast(Any, clock)
        self._heartbeat = heartbeat
        self._beating: defer.Deferred[Any] | None = None

    def startService(self) -> None:
        super().startService()
        self._loop.start(self._heartbeat, now=True)

    def _beat(self) -> defer.Deferred[Any] | None:
        if self._beating is not None:
            return None  # the database is slow: skip a beat rather than pile up
        self._beating = defer.ensureDeferred(self._renew_and_clear())
        self._beating.addErrback(
            lambda f: self._log.failure("Could not renew node {node}'s lease", f, node=self.node)
        )
        self._beating.addBoth(self._beaten)
        return None

    def _beaten(self, _: Any) -> None:
        self._beating = None

    async def _renew_and_clear(self) -> None:
        await self._registry.renew(self.node, self._lease)
        for node in await self._registry.lapsed():
            if node == self.node:
                continue
            count = mark_lapsed(self._store, node, self._clock.seconds())
            self._log.warn(
                "Node {lapsed}'s lease lapsed: marked its {count} tunnel end(s) disconnected",
                lapsed=node, count=count,
            )
            await self._registry.forget(node)

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        super().stopService()
        if self._loop.running:
            self._loop.stop()
        if self._beating is not None:
            yield self._beating
        try:
            yield self._registry.forget(self.node)
        except Exception:
            self._log.failure("Could not drop node {node}'s lease", node=self.node)
