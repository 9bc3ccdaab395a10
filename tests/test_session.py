"""
Tests for L{lpxy.proxy.session}: the protocol decisions of V1, V2 and V3.
"""

from __future__ import annotations

from collections.abc import Sequence

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from lpxy.frames import Message, data_header, encode
from lpxy.proxy.channel import (
    ProtocolViolation,
    ServiceBinding,
    ServiceMismatch,
    SessionError,
)
from lpxy.proxy.session import Session, older_destination
from lpxy.wire import MAX_CONNECTION_ID, MAX_STREAM_ID, is_valid_service_id
from tests.support.recorders import Recorder

V1 = "aws.iot.securetunneling-1.0"
V2 = "aws.iot.securetunneling-2.0"
V3 = "aws.iot.securetunneling-3.0"


def msg(kind: str, stream: int = 0, service: str = "", connection: int = 0,
        payload: bytes = b"", ids: Sequence[str] = (), ignorable: bool = False) -> Message:
    return Message(
        type=getattr(Message, kind) if isinstance(kind, str) else kind,
        streamId=stream, serviceId=service, connectionId=connection,
        payload=payload, availableServiceIds=ids, ignorable=ignorable,
    )


def make(mode: str = "source", keys: Sequence[str] = ("SSH",), ids: Sequence[str] | None = ("SSH",),
         **kw: object) -> tuple[Session, Recorder]:
    actions = Recorder()
    session = Session(mode, keys, actions, **kw)  # type: ignore[arg-type]
    session.connected()
    if ids is not None and session.version > 1:
        session.received(msg("SERVICE_IDS", ids=ids))
    return session, actions


