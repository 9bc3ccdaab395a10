# -*- test-case-name: tests.test_inbound -*-
"""
The frames a tunnel end sends the service, read with few copies.

Autobahn's reader copies the rest of its buffer after every frame header
and every frame (quadratic in the frames per read: the reference proxy
sends 4 KiB messages, eight or more per 32 KiB read), unmasks each frame
through a fresh masker that copies twice, and builds a future per message.
L{ClientFrames} reads an open connection's bytes in one pass instead: each
read is copied once into a buffer, its payload bytes are unmasked in place,
and each message is copied once out of it.

The rules are Autobahn's for a server with the service's options (no
extension, masked client frames, text not validated): the same checks, in
the same order, with the same reasons, reported to the L{FrameSink}, which
fails the connection as Autobahn would. After the first violation or
oversized frame, frames are still cut (so that a close frame, the peer's
answer to ours, is still seen) but data is dropped and nothing more is
checked; a control frame is still answered after a violation it caused,
as Autobahn does, unless it is over 125 bytes. Memory held between reads:
at most the 13 bytes of an incomplete frame header, the unmasked pieces
of the message being received (at most C{max_message} bytes, a limit
checked at each frame's header) and those of one control frame (at most
125 bytes).
"""

from __future__ import annotations

import struct
from typing import Protocol

from lpxy.masking import xor_in_place

__all__ = ["ClientFrames", "FrameSink", "unmask"]

_LENGTH_16 = struct.Struct("!H")
_LENGTH_64 = struct.Struct("!Q")
_CONTROL_OPCODES = (8, 9, 10)
_DATA_OPCODES = (0, 1, 2)
_CONTINUATION, _BINARY, _CLOSE = 0, 2, 8


unmask = xor_in_place
"""
C{unmask(buf, start, stop, key)}: XOR C{buf[start:stop]} in place with the
4-byte C{key} repeated from its first byte (RFC 6455 section 5.3).
"""


class FrameSink(Protocol):
    """What L{ClientFrames} reports to: the connection's protocol."""

    def frame_message(self, payload: bytes, binary: bool) -> bool:
        """
        A whole message arrived (its frames' payloads, unmasked and joined);
        return whether to go on reading (the connection is not closed).
        """

    def frame_control(self, opcode: int, payload: bytes, rsv: int, mask: bytes | None) -> bool:
        """A control frame arrived; return whether to go on reading (not closed)."""

    def frame_violation(self, reason: str) -> bool:
        """The peer broke the protocol; fail it; return whether to go on reading."""

    def frame_too_big(self, size: int, limit: int, reason: str) -> bool:
        """A frame or message is over its limit; fail it; return whether to go on reading."""


