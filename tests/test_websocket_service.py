"""
Tests for L{lpxy.tunnelservice.websocket}: Autobahn clients acting as source
and destination against a real tunnel service on loopback.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import txaio
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import optionsForClientTLS
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.internet.threads import deferToThread
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase

from lpxy.frames import WIRE_FRAME_LIMIT, Message, RecordDecoder, encode
from lpxy.tunnelservice.dataplane import CLOSE_HANDSHAKE_TIMEOUT
from lpxy.tunnelservice.flow import PARTNER_BEHIND
from lpxy.tunnelservice.store import DESTINATION, SOURCE
from lpxy.tunnelservice.websocket import TunnelServerProtocol
from tests.support.certs import TestPKI, make_test_pki
from tests.support.logs import LogRecorder
from tests.support.sockets import no_delay
from tests.support.tunnelservice import ServiceFixture, api_client, start_tunnelservice
from tests.support.wsframes import encode_all

V1, V2, V3 = (f"aws.iot.securetunneling-{v}" for v in ("1.0", "2.0", "3.0"))
CT1 = "c" * 32
CT2 = "d" * 40


class HandshakeFailed(Exception):
    """A test peer's WebSocket closed before it opened (or while a test waited on it)."""


class Peer(WebSocketClientProtocol):
    """A test client: records every message, and lets tests wait for more."""

    # at debug, Autobahn would log our own request, token included
    log = txaio.make_logger(level="info")  # type: ignore[attr-defined]

    def onConnect(self, response: Any) -> None:
        self.response = response

    def onOpen(self) -> None:
        self.decoder = RecordDecoder()
        self.raw = bytearray()
        self.messages: list[Message] = []
        self.frames: list[bytes] = []
        self._waiting: list[tuple[int, defer.Deferred[list[Message]]]] = []
        self.factory.opened.callback(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.frames.append(payload)
        self.raw += payload
        self.messages.extend(self.decoder.feed(payload))
        still = []
        for count, d in self._waiting:
            if len(self.messages) >= count:
                d.callback(self.messages[:count])
            else:
                still.append((count, d))
        self._waiting = still

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if not self.factory.opened.called:
            self.factory.opened.errback(HandshakeFailed(reason))
        for _, d in self._waiting if hasattr(self, "_waiting") else ():
            d.errback(HandshakeFailed(f"closed {code} {reason}"))
        self.factory.closed.callback((code, reason))

    def onPong(self, payload: bytes) -> None:
        self.factory.pong.callback(payload)

    def wait_messages(self, count: int) -> defer.Deferred[list[Message]]:
        """Fire when C{count} messages in all have arrived."""
        if len(self.messages) >= count:
            return defer.succeed(self.messages[:count])
        d: defer.Deferred[list[Message]] = defer.Deferred()
        self._waiting.append((count, d))
        return d

    def send(self, *messages: Message) -> None:
        self.sendMessage(encode_all(messages), isBinary=True)

    @property
    def closed(self) -> defer.Deferred[tuple[int | None, str | None]]:
        return self.factory.closed


class PongLessPeer(Peer):
    """A peer that never answers a ping (its pongs are lost, or very late)."""

    def onPing(self, payload: bytes) -> None:
        pass


def data(stream: int, payload: bytes, service: str = "", connection: int = 0) -> Message:
    return Message(type=Message.DATA, streamId=stream, serviceId=service,
                   connectionId=connection, payload=payload)


def start(stream: int, service: str = "", connection: int = 0) -> Message:
    return Message(type=Message.STREAM_START, streamId=stream, serviceId=service,
                   connectionId=connection)


def reset(stream: int, service: str = "", connection: int = 0) -> Message:
    return Message(type=Message.STREAM_RESET, streamId=stream, serviceId=service,
                   connectionId=connection)


def record_of(size: int, fill: bytes) -> bytes:
    """A DATA record of exactly C{size} bytes, length prefix included."""
    length = size - 20
    while True:
        record = encode(data(1, fill * length, "SSH"))
        if len(record) == size:
            return record
        length += size - len(record)


class RawHandshake(Protocol):
    """Sends a hand-written upgrade request and keeps the whole answer."""

    def __init__(self, request: bytes, done: defer.Deferred[bytes]) -> None:
        self._request = request
        self._done = done
        self._data = b""

    def connectionMade(self) -> None:
        self.transport.write(self._request)

    def dataReceived(self, data: bytes) -> None:
        self._data += data

    def connectionLost(self, reason: Any) -> None:
        self._done.callback(self._data)


class ServiceTestCase(TestCase):
    """A tunnel service on loopback and ways to reach it: Autobahn peers and raw requests."""

    clock: Clock | None = None
    tls: TestPKI | None = None

    async def setUp(self) -> None:
        if self.clock is None:
            # The service's time (expiry, keepalive, Autobahn's closing
            # handshake timeout) stands still unless a test moves it: a
            # close the service starts ends when the peer answers, however
            # loaded the machine, and is never cut short into a 1006.
            self.clock = Clock()
        self.fixture: ServiceFixture = await start_tunnelservice(
            self, clock=self.clock, tls=self.tls
        )

    async def connect(
        self,
        mode: str,
        token: str | None,
        protocols: list[str] | None = None,
        client_token: str | None = None,
        cookie: bool = False,
        fragment: int = 0,
        tls: Any = None,
        protocol: type[Peer] = Peer,
    ) -> Peer:
        headers = {}
        if token is not None:
            if cookie:
                headers["cookie"] = f"awsiot-tunnel-token={token}"
            else:
                headers["access-token"] = token
        if client_token is not None:
            headers["client-token"] = client_token
        scheme = "ws" if tls is None else "wss"
        factory = WebSocketClientFactory(
            f"{scheme}://127.0.0.1:{self.fixture.port}/tunnel?local-proxy-mode={mode}",
            protocols=protocols or [V3],
            headers=headers,
        )
        factory.protocol = protocol
        # No timers of the test's own: a close it starts ends when the
        # service answers, whatever the machine's load, and none is left
        # running after the test.
        factory.setProtocolOptions(
            autoFragmentSize=fragment, openHandshakeTimeout=0,
            closeHandshakeTimeout=0, serverConnectionDropTimeout=0,
        )
        factory.opened = defer.Deferred()
        factory.closed = defer.Deferred()
        factory.pong = defer.Deferred()
        endpoint: Any = TCP4ClientEndpoint(reactor, "127.0.0.1", self.fixture.port)
        if tls is not None:
            endpoint = wrapClientTLS(tls, endpoint)
        peer = await endpoint.connect(factory)
        self.addCleanup(self._close, peer)
        await factory.opened
        return peer

    async def _close(self, peer: Peer) -> None:
        if peer.state == peer.STATE_OPEN:
            peer.sendClose(1000)
        await peer.factory.closed

    async def raw(self, request: bytes) -> tuple[int, bytes, bytes]:
        """Send a raw request; return (status, headers, body) of the answer."""
        done: defer.Deferred[bytes] = defer.Deferred()
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.fixture.port)
        await endpoint.connect(Factory.forProtocol(lambda: RawHandshake(request, done)))
        answer = await done
        head, _, body = answer.partition(b"\r\n\r\n")
        return int(head.split(b" ")[1]), head, body

    def server_side(self, tunnel_id: str, mode: str) -> TunnelServerProtocol:
        return self.fixture.server_side(tunnel_id, mode)

    async def pair(
        self, services: list[str] | None = None, version: str = V3
    ) -> tuple[Peer, Peer, Any]:
        opened = self.fixture.open_tunnel(services)
        source = await self.connect(SOURCE, opened.source_token, [version])
        destination = await self.connect(DESTINATION, opened.destination_token, [version])
        if version != V1:
            await source.wait_messages(1)
            await destination.wait_messages(1)
        return source, destination, opened


