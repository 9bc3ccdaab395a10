# -*- test-case-name: tests.test_auth -*-
"""
Who may call the management API: AWS Signature Version 4, checked as AWS
checks it.

L{load_credentials} reads the operator's keys from a file in the AWS
shared-credentials format. L{SignatureVerifier} takes a received request
apart, rebuilds it as a botocore C{AWSRequest} holding exactly the headers
the client says it signed, and has botocore's own C{SigV4Auth} compute the
signature the client must have sent with the secret the service holds for
that key; the two are compared in constant time. No signing code of our own:
the canonical request, the string to sign and the key derivation are
botocore's.

Failures carry AWS's error types for JSON protocols, as boto3 and the AWS CLI
show them: C{MissingAuthenticationTokenException} (no signature at all),
C{IncompleteSignatureException} (a malformed one), C{UnrecognizedClientException}
(a key the service does not hold) and C{InvalidSignatureException} (a wrong
signature, a wrong scope, or a clock more than five minutes off). Secrets
never appear in a log line, a repr or an exception message.
"""

from __future__ import annotations

import calendar
import hashlib
import hmac
import re
import time
from collections.abc import Iterable, Mapping
from email.utils import parsedate_to_datetime

import attrs
import botocore.auth
import botocore.awsrequest
import botocore.compat
import botocore.configloader
import botocore.credentials
import botocore.exceptions

from lpxy._ws import Clock

__all__ = [
    "MAX_SKEW_SECONDS",
    "SIGNING_NAME",
    "AccessKeys",
    "AuthenticationFailed",
    "CredentialsError",
    "SignatureVerifier",
    "load_credentials",
]

SIGNING_NAME = "IoTSecuredTunneling"
"""The service name in a credential scope (botocore's C{signingName})."""

MAX_SKEW_SECONDS = 5 * 60
_ALGORITHM = "AWS4-HMAC-SHA256"
_AMZ_DATE = "%Y%m%dT%H%M%SZ"
_PARAMETER = re.compile(r"\s*([A-Za-z]+)=([^,\s]*)\s*")
_ACCESS_KEY = re.compile(r"[\x21-\x7e]{1,128}")

# AWS's own texts, which users search for.
_INVALID_TOKEN = "The security token included in the request is invalid."
_SIGNATURE_MISMATCH = (
    "The request signature we calculated does not match the signature you provided. "
    "Check your AWS Secret Access Key and signing method. "
    "Consult the service documentation for details."
)


class AccessKeys(dict[str, str]):
    """Access key ids mapped to their secrets; its repr names the ids only."""

    def __repr__(self) -> str:
        return f"<AccessKeys {', '.join(sorted(self))}>"

    __str__ = __repr__


class CredentialsError(Exception):
    """A credentials file that cannot be used; the message says why and where."""


