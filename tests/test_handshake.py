"""
Tests for L{lpxy.tunnelservice.handshake}: what an upgrade request must
carry, and the plain-text refusal (no sockets).
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from lpxy.tunnelservice.handshake import Upgrade, read_upgrade, refusal
from lpxy.tunnelservice.tokens import HandshakeRefused

V1, V2, V3 = (f"aws.iot.securetunneling-{v}" for v in ("1.0", "2.0", "3.0"))
TOKEN = "t0ken-Value_with.dots"
CT = "c" * 32


def read(
    headers: dict[str, str] | None = None,
    protocols: list[str] | None = None,
    path: str = "/tunnel",
    modes: list[str] | None = None,
) -> Upgrade:
    return read_upgrade(
        path,
        {"local-proxy-mode": ["source"] if modes is None else modes},
        [V3] if protocols is None else protocols,
        {"access-token": TOKEN} if headers is None else headers,
    )


class ReadUpgradeTests(SynchronousTestCase):
    """L{read_upgrade}: the mode, the newest subprotocol offered, the tokens."""

    def refused(self, **kwargs: object) -> tuple[int, str]:
        e = self.assertRaises(HandshakeRefused, read, **kwargs)
        return e.status, e.reason

    def test_upgrade(self) -> None:
        upgrade = read(
            {"access-token": TOKEN, "client-token": CT},
            protocols=[V1, V3, V2, "other"], modes=["destination"],
        )
        self.assertEqual(upgrade, Upgrade("destination", V3, TOKEN, CT))
        self.assertEqual(read(protocols=[V1, V2]).subprotocol, V2)
        self.assertIsNone(read().client_token)

    def test_tokens_not_in_repr(self) -> None:
        text = repr(read({"access-token": TOKEN, "client-token": CT}))
        self.assertNotIn(TOKEN, text)
        self.assertNotIn(CT, text)

    def test_cookie(self) -> None:
        for cookie in (f"awsiot-tunnel-token={TOKEN}",
                       f"other=1; awsiot-tunnel-token={TOKEN}; more=2",
                       f'awsiot-tunnel-token="{TOKEN}"'):
            with self.subTest(cookie):
                self.assertEqual(read({"cookie": cookie}).access_token, TOKEN)

    def test_path(self) -> None:
        self.assertEqual(
            self.refused(path="/elsewhere"),
            (400, "Invalid request path '/elsewhere': use /tunnel"),
        )

    def test_mode(self) -> None:
        for modes in ([], ["sideways"], ["source", "source"]):
            self.assertEqual(
                self.refused(modes=modes),
                (400, "Missing or invalid local-proxy-mode: use source or destination"),
            )

    def test_subprotocol(self) -> None:
        for protocols in ([], ["chat"]):
            self.assertEqual(self.refused(protocols=protocols), (
                400, f"No supported subprotocol: offer one of {V3}, {V2}, {V1}",
            ))

    def test_client_token(self) -> None:
        for bad in ("short", "c" * 129, "c" * 31 + "!"):
            self.assertEqual(
                self.refused(headers={"access-token": TOKEN, "client-token": bad}),
                (400, "Invalid client-token: use 32 to 128 of a-z, A-Z, 0-9 and -"),
            )

    def test_token_twice(self) -> None:
        status, reason = self.refused(
            headers={"access-token": TOKEN, "cookie": f"awsiot-tunnel-token={TOKEN}"}
        )
        self.assertEqual(status, 400)
        self.assertIn("not both", reason)
        self.assertEqual(
            self.refused(headers={"cookie": "awsiot-tunnel-token=a; awsiot-tunnel-token=b"}),
            (400, "More than one awsiot-tunnel-token cookie"),
        )

    def test_malformed_cookie(self) -> None:
        self.assertEqual(
            self.refused(headers={"cookie": 'awsiot-tunnel-token="unterminated'}),
            (400, "Malformed awsiot-tunnel-token cookie"),
        )

    def test_missing_token(self) -> None:
        for headers in ({}, {"access-token": ""}, {"cookie": "other=1"}):
            self.assertEqual(self.refused(headers=headers), (401, "Missing access token"))


class RefusalTests(SynchronousTestCase):
    """L{refusal}: the reason as a plain-text body, and the connection closed."""

    def test_refusal(self) -> None:
        answer = refusal(401, "Missing access token", [("X-Extra", "1")])
        self.assertEqual(answer, (
            b"HTTP/1.1 401 Unauthorized\r\n"
            b"Content-Type: text/plain; charset=utf-8\r\n"
            b"Content-Length: 21\r\n"
            b"Connection: close\r\n"
            b"X-Extra: 1\r\n"
            b"\r\n"
            b"Missing access token\n"
        ))

    def test_unknown_status(self) -> None:
        self.assertTrue(refusal(599, "odd").startswith(b"HTTP/1.1 599 Error\r\n"))