def upgrade(path: str, *headers: str, protocol: str | None = V3) -> bytes:
    lines = [
        f"GET {path} HTTP/1.1",
        "Host: 127.0.0.1",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version: 13",
    ]
    if protocol is not None:
        lines.append(f"Sec-WebSocket-Protocol: {protocol}")
    lines.extend(headers)
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class HandshakeTests(ServiceTestCase):
    """
    Successful handshakes and what follows: subprotocol, channel id,
    SERVICE_IDS, cookie, connection state, pings answered, an error in onOpen.
    """

    async def test_newest_subprotocol_and_channel_id(self) -> None:
        opened = self.fixture.open_tunnel(["SSH"])
        peer = await self.connect(SOURCE, opened.source_token, [V1, V3, V2, "other"])
        self.assertEqual(peer.response.protocol, V3)
        info = self.fixture.server_side(opened.tunnel_id, SOURCE)
        assert info._info is not None
        self.assertEqual(peer.response.headers["channel-id"], info._info.channel_id)
        peer2 = await self.connect(DESTINATION, opened.destination_token, [V1, V2])
        self.assertEqual(peer2.response.protocol, V2)

    async def test_service_ids(self) -> None:
        opened = self.fixture.open_tunnel(["SSH", "HTTP"])
        for mode, token, version in [
            (SOURCE, opened.source_token, V3),
            (DESTINATION, opened.destination_token, V2),
        ]:
            peer = await self.connect(mode, token, [version])
            [message] = await peer.wait_messages(1)
            self.assertEqual(message.type, Message.SERVICE_IDS)
            self.assertEqual(list(message.availableServiceIds), ["SSH", "HTTP"])

    async def test_service_ids_empty(self) -> None:
        opened = self.fixture.open_tunnel()
        peer = await self.connect(SOURCE, opened.source_token, [V2])
        [message] = await peer.wait_messages(1)
        self.assertEqual(message.type, Message.SERVICE_IDS)
        self.assertEqual(list(message.availableServiceIds), [])

    async def test_v1_gets_no_service_ids(self) -> None:
        source, destination, _ = await self.pair(version=V1)
        source.send(start(1), data(1, b"hi"))
        messages = await destination.wait_messages(2)
        self.assertEqual([m.type for m in messages], [Message.STREAM_START, Message.DATA])
        self.assertEqual(source.messages, [])

    async def test_ping_answered(self) -> None:
        source, destination, _ = await self.pair()
        source.sendPing(b"1700000000123")
        self.assertEqual(await source.factory.pong, b"1700000000123")
        self.assertEqual(len(destination.messages), 1)  # only SERVICE_IDS

    async def test_internal_error_on_open(self) -> None:
        opened = self.fixture.open_tunnel(["SSH"])
        # a record the service cannot encode makes onOpen fail
        self.fixture.broker.describe(opened.tunnel_id).services = (1,)  # type: ignore[assignment]
        peer = await self.connect(SOURCE, opened.source_token)
        self.assertEqual(await peer.closed, (1011, "internal error"))
        self.assertEqual(len(self.flushLoggedErrors(TypeError)), 1)
        self.assertFalse(self.fixture.broker.describe(opened.tunnel_id).source.connected)

    async def test_cookie(self) -> None:
        opened = self.fixture.open_tunnel()
        peer = await self.connect(SOURCE, opened.source_token, cookie=True)
        self.assertEqual(peer.response.protocol, V3)

    async def test_connection_state(self) -> None:
        opened = self.fixture.open_tunnel()
        peer = await self.connect(SOURCE, opened.source_token)
        record = self.fixture.broker.describe(opened.tunnel_id)
        self.assertTrue(record.source.connected)
        self.assertFalse(record.destination.connected)
        peer.sendClose(1000)
        await peer.closed
        self.assertFalse(record.source.connected)