class AuthenticationFailed(Exception):
    """
    A request the service does not accept as signed by a key it holds.

    @ivar kind: the AWS error type (C{__type}) to answer with.
    @ivar status: the HTTP status to answer with.
    """

    def __init__(self, kind: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.status = status


def load_credentials(path: str) -> AccessKeys:
    """
    Read access keys from a file in the AWS shared-credentials format:
    profiles (C{[name]} sections), each with C{aws_access_key_id} and
    C{aws_secret_access_key}. Other settings (C{region},
    C{aws_session_token}) are ignored.

    @return: each access key id mapped to its secret.
    @raise CredentialsError: the file is missing or unreadable, a profile
        lacks a key or a secret, one key id has two secrets, or there is no
        key at all.
    """
    try:
        profiles = botocore.configloader.raw_config_parse(path, parse_subsections=False)
    except botocore.exceptions.ConfigNotFound:
        raise CredentialsError(f"{path}: no such file") from None
    except (botocore.exceptions.ConfigParseError, OSError) as e:
        raise CredentialsError(f"{path}: not an AWS credentials file ({e})") from None
    keys = AccessKeys()
    for name, settings in profiles.items():
        key_id = settings.get("aws_access_key_id", "").strip()
        secret = settings.get("aws_secret_access_key", "").strip()
        if not key_id or not secret:
            raise CredentialsError(
                f"{path}: profile [{name}] needs both aws_access_key_id and "
                "aws_secret_access_key"
            )
        if not _ACCESS_KEY.fullmatch(key_id):
            raise CredentialsError(
                f"{path}: profile [{name}]: aws_access_key_id must be printable ASCII "
                "without spaces"
            )
        if keys.get(key_id, secret) != secret:
            raise CredentialsError(
                f"{path}: access key {key_id} has two different secrets"
            )
        keys[key_id] = secret
    if not keys:
        raise CredentialsError(
            f"{path}: no profile with aws_access_key_id and aws_secret_access_key"
        )
    return keys


@attrs.frozen
class _Authorization:
    """The parts of an C{Authorization: AWS4-HMAC-SHA256 ...} header."""

    access_key: str
    date: str
    region: str
    service: str
    signed_headers: tuple[str, ...]
    signature: str


def _parse_authorization(value: str) -> _Authorization:
    algorithm, _, rest = value.strip().partition(" ")
    if algorithm != _ALGORITHM:
        raise AuthenticationFailed(
            "IncompleteSignatureException",
            f"Unsupported Authorization algorithm: only {_ALGORITHM} is accepted",
        )
    parameters: dict[str, str] = {}
    for part in rest.split(","):
        match = _PARAMETER.fullmatch(part)
        if match is None:
            raise AuthenticationFailed(
                "IncompleteSignatureException",
                "Authorization header parameters must be NAME=VALUE, separated by commas",
            )
        parameters[match.group(1)] = match.group(2)
    missing = [n for n in ("Credential", "SignedHeaders", "Signature") if not parameters.get(n)]
    if missing:
        raise AuthenticationFailed(
            "IncompleteSignatureException",
            "Authorization header requires "
            + ", ".join(f"'{n}'" for n in missing) + " parameter",
        )
    scope = parameters["Credential"].split("/")
    if len(scope) != 5 or scope[4] != "aws4_request" or not all(scope):
        raise AuthenticationFailed(
            "IncompleteSignatureException",
            "Credential must be KEY/YYYYMMDD/REGION/SERVICE/aws4_request",
        )
    return _Authorization(
        access_key=scope[0],
        date=scope[1],
        region=scope[2],
        service=scope[3],
        signed_headers=tuple(parameters["SignedHeaders"].split(";")),
        signature=parameters["Signature"],
    )


def _format(seconds: float) -> str:
    return time.strftime(_AMZ_DATE, time.gmtime(seconds))


def _request_time(headers: Mapping[str, list[str]]) -> tuple[str, float]:
    """The request's signing time: as C{X-Amz-Date} text and in seconds."""
    amz_date = headers.get("x-amz-date")
    try:
        if amz_date:
            seconds = float(calendar.timegm(time.strptime(amz_date[0], _AMZ_DATE)))
            return amz_date[0], seconds
        date = headers.get("date")
        if date:
            seconds = parsedate_to_datetime(date[0]).timestamp()
            return _format(seconds), seconds
    except (ValueError, TypeError, OverflowError):
        raise AuthenticationFailed(
            "IncompleteSignatureException",
            "X-Amz-Date must be in the ISO 8601 basic format YYYYMMDD'T'HHMMSS'Z'",
        ) from None
    raise AuthenticationFailed(
        "IncompleteSignatureException",
        "Authorization header requires existence of either a 'X-Amz-Date' or a 'Date' header",
    )


class _ClaimedHeadersSigner(botocore.auth.SigV4Auth):
    """botocore's SigV4 signer, signing exactly the headers a client named."""

    def __init__(self, secret: str, access_key: str, region: str,
                 signed_headers: Iterable[str]) -> None:
        super().__init__(
            botocore.credentials.Credentials(access_key, secret), SIGNING_NAME, region
        )
        self._signed = tuple(signed_headers)

    def headers_to_sign(self, request: botocore.awsrequest.AWSRequest) -> object:
        chosen = botocore.compat.HTTPHeaders()
        for name in self._signed:
            for value in request.headers.get_all(name, []):
                chosen[name] = value
        return chosen

    def expected_signature(self, request: botocore.awsrequest.AWSRequest) -> str:
        canonical = self.canonical_request(request)
        return str(self.signature(self.string_to_sign(request, canonical), request))


class SignatureVerifier:
    """
    Checks requests' SigV4 signatures against the keys the operator gave.

    @param keys: access key ids mapped to their secrets.
    @param clock: the service's time, against which a request's signing
        time may be at most L{MAX_SKEW_SECONDS} off.
    """

    def __init__(self, keys: Mapping[str, str], clock: Clock) -> None:
        self._keys = dict(keys)
        self._clock = clock

    def __repr__(self) -> str:
        return f"<SignatureVerifier of {len(self._keys)} keys>"

    def verify(
        self,
        method: str,
        uri: bytes,
        headers: Iterable[tuple[bytes, bytes]],
        body: bytes,
    ) -> str:
        """
        Check one request.

        @param method: the HTTP method.
        @param uri: the request target as received (path and query).
        @param headers: every header as received, names in any case,
            repeated names repeated.
        @param body: the request body.
        @return: the access key id that signed the request.
        @raise AuthenticationFailed: the request is not signed by a key
            this verifier holds, at a time close enough to now.
        """
        received = _decoded(headers)
        authorization = received.get("authorization")
        if not authorization:
            raise AuthenticationFailed(
                "MissingAuthenticationTokenException", "Request is missing Authentication Token"
            )
        claimed = _parse_authorization(authorization[0])
        secret = self._keys.get(claimed.access_key)
        if secret is None:
            raise AuthenticationFailed("UnrecognizedClientException", _INVALID_TOKEN)
        amz_date, signed_at = _request_time(received)
        self._check_skew(amz_date, signed_at)
        self._check_scope(claimed, amz_date)
        self._check_payload(received, body)
        names = set(claimed.signed_headers)
        if "host" not in names or not names & {"x-amz-date", "date"}:
            raise AuthenticationFailed(
                "IncompleteSignatureException",
                "SignedHeaders must include host and x-amz-date (or date)",
            )
        missing = sorted(n for n in names if n not in received)
        if missing:
            raise AuthenticationFailed(
                "IncompleteSignatureException",
                f"Signed headers missing from the request: {', '.join(missing)}",
            )
        request = botocore.awsrequest.AWSRequest(
            method=method,
            # http: botocore hashes the payload only for URLs it sees as plain.
            url="http://" + received["host"][0] + uri.decode("utf-8", "replace"),
            data=body,
        )
        for name in claimed.signed_headers:
            for value in received[name]:
                request.headers[name] = value
        request.context["timestamp"] = amz_date
        signer = _ClaimedHeadersSigner(
            secret, claimed.access_key, claimed.region, claimed.signed_headers
        )
        expected = signer.expected_signature(request)
        if not hmac.compare_digest(expected.encode(), claimed.signature.encode("utf-8")):
            raise AuthenticationFailed("InvalidSignatureException", _SIGNATURE_MISMATCH)
        return claimed.access_key

    def _check_skew(self, amz_date: str, signed_at: float) -> None:
        now = self._clock.seconds()
        if signed_at < now - MAX_SKEW_SECONDS:
            raise AuthenticationFailed(
                "InvalidSignatureException",
                f"Signature expired: {amz_date} is now earlier than "
                f"{_format(now - MAX_SKEW_SECONDS)} ({_format(now)} - 5 min.)",
            )
        if signed_at > now + MAX_SKEW_SECONDS:
            raise AuthenticationFailed(
                "InvalidSignatureException",
                f"Signature not yet current: {amz_date} is still later than "
                f"{_format(now + MAX_SKEW_SECONDS)} ({_format(now)} + 5 min.)",
            )

    @staticmethod
    def _check_scope(claimed: _Authorization, amz_date: str) -> None:
        if claimed.service != SIGNING_NAME:
            raise AuthenticationFailed(
                "InvalidSignatureException",
                f"Credential should be scoped to correct service: '{SIGNING_NAME}'.",
            )
        if claimed.date != amz_date[:8]:
            raise AuthenticationFailed(
                "InvalidSignatureException",
                f"Date in Credential scope does not match YYYYMMDD from ISO-8601 "
                f"version of date from HTTP: '{claimed.date}' != '{amz_date[:8]}'",
            )

    @staticmethod
    def _check_payload(received: Mapping[str, list[str]], body: bytes) -> None:
        # A client may name the body's hash itself; it must be the hash of
        # this body (UNSIGNED-PAYLOAD would leave the body unprotected).
        declared = received.get("x-amz-content-sha256")
        if declared and declared[0] != hashlib.sha256(body).hexdigest():
            raise AuthenticationFailed(
                "InvalidSignatureException",
                "X-Amz-Content-SHA256 does not match the SHA-256 of the body",
            )


def _decoded(headers: Iterable[tuple[bytes, bytes]]) -> dict[str, list[str]]:
    result: dict[str, list[str]] = {}
    for name, value in headers:
        try:
            text = value.decode("utf-8")
        except UnicodeDecodeError:
            raise AuthenticationFailed(
                "IncompleteSignatureException", "Header values must be UTF-8"
            ) from None
        result.setdefault(name.decode("latin-1").lower(), []).append(text)
    return result
