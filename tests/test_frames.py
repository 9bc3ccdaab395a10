"""
Tests for L{lpxy.frames}, the record codec.
"""

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from lpxy.frames import (
    MAX_RECORD_SIZE,
    Message,
    ProtocolError,
    RecordDecoder,
    encode,
    encode_all,
    encode_body,
)


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