class RejectionTests(ServiceTestCase):
    """Refused handshakes: 400 or 401 with a plain-text reason, and no token spent."""

    async def refused(self, request: bytes) -> tuple[int, str]:
        status, head, body = await self.raw(request)
        self.assertIn(b"content-type: text/plain", head.lower())
        return status, body.decode()

    async def test_malformed(self) -> None:
        opened = self.fixture.open_tunnel()
        token = f"access-token: {opened.source_token}"
        cases = [
            (upgrade("/elsewhere?local-proxy-mode=source", token), "Invalid request path"),
            (upgrade("/tunnel", token), "local-proxy-mode"),
            (upgrade("/tunnel?local-proxy-mode=sideways", token), "local-proxy-mode"),
            (upgrade("/tunnel?local-proxy-mode=destination", token), "local-proxy-mode"),
            (upgrade("/tunnel?local-proxy-mode=source", token, protocol=None),
             "No supported subprotocol"),
            (upgrade("/tunnel?local-proxy-mode=source", token, protocol="chat"),
             "No supported subprotocol"),
            (upgrade("/tunnel?local-proxy-mode=source", token, "client-token: short"),
             "Invalid client-token"),
            (upgrade("/tunnel?local-proxy-mode=source", token,
                     f"cookie: awsiot-tunnel-token={opened.source_token}"), "not both"),
        ]
        for request, reason in cases:
            status, body = await self.refused(request)
            self.assertEqual(status, 400, request)
            self.assertIn(reason, body)
        # none of these spent the token
        await self.connect(SOURCE, opened.source_token)

    async def test_unauthorized(self) -> None:
        opened = self.fixture.open_tunnel()
        path = "/tunnel?local-proxy-mode=source"
        status, body = await self.refused(upgrade(path))
        self.assertEqual((status, body), (401, "Missing access token\n"))
        status, body = await self.refused(upgrade(path, "access-token: nonsense"))
        self.assertEqual(status, 401)
        self.assertIn("Invalid access token", body)

        await self.connect(SOURCE, opened.source_token)
        status, body = await self.refused(upgrade(path, f"access-token: {opened.source_token}"))
        self.assertEqual(status, 401)
        self.assertIn("previously used", body)

    async def test_client_token_mismatch(self) -> None:
        opened = self.fixture.open_tunnel()
        await self.connect(SOURCE, opened.source_token, client_token=CT1)
        path = "/tunnel?local-proxy-mode=source"
        for extra in ([f"client-token: {CT2}"], []):
            status, body = await self.refused(
                upgrade(path, f"access-token: {opened.source_token}", *extra)
            )
            self.assertEqual(status, 401)
            self.assertIn("Invalid client token", body)

    async def test_rotated_token(self) -> None:
        opened = self.fixture.open_tunnel()
        self.fixture.broker.rotate(opened.tunnel_id, "all")
        status, body = await self.refused(
            upgrade("/tunnel?local-proxy-mode=source", f"access-token: {opened.source_token}")
        )
        self.assertEqual(status, 401)
        self.assertIn("Invalid access token", body)

    async def test_refusal_logged_without_token(self) -> None:
        """
        Each refused handshake is one info line naming the reason and,
        where known, the tunnel and mode; the access token is never in it.
        """
        log = LogRecorder(self)
        opened = self.fixture.open_tunnel()
        token = opened.source_token
        await self.connect(SOURCE, token)
        cases = [
            # (request, reason in the line, tunnel known, mode)
            (upgrade("/tunnel?local-proxy-mode=source", f"access-token: {token}"),
             "previously used", True, SOURCE),
            (upgrade("/tunnel?local-proxy-mode=destination", f"access-token: {token}"),
             "local-proxy-mode", True, DESTINATION),
            (upgrade("/tunnel?local-proxy-mode=source", "access-token: secret-nonsense-42"),
             "Invalid access token", False, SOURCE),
            (upgrade("/tunnel?local-proxy-mode=source", f"access-token: {token}", protocol="chat"),
             "No supported subprotocol", False, SOURCE),
            (upgrade("/tunnel", f"access-token: {token}"), "local-proxy-mode", False, None),
        ]
        for request, reason, tunnel_known, mode in cases:
            before = len(log.events)
            await self.refused(request)
            lines = [
                e for e in log.events[before:]
                if "Refused tunnel handshake" in formatEvent(e)
            ]
            self.assertEqual(len(lines), 1, request)
            line = lines[0]
            self.assertEqual(line["log_level"], LogLevel.info)
            self.assertIn(reason, formatEvent(line))
            self.assertEqual(line["tunnel_id"], opened.tunnel_id if tunnel_known else None)
            self.assertEqual(line["mode"], mode)
            if tunnel_known:
                self.assertIn(f"tunnel {opened.tunnel_id}", formatEvent(line))
            if mode is not None:
                self.assertIn(f"({mode})", formatEvent(line))
        self.assertEqual(log.mentioning(token), [])
        self.assertEqual(log.mentioning("secret-nonsense-42"), [])

    async def test_autobahn_client_sees_refusal(self) -> None:
        with self.assertRaises(HandshakeFailed):
            await self.connect(SOURCE, "nonsense")