class ClientFrames:
    """
    Cuts the bytes of one open WebSocket from a client into messages and
    control frames for a L{FrameSink} (see the module docstring).

    @param sink: told of each message, control frame and violation, in order.
    @param max_frame: the largest frame payload accepted.
    @param max_message: the largest message payload accepted.
    """

    def __init__(self, sink: FrameSink, max_frame: int, max_message: int) -> None:
        self._sink = sink
        self._max_frame = max_frame
        self._max_message = max_message
        self._head = b""
        # The frame whose payload is being read: bytes left, its opcode, and
        # its key turned so that it starts at the next byte (None: unmasked).
        self._left = 0
        self._opcode = 0
        self._fin = False
        self._rsv = 0
        self._mask: bytes | None = None
        self._keep = False  # whether its payload is kept (else skipped)
        self._key: bytes | None = None
        self._pieces: list[memoryview] = []  # the current frame's, unmasked
        # The data message being received: its finished frames' payloads.
        self._inside = False
        self._binary = False
        self._message: list[memoryview] = []
        self._message_size = 0
        self._failed = False
        self._stopped = False

    @property
    def failed(self) -> bool:
        """Whether a violation was reported (data is dropped since)."""
        return self._failed

    def feed(self, data: bytes) -> None:
        """Read C{data}, the next bytes from the peer, reporting what it completes."""
        if self._stopped:
            return
        if self._head:
            data = self._head + data
            self._head = b""
        buf = bytearray(data)
        view = memoryview(buf)
        end = len(buf)
        pos = 0
        while True:
            if self._left:
                size = min(self._left, end - pos)
                if self._key is not None:
                    unmask(buf, pos, pos + size, self._key)
                    turn = size & 3
                    if turn:
                        self._key = self._key[turn:] + self._key[:turn]
                if self._keep:
                    self._pieces.append(view[pos : pos + size])
                self._left -= size
                pos += size
                if self._left:
                    return
                if not self._frame_end():
                    return
            if pos == end:
                return
            header = self._header(buf, pos, end)
            if header is None:
                self._head = bytes(view[pos:])
                return
            if header < 0:
                return
            pos = header
            if not self._left and not self._frame_end():
                return

    def _stop(self) -> bool:
        """The sink closed the connection: read nothing more."""
        self._stopped = True
        self._pieces = self._message = []
        return False

    def _violation(self, reason: str) -> bool:
        """Report a violation (only the first); return whether to go on."""
        if self._failed:
            return True
        self._failed = True
        self._message = []
        if not self._sink.frame_violation(reason):
            return self._stop()
        return True

    def _header(self, buf: bytearray, pos: int, end: int) -> int | None:
        """
        Read the frame header at C{pos}: return where its payload starts,
        L{None} if it is incomplete, or -1 if reading stopped.
        """
        if end - pos < 2:
            return None
        first, second = buf[pos], buf[pos + 1]
        fin = bool(first & 0x80)
        rsv = (first & 0x70) >> 4
        opcode = first & 0x0F
        masked = bool(second & 0x80)
        length = second & 0x7F
        size = 2 + (4 if masked else 0) + (2 if length == 126 else 8 if length == 127 else 0)
        if end - pos < size:
            return None
        ok = True
        checks = not self._failed
        if checks and rsv:
            ok = self._violation(f"RSV = {rsv} and no extension negotiated")
        if ok and checks and not masked:
            ok = self._violation("unmasked client-to-server frame")
        checks = not self._failed
        if ok and checks:
            if opcode > 7:
                if not fin:
                    ok = self._violation("fragmented control frame")
                elif length > 125:
                    ok = self._violation("control frame with payload length > 125 octets")
                elif opcode not in _CONTROL_OPCODES:
                    ok = self._violation(f"control frame using reserved opcode {opcode}")
                elif opcode == _CLOSE and length == 1:
                    ok = self._violation("received close control frame with payload len 1")
            elif opcode not in _DATA_OPCODES:
                ok = self._violation(f"data frame using reserved opcode {opcode}")
            elif not self._inside and opcode == _CONTINUATION:
                ok = self._violation(
                    "received continuation data frame outside fragmented message"
                )
            elif self._inside and opcode != _CONTINUATION:
                ok = self._violation(
                    "received non-continuation data frame while inside fragmented message"
                )
        at = pos + 2
        if length == 126:
            (length,) = _LENGTH_16.unpack_from(buf, at)
            at += 2
            if ok and length < 126 and not self._failed:
                ok = self._violation(
                    "invalid data frame length (not using minimal length encoding)"
                )
        elif length == 127:
            (length,) = _LENGTH_64.unpack_from(buf, at)
            at += 8
            if ok and not self._failed:
                if length > 0x7FFFFFFFFFFFFFFF:
                    ok = self._violation("invalid data frame length (>2^63)")
                elif length < 65536:
                    ok = self._violation(
                        "invalid data frame length (not using minimal length encoding)"
                    )
        if not ok:
            return -1
        mask = None
        if masked:
            mask = bytes(buf[at : at + 4])
            at += 4
        self._opcode, self._fin, self._rsv, self._mask = opcode, fin, rsv, mask
        self._key = mask if length else None
        self._left = length
        self._pieces = []
        if opcode < 8 and not self._frame_begin(length):
            return -1
        # Once failed, data is dropped; a control frame over 125 bytes
        # (reported unless failed before) is never kept: it could be huge.
        self._keep = length <= 125 if opcode > 7 else not self._failed
        return at

    def _frame_begin(self, length: int) -> bool:
        """A data frame begins; check the limits; return whether to go on."""
        if not self._inside:
            self._inside = True
            self._binary = self._opcode == _BINARY
            self._message = []
            self._message_size = 0
        self._message_size += length
        if self._failed:
            return True
        if 0 < self._max_message < self._message_size:
            reason = (
                f"received WebSocket message size {self._message_size} exceeds "
                f"payload limit of {self._max_message} octets"
            )
            return self._too_big(self._message_size, self._max_message, reason)
        if 0 < self._max_frame < length:
            reason = (
                f"received WebSocket frame size {length} exceeds payload limit "
                f"of {self._max_frame} octets"
            )
            return self._too_big(length, self._max_frame, reason)
        return True

    def _too_big(self, size: int, limit: int, reason: str) -> bool:
        self._failed = True
        self._message = []
        if not self._sink.frame_too_big(size, limit, reason):
            return self._stop()
        return True

    def _frame_end(self) -> bool:
        """The current frame is complete; report it; return whether to go on."""
        pieces, self._pieces = self._pieces, []
        if self._opcode > 7:
            if not self._keep:
                return True
            payload = pieces[0].tobytes() if len(pieces) == 1 else b"".join(pieces)
            if not self._sink.frame_control(self._opcode, payload, self._rsv, self._mask):
                return self._stop()
            return True
        if not self._failed:
            self._message.extend(pieces)
        if not self._fin:
            return True
        self._inside = False
        message, self._message = self._message, []
        if self._failed:
            return True
        if len(message) == 1:
            payload = message[0].tobytes()
        else:
            payload = b"".join(message)
        if not self._sink.frame_message(payload, self._binary):
            return self._stop()
        return True