class SourceV3Tests(SynchronousTestCase):
    def test_ready_after_service_ids(self) -> None:
        actions = Recorder()
        session = Session("source", ["SSH"], actions)
        session.connected()
        self.assertFalse(session.ready)
        self.assertEqual(actions.ready, [])
        self.assertIsNone(session.open_channel(ServiceBinding("SSH", "SSH")))
        session.received(msg("SERVICE_IDS", ids=["SSH"]))
        self.assertTrue(session.ready)
        self.assertEqual(actions.ready, [[ServiceBinding("SSH", "SSH")]])

    def test_connections(self) -> None:
        session, actions = make()
        (binding,) = session.bindings
        first = session.open_channel(binding)
        second = session.open_channel(binding)
        assert first is not None and second is not None
        self.assertEqual(
            actions.kinds(),
            [("STREAM_START", 1, "SSH", 1), ("CONNECTION_START", 1, "SSH", 2)],
        )
        session.received(msg("DATA", 1, "SSH", 2, b"two"))
        session.received(msg("DATA", 1, "SSH", 1, b"one"))
        session.received(msg("DATA", 2, "SSH", 1, b"stale"))
        session.received(msg("DATA", 1, "SSH", 9, b"unknown"))
        session.received(msg("DATA", 1, "HTTP", 1, b"other service"))
        self.assertEqual(actions.delivered, [(second, b"two"), (first, b"one")])

        session.local_closed(first)
        self.assertEqual(actions.kinds()[-1], ("CONNECTION_RESET", 1, "SSH", 1))
        session.local_closed(first)
        self.assertEqual(len(actions.sent), 3)
        third = session.open_channel(binding)
        assert third is not None
        self.assertEqual(actions.kinds()[-1], ("CONNECTION_START", 1, "SSH", 3))

    def test_header_is_data_record(self) -> None:
        session, _actions = make()
        channel = session.open_channel(session.bindings[0])
        assert channel is not None
        parsed = Message.FromString(channel.header + b"\x22\x03abc")
        self.assertEqual(
            (parsed.type, parsed.streamId, parsed.serviceId, parsed.connectionId, parsed.payload),
            (Message.DATA, 1, "SSH", 1, b"abc"),
        )

    def test_max_connections_refused(self) -> None:
        session, actions = make(max_connections=2)
        binding = session.bindings[0]
        self.assertIsNotNone(session.open_channel(binding))
        self.assertIsNotNone(session.open_channel(binding))
        self.assertIsNone(session.open_channel(binding))
        self.assertEqual(len(actions.sent), 2)

    def test_stream_reset_closes_all_then_new_stream(self) -> None:
        session, actions = make()
        binding = session.bindings[0]
        a, b = session.open_channel(binding), session.open_channel(binding)
        session.received(msg("STREAM_RESET", 1, "SSH"))
        self.assertEqual(actions.closed, [a, b])
        session.received(msg("DATA", 1, "SSH", 1, b"late"))
        self.assertEqual(actions.delivered, [])
        session.open_channel(binding)
        self.assertEqual(actions.kinds()[-1], ("STREAM_START", 2, "SSH", 3))

    def test_stale_reset_ignored(self) -> None:
        session, actions = make()
        session.open_channel(session.bindings[0])
        session.received(msg("STREAM_RESET", 7, "SSH"))
        session.received(msg("CONNECTION_RESET", 1, "SSH", 5))
        self.assertEqual(actions.closed, [])

    def test_connection_reset(self) -> None:
        session, actions = make()
        binding = session.bindings[0]
        a, b = session.open_channel(binding), session.open_channel(binding)
        session.received(msg("CONNECTION_RESET", 1, "SSH", 2))
        self.assertEqual(actions.closed, [b])
        assert b is not None
        session.local_closed(b)
        self.assertEqual(len(actions.sent), 2)
        session.received(msg("DATA", 1, "SSH", 1, b"x"))
        self.assertEqual(actions.delivered, [(a, b"x")])

    def test_reconnect_restarts_ids(self) -> None:
        session, actions = make()
        binding = session.bindings[0]
        old = session.open_channel(binding)
        session.open_channel(binding)
        session.disconnected()
        self.assertEqual(len(actions.closed), 2)
        self.assertIsNone(session.open_channel(binding))
        session.connected()
        session.received(msg("SERVICE_IDS", ids=["SSH"]))
        session.open_channel(binding)
        self.assertEqual(actions.kinds()[-1], ("STREAM_START", 1, "SSH", 1))
        sent = len(actions.sent)
        assert old is not None
        session.local_closed(old)
        self.assertEqual(len(actions.sent), sent)

    def test_session_reset(self) -> None:
        session, actions = make(keys=["A", "B"], ids=["B", "A"])
        for binding in session.bindings:
            session.open_channel(binding)
        session.received(msg("SESSION_RESET"))
        self.assertEqual(len(actions.closed), 2)

    def test_start_sent_to_source_ignored(self) -> None:
        session, actions = make()
        session.received(msg("STREAM_START", 1, "SSH", 1))
        session.received(msg("CONNECTION_START", 1, "SSH", 1))
        self.assertEqual((actions.opened, actions.sent), ([], []))


class SourceOlderDestinationTests(SynchronousTestCase):
    def test_v2_one_stream_replaced(self) -> None:
        session, actions = make(client_type="V2")
        binding = session.bindings[0]
        first = session.open_channel(binding)
        second = session.open_channel(binding)
        self.assertEqual(
            actions.kinds(), [("STREAM_START", 1, "SSH", 0), ("STREAM_START", 2, "SSH", 0)]
        )
        self.assertEqual(actions.closed, [first])
        session.received(msg("DATA", 2, "SSH", 0, b"x"))
        session.received(msg("DATA", 1, "SSH", 0, b"stale"))
        self.assertEqual(actions.delivered, [(second, b"x")])
        assert first is not None and second is not None
        session.local_closed(first)
        self.assertEqual(len(actions.sent), 2)
        session.local_closed(second)
        self.assertEqual(actions.kinds()[-1], ("STREAM_RESET", 2, "SSH", 0))
        session.open_channel(binding)
        self.assertEqual(actions.kinds()[-1], ("STREAM_START", 3, "SSH", 0))

    def test_v1_no_service_id(self) -> None:
        session, actions = make(client_type="V1")
        channel = session.open_channel(session.bindings[0])
        self.assertEqual(actions.kinds(), [("STREAM_START", 1, "", 0)])
        session.received(msg("DATA", 1, "", 0, b"x"))
        self.assertEqual(actions.delivered, [(channel, b"x")])

    def test_v1_subprotocol_ready_at_once(self) -> None:
        session, actions = make(keys=[""], ids=None, subprotocol=V1)
        self.assertTrue(session.ready)
        self.assertEqual(actions.ready, [[ServiceBinding("", "")]])
        session.received(msg("SERVICE_IDS", ids=["X", "Y"]))
        self.assertEqual(len(actions.ready), 1)
        session.open_channel(session.bindings[0])
        self.assertEqual(actions.kinds(), [("STREAM_START", 1, "", 0)])

    def test_v2_subprotocol(self) -> None:
        session, actions = make(subprotocol=V2)
        session.open_channel(session.bindings[0])
        self.assertEqual(actions.kinds(), [("STREAM_START", 1, "SSH", 0)])


