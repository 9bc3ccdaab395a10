"""
Tests for the management API's bounds: JSON nesting, tags per tunnel,
per-caller throttling, and no 500 with a traceback, driven through an HTTP
channel on a L{StringTransport} with a L{Clock}.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web import server
from twisted.web.resource import Resource

from lpxy.tunnelservice.api import MAX_JSON_DEPTH, ManagementAPI, SizeLimitedRequest
from lpxy.tunnelservice.broker import Broker
from lpxy.tunnelservice.throttle import Throttle, TokenBucket
from tests.support.logs import LogRecorder


def post(site: server.Site, operation: str, body: bytes, host: str = "10.0.0.1") -> Any:
    """One request on a fresh connection; (status, decoded JSON body, raw answer)."""
    channel = site.buildProtocol(IPv4Address("TCP", host, 1234))
    transport = StringTransport(peerAddress=IPv4Address("TCP", host, 1234))
    channel.makeConnection(transport)
    channel.dataReceived(
        b"POST / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"X-Amz-Target: IoTSecuredTunneling." + operation.encode() + b"\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    answer = transport.value()
    head, _, payload = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), json.loads(payload), answer


class Exploding(Resource):
    """A resource that fails, as a bug would."""

    isLeaf = True

    def render(self, request: server.Request) -> bytes:
        raise RuntimeError("a bug")


class APIBoundsTests(SynchronousTestCase):
    """The API's answers to hostile bodies and callers."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.broker = Broker(self.clock)
        self.logs = LogRecorder(self)  # type: ignore[arg-type]

    def site(self, resource: Resource | None = None, throttle: Throttle | None = None) -> Any:
        site = server.Site(resource or ManagementAPI(self.broker, throttle=throttle))
        site.requestFactory = SizeLimitedRequest
        site.displayTracebacks = False
        return site

    def test_deep_json(self) -> None:
        """Deep nesting gets a 400 SerializationException, not a RecursionError."""
        site = self.site()
        for depth in (MAX_JSON_DEPTH + 1, 30000):
            body = b'{"tags": ' + b"[" * depth + b"]" * depth + b"}"
            status, answer, _ = post(site, "ListTunnels", body)
            self.assertEqual((status, answer["__type"]), (400, "SerializationException"))
        # brackets inside strings do not count
        status, answer, _ = post(site, "OpenTunnel", b'{"description": "' + b"[" * 50 + b'"}')
        self.assertEqual(status, 200, answer)

    def test_allowed_nesting(self) -> None:
        status, answer, _ = post(site := self.site(), "OpenTunnel", json.dumps({
            "destinationConfig": {"services": ["SSH"]},
            "tags": [{"key": "a", "value": "b"}],
        }).encode())
        self.assertEqual(status, 200, answer)
        self.assertIsNotNone(site)

    def test_tags_per_tunnel(self) -> None:
        site = self.site()
        tags = [{"key": f"k{i}", "value": "v"} for i in range(50)]
        status, opened, _ = post(site, "OpenTunnel", json.dumps({"tags": tags}).encode())
        self.assertEqual(status, 200)
        arn = opened["tunnelArn"]
        # replacing an existing key is fine; a 51st key is not
        status, _, _ = post(site, "TagResource", json.dumps(
            {"resourceArn": arn, "tags": [{"key": "k0", "value": "w"}]}).encode())
        self.assertEqual(status, 200)
        status, answer, _ = post(site, "TagResource", json.dumps(
            {"resourceArn": arn, "tags": [{"key": "k50", "value": "v"}]}).encode())
        self.assertEqual((status, answer["__type"]), (400, "TooManyTagsException"))
        self.assertEqual(len(self.broker.tags(arn)), 50)
        status, answer, _ = post(site, "OpenTunnel", json.dumps(
            {"tags": [{"key": f"k{i}", "value": "v"} for i in range(51)]}).encode())
        self.assertEqual((status, answer["__type"]), (400, "TooManyTagsException"))

    def test_tag_characters(self) -> None:
        """Tags hold letters (of any script), numbers, spaces and _.:/=+-@; nothing else."""
        site = self.site()
        for key, value, status in [
            ("Name_1.a:b/c=d+e-f@g", "plain ASCII 0", 200),
            ("Größe", "日本 \uff12", 200),  # a full-width digit
            ("k", "tab\there", 400),
            ("k", "semi;colon", 400),
            ("emoji\U0001f600", "v", 400),
        ]:
            got, answer, _ = post(site, "OpenTunnel", json.dumps(
                {"tags": [{"key": key, "value": value}]}).encode())
            self.assertEqual(got, status, (key, value, answer))

    def test_throttling(self) -> None:
        """Each caller gets its burst, then ThrottlingException until its bucket refills."""
        site = self.site(throttle=Throttle(self.clock, rate=2, burst=3))
        statuses = [post(site, "ListTunnels", b"{}")[:2] for _ in range(4)]
        self.assertEqual([s for s, _ in statuses], [200, 200, 200, 400])
        self.assertEqual(statuses[3][1],
                         {"__type": "ThrottlingException", "message": "Rate exceeded"})
        # another caller is not affected
        self.assertEqual(post(site, "ListTunnels", b"{}", host="10.0.0.2")[0], 200)
        self.clock.advance(0.5)
        self.assertEqual(post(site, "ListTunnels", b"{}")[0], 200)
        self.assertEqual(post(site, "ListTunnels", b"{}")[0], 400)

    def test_unexpected_error_in_operation(self) -> None:
        """A bug in an operation: a JSON InternalFailure and one log line."""
        def broken(**kwargs: Any) -> Any:
            raise KeyError("surprise")
        self.broker.list_tunnels = broken  # type: ignore[method-assign]
        status, answer, raw = post(self.site(), "ListTunnels", b"{}")
        self.assertEqual((status, answer["__type"]), (500, "InternalFailure"))
        self.assertNotIn(b"Traceback", raw)
        self.assertEqual(len(self.logs.texts("API ListTunnels failed")), 1)
        self.flushLoggedErrors()

    def test_unexpected_error_anywhere(self) -> None:
        """A failure outside the API's own handling: JSON, not Twisted's HTML page."""
        status, answer, raw = post(self.site(Exploding()), "ListTunnels", b"{}")
        self.assertEqual((status, answer["__type"]), (500, "InternalFailure"))
        self.assertNotIn(b"<html", raw.lower())
        self.assertNotIn(b"Traceback", raw)
        self.assertEqual(len(self.logs.texts("API request failed: a bug")), 1)
        self.flushLoggedErrors(RuntimeError)


class ThrottleTests(SynchronousTestCase):
    """L{Throttle} and L{TokenBucket} on a L{Clock}."""

    def test_bucket(self) -> None:
        bucket = TokenBucket(rate=1, burst=2, now=0)
        self.assertEqual([bucket.take(0) for _ in range(3)], [True, True, False])
        self.assertFalse(bucket.take(0.5))
        self.assertTrue(bucket.take(1.0))
        self.assertFalse(bucket.full(1.0))
        self.assertTrue(bucket.full(3.0))

    def test_callers_bounded(self) -> None:
        """Made-up callers cannot grow the table past max_callers; full buckets go."""
        clock = Clock()
        throttle = Throttle(clock, rate=1, burst=1, max_callers=100)
        for i in range(10000):
            throttle.allow(f"caller {i}")
        self.assertEqual(len(throttle), 100)
        clock.advance(10)
        throttle.allow("late")
        self.assertEqual(len(throttle), 1)

    def test_default_burst(self) -> None:
        throttle = Throttle(Clock(), rate=5)
        self.assertEqual(sum(throttle.allow("a") for _ in range(20)), 10)
