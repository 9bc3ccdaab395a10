# -*- test-case-name: tests.test_frames -*-
"""
The record codec shared by the proxy and the tunnel service.

Inside the WebSocket, binary message payloads form one byte stream cut into
records: a 2-byte big-endian length N, then N bytes of a serialized
C{Message}. Records may span WebSocket messages and one message may carry
many records, so the decoder works on the concatenated stream and never
assumes one record per message.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

from google.protobuf.message import DecodeError

from lpxy._proto.Message_pb2 import Message

__all__ = [
    "LENGTH_PREFIX_SIZE",
    "MAX_RECORD_SIZE",
    "Message",
    "ProtocolError",
    "RecordDecoder",
    "encode",
    "encode_all",
    "encode_body",
    "parse_body",
]

LENGTH_PREFIX_SIZE = 2
MAX_RECORD_SIZE = 0xFFFF
"""The largest record body a 2-byte length prefix can describe."""

_LENGTH = struct.Struct(">H")


class ProtocolError(Exception):
    """
    The peer sent bytes that are not a valid record stream.

    The message says what was wrong; it never contains payload bytes.
    """


def encode_body(body: bytes) -> bytes:
    """
    Prefix an already serialized C{Message} with its length.

    @raise ValueError: when the body is empty or longer than L{MAX_RECORD_SIZE}.
    """
    size = len(body)
    if size == 0:
        raise ValueError("a record body cannot be empty")
    if size > MAX_RECORD_SIZE:
        raise ValueError(
            f"record of {size} bytes exceeds the limit of {MAX_RECORD_SIZE} bytes"
        )
    return _LENGTH.pack(size) + body


def encode(message: Message) -> bytes:
    """
    Serialize C{message} into one length-prefixed record.

    @raise ValueError: when the serialized message is over the record limit
        (for DATA, cut payloads at C{max_payload_size} before encoding).
    """
    return encode_body(message.SerializeToString())


def parse_body(body: bytes | memoryview) -> Message:
    """
    Parse one record body into a L{Message}.

    @raise ProtocolError: when the body is not a valid C{Message}.
    """
    message = Message()
    try:
        message.ParseFromString(bytes(body))
    except DecodeError as e:
        raise ProtocolError(f"record body does not parse as a Message: {e}") from None
    return message


class RecordDecoder:
    """
    Turns arbitrary chunks of the record stream into whole records.

    Feed it every WebSocket payload in order. Bytes of an incomplete record
    are kept until the rest arrives; at most one record's worth is ever
    buffered. After a L{ProtocolError} the stream is
    unusable and every later call raises again.
    """

    def __init__(self, max_size: int = MAX_RECORD_SIZE) -> None:
        if not 0 < max_size <= MAX_RECORD_SIZE:
            raise ValueError(f"max_size must be 1..{MAX_RECORD_SIZE}, not {max_size}")
        self._max_size = max_size
        self._buffer = bytearray()
        self._error: ProtocolError | None = None

    @property
    def pending(self) -> int:
        """The number of bytes held for an incomplete record."""
        return len(self._buffer)

    def feed_raw(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """
        Add C{data} and return the bodies of the records now complete.

        Each body is copied once, straight out of C{data}; only a record
        that spans chunks goes through the decoder's own buffer.

        @raise ProtocolError: on a zero or over-limit length.
        """
        if self._error is not None:
            raise self._error
        # Slicing bytes copies once; any other buffer is sliced as a view
        # and copied by bytes().
        raw = data if type(data) is bytes else None
        chunk = raw if raw is not None else memoryview(data).cast("B")
        end = len(chunk)
        bodies: list[bytes] = []
        offset = 0
        buffer = self._buffer
        if buffer:
            offset = self._complete(chunk, bodies)
            if buffer:
                return bodies
        unpack = _LENGTH.unpack_from
        limit = self._max_size
        while end - offset >= LENGTH_PREFIX_SIZE:
            (size,) = unpack(chunk, offset)
            if size == 0 or size > limit:
                raise self._fail(size)
            start = offset + LENGTH_PREFIX_SIZE
            stop = start + size
            if stop > end:
                break
            bodies.append(raw[start:stop] if raw is not None else bytes(chunk[start:stop]))
            offset = stop
        if offset < end:
            buffer += chunk[offset:]
        return bodies

    def _complete(self, chunk: bytes | memoryview, bodies: list[bytes]) -> int:
        """
        Move into the buffer what the record begun there still lacks; once
        whole, add its body to C{bodies}. Return how much of C{chunk} was
        used.
        """
        buffer = self._buffer
        used = 0
        held = len(buffer)
        if held < LENGTH_PREFIX_SIZE:
            used = LENGTH_PREFIX_SIZE - held
            buffer += chunk[:used]
            if len(buffer) < LENGTH_PREFIX_SIZE:
                return len(chunk)
        (size,) = _LENGTH.unpack_from(buffer)
        if size == 0 or size > self._max_size:
            raise self._fail(size)
        missing = LENGTH_PREFIX_SIZE + size - len(buffer)
        buffer += chunk[used : used + missing]
        if len(buffer) < LENGTH_PREFIX_SIZE + size:
            return len(chunk)
        with memoryview(buffer) as view:
            bodies.append(bytes(view[LENGTH_PREFIX_SIZE:]))
        buffer.clear()
        return used + missing

    def _fail(self, size: int) -> ProtocolError:
        self._error = ProtocolError(
            f"invalid record length {size} (must be 1..{self._max_size})"
        )
        self._buffer.clear()
        return self._error

    def feed(self, data: bytes | bytearray | memoryview) -> list[Message]:
        """
        Add C{data} and return the messages now complete, in order.

        @raise ProtocolError: on a bad length or a body that does not parse.
        """
        messages = []
        for body in self.feed_raw(data):
            try:
                messages.append(parse_body(body))
            except ProtocolError as e:
                self._error = e
                self._buffer.clear()
                raise
        return messages


def encode_all(messages: Iterable[Message]) -> bytes:
    """Encode several messages into one contiguous chunk of records."""
    return b"".join(encode(m) for m in messages)