class OlderDestinationFunctionTests(SynchronousTestCase):
    """L{older_destination}: what a destination's DATA tells of its version."""

    def test_v3(self) -> None:
        self.assertIsNone(older_destination(msg("DATA", 1, "SSH", 1), "SSH", 3))

    def test_v2(self) -> None:
        self.assertEqual(older_destination(msg("DATA", 1, "SSH", 0), "SSH", 3), 2)

    def test_v1(self) -> None:
        self.assertEqual(older_destination(msg("DATA", 1, "", 0), "SSH", 3), 1)
        self.assertEqual(older_destination(msg("DATA", 1, "", 0), "SSH", 2), 1)

    def test_nothing_to_tell(self) -> None:
        """Without a service id or a connection id sent, no answer is older."""
        self.assertIsNone(older_destination(msg("DATA", 1, "", 0), "", 2))
        self.assertIsNone(older_destination(msg("DATA", 1, "SSH", 0), "SSH", 2))


class DetectOlderDestinationTests(SynchronousTestCase):
    """A V3 source learns a V1 or V2 destination from its first DATA."""

    def setUp(self) -> None:
        self.events = EventLoggingObserver()
        globalLogPublisher.addObserver(self.events)
        self.addCleanup(globalLogPublisher.removeObserver, self.events)

    def switched(self) -> list[str]:
        texts = [formatEvent(e) for e in self.events]
        return [t for t in texts if "The destination answers as" in t]

    def test_v2(self) -> None:
        """
        Connection id 0 in the answer: the answer reaches the connection, the
        source speaks V2 from then on (one connection per stream, replaced by
        the next client), across a reconnection, and says so once.
        """
        session, actions = make()
        binding = session.bindings[0]
        first = session.open_channel(binding)
        assert first is not None
        session.received(msg("DATA", 1, "SSH", 0, b"banner"))
        self.assertEqual(actions.delivered, [(first, b"banner")])
        self.assertEqual((first.connection_id, first.wire_service_id), (0, "SSH"))
        self.assertEqual(first.header, data_header("SSH", 1, 0))
        second = session.open_channel(binding)
        self.assertEqual(actions.closed, [first])
        self.assertEqual(actions.kinds()[-1], ("STREAM_START", 2, "SSH", 0))
        session.received(msg("DATA", 2, "SSH", 0, b"again"))
        self.assertEqual(actions.delivered[-1], (second, b"again"))
        session.disconnected()
        session.connected()
        session.received(msg("SERVICE_IDS", ids=["SSH"]))
        session.open_channel(binding)
        self.assertEqual(actions.kinds()[-1], ("STREAM_START", 1, "SSH", 0))
        self.assertEqual(len(self.switched()), 1)
        self.assertIn("as a V2 peer (no connection ids)", self.switched()[0])

    def test_v1(self) -> None:
        """No service id in the answer: V1 from then on, no service ids sent."""
        session, actions = make()
        first = session.open_channel(session.bindings[0])
        assert first is not None
        session.received(msg("DATA", 1, "", 0, b"banner"))
        self.assertEqual(actions.delivered, [(first, b"banner")])
        self.assertEqual(first.header, data_header("", 1, 0))
        assert first is not None
        session.local_closed(first)
        self.assertEqual(actions.kinds()[-1], ("STREAM_RESET", 1, "", 0))
        session.open_channel(session.bindings[0])
        self.assertEqual(actions.kinds()[-1], ("STREAM_START", 2, "", 0))
        self.assertIn("as a V1 peer (no service id)", self.switched()[0])

    def test_other_connections_closed(self) -> None:
        """
        Connections started before the answer came cannot be told apart by
        the old peer: all but the stream's first are closed, sending nothing.
        """
        session, actions = make()
        binding = session.bindings[0]
        first = session.open_channel(binding)
        second = session.open_channel(binding)
        sent = len(actions.sent)
        session.received(msg("DATA", 1, "SSH", 0, b"x"))
        self.assertEqual(actions.closed, [second])
        self.assertEqual(actions.delivered, [(first, b"x")])
        self.assertEqual(len(actions.sent), sent)

    def test_v3_destination(self) -> None:
        """A V3 answer changes nothing, and later ones are not examined."""
        session, actions = make()
        binding = session.bindings[0]
        first = session.open_channel(binding)
        session.received(msg("DATA", 1, "SSH", 1, b"x"))
        session.received(msg("DATA", 1, "SSH", 0, b"not a V2 answer now"))
        session.open_channel(binding)
        self.assertEqual(actions.kinds()[-1], ("CONNECTION_START", 1, "SSH", 2))
        self.assertEqual(actions.delivered, [(first, b"x")])
        self.assertEqual(self.switched(), [])

    def test_forced(self) -> None:
        """-y keeps its version whatever the answers say."""
        session, actions = make(client_type="V2")
        first = session.open_channel(session.bindings[0])
        session.received(msg("DATA", 1, "", 0, b"x"))
        self.assertEqual(actions.delivered, [(first, b"x")])
        session.local_closed(first)  # type: ignore[arg-type]
        self.assertEqual(actions.kinds()[-1], ("STREAM_RESET", 1, "SSH", 0))
        self.assertEqual(self.switched(), [])


