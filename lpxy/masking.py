# -*- test-case-name: tests.test_masking -*-
"""
WebSocket masking (RFC 6455 section 5.3) in place, for the frames both
products read and write themselves: XOR a buffer's bytes with a 4-byte key
repeated from its first byte.

Autobahn's native masker (C{_nvx_xormasker}, built with Autobahn where it
can be, and used unless C{AUTOBAHN_USE_NVX=0}) is called directly on the
buffer: one call, no copy. Without it, Autobahn's public masker does the
same through a copy of the bytes.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["xor_in_place"]

XorInPlace = Callable[[bytearray, int, int, bytes], None]


def _xor_with_autobahn(buffer: bytearray, start: int, stop: int, key: bytes) -> None:
    from autobahn.websocket.xormasker import create_xor_masker

    buffer[start:stop] = create_xor_masker(key, stop - start).process(bytes(buffer[start:stop]))


def _native() -> XorInPlace | None:
    """Autobahn's native masker wrapped to work in place, or L{None}."""
    from autobahn.websocket import USES_NVX

    if not USES_NVX:
        return None
    try:
        from _nvx_xormasker import ffi, lib  # type: ignore[import-not-found]
    except ImportError:  # pragma: no cover - USES_NVX says it is there
        return None
    new, process, free, from_buffer, memmove = (
        lib.nvx_xormask_new, lib.nvx_xormask_process, lib.nvx_xormask_free,
        ffi.from_buffer, ffi.memmove,
    )
    key_buffer = ffi.new("uint8_t[4]")

    def xor_native(buffer: bytearray, start: int, stop: int, key: bytes) -> None:
        memmove(key_buffer, key, 4)
        masker = new(key_buffer)
        if masker == ffi.NULL:
            raise MemoryError("no memory for a WebSocket masker")
        try:
            process(masker, from_buffer(buffer) + start, stop - start)
        finally:
            free(masker)

    return xor_native


_native_xor = _native()


def xor_in_place(buffer: bytearray, start: int, stop: int, key: bytes) -> None:
    """XOR C{buffer[start:stop]} in place with C{key} repeated from its first byte."""
    if stop <= start:
        return
    if _native_xor is not None:
        _native_xor(buffer, start, stop, key)
    else:
        _xor_with_autobahn(buffer, start, stop, key)
