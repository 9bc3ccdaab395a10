"""
Tests for L{lpxy.tunnelservice.auth}: credentials files, and signatures made
by botocore's signer checked against a L{Clock}.
"""

from __future__ import annotations

import calendar
import time

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from twisted.internet.task import Clock
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase

from lpxy.tunnelservice.auth import (
    MAX_SKEW_SECONDS,
    SIGNING_NAME,
    AuthenticationFailed,
    CredentialsError,
    SignatureVerifier,
    load_credentials,
)

KEYS = {"AKIDONE": "secret-one", "AKIDTWO": "secret-two"}
BODY = b'{"maxResults": 5}'


def signed(
    key_id: str = "AKIDONE",
    secret: str = "secret-one",
    body: bytes = BODY,
    service: str = SIGNING_NAME,
    token: str | None = None,
) -> AWSRequest:
    """A C{ListTunnels} request as boto3 builds and signs it (now, by the wall clock)."""
    request = AWSRequest(
        method="POST",
        url="http://127.0.0.1:8080/",
        data=body,
        headers={
            "Content-Type": "application/x-amz-json-1.1",
            "X-Amz-Target": "IoTSecuredTunneling.ListTunnels",
            "User-Agent": "test",
        },
    )
    SigV4Auth(Credentials(key_id, secret, token), service, "eu-west-1").add_auth(request)
    return request


def signed_at(request: AWSRequest) -> float:
    return calendar.timegm(time.strptime(request.headers["X-Amz-Date"], "%Y%m%dT%H%M%SZ"))


def wire_headers(request: AWSRequest) -> list[tuple[bytes, bytes]]:
    """The headers as the service receives them, Host included."""
    headers = [(b"Host", b"127.0.0.1:8080")]
    for name, value in request.headers.items():
        headers.append((name.encode(), value.encode() if isinstance(value, str) else value))
    return headers