class DestinationTests(SynchronousTestCase):
    def test_v3_peer(self) -> None:
        session, actions = make("destination")
        session.received(msg("STREAM_START", 1, "SSH", 1))
        session.received(msg("STREAM_START", 1, "SSH", 1))
        session.received(msg("CONNECTION_START", 1, "SSH", 2))
        self.assertEqual(
            [(c.stream_id, c.connection_id) for c in actions.opened], [(1, 1), (1, 2)]
        )
        session.received(msg("CONNECTION_START", 1, "SSH", 2))
        self.assertEqual(actions.kinds(), [("CONNECTION_RESET", 1, "SSH", 2)])
        one, two = actions.opened
        session.received(msg("DATA", 1, "SSH", 2, b"b"))
        self.assertEqual(actions.delivered, [(two, b"b")])
        session.local_closed(one)
        self.assertEqual(actions.kinds()[-1], ("CONNECTION_RESET", 1, "SSH", 1))

    def test_replacement(self) -> None:
        session, actions = make("destination")
        session.received(msg("STREAM_START", 1, "SSH", 1))
        session.received(msg("STREAM_START", 2, "SSH", 1))
        first, second = actions.opened
        self.assertEqual(actions.closed, [first])
        self.assertEqual(second.stream_id, 2)
        session.local_closed(first)
        self.assertEqual(actions.sent, [])

    def test_learns_v2_peer(self) -> None:
        session, actions = make("destination", keys=["A", "B"], ids=["A", "B"])
        session.received(msg("STREAM_START", 4, "A", 0))
        (channel,) = actions.opened
        session.received(msg("CONNECTION_START", 4, "A", 2))
        self.assertEqual(len(actions.opened), 1)
        session.received(msg("DATA", 4, "A", 0, b"x"))
        self.assertEqual(actions.delivered, [(channel, b"x")])
        session.local_closed(channel)
        self.assertEqual(actions.kinds(), [("STREAM_RESET", 4, "A", 0)])
        session.received(msg("STREAM_START", 1, "B", 3))
        self.assertEqual(actions.opened[-1].connection_id, 3)

    def test_v1_peer_names_no_service(self) -> None:
        session, actions = make("destination", keys=[""], ids=None, subprotocol=V1)
        session.received(msg("STREAM_START", 1, "", 0))
        (channel,) = actions.opened
        self.assertEqual(channel.binding, ServiceBinding("", ""))
        session.received(msg("DATA", 1, "", 0, b"x"))
        session.local_closed(channel)
        self.assertEqual(actions.kinds(), [("STREAM_RESET", 1, "", 0)])

    def test_bad_starts_ignored(self) -> None:
        session, actions = make("destination")
        session.received(msg("STREAM_START", 0, "SSH", 1))
        session.received(msg("STREAM_START", 1, "NOPE", 1))
        session.received(msg("CONNECTION_START", 3, "SSH", 1))
        self.assertEqual((actions.opened, actions.sent), ([], []))

    def test_start_before_service_ids_ignored(self) -> None:
        session, actions = make("destination", ids=None)
        session.received(msg("STREAM_START", 1, "SSH", 1))
        self.assertEqual(actions.opened, [])

    def test_max_connections(self) -> None:
        session, actions = make("destination", max_connections=1)
        session.received(msg("STREAM_START", 1, "SSH", 1))
        session.received(msg("CONNECTION_START", 1, "SSH", 2))
        self.assertEqual(len(actions.opened), 1)
        self.assertEqual(actions.kinds(), [("CONNECTION_RESET", 1, "SSH", 2)])


