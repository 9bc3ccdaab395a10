# -*- test-case-name: tests.test_policy -*-
"""
The data plane's decisions, without a socket: what a tunnel end may send,
which streams are open across a tunnel, and how its two ends meet.

  - L{RecordRules} checks the records one end sends: never SESSION_RESET,
    SERVICE_IDS or UNKNOWN, never stream id 0, no starts from a
    destination, no service outside the tunnel's; an unknown type passes
    only when marked ignorable. A broken rule is a L{Violation}, carrying
    the WebSocket close code to answer with.
  - L{refusals}: without a partner, each start is answered with its reset.
  - L{StreamLedger} follows the starts and resets relayed through a
    pairing, so that the end left when its partner goes gets a
    STREAM_RESET for each stream still open.
  - L{Pairing} is where the two ends of a tunnel meet: records go through
    it to the partner, never from one end's connection into the other's.
    Its ends are L{TunnelEnd}s: anything that can send records, pause and
    resume its reading, and is told when it is paired and parted.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

import attrs

from lpxy.frames import Message, ProtocolError, encode, parse_body
from lpxy.tunnelservice.store import SOURCE
from lpxy.wire import (
    CLOSE_POLICY_VIOLATION,
    CLOSE_PROTOCOL_ERROR,
    KNOWN_TYPES,
    SERVICE_ONLY_TYPES,
    SOURCE_ONLY_TYPES,
    STREAM_TYPES,
)

__all__ = [
    "Pairing",
    "RecordRules",
    "StreamLedger",
    "TunnelEnd",
    "Violation",
    "refusals",
]

_FORBIDDEN = {Message.UNKNOWN: "message type UNKNOWN (0)"} | {
    kind: f"{Message.Type.Name(kind)} (only the service sends it)"
    for kind in sorted(SERVICE_ONLY_TYPES)
}
_REFUSAL = {
    Message.STREAM_START: Message.STREAM_RESET,
    Message.CONNECTION_START: Message.CONNECTION_RESET,
}


class Violation(Exception):
    """
    A tunnel end sent what it must not: its connection is closed.

    @ivar code: the WebSocket close code to close with.
    @ivar reason: what was wrong, for the log and the close frame.
    """

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@attrs.frozen
class RecordRules:
    """
    What one tunnel end may send.

    @ivar mode: the end, C{source} or C{destination}.
    @ivar services: the tunnel's service ids.
    """

    mode: str
    services: tuple[str, ...]

    def check(self, bodies: Iterable[bytes | memoryview]) -> list[Message]:
        """
        Parse and check the record bodies that one message brought.

        @return: the control records among them (starts and resets), in order;
            DATA and ignorable unknown types are checked but not returned.
        @raise Violation: a record breaks a rule, or does not parse.
        """
        controls = []
        for body in bodies:
            try:
                message = parse_body(body)
            except ProtocolError as e:
                raise Violation(CLOSE_PROTOCOL_ERROR, str(e)) from None
            if self._is_control(message):
                controls.append(message)
        return controls

    def _is_control(self, message: Message) -> bool:
        kind = message.type
        if kind in _FORBIDDEN:
            raise Violation(CLOSE_POLICY_VIOLATION, "a client sent " + _FORBIDDEN[kind])
        if kind not in KNOWN_TYPES:
            if not message.ignorable:
                raise Violation(
                    CLOSE_PROTOCOL_ERROR, f"unknown message type {kind} not ignorable"
                )
            return False
        if kind in STREAM_TYPES and message.streamId <= 0:
            raise Violation(
                CLOSE_POLICY_VIOLATION, f"{Message.Type.Name(kind)} without a stream id"
            )
        if kind in SOURCE_ONLY_TYPES and self.mode != SOURCE:
            raise Violation(
                CLOSE_POLICY_VIOLATION, f"a destination sent {Message.Type.Name(kind)}"
            )
        if message.serviceId and message.serviceId not in self.services:
            raise Violation(
                CLOSE_POLICY_VIOLATION,
                f"service id {message.serviceId!r} is not one of the tunnel's",
            )
        return kind != Message.DATA


def refusals(controls: Iterable[Message]) -> list[Message]:
    """The answers to an end without a partner: each start's reset."""
    return [
        Message(
            type=_REFUSAL[message.type], serviceId=message.serviceId,
            streamId=message.streamId, connectionId=message.connectionId,
        )
        for message in controls
        if message.type in _REFUSAL
    ]


class StreamLedger:
    """
    The streams open across a pairing: per service, the stream (and its
    connection) of the newest STREAM_START not yet reset.
    """

    def __init__(self) -> None:
        self._streams: dict[str, tuple[int, int]] = {}

    def track(self, message: Message) -> None:
        """Follow a control record relayed between the ends."""
        if message.type == Message.STREAM_START:
            self._streams[message.serviceId] = (message.streamId, message.connectionId)
        elif message.type == Message.STREAM_RESET:
            current = self._streams.get(message.serviceId)
            if current is not None and current[0] == message.streamId:
                del self._streams[message.serviceId]

    def resets(self) -> list[Message]:
        """A STREAM_RESET for each open stream; the ledger is empty afterwards."""
        resets = [
            Message(type=Message.STREAM_RESET, serviceId=service, streamId=stream,
                    connectionId=connection)
            for service, (stream, connection) in self._streams.items()
        ]
        self._streams.clear()
        return resets


class TunnelEnd(Protocol):
    """What a L{Pairing} asks of the connection of one tunnel end."""

    @property
    def accepting_records(self) -> bool:
        """Whether records can be sent to it now."""

    def send_records(self, data: bytes) -> None:
        """Send whole records, as one WebSocket message."""

    def pause_reading(self) -> None:
        """Stop reading from it (its partner cannot keep up)."""

    def resume_reading(self) -> None:
        """Read from it again."""

    def paired(self, pairing: Pairing) -> None:
        """It is now one of C{pairing}'s ends."""

    def parted(self) -> None:
        """Its pairing is over: it has no partner, and reads again."""


class Pairing:
    """
    The two ends of a tunnel while both are connected. Making one tells both
    ends (L{TunnelEnd.paired}); it is over once either leaves.
    """

    def __init__(self, first: TunnelEnd, second: TunnelEnd) -> None:
        self._ends = (first, second)
        self._ledger = StreamLedger()
        self._over = False
        first.paired(self)
        second.paired(self)

    def partner_of(self, end: TunnelEnd) -> TunnelEnd:
        """The other end."""
        first, second = self._ends
        return second if end is first else first

    def relay(
        self, sender: TunnelEnd, controls: Sequence[Message], messages: Iterable[bytes]
    ) -> bool:
        """
        Send C{messages} (whole records) from C{sender} to its partner, and
        follow the streams that C{controls}, the control records among
        them, open and close.

        @return: L{False}, and nothing is sent, when the partner cannot take
            records now (it is still opening or already closing).
        """
        partner = self.partner_of(sender)
        if self._over or not partner.accepting_records:
            return False
        for message in controls:
            self._ledger.track(message)
        for data in messages:
            partner.send_records(data)
        return True

    def left(self, leaving: TunnelEnd) -> None:
        """
        C{leaving} is gone: the pairing is over, and the end left gets a
        STREAM_RESET for each stream still open.
        """
        if self._over:
            return
        remaining = self.partner_of(leaving)
        self.dissolve()
        resets = self._ledger.resets()
        if resets and remaining.accepting_records:
            remaining.send_records(b"".join(encode(m) for m in resets))

    def dissolve(self) -> None:
        """End the pairing without a word to either end's peer."""
        if not self._over:
            self._over = True
            for end in self._ends:
                end.parted()