class VerifierTests(SynchronousTestCase):
    """L{SignatureVerifier} against requests botocore signs, on a clock set to their time."""

    def verify(
        self,
        request: AWSRequest,
        skew: float = 0,
        body: bytes | None = None,
        headers: list[tuple[bytes, bytes]] | None = None,
        uri: bytes = b"/",
    ) -> str:
        clock = Clock()
        clock.advance(signed_at(request) + skew)
        return SignatureVerifier(KEYS, clock).verify(
            "POST", uri,
            wire_headers(request) if headers is None else headers,
            BODY if body is None else body,
        )

    def refused(self, request: AWSRequest, **kwargs: object) -> AuthenticationFailed:
        return self.assertRaises(AuthenticationFailed, self.verify, request, **kwargs)

    def test_right_key(self) -> None:
        self.assertEqual(self.verify(signed()), "AKIDONE")
        self.assertEqual(self.verify(signed("AKIDTWO", "secret-two")), "AKIDTWO")

    def test_session_token(self) -> None:
        """A temporary credential's token is one more signed header."""
        self.assertEqual(self.verify(signed(token="session")), "AKIDONE")

    def test_wrong_secret(self) -> None:
        e = self.refused(signed(secret="secret-two"))
        self.assertEqual((e.kind, e.status), ("InvalidSignatureException", 400))
        self.assertIn("does not match the signature you provided", e.message)

    def test_unknown_key(self) -> None:
        e = self.refused(signed("AKIDNONE", "secret-one"))
        self.assertEqual((e.kind, e.status), ("UnrecognizedClientException", 400))
        self.assertEqual(e.message, "The security token included in the request is invalid.")

    def test_unsigned(self) -> None:
        request = signed()
        headers = [h for h in wire_headers(request) if h[0].lower() != b"authorization"]
        e = self.refused(request, headers=headers)
        self.assertEqual(e.kind, "MissingAuthenticationTokenException")

    def test_skew(self) -> None:
        """Up to five minutes either way is accepted; more is an expired or future signature."""
        request = signed()
        for skew in (MAX_SKEW_SECONDS, -MAX_SKEW_SECONDS):
            self.assertEqual(self.verify(request, skew=skew), "AKIDONE")
        late = self.refused(request, skew=MAX_SKEW_SECONDS + 1)
        self.assertEqual(late.kind, "InvalidSignatureException")
        self.assertIn("Signature expired: " + request.headers["X-Amz-Date"], late.message)
        early = self.refused(request, skew=-MAX_SKEW_SECONDS - 1)
        self.assertEqual(early.kind, "InvalidSignatureException")
        self.assertIn("Signature not yet current", early.message)

    def test_tampered_body(self) -> None:
        e = self.refused(signed(), body=b'{"maxResults": 6}')
        self.assertEqual(e.kind, "InvalidSignatureException")

    def test_tampered_header(self) -> None:
        """A signed header (here the operation) changed on the way is caught."""
        request = signed()
        headers = [
            (n, b"IoTSecuredTunneling.CloseTunnel" if n == b"X-Amz-Target" else v)
            for n, v in wire_headers(request)
        ]
        self.assertEqual(self.refused(request, headers=headers).kind,
                         "InvalidSignatureException")

    def test_other_path(self) -> None:
        self.assertEqual(self.refused(signed(), uri=b"/tunnel").kind,
                         "InvalidSignatureException")

    def test_unsigned_header_added(self) -> None:
        """Headers outside SignedHeaders do not matter."""
        request = signed()
        self.assertEqual(
            self.verify(request, headers=[*wire_headers(request), (b"X-Extra", b"1")]),
            "AKIDONE",
        )

    def test_wrong_service(self) -> None:
        e = self.refused(signed(service="iot"))
        self.assertEqual(e.kind, "InvalidSignatureException")
        self.assertIn(SIGNING_NAME, e.message)

    def test_unsigned_payload_refused(self) -> None:
        """The body's hash must be the body's: UNSIGNED-PAYLOAD would leave it open."""
        request = signed()
        headers = [*wire_headers(request), (b"X-Amz-Content-SHA256", b"UNSIGNED-PAYLOAD")]
        self.assertEqual(self.refused(request, headers=headers).kind,
                         "InvalidSignatureException")

    def test_malformed_authorization(self) -> None:
        request = signed()
        for value in (b"Basic abc", b"AWS4-HMAC-SHA256 Credential=AKIDONE/x",
                      b"AWS4-HMAC-SHA256 Signature=00", b"AWS4-HMAC-SHA256 junk"):
            headers = [
                (n, value if n == b"Authorization" else v) for n, v in wire_headers(request)
            ]
            e = self.refused(request, headers=headers)
            self.assertEqual((e.kind, e.status), ("IncompleteSignatureException", 400), value)

    def test_no_date(self) -> None:
        request = signed()
        headers = [h for h in wire_headers(request) if h[0] != b"X-Amz-Date"]
        self.assertEqual(self.refused(request, headers=headers).kind,
                         "IncompleteSignatureException")

    def test_secrets_not_shown(self) -> None:
        verifier = SignatureVerifier(KEYS, Clock())
        self.assertNotIn("secret", repr(verifier))
        e = self.refused(signed(secret="secret-two"))
        self.assertNotIn("secret-", str(e))


class LoadCredentialsTests(SynchronousTestCase):
    """L{load_credentials}: the AWS shared-credentials format, and errors naming the file."""

    def write(self, text: str) -> str:
        path = FilePath(self.mktemp())
        path.setContent(text.encode())
        return path.path

    def test_profiles(self) -> None:
        keys = load_credentials(self.write(
            "[default]\naws_access_key_id = AKIDONE\naws_secret_access_key = secret-one\n"
            "region = eu-west-1\n\n"
            "[ops]\naws_access_key_id=AKIDTWO\naws_secret_access_key=secret-two\n"
            "aws_session_token = ignored\n"
        ))
        self.assertEqual(dict(keys), KEYS)
        self.assertEqual(repr(keys), "<AccessKeys AKIDONE, AKIDTWO>")

    def test_errors(self) -> None:
        cases = [
            ("[a]\naws_access_key_id = K\n", "needs both aws_access_key_id and"),
            ("[a]\naws_secret_access_key = S\n", "needs both"),
            ("", "no profile with"),
            ("not ini at all\n", "not an AWS credentials file"),
            ("[a]\naws_access_key_id = K\naws_secret_access_key = S\n"
             "[b]\naws_access_key_id = K\naws_secret_access_key = T\n",
             "access key K has two different secrets"),
        ]
        for text, expected in cases:
            path = self.write(text)
            e = self.assertRaises(CredentialsError, load_credentials, path)
            self.assertIn(expected, str(e))
            self.assertIn(path, str(e))
            self.assertNotIn("S\n", str(e))

    def test_missing_file(self) -> None:
        path = self.mktemp()
        e = self.assertRaises(CredentialsError, load_credentials, path)
        self.assertEqual(str(e), f"{path}: no such file")