class ServiceIdsTests(SynchronousTestCase):
    def test_unnamed_takes_the_one_id(self) -> None:
        session, _actions = make(keys=[""], ids=["SSH"])
        self.assertEqual(session.bindings, [ServiceBinding("", "SSH")])

    def test_unnamed_with_no_ids(self) -> None:
        session, actions = make(keys=[""], ids=[])
        self.assertEqual(session.bindings, [ServiceBinding("", "")])
        session.open_channel(session.bindings[0])
        self.assertEqual(actions.kinds(), [("STREAM_START", 1, "", 1)])

    def test_named_must_match(self) -> None:
        self.assertRaises(ServiceMismatch, make, keys=["SSH"], ids=["SSH", "HTTP"])
        self.assertRaises(ServiceMismatch, make, keys=["SSH", "HTTP"], ids=["SSH"])
        session, _ = make(keys=["SSH", "HTTP"], ids=["HTTP", "SSH", "SSH"])
        self.assertEqual(
            sorted(b.service_id for b in session.bindings), ["HTTP", "SSH"]
        )

    def test_config_dir_source_random_port(self) -> None:
        session, _actions = make(keys=["SSH"], ids=["SSH", "WEB"], from_config_dir=True)
        self.assertEqual(
            session.bindings, [ServiceBinding("SSH", "SSH"), ServiceBinding(None, "WEB")]
        )

    def test_config_dir_destination_fails(self) -> None:
        self.assertRaises(
            ServiceMismatch, make, "destination", keys=["SSH"], ids=["SSH", "WEB"],
            from_config_dir=True,
        )

    def test_repeated_ignored(self) -> None:
        session, actions = make()
        session.received(msg("SERVICE_IDS", ids=["OTHER"]))
        self.assertEqual(len(actions.ready), 1)

    def test_changed_after_reconnect(self) -> None:
        session, _actions = make()
        session.disconnected()
        session.connected()
        self.assertRaises(
            ServiceMismatch, session.received, msg("SERVICE_IDS", ids=["OTHER"])
        )


