"""Tests for L{lpxy.proxy.ws_frames}: the proxy's binary frames, masked in place."""

from __future__ import annotations

import os
import struct

from autobahn.websocket.xormasker import create_xor_masker
from twisted.trial.unittest import SynchronousTestCase

from lpxy import masking
from lpxy.proxy.ws_frames import BinaryFrameReader, binary_frame, frame_header, mask_in_place
from tests.support.wsframes import BINARY, read_frames

KEY = b"\x01\x82\x3c\xf4"


def _expected(payload: bytes, key: bytes) -> bytes:
    """The frame RFC 6455 defines, masked by Autobahn's own masker."""
    return frame_header(len(payload), key) + create_xor_masker(key, len(payload)).process(payload)


class BinaryFrameTests(SynchronousTestCase):
    """One final masked binary frame per call, at every length encoding."""

    def test_lengths(self) -> None:
        """Payloads of 7-bit, 16-bit and 64-bit lengths decode to what was given."""
        for size in (0, 1, 125, 126, 65535, 65536, 131076):
            payload = os.urandom(size)
            pieces = [payload[: size // 3], memoryview(payload)[size // 3 :]]
            frame = binary_frame(pieces, size, KEY)
            self.assertEqual(bytes(frame), _expected(payload, KEY), size)
            self.assertEqual(read_frames(bytes(frame)), [(BINARY, payload)], size)

    def test_headerBits(self) -> None:
        """FIN and binary opcode, the mask bit, and the key after the length."""
        frame = binary_frame([b"abc"], 3, KEY)
        self.assertEqual(frame[:2], b"\x82\x83")
        self.assertEqual(frame[2:6], KEY)

    def test_randomKey(self) -> None:
        """Without a key each frame gets its own random one."""
        keys = {bytes(binary_frame([b"x" * 200], 200)[4:8]) for _ in range(8)}
        self.assertGreater(len(keys), 1)

    def test_unalignedStart(self) -> None:
        """Masking from any offset masks only what follows it, from key byte 0."""
        for start in range(6):
            data = os.urandom(300)
            buffer = bytearray(data)
            mask_in_place(buffer, start, KEY)
            self.assertEqual(bytes(buffer[:start]), data[:start])
            self.assertEqual(
                bytes(buffer[start:]), create_xor_masker(KEY, 300).process(data[start:])
            )

    def test_withoutNativeMasker(self) -> None:
        """Without Autobahn's native extension the Python masker gives the same frame."""
        self.patch(masking, "_native_xor", None)
        payload = os.urandom(70000)
        self.assertEqual(bytes(binary_frame([payload], len(payload), KEY)), _expected(payload, KEY))


def _server_frame(payload: bytes, first: int = 0x82, masked: bool = False) -> bytes:
    size = len(payload)
    mask = 0x80 if masked else 0
    if size < 126:
        head = struct.pack(">BB", first, mask | size)
    elif size < 65536:
        head = struct.pack(">BBH", first, mask | 126, size)
    else:
        head = struct.pack(">BBQ", first, mask | 127, size)
    return head + (b"\0\0\0\0" if masked else b"") + payload


class BinaryFrameReaderTests(SynchronousTestCase):
    """L{BinaryFrameReader}: binary payloads through, anything else handed on."""

    def read(self, reader: BinaryFrameReader, chunks: list[bytes]) -> tuple[bytes, bytes]:
        payload, rest = [], b""
        for chunk in chunks:
            pieces, rest_now = reader.feed(chunk)
            self.assertFalse(rest, "nothing is fed after a hand-over")
            payload.extend(bytes(p) for p in pieces)
            rest = rest_now
        return b"".join(payload), rest

    def test_everyCut(self) -> None:
        """Frames of every length encoding, cut at every offset, give their payloads in order."""
        payloads = [b"", b"a" * 5, b"b" * 300, os.urandom(70000)]
        stream = b"".join(_server_frame(p) for p in payloads)
        for cut in [*range(0, 320), *range(len(stream) - 20, len(stream) + 1)]:
            reader = BinaryFrameReader(131076)
            data, rest = self.read(reader, [stream[:cut], stream[cut:]])
            self.assertEqual((data, rest), (b"".join(payloads), b""), cut)
            self.assertTrue(reader.between_frames)

    def test_byteByByte(self) -> None:
        """One byte at a time works too; the reader is mid-frame in between."""
        stream = _server_frame(b"xyz" * 50) + _server_frame(b"q")
        reader = BinaryFrameReader(131076)
        data, rest = self.read(reader, [stream[i : i + 1] for i in range(len(stream))])
        self.assertEqual((data, rest), (b"xyz" * 50 + b"q", b""))

    def test_viewsNotCopies(self) -> None:
        """A payload whole in its chunk comes as a view of that chunk."""
        chunk = _server_frame(b"p" * 1000)
        pieces, _ = BinaryFrameReader(131076).feed(chunk)
        self.assertIs(pieces[0].obj, chunk)

    def test_handedOn(self) -> None:
        """
        A ping, a text frame, a fragment, a masked frame, extension bits, an
        oversized frame or a length not in its shortest form: the bytes from
        that frame on are handed on, after the payloads before it.
        """
        before = _server_frame(b"before")
        after = _server_frame(b"after")
        others = [
            _server_frame(b"ping", first=0x89),
            _server_frame(b"text", first=0x81),
            _server_frame(b"frag", first=0x02),
            _server_frame(b"masked", masked=True),
            _server_frame(b"rsv", first=0xC2),
            _server_frame(b"x" * 101),
            b"\x82\x7e\x00\x05hello",
            b"\x82\x7f" + struct.pack(">Q", 5) + b"hello",
        ]
        for other in others:
            reader = BinaryFrameReader(100)
            data, rest = self.read(reader, [before + other + after])
            self.assertEqual((data, rest), (b"before", other + after), other)
            self.assertTrue(reader.between_frames)

    def test_handedOnAfterCutHeader(self) -> None:
        """A header cut by a chunk's end is kept, and handed on whole if it is not binary."""
        ping = _server_frame(b"ping", first=0x89)
        reader = BinaryFrameReader(131076)
        self.assertEqual(reader.feed(_server_frame(b"a") + ping[:1]), ([memoryview(b"a")], b""))
        self.assertFalse(reader.between_frames)
        self.assertEqual(reader.feed(ping[1:]), ([], ping))
