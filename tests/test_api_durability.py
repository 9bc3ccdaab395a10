"""
The management API answers a call that changes state only once the store
has committed the change, so a service killed right after a 2xx has lost
nothing: driven over an HTTP channel on a L{StringTransport}, against a real
SQLite store whose transactions the test holds and lets run one at a time.
"""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web import server

from lpxy.tunnelservice.api import ManagementAPI, SizeLimitedRequest
from lpxy.tunnelservice.broker import Broker
from lpxy.tunnelservice.sqlstore import SQLTunnelStore, open_sqlite_store


class HeldWrites:
    """Stands in front of a store's pool: each transaction waits for L{release}."""

    def __init__(self, store: SQLTunnelStore) -> None:
        self.held: list[tuple[Deferred[Any], tuple[Any, ...]]] = []
        self._run = store._pool.runInteraction
        store._pool.runInteraction = self.hold  # type: ignore[method-assign]

    def hold(self, *args: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.held.append((d, args))
        return d

    def release(self) -> Deferred[Any]:
        """Run the oldest held transaction for real; fire once it has committed."""
        d, args = self.held.pop(0)
        self._run(*args).chainDeferred(d)
        return d

    def fail(self, error: Exception) -> None:
        """The oldest held transaction fails instead of running."""
        d, _ = self.held.pop(0)
        d.errback(Failure(error))


def request(site: server.Site, operation: str, body: dict[str, Any]) -> StringTransport:
    """Send one request on a new connection; return its transport, to read the answer."""
    address = IPv4Address("TCP", "127.0.0.1", 1234)
    channel = site.buildProtocol(address)
    transport = StringTransport(peerAddress=address)
    channel.makeConnection(transport)
    transport.protocol = channel
    content = json.dumps(body).encode()
    channel.dataReceived(
        b"POST / HTTP/1.1\r\nHost: x\r\n"
        b"X-Amz-Target: IoTSecuredTunneling." + operation.encode() + b"\r\n"
        b"Content-Length: " + str(len(content)).encode() + b"\r\n\r\n" + content
    )
    return transport


def answer(transport: StringTransport) -> tuple[int, dict[str, Any]]:
    head, _, payload = transport.value().partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), json.loads(payload)


def stored_tunnels(path: str) -> list[tuple[str, str]]:
    """What a service started now would find: (tunnel id, status) per stored tunnel."""
    connection = sqlite3.connect(path)
    try:
        return connection.execute("SELECT tunnel_id, status FROM tunnels").fetchall()
    finally:
        connection.close()


class DurableAnswerTests(TestCase):
    """A 2xx to a changing call means the change is committed."""

    def setUp(self) -> None:
        self.path = self.mktemp()
        self.store = open_sqlite_store(self.path)
        self.addCleanup(self.store.close)
        self.writes = HeldWrites(self.store)
        # Before closing the store: a test that failed may have left writes held.
        self.addCleanup(lambda: [self.writes.release() for _ in list(self.writes.held)])
        self.broker = Broker(Clock(), store=self.store)
        self.site = server.Site(ManagementAPI(self.broker), reactor=Clock())
        self.site.requestFactory = SizeLimitedRequest

    async def test_answer_waits_for_commit(self) -> None:
        """
        OpenTunnel, TagResource and CloseTunnel each answer only after the
        transaction holding their change has committed; a read answers at once.
        """
        opening = request(self.site, "OpenTunnel", {"destinationConfig": {"services": ["SSH"]}})
        self.assertEqual(opening.value(), b"")
        self.assertEqual(stored_tunnels(self.path), [])
        await self.writes.release()
        status, opened = answer(opening)
        self.assertEqual(status, 200, opened)
        tunnel_id = opened["tunnelId"]
        self.assertEqual(stored_tunnels(self.path), [(tunnel_id, "OPEN")])

        tagging = request(self.site, "TagResource", {
            "resourceArn": opened["tunnelArn"], "tags": [{"key": "k", "value": "v"}],
        })
        describing = request(self.site, "DescribeTunnel", {"tunnelId": tunnel_id})
        self.assertEqual(answer(describing)[0], 200)
        self.assertEqual(tagging.value(), b"")
        await self.writes.release()
        self.assertEqual(answer(tagging), (200, {}))

        closing = request(self.site, "CloseTunnel", {"tunnelId": tunnel_id})
        self.assertEqual(closing.value(), b"")
        self.assertEqual(stored_tunnels(self.path), [(tunnel_id, "OPEN")])
        await self.writes.release()
        self.assertEqual(answer(closing), (200, {}))
        self.assertEqual(stored_tunnels(self.path), [(tunnel_id, "CLOSED")])

    async def test_waits_for_the_transaction_holding_the_change(self) -> None:
        """
        A change made while an earlier transaction runs goes in the next
        one; its answer waits for that one, not just the running one.
        """
        first = request(self.site, "OpenTunnel", {})
        second = request(self.site, "OpenTunnel", {})
        self.assertEqual(len(self.writes.held), 1)
        await self.writes.release()
        self.assertEqual(answer(first)[0], 200)
        self.assertEqual(second.value(), b"")
        self.assertEqual(len(stored_tunnels(self.path)), 1)
        await self.writes.release()
        self.assertEqual(answer(second)[0], 200)
        self.assertEqual(len(stored_tunnels(self.path)), 2)

    def test_failed_write_is_not_a_success(self) -> None:
        """A change that could not be stored gets AWS's 500 InternalFailure, no traceback."""
        opening = request(self.site, "OpenTunnel", {})
        self.writes.fail(sqlite3.OperationalError("disk I/O error"))
        status, body = answer(opening)
        self.assertEqual(status, 500)
        self.assertEqual(body["__type"], "InternalFailure")
        self.assertNotIn(b"Traceback", opening.value())
        self.assertEqual(len(self.flushLoggedErrors(sqlite3.OperationalError)), 1)
        self.assertEqual(self.store.failed_writes, 1)

    def test_client_gone_before_commit(self) -> None:
        """A caller that hangs up while its change is written gets nothing, and nothing fails."""
        opening = request(self.site, "OpenTunnel", {})
        channel = opening.protocol
        channel.connectionLost(Failure(ConnectionError("gone")))
        self.writes.fail(sqlite3.OperationalError("disk I/O error"))
        self.assertEqual(opening.value(), b"")
        self.assertEqual(len(self.flushLoggedErrors(sqlite3.OperationalError)), 1)