class RelayTests(ServiceTestCase):
    """Records relayed between the ends in order and unchanged, framing, resets."""

    async def relay_both_ways(self, version: str) -> None:
        """
        STREAM_START, DATA, STREAM_RESET (and in 3.0 CONNECTION_START and
        CONNECTION_RESET) from source to destination and back, one record
        per WebSocket message as the reference sends them: they arrive in
        order and byte for byte. A 1.0 peer sends no serviceId, a 1.0 or
        2.0 peer no connectionId.
        """
        v1, v3 = version == V1, version == V3
        ssh = "" if v1 else "SSH"

        def conn(n: int) -> int:
            return n if v3 else 0

        def connection(kind: Message.Type, stream: int, n: int) -> Message:
            return Message(type=kind, streamId=stream, serviceId=ssh, connectionId=n)

        source, destination, _ = await self.pair(None if v1 else ["SSH", "HTTP"], version)
        sent = [start(1, ssh, conn(1))]
        sent += [data(1, bytes([i]) * (i * 100 + 1), ssh, conn(1)) for i in range(50)]
        if v3:
            sent += [connection(Message.CONNECTION_START, 1, 2), data(1, b"two", ssh, 2),
                     connection(Message.CONNECTION_RESET, 1, 2)]
        sent += [reset(1, ssh, conn(1)), start(2, ssh, conn(1)), data(2, b"again", ssh, conn(1))]
        if not v1:
            sent += [start(1, "HTTP", conn(1)), data(1, b"GET /", "HTTP", conn(1))]
        back = [data(2, b"reply", ssh, conn(1))]
        if v3:
            back += [connection(Message.CONNECTION_RESET, 2, 1)]
        back += [reset(2, ssh, conn(1))]
        if not v1:
            back += [data(1, b"200 OK", "HTTP", conn(1)), reset(1, "HTTP", conn(1))]

        ids = 0 if v1 else 1
        for message in sent:
            source.send(message)
        got = await destination.wait_messages(ids + len(sent))
        self.assertEqual(got[ids:], sent)
        head = len(encode(got[0])) if ids else 0
        self.assertEqual(bytes(destination.raw[head:]), encode_all(sent))
        for message in back:
            destination.send(message)
        got = await source.wait_messages(ids + len(back))
        self.assertEqual(got[ids:], back)
        head = len(encode(got[0])) if ids else 0
        self.assertEqual(bytes(source.raw[head:]), encode_all(back))
        for message in sent + back:
            self.assertEqual(message.serviceId == "", v1)
            self.assertEqual(message.connectionId == 0, not v3)

    async def test_relay_order_both_ways_1_0(self) -> None:
        await self.relay_both_ways(V1)

    async def test_relay_order_both_ways_2_0(self) -> None:
        await self.relay_both_ways(V2)

    async def test_relay_order_both_ways_3_0(self) -> None:
        await self.relay_both_ways(V3)

    async def test_mixed_versions(self) -> None:
        """A 3.0 source speaking V2 to a 2.0 destination: records pass as they are."""
        opened = self.fixture.open_tunnel(["SSH"])
        source = await self.connect(SOURCE, opened.source_token, [V3])
        destination = await self.connect(DESTINATION, opened.destination_token, [V2])
        for peer in (source, destination):
            [ids] = await peer.wait_messages(1)
            self.assertEqual(list(ids.availableServiceIds), ["SSH"])
        sent = [start(1, "SSH"), data(1, b"v2 style", "SSH")]
        source.send(*sent)
        self.assertEqual((await destination.wait_messages(3))[1:], sent)
        destination.send(data(1, b"back", "SSH"), reset(1, "SSH"))
        self.assertEqual((await source.wait_messages(3))[1:],
                         [data(1, b"back", "SSH"), reset(1, "SSH")])

    async def test_packed_and_split_records(self) -> None:
        source, destination, _ = await self.pair(["SSH"])
        sent = [start(1, "SSH", 1)] + [data(1, bytes([i]) * 3000, "SSH", 1) for i in range(40)]
        stream = encode_all(sent)
        # records cut at arbitrary points, and many records per message
        cuts = [0, 1, 2, 7, 3001, 3002, 10000, 60000, len(stream)]
        for a, b in itertools.pairwise(cuts):
            source.sendMessage(stream[a:b], isBinary=True)
        got = await destination.wait_messages(1 + len(sent))
        self.assertEqual(got[1:], sent)
        self.assertTrue(all(len(f) <= WIRE_FRAME_LIMIT for f in destination.frames))
        # a message of whole records goes on as it is
        whole = encode_all([data(1, b"a", "SSH"), data(1, b"b" * 35000, "SSH")])
        source.sendMessage(whole, isBinary=True)
        await destination.wait_messages(3 + len(sent))
        self.assertEqual(destination.frames[-1], whole)

    async def test_fragmented_frames(self) -> None:
        opened = self.fixture.open_tunnel(["SSH"])
        source = await self.connect(SOURCE, opened.source_token, fragment=1000)
        destination = await self.connect(DESTINATION, opened.destination_token)
        await destination.wait_messages(1)
        sent = [start(1, "SSH"), data(1, b"x" * 50000, "SSH"), data(1, b"y", "SSH")]
        source.send(*sent)
        self.assertEqual((await destination.wait_messages(4))[1:], sent)

    async def test_largest_frames(self) -> None:
        source, destination, _ = await self.pair(["SSH"])
        head = encode(start(1, "SSH"))
        first = record_of(65537, b"z")
        second = record_of(WIRE_FRAME_LIMIT - len(head) - len(first), b"w")
        payload = head + first + second
        self.assertEqual(len(payload), WIRE_FRAME_LIMIT)
        source.sendMessage(payload, isBinary=True)
        # then a record split so that the next message would exceed the limit
        rest = encode(data(1, b"v" * 65000, "SSH")) * 2
        source.sendMessage(rest[:100], isBinary=True)
        source.sendMessage(rest[100:], isBinary=True)
        await destination.wait_messages(6)
        self.assertTrue(all(len(f) <= WIRE_FRAME_LIMIT for f in destination.frames))

    async def test_oversized_frame_refused(self) -> None:
        source, _, opened = await self.pair(["SSH"])
        source.sendMessage(b"\x00" * (WIRE_FRAME_LIMIT + 1), isBinary=True)
        code, _ = await source.closed
        self.assertEqual(code, 1009)
        self.assertFalse(self.fixture.broker.describe(opened.tunnel_id).source.connected)

    async def test_no_partner(self) -> None:
        opened = self.fixture.open_tunnel(["SSH"])
        source = await self.connect(SOURCE, opened.source_token)
        source.send(start(4, "SSH", 1), data(4, b"lost", "SSH", 1),
                    Message(type=Message.CONNECTION_START, streamId=4, serviceId="SSH",
                            connectionId=2))
        got = await source.wait_messages(3)
        self.assertEqual(got[1:], [
            reset(4, "SSH", 1),
            Message(type=Message.CONNECTION_RESET, streamId=4, serviceId="SSH",
                    connectionId=2),
        ])

    async def test_ignorable_unknown_type_relayed(self) -> None:
        source, destination, _ = await self.pair()
        odd = Message(type=42, ignorable=True, streamId=1)  # type: ignore[arg-type]
        source.send(odd, start(1))
        self.assertEqual((await destination.wait_messages(3))[1:], [odd, start(1)])

    async def test_stream_reset_when_peer_leaves(self) -> None:
        source, destination, _ = await self.pair(["SSH", "HTTP", "DB"])
        source.send(start(1, "SSH", 1), start(2, "HTTP"), start(3, "DB", 5), reset(3, "DB", 5),
                    start(1, "SSH", 1))
        await destination.wait_messages(6)
        source.sendClose(1000)
        await source.closed
        got = await destination.wait_messages(8)
        self.assertEqual(
            sorted(got[6:], key=lambda m: m.serviceId),
            [reset(2, "HTTP"), reset(1, "SSH", 1)],
        )

    async def test_stream_reset_to_source_when_destination_leaves(self) -> None:
        source, destination, _ = await self.pair(version=V1)
        source.send(start(3), data(3, b"x"))
        await destination.wait_messages(2)
        destination.sendClose(1000)
        await destination.closed
        self.assertEqual(await source.wait_messages(1), [reset(3)])


