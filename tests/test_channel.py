"""
Tests for L{lpxy.proxy.channel}: what the session and the I/O share.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from lpxy.proxy.channel import ProtocolViolation, ServiceMismatch, SessionError, shown_id


class ShownIdTests(SynchronousTestCase):
    def test_shown_id(self) -> None:
        self.assertEqual(shown_id("SSH"), "'SSH'")
        self.assertEqual(shown_id("a\nb"), "'a\\nb'")
        self.assertEqual(shown_id("y" * 41), f"{'y' * 40!r}... (41 characters)")


class ErrorTests(SynchronousTestCase):
    def test_session_errors(self) -> None:
        """Both errors that end a WebSocket session are L{SessionError}s."""
        self.assertTrue(issubclass(ProtocolViolation, SessionError))
        self.assertTrue(issubclass(ServiceMismatch, SessionError))
