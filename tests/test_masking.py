"""
Tests for L{lpxy.masking}: WebSocket masking in place, natively and through
Autobahn's public masker, as RFC 6455 defines it.
"""

from __future__ import annotations

import random

from autobahn.websocket.xormasker import create_xor_masker
from twisted.trial.unittest import SynchronousTestCase

from lpxy import masking


def by_definition(data: bytes, start: int, stop: int, key: bytes) -> bytearray:
    expected = bytearray(data)
    for i in range(stop - start):
        expected[start + i] ^= key[i % 4]
    return expected


class XorInPlaceTests(SynchronousTestCase):
    """L{masking.xor_in_place} XORs exactly the range given, from key byte 0."""

    SIZES = (0, 1, 3, 4, 5, 15, 16, 17, 127, 128, 129, 4096, 70001)

    def check(self) -> None:
        rng = random.Random(7)
        for size in self.SIZES:
            for start in (0, 1, 5):
                data = rng.randbytes(size + 10)
                key = rng.randbytes(4)
                buffer = bytearray(data)
                masking.xor_in_place(buffer, start, start + size, key)
                self.assertEqual(buffer, by_definition(data, start, start + size, key),
                                 (size, start))

    def test_matches_definition(self) -> None:
        self.check()

    def test_without_native_masker(self) -> None:
        """Without Autobahn's native extension, its Python masker gives the same bytes."""
        self.patch(masking, "_native_xor", None)
        self.check()

    def test_native_masker_used(self) -> None:
        """Where Autobahn built its native masker, it is the one called."""
        from autobahn.websocket import USES_NVX

        if not USES_NVX:
            raise self.skipTest("Autobahn's native masker is not built here")
        self.assertIsNotNone(masking._native_xor)

    def test_same_as_autobahn(self) -> None:
        """What Autobahn's own masker makes of the payload."""
        payload = bytes(range(256)) * 3
        buffer = bytearray(payload)
        masking.xor_in_place(buffer, 0, len(buffer), b"\x01\x02\x03\x04")
        self.assertEqual(
            bytes(buffer), create_xor_masker(b"\x01\x02\x03\x04", len(payload)).process(payload)
        )
