"""
End to end against a hostile tunneling service (L{tests.support.hostile}):
whatever it sends, the local proxy prints no traceback and no C{Failure}
dump, says what was wrong in one log line, and keeps serving what it can or
reconnects.
"""

from __future__ import annotations

import struct
from typing import Any, cast

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.logger import LogLevel, formatEvent
from twisted.trial.unittest import TestCase

from lpxy.frames import LENGTH_PREFIX, Message
from lpxy.proxy.service import LocalProxyService
from tests.support.apps import connect_client, start_app
from tests.support.hostile import HostileConnection, HostileService, start_hostile
from tests.support.logs import LogRecorder
from tests.support.proxies import V2, listener_ports, make_config, start_proxy, tcp
from tests.support.waiting import turns

TOKEN = "hostile-test-token"


def ids_record(ids: list[str]) -> Message:
    return Message(type=Message.SERVICE_IDS, availableServiceIds=ids)


class HostileServiceTests(TestCase):
    timeout = 30

    def setUp(self) -> None:
        self.logs = LogRecorder(self)

    def tearDown(self) -> None:
        self.assertClean()

    def assertClean(self) -> None:
        """No traceback, no C{Failure} dump, no event carrying a failure."""
        for event in self.logs.events:
            self.assertNotIn("log_failure", event, event.get("log_format"))
        for text in self.logs.texts():
            self.assertNotIn("Traceback", text)
            self.assertNotIn("Failure", text)

    def warnings(self) -> list[str]:
        return [formatEvent(e) for e in self.logs.events
                if e.get("log_level", LogLevel.info) >= LogLevel.warn]

    def lines(self, containing: str) -> list[str]:
        return self.logs.texts(containing)

    async def start(
        self, service: HostileService, mode: str = "source", **kwargs: Any
    ) -> LocalProxyService:
        config = make_config(cast(Any, service), TOKEN, mode, **kwargs)
        return await start_proxy(self, config, wait=False)

    def start_source(self, service: HostileService, **ports: int) -> Deferred[LocalProxyService]:
        return Deferred.fromCoroutine(self.start(service, "source", source_ports=ports))

    @inlineCallbacks
    def test_thousands_of_service_ids(self) -> Any:
        """
        A source with no map listens for the first C{max_services} of
        5000 ids, says so once, and serves them.
        """
        service = yield Deferred.fromCoroutine(start_hostile(self))
        ids = [f"S{i}" for i in range(5000)]
        service.on_open = lambda c: c.send_records([ids_record(ids)])
        proxy = yield self.start_source(service)
        yield proxy.client.whenConnected()
        ports = listener_ports(proxy)
        self.assertEqual(sorted(ports), sorted(ids[:9]))
        (line,) = self.lines("services, more than")
        self.assertIn("announced 5000 services, more than the 9 served", line)
        client = yield Deferred.fromCoroutine(connect_client(self, ports["S3"]))
        connection = service.connections[0]
        while not connection.received:
            yield turns(1)
        (start,) = connection.received
        self.assertEqual((start.type, start.serviceId, start.streamId),
                         (Message.STREAM_START, "S3", 1))
        client.transport.loseConnection()
        yield client.closed

    @inlineCallbacks
    def test_thousands_of_ids_to_a_named_map(self) -> Any:
        """
        A named map cannot fit 5000 services: the proxy ends with status 1
        and one error line of bounded length.
        """
        service = yield Deferred.fromCoroutine(start_hostile(self))
        service.on_open = lambda c: c.send_records([ids_record([f"S{i}" for i in range(5000)])])
        proxy = yield self.start_source(service, SSH=0)
        status = yield proxy.whenDone()
        self.assertEqual(status, 1)
        errors = [line for line in self.warnings() if "do not match" in line]
        self.assertEqual(len(errors), 1, self.warnings())
        self.assertLess(len(errors[0]), 300)

    @inlineCallbacks
    def test_huge_service_id(self) -> Any:
        """An id of 65,000 characters is ignored in one line; SSH is served."""
        service = yield Deferred.fromCoroutine(start_hostile(self))
        service.on_open = lambda c: c.send_records([ids_record(["x" * 65000, "SSH"])])
        proxy = yield self.start_source(service, SSH=0)
        yield proxy.client.whenConnected()
        self.assertEqual(list(listener_ports(proxy)), ["SSH"])
        (line,) = self.lines("Ignoring 1 service id")
        self.assertIn("(65000 characters)", line)
        self.assertLess(len(line), 200)

    @inlineCallbacks
    def check_subprotocol_refused(self, answered: str | None, reason: str) -> Any:
        service = yield Deferred.fromCoroutine(start_hostile(self, subprotocol=answered))
        proxy = yield self.start_source(service, SSH=0)
        yield service.connection(2)
        self.assertFalse(proxy.connector.session.ready)
        self.assertEqual(self.lines("Connected to"), [])
        self.assertEqual(len(self.warnings()), 1, self.warnings())
        (line, *_) = self.lines("Could not connect to the tunneling service")
        self.assertIn(reason, line)
        self.assertTrue(line.endswith("retrying in 0.1s"), line)
        self.assertEqual(self.lines("onConnect"), [])

    @inlineCallbacks
    def test_stopped_while_connecting(self) -> Any:
        """Stopping while an attempt is under way says nothing at warning."""
        service = yield Deferred.fromCoroutine(start_hostile(self, subprotocol=None))
        proxy = yield self.start_source(service, SSH=0)
        yield service.connection(2)
        yield proxy.stopService()
        self.assertEqual(len(self.warnings()), 1, self.warnings())

    def test_no_subprotocol(self) -> Any:
        """A 101 without a subprotocol is a failed attempt, retried."""
        return self.check_subprotocol_refused(
            None,
            "Could not connect to the tunneling service (the service answered without "
            "subprotocol 'aws.iot.securetunneling-3.0' (got None)); retrying in 0.1s",
        )

    def test_subprotocol_not_offered(self) -> Any:
        return self.check_subprotocol_refused(
            V2, 'subprotocol selected by server "aws.iot.securetunneling-2.0" not in'
        )

    @inlineCallbacks
    def test_bad_ids_in_records(self) -> Any:
        """
        A destination ignores starts naming invalid streams, connections
        or services, and records for streams never started, one line each;
        a start with ids past 65535 works both ways.
        """
        app_port, _ = yield Deferred.fromCoroutine(start_app(self))
        service = yield Deferred.fromCoroutine(start_hostile(self))

        def hostile(c: HostileConnection) -> None:
            c.send_records([
                ids_record(["SSH"]),
                Message(type=Message.DATA, streamId=9, serviceId="SSH", connectionId=1,
                        payload=b"nobody's"),
                Message(type=Message.STREAM_START, streamId=-1, serviceId="SSH",
                        connectionId=1),
                Message(type=Message.STREAM_START, streamId=0, serviceId="SSH",
                        connectionId=1),
                Message(type=Message.STREAM_START, streamId=1, serviceId="y" * 60000,
                        connectionId=1),
                Message(type=Message.CONNECTION_START, streamId=3, serviceId="SSH",
                        connectionId=2),
                Message(type=Message.STREAM_START, streamId=70000, serviceId="SSH",
                        connectionId=70000),
                Message(type=Message.CONNECTION_START, streamId=70000, serviceId="SSH",
                        connectionId=0),
                Message(type=Message.DATA, streamId=70000, serviceId="SSH",
                        connectionId=70000, payload=b"hello"),
            ])

        service.on_open = hostile
        proxy = yield Deferred.fromCoroutine(self.start(
            service, "destination", destination_apps={"SSH": tcp(app_port)}
        ))
        yield proxy.client.whenConnected()
        connection = service.connections[0]
        while not [m for m in connection.received if m.type == Message.DATA]:
            yield turns(1)
        (echo,) = [m for m in connection.received if m.type == Message.DATA]
        self.assertEqual((echo.streamId, echo.connectionId, echo.payload),
                         (70000, 70000, b"hello"))
        self.assertEqual(len(self.lines("invalid stream id")), 2)
        (line,) = self.lines("(60000 characters): not a service id")
        self.assertLess(len(line), 200)
        self.assertEqual(len(self.lines("connection 2 of 'SSH': no such active stream")), 1)
        self.assertEqual(len(self.lines("connection 0 of 'SSH': invalid connection id")), 1)
        self.assertEqual(len(service.connections), 1)

    @inlineCallbacks
    def check_reconnects(self, payload: bytes, reason: str, raw: bool = False) -> Any:
        """
        After C{payload} (a binary message's, or C{raw} bytes), the proxy
        logs C{reason} in one warning and reconnects.
        """
        service = yield Deferred.fromCoroutine(start_hostile(self))

        def on_open(c: HostileConnection) -> None:
            c.send_records([ids_record(["SSH"])])
            if len(service.connections) == 1:
                (c.send_raw if raw else c.send_payload)(payload)

        service.on_open = on_open
        proxy = yield self.start_source(service, SSH=0)
        yield service.connection(2)
        yield proxy.client.whenConnected()
        (line,) = self.warnings()
        self.assertIn(reason, line)
        self.assertTrue(line.endswith("; reconnecting in 0.1s"), line)

    def test_unknown_type(self) -> Any:
        record = Message(type=99, streamId=1).SerializeToString()  # type: ignore[arg-type]
        return self.check_reconnects(
            LENGTH_PREFIX.pack(len(record)) + record,
            "Protocol error from the tunneling service: received a record of unknown "
            "type 99 not marked ignorable",
        )

    def test_malformed_protobuf(self) -> Any:
        return self.check_reconnects(
            LENGTH_PREFIX.pack(3) + b"\xff\xff\xff",
            "Protocol error from the tunneling service: record body does not parse",
        )

    def test_zero_length(self) -> Any:
        return self.check_reconnects(
            b"\x00\x00", "Protocol error from the tunneling service: invalid record length 0"
        )

    def test_oversized_message(self) -> Any:
        return self.check_reconnects(
            b"\x01" * 200_000,
            "Lost the tunnel connection (connection was closed uncleanly (\"I dropped the "
            "WebSocket TCP connection: received WebSocket message size 200000 exceeds "
            "payload limit of 131076 octets\"))",
        )

    def test_frame_claiming_exabytes(self) -> Any:
        """A frame header announcing 2**62 bytes is refused before any is read."""
        return self.check_reconnects(
            struct.pack(">BBQ", 0x82, 127, 2**62),
            "exceeds payload limit of 131076 octets",
            raw=True,
        )

    @inlineCallbacks
    def test_ignorable_and_text(self) -> Any:
        """An ignorable unknown type is skipped; a text message, one line."""
        service = yield Deferred.fromCoroutine(start_hostile(self))

        def on_open(c: HostileConnection) -> None:
            c.send_records([ids_record(["SSH"]),
                            Message(type=42, ignorable=True)])  # type: ignore[arg-type]
            c.send_text("hello")

        service.on_open = on_open
        proxy = yield self.start_source(service, SSH=0)
        yield proxy.client.whenConnected()
        yield self.logs.when("text message")
        self.assertEqual(len(service.connections), 1)
