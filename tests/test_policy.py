"""
Tests for L{lpxy.tunnelservice.policy}: the record rules, the stream ledger
and the pairing of a tunnel's two ends, as plain objects (no sockets).
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from lpxy.frames import Message, RecordDecoder, encode
from lpxy.tunnelservice.policy import (
    Pairing,
    RecordRules,
    StreamLedger,
    Violation,
    refusals,
)
from lpxy.tunnelservice.store import DESTINATION, SOURCE
from lpxy.wire import CLOSE_POLICY_VIOLATION, CLOSE_PROTOCOL_ERROR


def msg(kind: int, stream: int = 0, service: str = "", connection: int = 0,
        payload: bytes = b"", ignorable: bool = False) -> Message:
    return Message(type=kind, streamId=stream, serviceId=service,  # type: ignore[arg-type]
                   connectionId=connection, payload=payload, ignorable=ignorable)


def data(stream: int, payload: bytes = b"x", service: str = "", connection: int = 0) -> Message:
    return msg(Message.DATA, stream, service, connection, payload)


def start(stream: int, service: str = "", connection: int = 0) -> Message:
    return msg(Message.STREAM_START, stream, service, connection)


def reset(stream: int, service: str = "", connection: int = 0) -> Message:
    return msg(Message.STREAM_RESET, stream, service, connection)


def bodies(*messages: Message) -> list[bytes]:
    """The record bodies of C{messages}, as the decoder cuts them from a message."""
    return [bytes(b) for b in RecordDecoder().feed_raw(b"".join(encode(m) for m in messages))]


class RecordRulesTests(SynchronousTestCase):
    """L{RecordRules.check}: what an end may send, and the close code when it may not."""

    source = RecordRules(SOURCE, ("SSH", "HTTP"))
    destination = RecordRules(DESTINATION, ("SSH", "HTTP"))

    def violation(self, rules: RecordRules, *messages: Message) -> Violation:
        return self.assertRaises(Violation, rules.check, bodies(*messages))

    def test_controls_returned_in_order(self) -> None:
        sent = [start(1, "SSH", 1), data(1, b"a", "SSH", 1),
                msg(Message.CONNECTION_START, 1, "SSH", 2), data(1, b"b", "SSH", 2),
                msg(Message.CONNECTION_RESET, 1, "SSH", 2), reset(1, "SSH", 1)]
        self.assertEqual(
            self.source.check(bodies(*sent)), [sent[0], sent[2], sent[4], sent[5]]
        )

    def test_data_only(self) -> None:
        self.assertEqual(self.destination.check(bodies(data(1, b"a", "SSH"))), [])

    def test_destination_resets(self) -> None:
        sent = [reset(1, "SSH"), msg(Message.CONNECTION_RESET, 1, "HTTP", 3)]
        self.assertEqual(self.destination.check(bodies(*sent)), sent)

    def test_no_service_id(self) -> None:
        """V1 records name no service; they pass whatever the tunnel's services."""
        rules = RecordRules(SOURCE, ())
        self.assertEqual(rules.check(bodies(start(1), data(1))), [start(1)])

    def test_forbidden_types(self) -> None:
        for message, text in [
            (msg(Message.SESSION_RESET), "SESSION_RESET (only the service sends it)"),
            (Message(type=Message.SERVICE_IDS, availableServiceIds=["SSH"]),
             "SERVICE_IDS (only the service sends it)"),
            (msg(Message.UNKNOWN, 1), "message type UNKNOWN (0)"),
        ]:
            with self.subTest(text):
                e = self.violation(self.source, message)
                self.assertEqual(
                    (e.code, e.reason), (CLOSE_POLICY_VIOLATION, "a client sent " + text)
                )

    def test_stream_id_zero(self) -> None:
        for kind, reason in [
            (Message.DATA, "DATA without a stream id"),
            (Message.STREAM_START, "STREAM_START without a stream id"),
            (Message.STREAM_RESET, "STREAM_RESET without a stream id"),
            (Message.CONNECTION_START, "CONNECTION_START without a stream id"),
            (Message.CONNECTION_RESET, "CONNECTION_RESET without a stream id"),
        ]:
            with self.subTest(reason):
                e = self.violation(self.source, msg(kind, 0, "SSH"))
                self.assertEqual((e.code, e.reason), (CLOSE_POLICY_VIOLATION, reason))

    def test_unknown_service(self) -> None:
        for message in (data(1, b"x", "FTP"), start(1, "FTP"), reset(1, "FTP")):
            e = self.violation(self.source, message)
            self.assertEqual(
                (e.code, e.reason),
                (CLOSE_POLICY_VIOLATION, "service id 'FTP' is not one of the tunnel's"),
            )

    def test_destination_starts(self) -> None:
        for kind, name in [(Message.STREAM_START, "STREAM_START"),
                           (Message.CONNECTION_START, "CONNECTION_START")]:
            e = self.violation(self.destination, msg(kind, 2, "SSH"))
            self.assertEqual(
                (e.code, e.reason), (CLOSE_POLICY_VIOLATION, f"a destination sent {name}")
            )

    def test_unknown_type(self) -> None:
        e = self.violation(self.source, msg(42, 1))
        self.assertEqual(
            (e.code, e.reason), (CLOSE_PROTOCOL_ERROR, "unknown message type 42 not ignorable")
        )
        # an ignorable one passes, whatever its stream and service, and is no control
        odd = [msg(42, 0, "FTP", ignorable=True), start(1, "SSH")]
        self.assertEqual(self.source.check(bodies(*odd)), [start(1, "SSH")])

    def test_unparsable(self) -> None:
        e = self.assertRaises(Violation, self.source.check, [b"\xff\xff"])
        self.assertEqual(e.code, CLOSE_PROTOCOL_ERROR)

    def test_first_broken_rule_wins(self) -> None:
        e = self.violation(self.destination, data(1, b"x", "SSH"), start(2, "SSH"),
                           data(0, b"y", "SSH"))
        self.assertEqual(e.reason, "a destination sent STREAM_START")


