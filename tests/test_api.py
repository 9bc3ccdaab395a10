"""
Tests for L{lpxy.tunnelservice.api}: boto3 and the AWS CLI against a real
loopback port, for every operation and each error.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request
from typing import Any, ClassVar

from botocore.exceptions import ClientError
from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

from lpxy.tunnelservice.store import SOURCE
from lpxy.wire import is_valid_service_id
from tests.support.tunnelservice import (
    RecordingPeer,
    ServiceFixture,
    api_client,
    start_tunnelservice,
)


class APITestCase(TestCase):
    """A tunnel service on a L{Clock} and a boto3 client for its API (C{limits} per subclass)."""

    limits: ClassVar[dict[str, int]] = {}

    async def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.fixture: ServiceFixture = await start_tunnelservice(
            self, clock=self.clock, **self.limits
        )
        self.client = await deferToThread(api_client, self.fixture.api_url)

    def call(self, operation: str, **kwargs: Any) -> Any:
        """Call a boto3 operation in a thread; fire with its result minus metadata."""
        def run() -> Any:
            result = getattr(self.client, operation)(**kwargs)
            result.pop("ResponseMetadata", None)
            return result
        return deferToThread(run)

    async def error(self, operation: str, **kwargs: Any) -> tuple[str, int, str]:
        """Call an operation that must fail; return (code, status, message)."""
        try:
            await self.call(operation, **kwargs)
        except ClientError as e:
            return (
                e.response["Error"]["Code"],
                e.response["ResponseMetadata"]["HTTPStatusCode"],
                e.response["Error"]["Message"],
            )
        raise self.failureException(f"{operation} did not fail")


class OperationTests(APITestCase):
    """Each operation through boto3, with what it answers and what the broker then holds."""

    async def test_open_and_describe(self) -> None:
        opened = await self.call(
            "open_tunnel",
            description="my tunnel",
            tags=[{"key": "team", "value": "edge"}],
            destinationConfig={"thingName": "thing-1", "services": ["SSH", "HTTP"]},
            timeoutConfig={"maxLifetimeTimeoutMinutes": 30},
        )
        self.assertEqual(
            sorted(opened),
            ["destinationAccessToken", "sourceAccessToken", "tunnelArn", "tunnelId"],
        )
        self.assertTrue(opened["tunnelArn"].endswith(":tunnel/" + opened["tunnelId"]))
        tunnel = (await self.call("describe_tunnel", tunnelId=opened["tunnelId"]))["tunnel"]
        self.assertEqual(tunnel["tunnelId"], opened["tunnelId"])
        self.assertEqual(tunnel["tunnelArn"], opened["tunnelArn"])
        self.assertEqual(tunnel["status"], "OPEN")
        self.assertEqual(tunnel["description"], "my tunnel")
        self.assertEqual(
            tunnel["destinationConfig"], {"thingName": "thing-1", "services": ["SSH", "HTTP"]}
        )
        self.assertEqual(tunnel["timeoutConfig"], {"maxLifetimeTimeoutMinutes": 30})
        self.assertEqual(tunnel["tags"], [{"key": "team", "value": "edge"}])
        self.assertEqual(tunnel["createdAt"].timestamp(), 1_700_000_000)
        self.assertEqual(tunnel["sourceConnectionState"]["status"], "DISCONNECTED")
        self.assertEqual(tunnel["destinationConnectionState"]["status"], "DISCONNECTED")

    async def test_open_defaults(self) -> None:
        opened = await self.call("open_tunnel")
        tunnel = (await self.call("describe_tunnel", tunnelId=opened["tunnelId"]))["tunnel"]
        self.assertEqual(tunnel["timeoutConfig"], {"maxLifetimeTimeoutMinutes": 720})
        self.assertNotIn("destinationConfig", tunnel)
        self.assertNotIn("description", tunnel)
        self.assertNotIn("tags", tunnel)
        self.assertEqual(self.fixture.broker.describe(opened["tunnelId"]).services, ())

    async def test_connection_state(self) -> None:
        opened = self.fixture.open_tunnel(["SSH"])
        self.clock.advance(60)
        self.fixture.broker.connect(SOURCE, opened.source_token, None, RecordingPeer("source", []))
        tunnel = (await self.call("describe_tunnel", tunnelId=opened.tunnel_id))["tunnel"]
        self.assertEqual(tunnel["sourceConnectionState"]["status"], "CONNECTED")
        self.assertEqual(
            tunnel["sourceConnectionState"]["lastUpdatedAt"].timestamp(), 1_700_000_060
        )
        self.assertEqual(tunnel["destinationConnectionState"]["status"], "DISCONNECTED")

    async def test_close(self) -> None:
        opened = self.fixture.open_tunnel()
        self.assertEqual(await self.call("close_tunnel", tunnelId=opened.tunnel_id), {})
        tunnel = (await self.call("describe_tunnel", tunnelId=opened.tunnel_id))["tunnel"]
        self.assertEqual(tunnel["status"], "CLOSED")
        await self.call("close_tunnel", tunnelId=opened.tunnel_id, delete=True)
        code, status, _ = await self.error("describe_tunnel", tunnelId=opened.tunnel_id)
        self.assertEqual((code, status), ("ResourceNotFoundException", 404))

    async def test_service_id_rule(self) -> None:
        # OpenTunnel's services follow lpxy.wire's rule, with AWS's message.
        valid = ["SSH", "a:b_c-d", "x" * 128]
        self.assertTrue(all(map(is_valid_service_id, valid)))
        opened = await self.call("open_tunnel", destinationConfig={"services": valid})
        self.assertEqual(
            self.fixture.broker.describe(opened["tunnelId"]).services, tuple(valid)
        )
        for service in ("no spaces", "a.b", "\u00e9"):
            self.assertFalse(is_valid_service_id(service), service)
            code, status, message = await self.error(
                "open_tunnel", destinationConfig={"services": [service]}
            )
            self.assertEqual((code, status), ("ValidationException", 400), service)
            self.assertEqual(message, "Value for services must match [a-zA-Z0-9:_-]{1,128}")

    async def test_list(self) -> None:
        ids = [
            self.fixture.broker.open_tunnel(thing_name="a" if i % 2 else "b").tunnel_id
            for i in range(5)
        ]
        everything = await self.call("list_tunnels")
        self.assertEqual([t["tunnelId"] for t in everything["tunnelSummaries"]], ids[::-1])
        self.assertNotIn("nextToken", everything)
        summary = everything["tunnelSummaries"][0]
        self.assertEqual(
            sorted(summary), ["createdAt", "lastUpdatedAt", "status", "tunnelArn", "tunnelId"]
        )
        first = await self.call("list_tunnels", maxResults=2)
        self.assertEqual([t["tunnelId"] for t in first["tunnelSummaries"]], ids[:2:-1])
        second = await self.call("list_tunnels", maxResults=2, nextToken=first["nextToken"])
        self.assertEqual([t["tunnelId"] for t in second["tunnelSummaries"]], ids[2:0:-1])
        things = await self.call("list_tunnels", thingName="a")
        self.assertEqual([t["tunnelId"] for t in things["tunnelSummaries"]], [ids[3], ids[1]])

    async def test_rotate(self) -> None:
        opened = self.fixture.open_tunnel(["SSH"])
        rotated = await self.call(
            "rotate_tunnel_access_token", tunnelId=opened.tunnel_id, clientMode="SOURCE"
        )
        self.assertEqual(sorted(rotated), ["sourceAccessToken", "tunnelArn"])
        rotated = await self.call(
            "rotate_tunnel_access_token", tunnelId=opened.tunnel_id, clientMode="DESTINATION",
            destinationConfig={"services": ["HTTP"]},
        )
        self.assertEqual(sorted(rotated), ["destinationAccessToken", "tunnelArn"])
        self.assertEqual(self.fixture.broker.describe(opened.tunnel_id).services, ("HTTP",))
        rotated = await self.call(
            "rotate_tunnel_access_token", tunnelId=opened.tunnel_id, clientMode="ALL"
        )
        self.assertEqual(
            sorted(rotated), ["destinationAccessToken", "sourceAccessToken", "tunnelArn"]
        )
        self.fixture.broker.connect(
            SOURCE, rotated["sourceAccessToken"], None, RecordingPeer("source", [])
        )

    async def test_tags(self) -> None:
        arn = self.fixture.open_tunnel().tunnel_arn
        self.assertEqual(await self.call("list_tags_for_resource", resourceArn=arn), {"tags": []})
        await self.call("tag_resource", resourceArn=arn, tags=[
            {"key": "a", "value": "1"}, {"key": "b c", "value": ""},
        ])
        await self.call("untag_resource", resourceArn=arn, tagKeys=["a"])
        self.assertEqual(
            await self.call("list_tags_for_resource", resourceArn=arn),
            {"tags": [{"key": "b c", "value": ""}]},
        )


class ErrorTests(APITestCase):
    """Errors boto3 sees: unknown tunnels, closed tunnels, limits, validation, size."""

    limits: ClassVar[dict[str, int]] = {"max_open_tunnels": 2, "max_request_size": 1024}

    async def test_not_found(self) -> None:
        arn = "arn:aws:iot:us-east-1:123456789012:tunnel/nope"
        for operation, kwargs in [
            ("describe_tunnel", {"tunnelId": "nope"}),
            ("close_tunnel", {"tunnelId": "nope"}),
            ("rotate_tunnel_access_token", {"tunnelId": "nope", "clientMode": "ALL"}),
            ("tag_resource", {"resourceArn": arn, "tags": [{"key": "k", "value": "v"}]}),
            ("untag_resource", {"resourceArn": arn, "tagKeys": ["k"]}),
            ("list_tags_for_resource", {"resourceArn": arn}),
        ]:
            code, status, message = await self.error(operation, **kwargs)
            self.assertEqual((code, status), ("ResourceNotFoundException", 404), operation)
            self.assertIn("nope", message)

    async def test_rotate_closed(self) -> None:
        opened = self.fixture.open_tunnel()
        self.fixture.close_tunnel(opened.tunnel_id)
        code, _, _ = await self.error(
            "rotate_tunnel_access_token", tunnelId=opened.tunnel_id, clientMode="SOURCE"
        )
        self.assertEqual(code, "ResourceNotFoundException")

    async def test_limits(self) -> None:
        code, status, message = await self.error(
            "open_tunnel", destinationConfig={"services": ["a", "b", "c", "d"]}
        )
        self.assertEqual((code, status), ("LimitExceededException", 400))
        self.assertIn("3 services", message)
        await self.call("open_tunnel")
        await self.call("open_tunnel")
        code, status, message = await self.error("open_tunnel")
        self.assertEqual((code, status), ("LimitExceededException", 400))
        self.assertIn("2 tunnels", message)

    async def test_validation(self) -> None:
        opened = self.fixture.open_tunnel()
        arn = opened.tunnel_arn
        for operation, kwargs in [
            ("open_tunnel", {"timeoutConfig": {"maxLifetimeTimeoutMinutes": 721}}),
            ("open_tunnel", {"destinationConfig": {"services": ["no spaces"]}}),
            ("open_tunnel", {"destinationConfig": {"services": ["SSH", "SSH"]}}),
            ("open_tunnel", {"destinationConfig": {"services": ["A"], "thingName": "a b"}}),
            ("open_tunnel", {"description": "tab\there"}),
            ("open_tunnel", {"tags": [{"key": "bad#key", "value": "v"}]}),
            ("describe_tunnel", {"tunnelId": "bad id"}),
            ("list_tunnels", {"maxResults": 101}),
            ("list_tunnels", {"nextToken": "made-up"}),
            ("list_tunnels", {"nextToken": "bad token!"}),
            ("list_tunnels", {"thingName": "a/b"}),
            ("rotate_tunnel_access_token", {"tunnelId": opened.tunnel_id, "clientMode": "X"}),
            ("tag_resource", {"resourceArn": arn, "tags": [{"key": "k", "value": "v\x01"}]}),
            ("untag_resource", {"resourceArn": arn, "tagKeys": ["k" * 129]}),
        ]:
            code, status, _ = await self.error(operation, **kwargs)
            self.assertEqual((code, status), ("ValidationException", 400), (operation, kwargs))

    async def test_request_too_large(self) -> None:
        code, status, message = await self.error("open_tunnel", description="x" * 1100)
        self.assertEqual((code, status), ("ValidationException", 400))
        self.assertIn("too large", message)


class ClosedTunnelTests(APITestCase):
    """Closed tunnels beyond the retention time or the count are gone alike."""

    limits: ClassVar[dict[str, int]] = {"max_closed_tunnels": 1, "closed_retention_seconds": 60}

    async def gone(self, tunnel_id: str) -> tuple[str, int, str]:
        code, status, message = await self.error("describe_tunnel", tunnelId=tunnel_id)
        return code, status, message.replace(tunnel_id, "ID")

    async def test_beyond_count_like_beyond_time(self) -> None:
        expired, evicted, kept = (self.fixture.open_tunnel() for _ in range(3))
        self.fixture.close_tunnel(expired.tunnel_id)
        self.clock.advance(60)
        self.fixture.close_tunnel(evicted.tunnel_id)
        tunnel = (await self.call("describe_tunnel", tunnelId=evicted.tunnel_id))["tunnel"]
        self.assertEqual(tunnel["status"], "CLOSED")
        self.fixture.close_tunnel(kept.tunnel_id)
        after_time = await self.gone(expired.tunnel_id)
        self.assertEqual(after_time[:2], ("ResourceNotFoundException", 404))
        self.assertEqual(await self.gone(evicted.tunnel_id), after_time)
        listed = (await self.call("list_tunnels"))["tunnelSummaries"]
        self.assertEqual([t["tunnelId"] for t in listed], [kept.tunnel_id])


def _post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


class RawHTTPTests(APITestCase):
    """
    Requests boto3 would never send: unknown operations, bodies that are not
    JSON objects or hold wrong types, another path.
    """

    def post(self, body: bytes, target: str | None) -> Any:
        headers = {"Content-Type": "application/x-amz-json-1.1"}
        if target is not None:
            headers["X-Amz-Target"] = target
        return deferToThread(_post, self.fixture.api_url + "/", body, headers)

    async def test_unknown_operation(self) -> None:
        status, body = await self.post(b"{}", "IoTSecuredTunneling.Explode")
        self.assertEqual((status, body["__type"]), (400, "UnknownOperationException"))
        status, body = await self.post(b"{}", None)
        self.assertEqual((status, body["__type"]), (400, "UnknownOperationException"))

    async def test_not_json(self) -> None:
        for bad in (b"{", b"[]"):
            status, body = await self.post(bad, "IoTSecuredTunneling.ListTunnels")
            self.assertEqual((status, body["__type"]), (400, "SerializationException"))

    async def test_wrong_types(self) -> None:
        status, body = await self.post(
            b'{"tunnelId": 5}', "IoTSecuredTunneling.DescribeTunnel"
        )
        self.assertEqual((status, body["__type"]), (400, "ValidationException"))
        status, body = await self.post(
            b'{"maxResults": true}', "IoTSecuredTunneling.ListTunnels"
        )
        self.assertEqual((status, body["__type"]), (400, "ValidationException"))

    async def test_wrong_path(self) -> None:
        status, body = await deferToThread(_get, self.fixture.api_url + "/elsewhere")
        self.assertEqual(status, 400)
        self.assertIn(b"Invalid request path", body)

    async def test_health(self) -> None:
        """GET /health answers 200, for a load balancer's health checks."""
        status, body = await deferToThread(_get, self.fixture.api_url + "/health")
        self.assertEqual((status, body), (200, b"ok\n"))
        status, body = await deferToThread(_get, self.fixture.api_url + "/health/more")
        self.assertEqual(status, 400)


