# -*- test-case-name: tests.test_ws_frames -*-
"""
The binary WebSocket frames the proxy sends, built in one buffer, and those
it reads from the service, read without copies.

A WebSocket client masks every frame it sends (RFC 6455 section 5.3).
Autobahn's C{sendMessage} takes a joined payload, copies it into its masker
(a fresh C{cffi} buffer and masker object per frame), copies the masked
result out, and joins it with the header: four copies of each 128 KiB
message. L{binary_frame} copies the records' pieces once, into a
C{bytearray} behind the header, and masks that in place with Autobahn's
own native masker (L{lpxy.masking}).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence

from lpxy.masking import xor_in_place

__all__ = ["BinaryFrameReader", "binary_frame", "frame_header", "mask_in_place"]

_FIN_BINARY = 0x82
_MASKED = 0x80
_SHORT = struct.Struct("!BB4s")
_MEDIUM = struct.Struct("!BBH4s")
_LONG = struct.Struct("!BBQ4s")
_U16 = struct.Struct("!H")
_U64 = struct.Struct("!Q")


def frame_header(size: int, key: bytes) -> bytes:
    """The header of a final, masked binary frame of C{size} payload bytes."""
    if size <= 125:
        return _SHORT.pack(_FIN_BINARY, _MASKED | size, key)
    if size <= 0xFFFF:
        return _MEDIUM.pack(_FIN_BINARY, _MASKED | 126, size, key)
    return _LONG.pack(_FIN_BINARY, _MASKED | 127, size, key)


def mask_in_place(buffer: bytearray, start: int, key: bytes) -> None:
    """XOR C{buffer[start:]} with the 4-byte masking C{key}, repeated."""
    xor_in_place(buffer, start, len(buffer), key)


def binary_frame(
    pieces: Sequence[bytes | memoryview], size: int, key: bytes | None = None
) -> bytearray:
    """
    One final binary frame whose payload is C{pieces} joined (C{size}
    bytes), masked with C{key} (4 random bytes when not given).
    """
    if key is None:
        key = os.urandom(4)
    header = frame_header(size, key)
    frame = bytearray().join([header, *pieces])
    mask_in_place(frame, len(header), key)
    return frame


class BinaryFrameReader:
    """
    Reads the plain binary frames of the service's frame stream (final,
    unmasked, no extension bits, at most C{limit} payload bytes, lengths in
    their shortest form) and passes their payloads through as views of the
    chunks read, without the copies of Autobahn's reader, which slices its
    whole buffer again after every frame.

    Anything else (a control frame, text, a fragment, a frame breaking a
    rule) stops it: from that frame on, the bytes go to Autobahn, which
    answers pings, closes, and fails the connection over a broken frame.
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._left = 0  # payload bytes of the current frame still to come
        self._head = b""  # a frame header cut by the end of the last chunk

    @property
    def between_frames(self) -> bool:
        """Whether the next byte starts a frame (Autobahn may take over)."""
        return not self._left and not self._head

    def feed(self, data: bytes) -> tuple[list[memoryview], bytes]:
        """
        Read C{data}, the next bytes of the stream. Return the payload
        pieces of binary frames it holds, in order, and the bytes from the
        first frame not read here on (empty when every frame was read), for
        Autobahn.
        """
        if self._head:
            data, self._head = self._head + data, b""
        view = memoryview(data)
        end = len(data)
        pieces: list[memoryview] = []
        offset = 0
        left = self._left
        if left:
            take = min(left, end)
            pieces.append(view[:take])
            left -= take
            offset = take
        limit = self._limit
        while offset < end and not left:
            if end - offset < 2:
                self._head = data[offset:]
                break
            first, second = data[offset], data[offset + 1]
            if first != _FIN_BINARY or second & _MASKED:
                break
            size = second
            start = offset + 2
            if size == 126:
                start += 2
                if start > end:
                    self._head = data[offset:]
                    break
                (size,) = _U16.unpack_from(data, offset + 2)
                if size < 126:
                    break
            elif size == 127:
                start += 8
                if start > end:
                    self._head = data[offset:]
                    break
                (size,) = _U64.unpack_from(data, offset + 2)
                if size <= 0xFFFF:
                    break
            if size > limit:
                break
            stop = min(start + size, end)
            if stop > start:
                pieces.append(view[start:stop])
            left = size - (stop - start)
            offset = stop
        self._left = left
        rest = b""
        if offset < end and not left and not self._head:
            rest = data[offset:]
        return pieces, rest