class HostileServiceIdsTests(SynchronousTestCase):
    """
    A SERVICE_IDS from a hostile or broken service: ids that break AWS's
    rule are ignored, at most C{max_services} are served, and each refusal
    is one warning of bounded length.
    """

    def warnings(self) -> list[str]:
        return [formatEvent(e) for e in self.observer if e["log_level"] == LogLevel.warn]

    def setUp(self) -> None:
        self.observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    def test_thousands_of_ids(self) -> None:
        ids = [f"S{i}" for i in range(5000)]
        session, actions = make(keys=[], ids=ids, from_config_dir=True)
        self.assertEqual([b.service_id for b in session.bindings], ids[:9])
        self.assertEqual(actions.ready, [session.bindings])
        (line,) = self.warnings()
        self.assertEqual(
            line,
            "The tunnel announced 5000 services, more than the 9 served "
            "(tunneling.proxy.websocket.max_services): ignoring all but the first 9",
        )

    def test_setting(self) -> None:
        session, _ = make("destination", keys=["A", "B", "C"], ids=["A", "B", "C"],
                          from_config_dir=True, max_services=2)
        self.assertEqual([b.service_id for b in session.bindings], ["A", "B"])
        self.assertEqual(len(self.warnings()), 1)

    def test_named_map_raises_the_limit(self) -> None:
        """A map naming more services than the limit is the user's choice."""
        keys = [f"S{i}" for i in range(12)]
        session, _ = make(keys=keys, ids=list(reversed(keys)), max_services=2)
        self.assertEqual(sorted(b.service_id for b in session.bindings), sorted(keys))
        self.assertEqual(self.warnings(), [])

    def test_invalid_ids_ignored(self) -> None:
        huge = "x" * 65000
        session, actions = make(keys=["SSH"], ids=["SSH", huge, "", "S.1", "a b", "SSH"])
        self.assertEqual(session.bindings, [ServiceBinding("SSH", "SSH")])
        self.assertEqual(len(actions.ready), 1)
        (line,) = self.warnings()
        self.assertEqual(
            line,
            "Ignoring 4 service id(s) of the tunnel that are not 1 to 128 of "
            f"[a-zA-Z0-9:_-]: {'x' * 40!r}... (65000 characters), '', 'S.1', ...",
        )

    def test_invalid_ids_to_unnamed_mapping(self) -> None:
        """The one valid id names the unnamed mapping."""
        session, _ = make(keys=[""], ids=["bad id", "SSH"])
        self.assertEqual(session.bindings, [ServiceBinding("", "SSH")])

    def test_mismatch_message_bounded(self) -> None:
        ids = [f"S{i:03}" for i in range(3000)]
        with self.assertRaises(ServiceMismatch) as caught:
            make(keys=["SSH"], ids=ids)
        self.assertLess(len(str(caught.exception)), 300)