class AWSCLITests(APITestCase):
    """The AWS CLI, unmodified but for C{--endpoint-url}, against the service."""

    def aws(self, *args: str) -> Any:
        # none of the machine's AWS settings (AWS_PROFILE, ~/.aws) apply
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update({
            "AWS_ACCESS_KEY_ID": "x",
            "AWS_SECRET_ACCESS_KEY": "x",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        })
        return getProcessOutputAndValue(
            sys.executable,
            ["-m", "awscli", "iotsecuretunneling", *args,
             "--endpoint-url", self.fixture.api_url, "--output", "json"],
            env=env,
            reactor=reactor,
        )

    async def test_open_describe_close(self) -> None:
        out, err, code = await self.aws(
            "open-tunnel", "--destination-config", "thingName=dev1,services=SSH",
            "--timeout-config", "maxLifetimeTimeoutMinutes=60",
        )
        self.assertEqual(code, 0, err)
        opened = json.loads(out)
        self.assertEqual(
            self.fixture.broker.describe(opened["tunnelId"]).services, ("SSH",)
        )
        out, err, code = await self.aws("describe-tunnel", "--tunnel-id", opened["tunnelId"])
        self.assertEqual(code, 0, err)
        self.assertEqual(json.loads(out)["tunnel"]["status"], "OPEN")
        out, err, code = await self.aws("close-tunnel", "--tunnel-id", opened["tunnelId"])
        self.assertEqual(code, 0, err)
        out, err, code = await self.aws("describe-tunnel", "--tunnel-id", "nope")
        self.assertNotEqual(code, 0)
        self.assertIn(b"ResourceNotFoundException", err)

