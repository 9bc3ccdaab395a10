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
from collections.abc import Iterable, Iterator, Sequence
from functools import lru_cache

from google.protobuf.message import DecodeError

from lpxy._proto.Message_pb2 import Message

__all__ = [
    "LENGTH_PREFIX",
    "LENGTH_PREFIX_SIZE",
    "MAX_RECORD_SIZE",
    "WIRE_FRAME_LIMIT",
    "Message",
    "ProtocolError",
    "RecordDecoder",
    "data_header",
    "data_record_parts",
    "encode",
    "encode_body",
    "group_records",
    "pack_records",
    "parse_body",
]

LENGTH_PREFIX = struct.Struct(">H")
"""The length before each record body: 2 bytes, big-endian (the wire's, not a setting)."""
LENGTH_PREFIX_SIZE = LENGTH_PREFIX.size
MAX_RECORD_SIZE = (1 << 8 * LENGTH_PREFIX_SIZE) - 1
"""The largest record body the length prefix can describe."""

WIRE_FRAME_LIMIT = 131076
"""
The largest WebSocket message either end of a tunnel sends or accepts
(protocol.md section 2). It is the wire's limit, not a setting: the peer
and the service send messages this big whatever we configure, and refuse
bigger ones. The reference's C{websocket.max_frame_size} only sizes its
socket buffers.
"""

_PAYLOAD_TAG = b"\x22"  # field 4 (payload), wire type 2 (length-delimited)
_SPLITS_KEPT = 1024  # DATA headers whose split is remembered (one per channel)


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
    return LENGTH_PREFIX.pack(size) + body


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
    are kept until the rest arrives: at most one record's worth, held as
    views of the chunks it came in when those are immutable C{bytes} (so at
    most one record plus the chunk its first piece came from stays in
    memory). After a L{ProtocolError} the stream is
    unusable and every later call raises again.
    """

    def __init__(self, max_size: int = MAX_RECORD_SIZE) -> None:
        if not 0 < max_size <= MAX_RECORD_SIZE:
            raise ValueError(f"max_size must be 1..{MAX_RECORD_SIZE}, not {max_size}")
        self._max_size = max_size
        # The record begun in an earlier chunk: its pieces (the length
        # prefix's first byte, or body bytes once the length is known) and
        # their total size. Pieces of immutable chunks are views of them;
        # the body is joined, the one copy, when its last piece arrives.
        self._pieces: list[bytes | memoryview] = []
        self._held = 0
        self._size: int | None = None
        self._error: ProtocolError | None = None

    @property
    def pending(self) -> int:
        """The number of bytes held for an incomplete record."""
        if self._size is None:
            return self._held
        return LENGTH_PREFIX_SIZE + self._held

    def feed_raw(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """
        Add C{data} and return the bodies of the records now complete.

        Each body is copied once: sliced straight out of C{data}, or joined
        from its pieces when it spans chunks.

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
        if self._held or self._size is not None:
            offset = self._complete(chunk, raw is not None, bodies)
            if offset == end:
                return bodies
        unpack = LENGTH_PREFIX.unpack_from
        limit = self._max_size
        while end - offset >= LENGTH_PREFIX_SIZE:
            (size,) = unpack(chunk, offset)
            if size == 0 or size > limit:
                raise self._fail(size)
            start = offset + LENGTH_PREFIX_SIZE
            stop = start + size
            if stop > end:
                self._size = size
                self._hold(chunk, start, raw is not None)
                return bodies
            bodies.append(raw[start:stop] if raw is not None else bytes(chunk[start:stop]))
            offset = stop
        if offset < end:
            self._hold(chunk, offset, raw is not None)
        return bodies

    def _hold(self, chunk: bytes | memoryview, start: int, immutable: bool) -> None:
        piece = memoryview(chunk)[start:] if immutable else bytes(chunk[start:])
        self._pieces.append(piece)
        self._held += len(piece)

    def _complete(self, chunk: bytes | memoryview, immutable: bool, bodies: list[bytes]) -> int:
        """
        Add to the record begun earlier what it lacks from C{chunk}; once
        whole, add its body to C{bodies}. Return how much of C{chunk} was
        used (all of it while the record is still incomplete).
        """
        end = len(chunk)
        used = 0
        if self._size is None:
            used = LENGTH_PREFIX_SIZE - self._held
            if end < used:
                if end:
                    self._hold(chunk, 0, immutable)
                return end
            (size,) = LENGTH_PREFIX.unpack(b"".join([*self._pieces, chunk[:used]]))
            if size == 0 or size > self._max_size:
                raise self._fail(size)
            self._size = size
            self._pieces = []
            self._held = 0
        missing = self._size - self._held
        if end - used < missing:
            if end > used:
                self._hold(chunk, used, immutable)
            return end
        pieces, self._pieces, self._held, self._size = self._pieces, [], 0, None
        pieces.append(chunk[used : used + missing])
        bodies.append(b"".join(pieces))
        return used + missing

    def _fail(self, size: int) -> ProtocolError:
        return self._broken(
            ProtocolError(f"invalid record length {size} (must be 1..{self._max_size})")
        )

    def _broken(self, error: ProtocolError) -> ProtocolError:
        # Every later call raises this again; nothing held is of use now.
        self._error = error
        self._pieces, self._held, self._size = [], 0, None
        return error

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
                self._broken(e)
                raise
        return messages


