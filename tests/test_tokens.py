"""
Tests for L{lpxy.tunnelservice.tokens}: which handshake an end's tokens
admit. (Through the broker, with replacement and rotation:
tests.test_broker.)
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from lpxy.tunnelservice.store import CLOSED, DESTINATION, SOURCE, EndRecord, TunnelRecord
from lpxy.tunnelservice.tokens import (
    CLIENT_TOKEN_MISMATCH,
    CLOSED_TUNNEL,
    MODE_MISMATCH,
    SPENT_TOKEN,
    UNKNOWN_TOKEN,
    HandshakeRefused,
    admit,
    digest,
    new_token,
    routing_key,
    token_routing_key,
)

CLIENT = "c" * 32


class AdmitTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.token = new_token("t")
        self.record = TunnelRecord(
            tunnel_id="t", arn="arn:t", sequence=1, description=None, thing_name=None,
            services=("SSH",), lifetime_minutes=720, created_at=0.0, last_updated_at=0.0,
            source=EndRecord(token_hash=digest(self.token), last_updated_at=0.0),
            destination=EndRecord(token_hash=digest(new_token("t")), last_updated_at=0.0),
        )

    def refusal(self, found: tuple[TunnelRecord, str] | None, token: str, mode: str,
                client_token: str | None = None) -> tuple[int, str]:
        e = self.assertRaises(HandshakeRefused, admit, found, digest(token), mode, client_token)
        return e.status, e.reason

    def test_spent_by_first_handshake(self) -> None:
        """Without a client token, the first handshake spends the token."""
        found = (self.record, SOURCE)
        self.assertEqual(
            admit(found, digest(self.token), SOURCE, None), (self.record, self.record.source)
        )
        self.assertTrue(self.record.source.spent)
        self.assertEqual(self.refusal(found, self.token, SOURCE), (401, SPENT_TOKEN))

    def test_client_token_reconnects(self) -> None:
        """A client token set by the first handshake admits later ones."""
        found = (self.record, SOURCE)
        admit(found, digest(self.token), SOURCE, CLIENT)
        self.assertEqual(self.record.source.client_token_hash, digest(CLIENT))
        admit(found, digest(self.token), SOURCE, CLIENT)
        self.assertEqual(
            self.refusal(found, self.token, SOURCE, "d" * 32), (401, CLIENT_TOKEN_MISMATCH)
        )
        self.assertEqual(self.refusal(found, self.token, SOURCE), (401, CLIENT_TOKEN_MISMATCH))

    def test_refusals(self) -> None:
        """Unknown token, a hash that does not match, wrong end, closed tunnel."""
        self.assertEqual(self.refusal(None, self.token, SOURCE), (401, UNKNOWN_TOKEN))
        self.assertEqual(
            self.refusal((self.record, SOURCE), new_token("t"), SOURCE), (401, UNKNOWN_TOKEN)
        )
        self.assertEqual(
            self.refusal((self.record, SOURCE), self.token, DESTINATION), (400, MODE_MISMATCH)
        )
        self.record.status = CLOSED
        self.assertEqual(
            self.refusal((self.record, SOURCE), self.token, SOURCE), (401, CLOSED_TUNNEL)
        )
        self.assertFalse(self.record.source.spent)


class RoutingKeyTests(SynchronousTestCase):
    """Tokens carry their tunnel's routing key, for a load balancer to hash on."""

    def test_shared_by_a_tunnels_tokens(self) -> None:
        """Every token of one tunnel carries the same key; other tunnels' differ."""
        first, second = new_token("tunnel-1"), new_token("tunnel-1")
        self.assertNotEqual(first, second)
        self.assertEqual(token_routing_key(first), routing_key("tunnel-1"))
        self.assertEqual(token_routing_key(second), routing_key("tunnel-1"))
        self.assertNotEqual(routing_key("tunnel-1"), routing_key("tunnel-2"))

    def test_shape(self) -> None:
        """
        The key is URL-safe, does not spell the tunnel id out, and comes
        first, before a dot: what HAProxy's C{field(1,.)} takes.
        """
        tunnel_id = "0a1b2c3d-0000-4000-8000-000000000001"
        key = routing_key(tunnel_id)
        token = new_token(tunnel_id)
        self.assertEqual(token.split(".")[0], key)
        self.assertRegex(key, r"^[A-Za-z0-9_-]{16}$")
        self.assertNotIn(tunnel_id[:8], key)
        # The secret after the key is as strong as before keys existed.
        self.assertGreaterEqual(len(token.split(".", 1)[1]), 64)
        self.assertRegex(token, r"^[A-Za-z0-9_.-]+$")

    def test_no_key(self) -> None:
        """A token without a well-formed key has none."""
        self.assertIsNone(token_routing_key("no-separator-here"))
        self.assertIsNone(token_routing_key("short.secret"))