class HostileRecordTests(SynchronousTestCase):
    """
    Records naming streams, connections or services that cannot be are
    refused with one warning, and the session goes on.
    """

    def setUp(self) -> None:
        self.observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    def warnings(self) -> list[str]:
        return [formatEvent(e) for e in self.observer if e["log_level"] == LogLevel.warn]

    def test_v1_start_with_invalid_service_id(self) -> None:
        """
        A V1 destination takes any service id's start as its one service's
        and answers with that id: not one that breaks the rule (its DATA
        records would not fit the 2-byte length).
        """
        session, actions = make("destination", keys=[""], ids=None, subprotocol=V1)
        session.received(msg("STREAM_START", 1, "x" * 65000, 0))
        self.assertEqual(actions.opened, [])
        (line,) = self.warnings()
        self.assertEqual(
            line,
            f"Ignoring a STREAM_START with stream id 1 for service {'x' * 40!r}... "
            "(65000 characters): not a service id (1 to 128 of [a-zA-Z0-9:_-])",
        )
        session.received(msg("STREAM_START", 2, "SSH", 0))
        (channel,) = actions.opened
        self.assertEqual(channel.wire_service_id, "SSH")

    def test_stream_ids(self) -> None:
        session, actions = make("destination")
        for bad in (0, -1, -(2**31)):
            session.received(msg("STREAM_START", bad, "SSH", 1))
        self.assertEqual(actions.opened, [])
        self.assertEqual(len(self.warnings()), 3)
        self.assertTrue(all(w.endswith(": invalid stream id") for w in self.warnings()))
        session.received(msg("STREAM_START", 70000, "SSH", 70000))
        (channel,) = actions.opened
        session.received(msg("DATA", 70000, "SSH", 70000, b"x"))
        self.assertEqual(actions.delivered, [(channel, b"x")])
        session.local_closed(channel)
        self.assertEqual(actions.kinds(), [("CONNECTION_RESET", 70000, "SSH", 70000)])
        session.received(msg("STREAM_START", MAX_STREAM_ID, "SSH", 1))
        self.assertEqual(actions.opened[-1].stream_id, MAX_STREAM_ID)

    def test_connection_ids(self) -> None:
        session, actions = make("destination")
        session.received(msg("STREAM_START", 1, "SSH", 1))
        session.received(msg("CONNECTION_START", 1, "SSH", 0))
        self.assertEqual(len(actions.opened), 1)
        (line,) = self.warnings()
        self.assertTrue(line.endswith("connection 0 of 'SSH': invalid connection id"), line)
        session.received(msg("CONNECTION_START", 1, "SSH", MAX_CONNECTION_ID))
        self.assertEqual(actions.opened[-1].connection_id, MAX_CONNECTION_ID)
        session.received(msg("CONNECTION_START", 5, "SSH", 2))
        self.assertTrue(self.warnings()[-1].endswith("no such active stream"))
        self.assertEqual(actions.sent, [])

    def test_unknown_streams(self) -> None:
        """Records for streams or connections never started change nothing."""
        session, actions = make("destination")
        session.received(msg("STREAM_START", 1, "SSH", 1))
        for kind in ("DATA", "STREAM_RESET", "CONNECTION_RESET"):
            session.received(msg(kind, 9, "SSH", 1, b"x"))
            session.received(msg(kind, 1, "OTHER", 1, b"x"))
            session.received(msg(kind, 1, "x" * 60000, 1, b"x"))
        session.received(msg("DATA", 1, "SSH", 77, b"x"))
        session.received(msg("CONNECTION_RESET", 1, "SSH", 77))
        self.assertEqual((actions.delivered, actions.closed, actions.sent), ([], [], []))
        session.received(msg("DATA", 1, "SSH", 1, b"ok"))
        self.assertEqual(len(actions.delivered), 1)


class TypeTests(SynchronousTestCase):
    def test_unknown_type_zero(self) -> None:
        session, _ = make()
        self.assertRaises(ProtocolViolation, session.received, msg("UNKNOWN"))

    def test_unknown_types(self) -> None:
        session, actions = make()
        session.received(msg(99, ignorable=True))  # type: ignore[arg-type]
        self.assertEqual(actions.sent, [])
        self.assertRaises(ProtocolViolation, session.received, msg(99))  # type: ignore[arg-type]


_TYPES = st.sampled_from(list(range(0, 9)))
_MESSAGES = st.builds(
    lambda kind, stream, service, connection, ignorable, ids: Message(
        type=kind, streamId=stream, serviceId=service, connectionId=connection,
        payload=f"{service}/{stream}/{connection}".encode(), ignorable=ignorable,
        availableServiceIds=ids,
    ),
    _TYPES,
    st.integers(0, 4),
    st.sampled_from(["A", "B", "", "Z"]),
    st.integers(0, 4),
    st.booleans(),
    st.lists(st.sampled_from(["A", "B", "C"]), max_size=3),
)
_LOCAL = st.tuples(st.sampled_from(["open", "close"]), st.integers(0, 3))


