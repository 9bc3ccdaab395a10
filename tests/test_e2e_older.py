"""
A V3 source meets an older destination and learns it from the answers
(L{lpxy.proxy.session.older_destination}), through the real tunnel service.

The destinations are strict stand-ins written here, not lpxy's own proxy
told to speak an older subprotocol (which still answers with the source's
connection ids): like the reference's V1 and V2 proxies on the wire, they
know only their version's fields, answer every stream with connection id
0, and a V1 one names no service. Each echoes what it gets, prefixed, on the
stream it was started for.
"""

from __future__ import annotations

from typing import Any

import txaio  # type: ignore[import-untyped]
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.trial.unittest import TestCase

from lpxy.frames import Message, RecordDecoder, encode
from tests.support.apps import connect_client
from tests.support.logs import LogRecorder
from tests.support.proxies import V1, V2, make_config, start_proxy
from tests.support.tunnelservice import ServiceFixture, start_tunnelservice


class OldDestination(WebSocketClientProtocol):
    """
    A V1 or V2 destination as the reference's older versions are on the
    wire: it reads and writes only the fields its version has.
    """

    # at debug, Autobahn would log the request, token included
    log = txaio.make_logger(level="info")  # type: ignore[attr-defined]
    factory: Any

    def onOpen(self) -> None:
        self.decoder = RecordDecoder()
        self.received: list[Message] = []
        self.unknown: list[int] = []
        self.stream = 0
        self.service = ""
        self.factory.opened.callback(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        for message in self.decoder.feed(payload):
            self.received.append(message)
            self.handle(message)

    def handle(self, message: Message) -> None:
        version = self.factory.peer_version
        kind = message.type
        if kind == Message.STREAM_START:
            self.stream = message.streamId
            self.service = message.serviceId if version == 2 else ""
        elif kind == Message.DATA:
            if message.streamId == self.stream and (
                version == 1 or message.serviceId == self.service
            ):
                self.answer(b"echo:" + message.payload)
        elif kind == Message.STREAM_RESET:
            if message.streamId == self.stream:
                self.stream = 0
        elif kind == Message.SERVICE_IDS and version == 2:
            pass
        else:
            # CONNECTION_START and CONNECTION_RESET mean nothing to it.
            self.unknown.append(int(kind))

    def answer(self, payload: bytes) -> None:
        reply = Message(type=Message.DATA, streamId=self.stream, payload=payload)
        if self.factory.peer_version == 2:
            reply.serviceId = self.service
        self.sendMessage(encode(reply), isBinary=True)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if not self.factory.opened.called:
            self.factory.opened.errback(AssertionError(f"not opened: {code} {reason}"))
        self.factory.closed.callback(None)


async def connect_old_destination(
    case: TestCase, fixture: ServiceFixture, token: str, version: int
) -> OldDestination:
    factory = WebSocketClientFactory(
        f"ws://127.0.0.1:{fixture.port}/tunnel?local-proxy-mode=destination",
        protocols=[V1 if version == 1 else V2],
        headers={"access-token": token},
    )
    factory.protocol = OldDestination
    factory.setProtocolOptions(openHandshakeTimeout=0)
    factory.peer_version = version
    factory.opened = Deferred()
    factory.closed = Deferred()
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", fixture.port)
    protocol = await endpoint.connect(factory)

    async def close() -> None:
        if protocol.state == protocol.STATE_OPEN:
            protocol.sendClose(1000)
        await factory.closed

    case.addCleanup(lambda: Deferred.fromCoroutine(close()))
    return await factory.opened  # type: ignore[no-any-return]


class OlderDestinationTests(TestCase):
    """A V3 lpxy source (no -y) against V1 and V2 stand-ins."""

    timeout = 30

    async def start(self, version: int, client_type: str | None = None) -> tuple[Any, int]:
        fixture = await start_tunnelservice(self)
        opened = fixture.open_tunnel(["SSH"])
        old = await connect_old_destination(self, fixture, opened.destination_token, version)
        source = await start_proxy(self, make_config(
            fixture, opened.source_token, "source", source_ports={"SSH": 0},
            client_type=client_type,
        ))
        listeners = source.connector.listeners
        assert listeners is not None
        port = listeners.port_for("SSH")
        assert port is not None
        return old, port

    async def round_trip(self, port: int, text: bytes) -> Any:
        client = await connect_client(self, port)
        assert client.transport is not None
        client.transport.write(text)
        self.assertEqual(await client.received(5 + len(text)), b"echo:" + text)
        return client

    def kinds(self, old: OldDestination) -> list[tuple[str, int, str, int]]:
        return [
            (Message.Type.Name(m.type), m.streamId, m.serviceId, m.connectionId)
            for m in old.received if m.type != Message.SERVICE_IDS
        ]

    async def test_v2(self) -> None:
        """
        The first answer has connection id 0: the source switches to V2 and
        says so once; the next client starts a new stream (replacing the
        first) and nothing the old peer does not know is ever sent.
        """
        logs = LogRecorder(self)
        old, port = await self.start(2)
        first = await self.round_trip(port, b"hello")
        await self.round_trip(port, b"again")
        await first.closed
        self.assertEqual(self.kinds(old), [
            ("STREAM_START", 1, "SSH", 1),
            ("DATA", 1, "SSH", 1),
            ("STREAM_START", 2, "SSH", 0),
            ("DATA", 2, "SSH", 0),
        ])
        self.assertEqual(old.unknown, [])
        [line] = logs.texts("The destination answers as")
        self.assertIn("as a V2 peer (no connection ids): speaking V2", line)

    async def test_v1(self) -> None:
        """
        The first answer names no service: the source switches to V1 and
        names none from then on.
        """
        logs = LogRecorder(self)
        old, port = await self.start(1)
        first = await self.round_trip(port, b"hello")
        assert first.transport is not None
        first.transport.write(b"more")
        self.assertEqual(await first.received(10 + 9), b"echo:helloecho:more")
        await self.round_trip(port, b"again")
        self.assertEqual(self.kinds(old), [
            ("STREAM_START", 1, "SSH", 1),
            ("DATA", 1, "SSH", 1),
            ("DATA", 1, "", 0),
            ("STREAM_START", 2, "", 0),
            ("DATA", 2, "", 0),
        ])
        [line] = logs.texts("The destination answers as")
        self.assertIn("as a V1 peer (no service id): speaking V1", line)

    async def test_forced(self) -> None:
        """With -y V2 the source speaks V2 from the start and learns nothing."""
        logs = LogRecorder(self)
        old, port = await self.start(2, client_type="V2")
        await self.round_trip(port, b"hello")
        self.assertEqual(self.kinds(old), [
            ("STREAM_START", 1, "SSH", 0),
            ("DATA", 1, "SSH", 0),
        ])
        self.assertEqual(logs.texts("The destination answers as"), [])
