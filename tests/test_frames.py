"""
Tests for L{lpxy.frames}, the record codec.
"""

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from lpxy.frames import (
    LENGTH_PREFIX_SIZE,
    MAX_RECORD_SIZE,
    WIRE_FRAME_LIMIT,
    Message,
    ProtocolError,
    RecordDecoder,
    data_header,
    data_record_parts,
    encode,
    encode_body,
    group_records,
    pack_records,
)
from tests.support.wsframes import encode_all


def data(stream_id: int, payload: bytes, service_id: str = "") -> Message:
    return Message(
        type=Message.DATA, streamId=stream_id, payload=payload, serviceId=service_id
    )


messages = st.builds(
    Message,
    type=st.sampled_from([t for t in Message.Type.values() if t != Message.UNKNOWN]),
    streamId=st.integers(min_value=0, max_value=2**31 - 1),
    ignorable=st.booleans(),
    payload=st.binary(max_size=2000),
    serviceId=st.text(max_size=20),
    availableServiceIds=st.lists(st.text(max_size=10), max_size=3),
    connectionId=st.integers(min_value=0, max_value=2**32 - 1),
)


def rechunk(stream: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(stream) + 1) for c in cuts})
    chunks, last = [], 0
    for p in [*points, len(stream)]:
        chunks.append(stream[last:p])
        last = p
    return chunks


class EncodeTests(SynchronousTestCase):
    def test_prefix(self) -> None:
        message = data(1, b"hello", "SSH1")
        body = message.SerializeToString()
        self.assertEqual(encode(message), len(body).to_bytes(2, "big") + body)

    def test_overLimitRefused(self) -> None:
        message = data(1, b"x" * MAX_RECORD_SIZE)
        exc = self.assertRaises(ValueError, encode, message)
        self.assertIn("exceeds the limit of 65535 bytes", str(exc))

    def test_largestAccepted(self) -> None:
        overhead = len(encode(data(1, b"x" * 60000))) - 60000
        payload = b"x" * (MAX_RECORD_SIZE + 2 - overhead)
        record = encode(data(1, payload))
        self.assertEqual(len(record), MAX_RECORD_SIZE + 2)
        self.assertEqual(RecordDecoder().feed(record)[0].payload, payload)

    def test_emptyBodyRefused(self) -> None:
        self.assertRaises(ValueError, encode_body, b"")


    def test_lengthPrefix(self) -> None:
        """The prefix is 2 bytes, so a body holds at most 65535 bytes."""
        self.assertEqual((LENGTH_PREFIX_SIZE, MAX_RECORD_SIZE), (2, 65535))