class ViolationTests(ServiceTestCase):
    """
    What a client must not send closes its connection with a code, logged
    once, and resets its partner's streams (each rule: tests.test_policy).
    """

    async def violate(self, *messages: Message, mode: str = SOURCE,
                      raw: bytes | None = None, binary: bool = True) -> tuple[int, str]:
        source, destination, opened = await self.pair(["SSH"])
        source.send(start(1, "SSH"))
        await destination.wait_messages(2)
        offender = source if mode == SOURCE else destination
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        offender.sendMessage(raw if raw is not None else encode_all(messages), isBinary=binary)
        code, reason = await offender.closed
        self.assertFalse(self.fixture.broker.describe(opened.tunnel_id).end(mode).connected)
        [logged] = [e for e in events if e.get("log_level") == LogLevel.warn]
        self.assertEqual(
            {k: logged.get(k) for k in ("mode", "tunnel_id", "channel_id", "code")},
            {"mode": mode, "tunnel_id": opened.tunnel_id,
             "channel_id": offender.response.headers["channel-id"], "code": code},
        )
        # the close frame carries at most 123 bytes of it; the log has it whole
        assert reason is not None
        self.assertTrue(logged["reason"].startswith(reason), (logged["reason"], reason))
        self.assertIn(logged["reason"], formatEvent(logged))
        self.assertEqual(
            logged["log_namespace"], "lpxy.tunnelservice.websocket.TunnelServerProtocol"
        )
        if mode == SOURCE:
            self.assertEqual((await destination.wait_messages(3))[2], reset(1, "SSH"))
        else:
            self.assertEqual((await source.wait_messages(2))[1], reset(1, "SSH"))
        assert code is not None and reason is not None
        return code, reason

    async def test_unknown_service(self) -> None:
        code, reason = await self.violate(data(1, b"x", "FTP"))
        self.assertEqual(code, 1008)
        self.assertIn("FTP", reason)

    async def test_destination_starts(self) -> None:
        code, reason = await self.violate(start(2, "SSH"), mode=DESTINATION)
        self.assertEqual(code, 1008)
        self.assertIn("destination sent STREAM_START", reason)

    async def test_bad_records(self) -> None:
        code, reason = await self.violate(raw=b"\x00\x00")
        self.assertEqual(code, 1002)
        self.assertIn("length", reason)
        code, reason = await self.violate(raw=b"\x00\x02\xff\xff")
        self.assertEqual(code, 1002)

    async def test_text_message(self) -> None:
        code, _ = await self.violate(raw=b"hello", binary=False)
        self.assertEqual(code, 1003)