class PropertyTests(SynchronousTestCase):
    def _check(self, session: Session, actions: Recorder,
               steps: list[Message | tuple[str, int]]) -> None:
        for step in steps:
            before = len(actions.delivered)
            if isinstance(step, tuple):
                op, index = step
                if op == "open" and session.bindings:
                    session.open_channel(session.bindings[index % len(session.bindings)])
                elif op == "close" and actions.opened:
                    session.local_closed(actions.opened[index % len(actions.opened)])
                continue
            try:
                session.received(step)
            except SessionError:
                continue
            for channel, data in actions.delivered[before:]:
                # Each DATA goes only to a current channel of its own stream,
                # service and connection.
                self.assertTrue(channel.open)
                self.assertEqual(step.type, Message.DATA)
                self.assertEqual(data, step.payload)
                self.assertEqual(channel.stream_id, step.streamId)
                if channel.wire_service_id:
                    self.assertEqual(channel.wire_service_id, step.serviceId)
                if channel.connection_id:
                    self.assertEqual(channel.connection_id, step.connectionId)
        for message in actions.sent:
            self.assertNotEqual(message.streamId, 0)

    @settings(max_examples=300, deadline=None)
    @given(st.lists(st.one_of(_MESSAGES, _LOCAL), max_size=40),
           st.sampled_from(["source", "destination"]),
           st.sampled_from([None, "V1", "V2"]))
    def test_random_sequences(self, steps: list[Message | tuple[str, int]], mode: str,
                              client_type: str | None) -> None:
        actions = Recorder()
        session = Session(mode, ["A", "B"], actions, client_type=client_type,  # type: ignore[arg-type]
                          max_connections=3)
        session.connected()
        try:
            session.received(msg("SERVICE_IDS", ids=["A", "B"]))
        except SessionError:
            self.fail("valid SERVICE_IDS refused")
        self._check(session, actions, steps)
        # Every channel the session opened and later closed is closed once.
        self.assertEqual(len(actions.closed), len(set(map(id, actions.closed))))


_HOSTILE_MESSAGES = st.builds(
    lambda kind, stream, service, connection, ignorable: Message(
        type=kind, streamId=stream, serviceId=service, connectionId=connection,
        payload=b"p", ignorable=ignorable,
    ),
    st.sampled_from(list(range(0, 9))),
    st.sampled_from([-(2**31), -1, 0, 1, 2, 65535, 65536, MAX_STREAM_ID]),
    st.sampled_from(["A", "", "Z", "x" * 60000, "a b", "A" * 129]),
    st.sampled_from([0, 1, 2, 65536, MAX_CONNECTION_ID]),
    st.booleans(),
)


class HostilePropertyTests(SynchronousTestCase):
    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.one_of(_HOSTILE_MESSAGES, _LOCAL), max_size=30),
           st.sampled_from(["source", "destination"]),
           st.sampled_from([V1, V2, V3]))
    def test_anything_the_service_sends(self, steps: list[Message | tuple[str, int]],
                                        mode: str, subprotocol: str) -> None:
        """
        Whatever ids a record carries, the session raises nothing but a
        L{SessionError} and everything it sends is a record that encodes,
        naming a valid stream and a valid service (or none).
        """
        actions = Recorder()
        session = Session(mode, ["A"], actions, subprotocol=subprotocol)  # type: ignore[arg-type]
        session.connected()
        if session.version > 1:
            session.received(msg("SERVICE_IDS", ids=["A", "x" * 60000]))
        for step in steps:
            if isinstance(step, tuple):
                op, index = step
                if op == "open" and session.bindings:
                    session.open_channel(session.bindings[0])
                elif op == "close" and actions.opened:
                    session.local_closed(actions.opened[index % len(actions.opened)])
                continue
            try:
                session.received(step)
            except SessionError:
                continue
        for message in actions.sent:
            encode(message)
            self.assertGreater(message.streamId, 0)
            self.assertTrue(message.serviceId == "" or is_valid_service_id(message.serviceId))
        for channel in actions.opened:
            self.assertTrue(channel.wire_service_id == ""
                            or is_valid_service_id(channel.wire_service_id))


class TraceTests(SynchronousTestCase):
    def _events(self, trace: bool) -> list[str]:
        observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        session, _ = make(trace=trace)
        session.open_channel(session.bindings[0])
        session.received(msg("DATA", 1, "SSH", 1, b"x"))
        return [formatEvent(e) for e in observer if e.get("log_level") == LogLevel.debug]

    def test_per_record_only_when_tracing(self) -> None:
        self.assertEqual(self._events(False), [])
        traced = self._events(True)
        self.assertTrue(any(t.startswith("DATA 1 bytes") for t in traced))
        self.assertTrue(any(t.startswith("Sending STREAM_START") for t in traced))