class DataRecordTests(SynchronousTestCase):
    """
    L{data_record_parts}: a DATA record from a pre-serialized header and a
    payload it does not copy.
    """

    def record(self, header: Message, payload: bytes) -> bytes:
        before, after = data_record_parts(header.SerializeToString(), len(payload))
        return before + payload + after

    def test_whatProtobufSerializes(self) -> None:
        """
        The parts around a payload make exactly the bytes of L{encode} of
        the whole message, whatever the field values and varint lengths.
        """
        combinations = [
            (stream_id, service_id, connection_id, ignorable, size)
            for stream_id in (1, 127, 128, 16384, 2**31 - 1)
            for service_id in ("", "S", "SSH1", "\u00e9t\u00e9", "x" * 128)
            for connection_id in (0, 1, 128, 2**21, 2**32 - 1)
            for ignorable in (False, True)
            for size in (0, 1, 127, 128, 300)
        ]
        combinations += [(7, "HTTP", 3, False, size) for size in (16383, 16384, 64512)]
        for stream_id, service_id, connection_id, ignorable, size in combinations:
            header = Message(type=Message.DATA, streamId=stream_id, serviceId=service_id,
                             connectionId=connection_id, ignorable=ignorable)
            payload = bytes(range(256)) * (size // 256) + b"p" * (size % 256)
            record = self.record(header, payload)
            header.payload = payload
            self.assertEqual(record, encode(header))

    def test_dataHeader(self) -> None:
        """
        L{data_header} is a channel's DATA message without payload; its
        record with a payload is L{encode} of that message with it.
        """
        header = data_header("SSH", 5, 2)
        self.assertEqual(
            Message.FromString(header),
            Message(type=Message.DATA, streamId=5, serviceId="SSH", connectionId=2),
        )
        before, after = data_record_parts(header, 3)
        self.assertEqual(
            before + b"abc" + after,
            encode(Message(type=Message.DATA, streamId=5, serviceId="SSH", connectionId=2,
                           payload=b"abc")),
        )

    def test_emptyPayload(self) -> None:
        """Without payload the record is the header's (proto3 leaves it out)."""
        header = Message(type=Message.DATA, streamId=3, serviceId="S").SerializeToString()
        self.assertEqual(data_record_parts(header, 0), (encode_body(header), b""))

    def test_overLimitRefused(self) -> None:
        header = Message(type=Message.DATA, streamId=1).SerializeToString()
        largest = MAX_RECORD_SIZE - len(header) - 4  # tag and a 3-byte length
        self.assertEqual(len(self.record(Message(type=Message.DATA, streamId=1),
                                         b"x" * largest)), 2 + MAX_RECORD_SIZE)
        self.assertRaises(ValueError, data_record_parts, header, largest + 1)

    @settings(max_examples=200, deadline=None)
    @given(
        stream_id=st.integers(min_value=1, max_value=2**31 - 1),
        service_id=st.text(max_size=40),
        connection_id=st.integers(min_value=0, max_value=2**32 - 1),
        ignorable=st.booleans(),
        payload=st.binary(max_size=3000),
    )
    def test_anyHeaderAndPayload(
        self, stream_id: int, service_id: str, connection_id: int, ignorable: bool,
        payload: bytes,
    ) -> None:
        header = Message(type=Message.DATA, streamId=stream_id, serviceId=service_id,
                         connectionId=connection_id, ignorable=ignorable)
        record = self.record(header, payload)
        header.payload = payload
        self.assertEqual(record, encode(header))


class PackTests(SynchronousTestCase):
    """L{pack_records}: whole records into as few messages as the limit allows."""

    def test_frameLimit(self) -> None:
        """Two of the largest DATA records fit the wire limit; a third does not."""
        header = Message(type=Message.DATA, streamId=1).SerializeToString()
        chunk = bytes(range(256)) * 252  # 64512 bytes
        before, after = data_record_parts(header, len(chunk))
        messages = list(pack_records([(before, chunk, after)] * 3))
        self.assertTrue(all(len(m) <= WIRE_FRAME_LIMIT for m in messages))
        decoder = RecordDecoder()
        self.assertEqual([len(decoder.feed(m)) for m in messages], [2, 1])

    def test_nothing(self) -> None:
        self.assertEqual(list(pack_records([])), [])

    def test_biggerThanLimitGoesAlone(self) -> None:
        self.assertEqual(
            list(pack_records([(b"ab",), (b"cdef",), (b"g", b"h")], limit=3)),
            [b"ab", b"cdef", b"gh"],
        )

    def test_piecesJoined(self) -> None:
        """The pieces of a record may be bytes or views; the message is bytes."""
        [message] = pack_records([(b"\x00\x02", memoryview(b"xyz")[1:]), (b"tail",)])
        self.assertEqual(message, b"\x00\x02yztail")
        self.assertIs(type(message), bytes)

    @settings(max_examples=300, deadline=None)
    @given(
        sizes=st.lists(st.integers(min_value=1, max_value=40), max_size=30),
        limit=st.integers(min_value=1, max_value=100),
    )
    def test_wholeRecordsGreedily(self, sizes: list[int], limit: int) -> None:
        """
        The messages hold the records in order, never cut one, stay within
        the limit unless one record alone is bigger, and a message is only
        ended when the next record does not fit.
        """
        records = [bytes([i % 256]) * size for i, size in enumerate(sizes)]
        messages = list(pack_records([(r,) for r in records], limit=limit))
        self.assertEqual(b"".join(messages), b"".join(records))
        remaining = list(records)
        for message in messages:
            taken: list[bytes] = []
            while remaining and sum(map(len, taken)) < len(message):
                taken.append(remaining.pop(0))
            self.assertEqual(b"".join(taken), message)
            if len(message) > limit:
                self.assertEqual(len(taken), 1)
            if remaining:
                self.assertGreater(len(message) + len(remaining[0]), limit)


class DecoderTests(SynchronousTestCase):
    def test_splitAcrossChunks(self) -> None:
        record = encode(data(7, b"abcdef", "HTTP"))
        decoder = RecordDecoder()
        for byte in record[:-1]:
            self.assertEqual(decoder.feed(bytes([byte])), [])
        [message] = decoder.feed(record[-1:])
        self.assertEqual((message.streamId, message.payload), (7, b"abcdef"))
        self.assertEqual(decoder.pending, 0)

    def test_manyInOneChunk(self) -> None:
        sent = [data(i, bytes([i]) * i) for i in range(1, 20)]
        self.assertEqual(RecordDecoder().feed(encode_all(sent)), sent)

    def test_zeroLength(self) -> None:
        exc = self.assertRaises(ProtocolError, RecordDecoder().feed, b"\x00\x00")
        self.assertIn("invalid record length 0", str(exc))

    def test_overLimitLength(self) -> None:
        decoder = RecordDecoder(max_size=100)
        exc = self.assertRaises(ProtocolError, decoder.feed, b"\x00\x65" + b"x" * 101)
        self.assertIn("invalid record length 101 (must be 1..100)", str(exc))

    def test_unparsableBody(self) -> None:
        # Field 1 as varint with a truncated value cannot parse.
        exc = self.assertRaises(ProtocolError, RecordDecoder().feed, b"\x00\x02\x08\xff")
        self.assertIn("does not parse", str(exc))

    def test_errorIsSticky(self) -> None:
        decoder = RecordDecoder()
        self.assertRaises(ProtocolError, decoder.feed, b"\x00\x00")
        self.assertRaises(ProtocolError, decoder.feed, encode(data(1, b"ok")))

    def test_rawBodies(self) -> None:
        message = data(3, b"zz")
        self.assertEqual(
            RecordDecoder().feed_raw(encode(message) * 2),
            [message.SerializeToString()] * 2,
        )

    def test_bodiesAreBytesWhateverTheInput(self) -> None:
        records = encode(data(1, b"abc", "S")) + encode(data(2, b"de"))
        for kind in (bytes, bytearray, memoryview):
            bodies = RecordDecoder().feed_raw(kind(records))
            self.assertEqual([type(b) for b in bodies], [bytes, bytes])
            self.assertEqual(
                bodies,
                [data(1, b"abc", "S").SerializeToString(), data(2, b"de").SerializeToString()],
            )

    def test_inputMutatedLater(self) -> None:
        """Bodies and held bytes are copies, not views of the caller's buffer."""
        record = encode(data(1, b"abcdef"))
        chunk = bytearray(record + record[:5])
        decoder = RecordDecoder()
        [body] = decoder.feed_raw(chunk)
        chunk[:] = b"\xff" * len(chunk)
        self.assertEqual(body, data(1, b"abcdef").SerializeToString())
        self.assertEqual(decoder.feed_raw(record[5:]), [body])

    def test_lengthPrefixSplit(self) -> None:
        record = encode(data(1, b"x" * 300))
        decoder = RecordDecoder()
        self.assertEqual(decoder.feed_raw(record[:1]), [])
        self.assertEqual(decoder.pending, 1)
        self.assertEqual(decoder.feed_raw(b""), [])
        self.assertEqual(decoder.feed_raw(record[1:2]), [])
        self.assertEqual(decoder.pending, 2)
        self.assertEqual(decoder.feed_raw(record[2:] + record), [record[2:]] * 2)
        self.assertEqual(decoder.pending, 0)

    def test_badLengthAfterHeldBytesPoisons(self) -> None:
        """A bad length completed from held bytes poisons the stream too."""
        decoder = RecordDecoder(max_size=100)
        self.assertEqual(decoder.feed_raw(b"\x00"), [])
        exc = self.assertRaises(ProtocolError, decoder.feed_raw, b"\x65" + b"x" * 200)
        self.assertIn("invalid record length 101", str(exc))
        self.assertEqual(decoder.pending, 0)
        self.assertRaises(ProtocolError, decoder.feed_raw, encode(data(1, b"ok")))

    def test_unparsableBodyPoisons(self) -> None:
        decoder = RecordDecoder()
        self.assertRaises(ProtocolError, decoder.feed, b"\x00\x02\x08\xff" + b"\x00")
        self.assertEqual(decoder.pending, 0)
        self.assertRaises(ProtocolError, decoder.feed, encode(data(1, b"ok")))
        self.assertRaises(ProtocolError, decoder.feed_raw, encode(data(1, b"ok")))

    def test_badMaxSize(self) -> None:
        self.assertRaises(ValueError, RecordDecoder, 0)
        self.assertRaises(ValueError, RecordDecoder, MAX_RECORD_SIZE + 1)


class PropertyTests(SynchronousTestCase):
    @settings(max_examples=200, deadline=None)
    @given(st.lists(messages, min_size=1, max_size=10), st.lists(st.integers(0, 10**6)))
    def test_anyRechunkingDecodesTheSame(self, sent, cuts) -> None:
        stream = encode_all(sent)
        decoder = RecordDecoder()
        received = []
        for chunk in rechunk(stream, cuts):
            received.extend(decoder.feed(chunk))
        self.assertEqual(received, sent)
        self.assertEqual(decoder.pending, 0)

    @settings(max_examples=300, deadline=None)
    @given(
        st.lists(st.binary(min_size=1, max_size=700), min_size=1, max_size=10),
        st.lists(st.integers(0, 10**6)),
        st.lists(st.sampled_from([bytes, bytearray, memoryview])),
    )
    def test_rawBodiesAnyChunkingAndInputType(self, bodies, cuts, kinds) -> None:
        """
        Bodies come out whole and in order however the stream is cut and
        whatever buffer type each chunk is; nothing is left held.
        """
        stream = b"".join(encode_body(b) for b in bodies)
        decoder = RecordDecoder()
        received: list[bytes] = []
        for i, chunk in enumerate(rechunk(stream, cuts)):
            kind = kinds[i % len(kinds)] if kinds else bytes
            received.extend(decoder.feed_raw(kind(chunk)))
            self.assertLessEqual(decoder.pending, max(len(b) for b in bodies) + 2)
        self.assertEqual(received, bodies)
        self.assertEqual(decoder.pending, 0)

    @settings(max_examples=500, deadline=None)
    @given(st.lists(st.binary(max_size=300), max_size=8))
    def test_randomBytesOnlyRaiseProtocolError(self, chunks) -> None:
        decoder = RecordDecoder()
        try:
            for chunk in chunks:
                for message in decoder.feed(chunk):
                    self.assertIsInstance(message, Message)
        except ProtocolError:
            pass


class GroupRecordsTests(SynchronousTestCase):
    """L{group_records}: L{pack_records}' messages as sizes and pieces."""

    def test_sameMessagesAsPacked(self) -> None:
        records = [(b"\x00\x03abc",), (b"\x00\x02", memoryview(b"de")), (b"\x00\x01f",)]
        groups = list(group_records(records, 8))
        self.assertEqual([size for size, _ in groups], [5, 7])
        self.assertEqual(
            [b"".join(pieces) for _, pieces in groups], list(pack_records(records, 8))
        )
        self.assertIsInstance(groups[1][1][1], memoryview)