class TokenTests(ServiceTestCase):
    """Client-token reconnects, replacement of a live end, and rotation over real sockets."""

    async def test_client_token_reconnect(self) -> None:
        opened = self.fixture.open_tunnel()
        first = await self.connect(SOURCE, opened.source_token, client_token=CT1)
        first.sendClose(1000)
        await first.closed
        second = await self.connect(SOURCE, opened.source_token, client_token=CT1)
        self.assertEqual(second.response.protocol, V3)

    async def test_replacement(self) -> None:
        opened = self.fixture.open_tunnel(["SSH"])
        old = await self.connect(SOURCE, opened.source_token, client_token=CT1)
        destination = await self.connect(DESTINATION, opened.destination_token)
        await old.wait_messages(1)
        old.send(start(1, "SSH"), data(1, b"a", "SSH"))
        await destination.wait_messages(3)
        new = await self.connect(SOURCE, opened.source_token, client_token=CT1)
        self.assertEqual(await old.closed, (1000, "replaced by a new connection"))
        self.assertEqual((await destination.wait_messages(4))[3], reset(1, "SSH"))
        await new.wait_messages(1)
        new.send(start(1, "SSH"), data(1, b"b", "SSH"))
        self.assertEqual((await destination.wait_messages(6))[4:],
                         [start(1, "SSH"), data(1, b"b", "SSH")])
        self.assertTrue(self.fixture.broker.describe(opened.tunnel_id).source.connected)

    async def test_rotation_closes(self) -> None:
        source, destination, opened = await self.pair(["SSH"])
        rotated = self.fixture.broker.rotate(opened.tunnel_id, DESTINATION)
        self.assertEqual(await destination.closed, (1000, "access token rotated"))
        self.assertEqual(source.state, source.STATE_OPEN)
        assert rotated.destination_token is not None
        again = await self.connect(DESTINATION, rotated.destination_token)
        self.assertEqual((await again.wait_messages(1))[0].type, Message.SERVICE_IDS)


class LifecycleTests(ServiceTestCase):
    """CloseTunnel closes both peers with 1000; stopping the service with 1001."""

    async def test_close_tunnel(self) -> None:
        source, destination, opened = await self.pair()
        self.fixture.close_tunnel(opened.tunnel_id)
        self.assertEqual(await source.closed, (1000, "tunnel closed"))
        self.assertEqual(await destination.closed, (1000, "tunnel closed"))
        status, _, body = await self.raw(upgrade(
            "/tunnel?local-proxy-mode=source", f"access-token: {opened.source_token}"))
        self.assertEqual(status, 401)
        self.assertIn(b"tunnel is closed", body)

    async def test_stop_service(self) -> None:
        source, destination, _ = await self.pair()
        await self.fixture.service.stopService()
        self.assertEqual((await source.closed)[0], 1001)
        self.assertEqual((await destination.closed)[0], 1001)


class SlowCloserPeer(Peer):
    """
    A peer that holds back its answer to the service's close until the test
    lets it go (C{answer}); C{close_received} fires when the close arrives.
    """

    def onOpen(self) -> None:
        self.close_received: defer.Deferred[None] = defer.Deferred()
        self._held: tuple[int, bytes] | None = None
        super().onOpen()  # fires the test's wait for the connection

    def onCloseFrame(self, code: int, reasonRaw: bytes) -> bool | None:
        if self._held is None and self.state == self.STATE_OPEN:
            self._held = (code, reasonRaw)
            self.close_received.callback(None)
            return None
        return super().onCloseFrame(code, reasonRaw)

    def answer(self) -> None:
        assert self._held is not None
        super().onCloseFrame(*self._held)


