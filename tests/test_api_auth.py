"""
Signed API requests end to end: boto3 and the AWS CLI against a tunnel
service holding credentials, on a real loopback port; and where an open API
may listen.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from botocore.config import Config
from botocore.exceptions import ClientError
from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

from lpxy.tunnelservice.auth import SignatureVerifier
from lpxy.tunnelservice.service import TunnelService
from tests.support.logs import LogRecorder
from tests.support.tunnelservice import ServiceFixture, api_client, start_tunnelservice

KEYS = {"AKIDOPERATOR": "operator-secret", "AKIDCI": "ci-secret"}
NO_RETRIES = Config(retries={"total_max_attempts": 1})


class SignedAPITests(TestCase):
    """
    boto3 signing with a held key, a wrong secret, an unknown key, and with
    the service's clock ten minutes ahead.
    """

    async def start(self, skew: float = 0) -> ServiceFixture:
        clock = Clock()
        # boto3 signs with the wall clock; the service's starts there (plus skew).
        clock.advance(time.time() + skew)
        return await start_tunnelservice(
            self, verifier=SignatureVerifier(KEYS, clock)
        )

    async def outcome(self, fixture: ServiceFixture, key_id: str, secret: str) -> Any:
        """Call ListTunnels; the error's (code, status, message), or the result."""
        def run() -> Any:
            client = api_client(fixture.api_url, key_id, secret, config=NO_RETRIES)
            try:
                return client.list_tunnels()["tunnelSummaries"]
            except ClientError as e:
                return (
                    e.response["Error"]["Code"],
                    e.response["ResponseMetadata"]["HTTPStatusCode"],
                    e.response["Error"]["Message"],
                )
        return await deferToThread(run)

    async def test_right_keys(self) -> None:
        fixture = await self.start()
        fixture.open_tunnel(["SSH"])
        for key_id, secret in KEYS.items():
            summaries = await self.outcome(fixture, key_id, secret)
            self.assertEqual(len(summaries), 1)

    async def test_wrong_secret(self) -> None:
        fixture = await self.start()
        code, status, message = await self.outcome(fixture, "AKIDOPERATOR", "ci-secret")
        self.assertEqual((code, status), ("InvalidSignatureException", 400))
        self.assertIn("signature we calculated does not match", message)

    async def test_unknown_key(self) -> None:
        fixture = await self.start()
        self.assertEqual(
            await self.outcome(fixture, "AKIDSTRANGER", "operator-secret"),
            ("UnrecognizedClientException", 400,
             "The security token included in the request is invalid."),
        )

    async def test_skewed_clock(self) -> None:
        fixture = await self.start(skew=600)
        code, status, message = await self.outcome(fixture, "AKIDOPERATOR", "operator-secret")
        self.assertEqual((code, status), ("InvalidSignatureException", 400))
        self.assertIn("Signature expired", message)

    async def test_refused_changes_nothing(self) -> None:
        """A refused OpenTunnel opens no tunnel."""
        fixture = await self.start()

        def run() -> Any:
            client = api_client(fixture.api_url, "AKIDOPERATOR", "wrong", config=NO_RETRIES)
            return self.assertRaises(ClientError, client.open_tunnel)
        await deferToThread(run)
        self.assertEqual(fixture.broker.list_tunnels()[0], [])

    async def test_aws_cli(self) -> None:
        """The AWS CLI with a held key succeeds, and shows AWS's error with a wrong one."""
        fixture = await self.start()

        def aws(secret: str) -> Any:
            env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
            env.update({
                "AWS_ACCESS_KEY_ID": "AKIDCI",
                "AWS_SECRET_ACCESS_KEY": secret,
                "AWS_DEFAULT_REGION": "eu-west-1",
                "AWS_CONFIG_FILE": os.devnull,
                "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
                "AWS_MAX_ATTEMPTS": "1",
            })
            return getProcessOutputAndValue(
                sys.executable,
                ["-m", "awscli", "iotsecuretunneling", "list-tunnels",
                 "--endpoint-url", fixture.api_url, "--output", "json"],
                env=env, reactor=reactor,
            )

        out, err, code = await aws("ci-secret")
        self.assertEqual(code, 0, err)
        self.assertEqual(json.loads(out)["tunnelSummaries"], [])
        out, err, code = await aws("operator-secret")
        self.assertNotEqual(code, 0)
        self.assertIn(b"An error occurred (InvalidSignatureException) when calling the "
                      b"ListTunnels operation: The request signature we calculated", err)


class OpenAPITests(TestCase):
    """Without credentials the API listens on loopback only, unless allowed, and says so."""

    def start(self, endpoint: str, **kwargs: Any) -> tuple[TunnelService, LogRecorder]:
        logs = LogRecorder(self)
        service = TunnelService(reactor, [endpoint], **kwargs)
        self.addCleanup(service.stopService)
        return service, logs

    def test_loopback_open(self) -> None:
        service, logs = self.start("tcp:0:interface=127.0.0.1")
        service.startService()
        self.assertEqual(len(logs.texts("Tunnel service listening on 127.0.0.1 port")), 1)
        self.assertEqual(len(logs.texts("The management API is open")), 1)

    def test_public_open_refused(self) -> None:
        service, _ = self.start("tcp:0")
        e = self.assertRaises(SystemExit, service.startService)
        self.assertIn("is reachable beyond this machine", str(e))
        self.assertIn("--insecure-open-api", str(e))
        self.assertIn("--credentials", str(e))

    def test_public_open_allowed(self) -> None:
        service, logs = self.start("tcp:0", insecure_open_api=True)
        service.startService()
        self.assertEqual(len(logs.texts("Tunnel service listening on 0.0.0.0 port")), 1)
        self.assertEqual(len(logs.texts("The management API is open")), 1)

    def test_public_with_credentials(self) -> None:
        service, logs = self.start("tcp:0", verifier=SignatureVerifier(KEYS, Clock()))
        service.startService()
        self.assertEqual(len(logs.texts("Tunnel service listening on 0.0.0.0 port")), 1)
        self.assertEqual(logs.texts("The management API is open"), [])
