"""
Just enough of RFC 6455 to play the tunneling service against a
L{lpxy.proxy.tunnel.TunnelProtocol} over a C{StringTransport}: answer the
opening handshake, build server frames, read the client's masked frames, and
a C{StringTransport} an Autobahn protocol can run on; and the record
stream a list of messages makes.
"""

from __future__ import annotations

import base64
import hashlib
import struct
from collections.abc import Iterable

from twisted.internet.testing import StringTransport

from lpxy.frames import Message, encode

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

BINARY, TEXT, CLOSE, PING, PONG = 2, 1, 8, 9, 10


class WebSocketTransport(StringTransport):
    """
    A C{StringTransport} that, like a real one, lets Autobahn unregister a
    producer that was never registered.
    """

    def unregisterProducer(self) -> None:
        if self.producer is not None:
            super().unregisterProducer()


def parse_request(data: bytes) -> tuple[str, dict[str, str], bytes]:
    """
    Split an HTTP request (a WebSocket upgrade, a web proxy's CONNECT) into
    its request line, its headers (lower-case names) and what follows them.
    """
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return lines[0], headers, rest


def accept_response(request: bytes, subprotocol: str | None, channel_id: str = "chan-1",
                    extra: str = "") -> bytes:
    """The 101 answer to C{request}."""
    _, headers, _ = parse_request(request)
    key = headers["sec-websocket-key"].encode()
    accept = base64.b64encode(hashlib.sha1(key + _GUID).digest()).decode()
    lines = [
        "HTTP/1.1 101 Switching Protocols",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Accept: {accept}",
        f"channel-id: {channel_id}",
    ]
    if subprotocol is not None:
        lines.append(f"Sec-WebSocket-Protocol: {subprotocol}")
    return ("\r\n".join(lines) + "\r\n" + extra + "\r\n").encode()


def frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    """An unmasked (server to client) frame."""
    first = (0x80 if fin else 0) | opcode
    size = len(payload)
    if size < 126:
        head = struct.pack(">BB", first, size)
    elif size < 65536:
        head = struct.pack(">BBH", first, 126, size)
    else:
        head = struct.pack(">BBQ", first, 127, size)
    return head + payload


def client_frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    """A client-to-server frame, masked with the key 0 (which leaves the payload as it is)."""
    head = bytearray(frame(opcode, b"", fin)[:1])
    size = len(payload)
    if size < 126:
        head += struct.pack(">B", 0x80 | size)
    elif size < 65536:
        head += struct.pack(">BH", 0x80 | 126, size)
    else:
        head += struct.pack(">BQ", 0x80 | 127, size)
    return bytes(head) + b"\0\0\0\0" + payload


def read_frames(data: bytes) -> list[tuple[int, bytes]]:
    """Decode the client's (masked) frames in C{data}."""
    frames = []
    offset = 0
    while offset < len(data):
        first, second = data[offset], data[offset + 1]
        offset += 2
        size = second & 0x7F
        if size == 126:
            (size,) = struct.unpack_from(">H", data, offset)
            offset += 2
        elif size == 127:
            (size,) = struct.unpack_from(">Q", data, offset)
            offset += 8
        mask = b""
        if second & 0x80:
            mask = data[offset:offset + 4]
            offset += 4
        payload = data[offset:offset + size]
        offset += size
        if mask:
            payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        frames.append((first & 0x0F, payload))
    return frames


def encode_all(messages: Iterable[Message]) -> bytes:
    """Encode several messages into one contiguous chunk of records."""
    return b"".join(encode(m) for m in messages)