class CloseHandshakeTimeoutTests(ServiceTestCase):
    """
    A peer has L{CLOSE_HANDSHAKE_TIMEOUT} seconds of the service's clock to
    answer a close: a slow answer still closes cleanly with the close's
    code, a peer that never answers is dropped at that bound.
    """

    async def closing(self) -> tuple[SlowCloserPeer, TunnelServerProtocol]:
        opened = self.fixture.open_tunnel()
        peer = await self.connect(SOURCE, opened.source_token, protocol=SlowCloserPeer)
        server = self.server_side(opened.tunnel_id, SOURCE)
        self.fixture.close_tunnel(opened.tunnel_id)
        await peer.close_received
        return peer, server

    async def test_late_answer_closes_cleanly(self) -> None:
        self.assertGreater(CLOSE_HANDSHAKE_TIMEOUT, 2)
        peer, server = await self.closing()
        assert self.clock is not None
        self.clock.advance(2)  # more than Autobahn's default of 1 s
        self.assertEqual(server.state, server.STATE_CLOSING)
        peer.answer()
        self.assertEqual(await peer.closed, (1000, "tunnel closed"))
        self.assertTrue(peer.wasClean)
        self.assertTrue(server.wasClean)

    async def test_silent_peer_dropped_at_bound(self) -> None:
        peer, server = await self.closing()
        assert self.clock is not None
        self.clock.advance(CLOSE_HANDSHAKE_TIMEOUT - 0.01)
        self.assertEqual(server.state, server.STATE_CLOSING)
        self.clock.advance(0.01)
        self.assertEqual((await peer.closed)[0], 1006)
        self.assertFalse(server.wasClean)
        self.assertTrue(server.wasCloseHandshakeTimeout)


class ExpiryTests(ServiceTestCase):
    """A tunnel's lifetime ends on the service's L{Clock}: its peers are closed."""

    async def setUp(self) -> None:
        self.clock = Clock()
        await super().setUp()

    async def test_expiry(self) -> None:
        opened = self.fixture.open_tunnel(lifetime_minutes=1)
        source = await self.connect(SOURCE, opened.source_token)
        assert self.clock is not None
        self.clock.advance(60)
        self.assertEqual(await source.closed, (1000, "tunnel lifetime expired"))
        status, _, _ = await self.raw(upgrade(
            "/tunnel?local-proxy-mode=destination",
            f"access-token: {opened.destination_token}"))
        self.assertEqual(status, 401)


def next_pong(server: TunnelServerProtocol) -> defer.Deferred[bytes]:
    """Fire when the service's side of a connection next receives a pong."""
    d: defer.Deferred[bytes] = defer.Deferred()

    def on_pong(payload: bytes) -> None:
        del server.onPong
        d.callback(payload)

    server.onPong = on_pong  # type: ignore[method-assign]
    return d


class KeepaliveTests(ServiceTestCase):
    """
    The service pings a peer after 30 s of silence and drops it after 90 s
    without anything from it: a half-open connection does not stay CONNECTED.
    """

    async def setUp(self) -> None:
        self.clock = Clock()
        await super().setUp()
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    def advance(self, seconds: float) -> None:
        assert self.clock is not None
        self.clock.advance(seconds)

    async def test_silent_peer_dropped_answering_peer_kept(self) -> None:
        opened = self.fixture.open_tunnel(["SSH"])
        source = await self.connect(SOURCE, opened.source_token, protocol=PongLessPeer)
        destination = await self.connect(DESTINATION, opened.destination_token)
        await source.wait_messages(1)
        await destination.wait_messages(1)
        source.send(start(1, "SSH", 1))
        await destination.wait_messages(2)
        server_destination = self.server_side(opened.tunnel_id, DESTINATION)
        for _ in range(2):
            pong = next_pong(server_destination)
            self.advance(30)
            await pong
            self.assertTrue(self.fixture.broker.describe(opened.tunnel_id).source.connected)
        pong = next_pong(server_destination)
        self.advance(30)
        self.assertEqual((await source.closed)[0], 1006)
        record = self.fixture.broker.describe(opened.tunnel_id)
        self.assertFalse(record.source.connected)
        self.assertEqual(record.source.last_updated_at, 90)
        self.assertEqual((await destination.wait_messages(3))[2], reset(1, "SSH", 1))
        [dropped] = [e for e in self.events if "Dropping" in e["log_format"]]
        self.assertEqual(
            (dropped["mode"], dropped["tunnel_id"], dropped["silent"]),
            (SOURCE, opened.tunnel_id, 90),
        )
        # the destination answers its pings and stays
        await pong
        for _ in range(4):
            pong = next_pong(server_destination)
            self.advance(30)
            await pong
        self.assertTrue(self.fixture.broker.describe(opened.tunnel_id).destination.connected)
        self.assertEqual(destination.state, destination.STATE_OPEN)

    async def test_any_data_counts(self) -> None:
        """A peer slow to pong but sending data is alive; once it stops, it is dropped."""
        opened = self.fixture.open_tunnel(["SSH"])
        source = await self.connect(SOURCE, opened.source_token, protocol=PongLessPeer)
        destination = await self.connect(
            DESTINATION, opened.destination_token, protocol=PongLessPeer
        )
        await source.wait_messages(1)
        await destination.wait_messages(1)
        source.send(start(1, "SSH"))
        await destination.wait_messages(2)
        for i in range(6):
            source.send(data(1, b"up", "SSH"))
            destination.send(data(1, b"down", "SSH"))
            await destination.wait_messages(3 + i)
            await source.wait_messages(2 + i)
            self.advance(30)
        self.assertEqual(source.state, source.STATE_OPEN)
        self.assertEqual(destination.state, destination.STATE_OPEN)
        record = self.fixture.broker.describe(opened.tunnel_id)
        self.assertTrue(record.source.connected and record.destination.connected)
        self.advance(60)
        self.assertEqual((await source.closed)[0], 1006)
        self.assertEqual((await destination.closed)[0], 1006)

    async def test_not_reading_is_not_silence(self) -> None:
        """While flow control keeps the service from reading a peer, it is not dropped."""
        opened = self.fixture.open_tunnel()
        source = await self.connect(SOURCE, opened.source_token, protocol=PongLessPeer)
        server_source = self.server_side(opened.tunnel_id, SOURCE)
        server_source.pause_reading()
        for _ in range(10):
            self.advance(30)
        self.assertEqual([e for e in self.events if "Dropping" in e["log_format"]], [])
        self.assertEqual(server_source.state, server_source.STATE_OPEN)
        server_source.resume_reading()
        self.advance(30)
        self.advance(30)
        self.advance(30)
        self.assertEqual((await source.closed)[0], 1006)
        self.assertFalse(self.fixture.broker.describe(opened.tunnel_id).source.connected)