class RefusalTests(SynchronousTestCase):
    """L{refusals}: without a partner, each start is answered with its reset."""

    def test_starts_refused(self) -> None:
        controls = [start(4, "SSH", 1), reset(3, "SSH", 1),
                    msg(Message.CONNECTION_START, 4, "SSH", 2),
                    msg(Message.CONNECTION_RESET, 4, "SSH", 2)]
        self.assertEqual(refusals(controls), [
            reset(4, "SSH", 1), msg(Message.CONNECTION_RESET, 4, "SSH", 2),
        ])

    def test_nothing_to_refuse(self) -> None:
        self.assertEqual(refusals([reset(1)]), [])


class StreamLedgerTests(SynchronousTestCase):
    """L{StreamLedger}: one open stream per service, the newest start's."""

    def test_resets_of_open_streams(self) -> None:
        ledger = StreamLedger()
        for message in (start(1, "SSH", 1), start(2, "HTTP"), start(3, "DB", 5),
                        reset(3, "DB", 5), start(1, "SSH", 1)):
            ledger.track(message)
        self.assertEqual(
            sorted(ledger.resets(), key=lambda m: m.serviceId),
            [reset(2, "HTTP"), reset(1, "SSH", 1)],
        )
        self.assertEqual(ledger.resets(), [])

    def test_newer_start_replaces(self) -> None:
        ledger = StreamLedger()
        ledger.track(start(1, "SSH", 1))
        ledger.track(start(2, "SSH", 7))
        ledger.track(reset(1, "SSH", 1))  # an old stream's reset: stream 2 stays open
        self.assertEqual(ledger.resets(), [reset(2, "SSH", 7)])

    def test_other_records_ignored(self) -> None:
        ledger = StreamLedger()
        ledger.track(start(1))
        for message in (data(1), msg(Message.CONNECTION_START, 1, "", 2),
                        msg(Message.CONNECTION_RESET, 1, "", 1)):
            ledger.track(message)
        self.assertEqual(ledger.resets(), [reset(1)])

    # a loaded machine makes drawing slow; that says nothing about the ledger
    @settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(st.tuples(st.booleans(), st.sampled_from(["", "A", "B"]),
                              st.integers(1, 3))))
    def test_one_reset_per_open_service(self, steps: list[tuple[bool, str, int]]) -> None:
        ledger = StreamLedger()
        open_streams: dict[str, int] = {}
        for is_start, service, stream in steps:
            if is_start:
                ledger.track(start(stream, service))
                open_streams[service] = stream
            else:
                ledger.track(reset(stream, service))
                if open_streams.get(service) == stream:
                    del open_streams[service]
        self.assertEqual(
            {m.serviceId: m.streamId for m in ledger.resets()}, open_streams
        )


class FakeEnd:
    """A L{TunnelEnd} that records what it is asked to do, in C{events}."""

    def __init__(self, name: str, events: list[tuple[str, ...]], accepting: bool = True) -> None:
        self.name = name
        self.events = events
        self.accepting_records = accepting
        self.pairing: Pairing | None = None
        self.sent: list[bytes] = []

    def send_records(self, data: bytes) -> None:
        self.sent.append(data)

    def pause_reading(self) -> None:
        self.events.append((self.name, "pause"))

    def resume_reading(self) -> None:
        self.events.append((self.name, "resume"))

    def paired(self, pairing: Pairing) -> None:
        self.pairing = pairing
        self.events.append((self.name, "paired", pairing.partner_of(self).name))  # type: ignore[attr-defined]

    def parted(self) -> None:
        self.pairing = None
        self.events.append((self.name, "parted"))

    def received(self) -> list[Message]:
        decoder = RecordDecoder()
        return [m for data in self.sent for m in decoder.feed(data)]