def _varint(value: int) -> bytes:
    if value < 0x80:
        return bytes((value,))
    if value < 0x4000:
        return bytes(((value & 0x7F) | 0x80, value >> 7))
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


@lru_cache(maxsize=_SPLITS_KEPT)
def _split_header(header: bytes) -> tuple[bytes, bytes]:
    """
    Cut a serialized DATA header where its payload (field 4) belongs:
    after fields 1 to 3 (varints, one-byte tags), before fields 5 to 7.
    """
    offset, end = 0, len(header)
    while offset < end and header[offset] < 0x20:
        offset += 1
        while offset < end and header[offset] & 0x80:
            offset += 1
        offset += 1
    return header[:offset], header[offset:]


def data_header(service_id: str, stream_id: int, connection_id: int) -> bytes:
    """
    The serialized DATA header of one channel: a C{Message} of type DATA
    without payload, made once and given to L{data_record_parts} for each
    payload.
    """
    return Message(
        type=Message.DATA,
        streamId=stream_id,
        serviceId=service_id,
        connectionId=connection_id,
    ).SerializeToString()


def data_record_parts(header: bytes, payload_size: int) -> tuple[bytes, bytes]:
    """
    The bytes that go before and after a payload of C{payload_size} bytes
    to make the DATA record of C{header} (a serialized C{Message} of type
    DATA without payload, pre-serialized once per channel): the record is
    C{before + payload + after}, exactly what L{encode} makes of the whole
    message, without copying the payload.

    @raise ValueError: when the record would be over L{MAX_RECORD_SIZE}.
    """
    if not payload_size:
        # proto3 leaves an empty payload out.
        return encode_body(header), b""
    lead, trail = _split_header(header)
    tag = _PAYLOAD_TAG + _varint(payload_size)
    size = len(header) + len(tag) + payload_size
    if size > MAX_RECORD_SIZE:
        raise ValueError(
            f"record of {size} bytes exceeds the limit of {MAX_RECORD_SIZE} bytes"
        )
    return LENGTH_PREFIX.pack(size) + lead + tag, trail


def group_records(
    records: Iterable[Sequence[bytes | memoryview]], limit: int = WIRE_FRAME_LIMIT
) -> Iterator[tuple[int, list[bytes | memoryview]]]:
    """
    What L{pack_records} makes, not joined: each message payload as its
    size and the pieces that make it, in order, for a caller that copies
    them once into a frame of its own.
    """
    parts: list[bytes | memoryview] = []
    size = 0
    for pieces in records:
        record_size = sum(map(len, pieces))
        if size and size + record_size > limit:
            yield size, parts
            parts, size = [], 0
        parts.extend(pieces)
        size += record_size
    if parts:
        yield size, parts


def pack_records(
    records: Iterable[Sequence[bytes | memoryview]], limit: int = WIRE_FRAME_LIMIT
) -> Iterator[bytes]:
    """
    Join whole records into as few WebSocket message payloads as fit in
    C{limit} bytes each, in order. Each record is given as its pieces (a
    length-prefixed record, or the parts of one such as
    L{data_record_parts} and a payload); a record is never cut, and one
    bigger than C{limit} goes alone.
    """
    for _, parts in group_records(records, limit):
        yield b"".join(parts)