class FlowControlTests(ServiceTestCase):
    """A peer that does not read pauses the service's reading of its partner."""

    async def test_slow_destination_pauses_source(self) -> None:
        source, destination, opened = await self.pair(["SSH"])
        server_source = self.server_side(opened.tunnel_id, SOURCE)
        paused: defer.Deferred[None] = defer.Deferred()
        original = server_source.pause_reading

        def pause(reason: str = PARTNER_BEHIND) -> None:
            original(reason)
            if not paused.called:
                paused.callback(None)

        server_source.pause_reading = pause  # type: ignore[method-assign]
        destination.transport.pauseProducing()
        record = encode(data(1, b"p" * 64000, "SSH"))
        total = 400
        source.send(start(1, "SSH"))
        for _ in range(total):
            source.sendMessage(record * 2, isBinary=True)
        await paused
        # the service stopped reading long before the source's data ran out
        self.assertLess(server_source._bytes_in, total * len(record))
        self.assertTrue(server_source._pausers)
        destination.transport.resumeProducing()
        got = await destination.wait_messages(2 + 2 * total)
        self.assertEqual(sum(len(m.payload) for m in got), 2 * total * 64000)
        self.assertFalse(server_source._pausers)


class TokenNeverLoggedTests(ServiceTestCase):
    """No access or client token in any log event, even at debug."""

    async def test_debug_logging(self) -> None:
        """
        Even with Autobahn's loggers at debug, no log event of the service
        carries an access token or a client token.
        """
        logs = LogRecorder(self)
        txaio.set_global_log_level("debug")
        self.addCleanup(txaio.set_global_log_level, "info")
        opened = self.fixture.open_tunnel(["SSH"])
        source = await self.connect(SOURCE, opened.source_token, client_token=CT1)
        destination = await self.connect(DESTINATION, opened.destination_token, cookie=True)
        await destination.wait_messages(1)
        status, _, _ = await self.raw(upgrade(
            "/tunnel?local-proxy-mode=destination",
            f"access-token: {opened.destination_token}"))
        self.assertEqual(status, 401)
        status, _, _ = await self.raw(upgrade(
            "/tunnel?local-proxy-mode=source",
            f"access-token: {opened.source_token}", f"client-token: {CT2}"))
        self.assertEqual(status, 401)
        source.sendClose(1000)
        self.assertEqual(await source.closed, (1000, None))
        await logs.when("Peer disconnected")
        self.assertTrue(logs.texts("Peer connected"))
        for secret in (opened.source_token, opened.destination_token, CT1, CT2):
            self.assertEqual(logs.mentioning(secret), [])


class NoDelayTests(ServiceTestCase):
    """C{TCP_NODELAY} on the service's side of every peer's socket."""

    async def test_tcp_nodelay(self) -> None:
        _, _, opened = await self.pair()
        for mode in (SOURCE, DESTINATION):
            self.assertTrue(no_delay(self.server_side(opened.tunnel_id, mode).transport))


class TLSTests(ServiceTestCase):
    """The data plane and the API on a TLS port with a test CA."""

    async def setUp(self) -> None:
        directory = Path(self.mktemp())
        directory.mkdir()
        self.pki = make_test_pki(directory)
        self.tls = self.pki
        await super().setUp()
        self.client_tls = optionsForClientTLS("localhost", trustRoot=self.pki.ca_certificate())

    async def test_relay_over_tls(self) -> None:
        self.assertTrue(self.fixture.api_url.startswith("https://127.0.0.1:"))
        opened = self.fixture.open_tunnel(["SSH"])
        source = await self.connect(SOURCE, opened.source_token, tls=self.client_tls)
        destination = await self.connect(
            DESTINATION, opened.destination_token, tls=self.client_tls
        )
        await source.wait_messages(1)
        await destination.wait_messages(1)
        sent = [start(1, "SSH"), data(1, b"secret" * 10000, "SSH")]
        source.send(*sent)
        self.assertEqual((await destination.wait_messages(3))[1:], sent)
        self.assertTrue(no_delay(self.server_side(opened.tunnel_id, SOURCE).transport))

    async def test_api_over_tls(self) -> None:
        def describe() -> Any:
            client = api_client(self.fixture.api_url, verify=str(self.pki.ca_cert_path))
            opened = client.open_tunnel()
            return client.describe_tunnel(tunnelId=opened["tunnelId"])["tunnel"]

        tunnel = await deferToThread(describe)
        self.assertEqual(tunnel["status"], "OPEN")