class PairingTests(SynchronousTestCase):
    """L{Pairing}: records go through it to the partner; the end left hears of open streams."""

    def setUp(self) -> None:
        self.events: list[tuple[str, ...]] = []
        self.source = FakeEnd("source", self.events)
        self.destination = FakeEnd("destination", self.events)
        self.pairing = Pairing(self.source, self.destination)

    def test_both_ends_told(self) -> None:
        self.assertEqual(self.events, [
            ("source", "paired", "destination"), ("destination", "paired", "source"),
        ])
        self.assertIs(self.source.pairing, self.pairing)
        self.assertIs(self.destination.pairing, self.pairing)
        self.assertIs(self.pairing.partner_of(self.source), self.destination)
        self.assertIs(self.pairing.partner_of(self.destination), self.source)

    def test_relay_to_partner(self) -> None:
        self.assertTrue(self.pairing.relay(self.source, [start(1)], [b"one", b"two"]))
        self.assertEqual(self.destination.sent, [b"one", b"two"])
        self.assertTrue(self.pairing.relay(self.destination, [], [b"back"]))
        self.assertEqual(self.source.sent, [b"back"])

    def test_partner_not_accepting(self) -> None:
        self.destination.accepting_records = False
        self.assertFalse(self.pairing.relay(self.source, [start(1)], [b"one"]))
        self.assertEqual(self.destination.sent, [])
        # an unrelayed start is not an open stream
        self.destination.accepting_records = True
        self.pairing.left(self.destination)
        self.assertEqual(self.source.sent, [])

    def test_left_resets_open_streams(self) -> None:
        self.pairing.relay(self.source, [start(1, "SSH", 1), start(2, "HTTP")], [b"starts"])
        self.pairing.relay(self.destination, [reset(2, "HTTP")], [b"reset"])
        self.source.sent.clear()
        del self.events[:]
        self.pairing.left(self.destination)
        self.assertEqual(self.source.received(), [reset(1, "SSH", 1)])
        self.assertEqual(len(self.source.sent), 1)  # one message for all the resets
        self.assertEqual(self.destination.sent, [b"starts"])
        self.assertEqual(self.events, [("source", "parted"), ("destination", "parted")])
        self.assertIsNone(self.source.pairing)

    def test_left_by_either_end(self) -> None:
        self.pairing.relay(self.destination, [reset(9)], [b"x"])
        self.pairing.relay(self.source, [start(3)], [b"y"])
        self.pairing.left(self.source)
        self.assertEqual(self.destination.sent[0], b"y")
        self.assertEqual(self.destination.sent[1:], [encode(reset(3))])
        self.assertEqual(self.source.sent, [b"x"])

    def test_left_nothing_open(self) -> None:
        self.pairing.relay(self.source, [start(1)], [b"a"])
        self.pairing.relay(self.destination, [reset(1)], [b"b"])
        self.pairing.left(self.source)
        self.assertEqual(self.destination.sent, [b"a"])

    def test_left_to_a_closing_end(self) -> None:
        self.pairing.relay(self.source, [start(1)], [b"a"])
        self.source.accepting_records = False
        self.pairing.left(self.destination)
        self.assertEqual(self.source.sent, [])

    def test_over_once(self) -> None:
        self.pairing.relay(self.source, [start(1)], [b"a"])
        self.pairing.left(self.destination)
        self.pairing.left(self.destination)
        self.pairing.dissolve()
        self.assertEqual(self.source.received(), [reset(1)])
        self.assertEqual(
            [e for e in self.events if e[1] == "parted"],
            [("source", "parted"), ("destination", "parted")],
        )
        self.assertFalse(self.pairing.relay(self.source, [], [b"late"]))
        self.assertEqual(self.destination.sent, [b"a"])

    def test_dissolve_quietly(self) -> None:
        self.pairing.relay(self.source, [start(1)], [b"a"])
        self.pairing.dissolve()
        self.assertEqual((self.source.sent, self.destination.sent), ([], [b"a"]))
        self.assertEqual(self.events[2:], [("source", "parted"), ("destination", "parted")])
        self.assertIsNone(self.destination.pairing)

    def test_new_pairing_new_ledger(self) -> None:
        self.pairing.relay(self.source, [start(1)], [b"a"])
        self.pairing.dissolve()
        again = Pairing(self.source, self.destination)
        again.left(self.source)
        self.assertEqual(self.destination.sent, [b"a"])
