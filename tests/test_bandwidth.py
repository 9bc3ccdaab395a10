"""
Tests for L{lpxy.tunnelservice.bandwidth}: the per-tunnel byte bucket on a
Clock, the pacing of one end's reading, and on loopback a tunnel held to
its rate.
"""

from __future__ import annotations

import gc
from typing import Any

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from lpxy.frames import Message, RecordDecoder, encode
from lpxy.tunnelservice.bandwidth import ReadPacer, TunnelRates
from lpxy.tunnelservice.store import DESTINATION, SOURCE
from lpxy.tunnelservice.throttle import TokenBucket
from tests.support.tunnelservice import start_tunnelservice


class SpendTests(SynchronousTestCase):
    """L{TokenBucket.spend}: bytes spent into debt, and how long the debt lasts."""

    def test_within_burst(self) -> None:
        bucket = TokenBucket(rate=1000, burst=500, now=0)
        self.assertEqual(bucket.spend(500, 0), 0)

    def test_debt(self) -> None:
        bucket = TokenBucket(rate=1000, burst=500, now=0)
        self.assertEqual(bucket.spend(1500, 0), 1.0)
        self.assertEqual(bucket.spend(0, 0.5), 0.5)
        self.assertEqual(bucket.spend(0, 1.0), 0)

    def test_refill_capped(self) -> None:
        bucket = TokenBucket(rate=1000, burst=500, now=0)
        bucket.spend(500, 0)
        self.assertEqual(bucket.spend(1000, 100), 0.5)


class PacerTests(SynchronousTestCase):
    """L{ReadPacer}: pauses an end whose reads put its tunnel in debt, until paid."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.rates = TunnelRates(self.clock, rate=100_000, burst=100_000)
        self.events: list[tuple[str, str]] = []

    def pacer(self, name: str, tunnel: str = "t1") -> ReadPacer:
        return self.rates.pacer(
            tunnel,
            pause=lambda: self.events.append((name, "pause")),
            resume=lambda: self.events.append((name, "resume")),
        )

    def test_paused_until_paid(self) -> None:
        source = self.pacer("source")
        source.read(60_000)
        self.assertEqual(self.events, [])
        source.read(90_000)
        self.assertEqual(self.events, [("source", "pause")])
        self.clock.advance(0.49)
        self.assertEqual(self.events, [("source", "pause")])
        self.clock.advance(0.01)
        self.assertEqual(self.events, [("source", "pause"), ("source", "resume")])

    def test_both_ends_share_the_tunnels_bucket(self) -> None:
        source = self.pacer("source")
        destination = self.pacer("destination")
        other = self.pacer("other", tunnel="t2")
        source.read(80_000)
        destination.read(40_000)
        other.read(100_000)
        self.assertEqual(self.events, [("destination", "pause")])
        # the source spends more while the destination waits: it waits longer
        source.read(30_000)
        self.clock.advance(0.2)
        self.assertEqual(self.events[-1], ("source", "pause"))
        self.clock.advance(0.3)
        self.assertEqual(
            self.events,
            [("destination", "pause"), ("source", "pause"),
             ("source", "resume"), ("destination", "resume")],
        )

    def test_stop_cancels(self) -> None:
        source = self.pacer("source")
        source.read(200_000)
        source.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(10)
        self.assertEqual(self.events, [("source", "pause")])

    def test_bucket_forgotten_with_its_ends(self) -> None:
        source = self.pacer("source")
        source.read(100_000)
        del source
        gc.collect()
        fresh = self.pacer("fresh")
        fresh.read(100_000)
        self.assertEqual(self.events, [])

    def test_rate_must_be_positive(self) -> None:
        self.assertRaises(ValueError, TunnelRates, self.clock, 0)


V3 = "aws.iot.securetunneling-3.0"


class CountingPeer(WebSocketClientProtocol):
    """A tunnel end that counts the DATA payload bytes it receives."""

    def onOpen(self) -> None:
        self.decoder = RecordDecoder()
        self.received = 0
        self.factory.opened.callback(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        for message in self.decoder.feed(payload):
            if message.type == Message.DATA:
                self.received += len(message.payload)
        waiting = self.factory.waiting
        if waiting is not None and self.received >= waiting[0]:
            self.factory.waiting = None
            waiting[1].callback(reactor.seconds())

    def received_all(self, size: int) -> defer.Deferred[float]:
        d: defer.Deferred[float] = defer.Deferred()
        self.factory.waiting = (size, d)
        return d


class RateLoopbackTests(TestCase):
    """A tunnel limited to a rate carries data at that rate, not faster."""

    async def connect(self, port: int, mode: str, token: str) -> Any:
        factory = WebSocketClientFactory(
            f"ws://127.0.0.1:{port}/tunnel?local-proxy-mode={mode}",
            protocols=[V3], headers={"access-token": token},
        )
        factory.protocol = CountingPeer
        factory.setProtocolOptions(openHandshakeTimeout=0)
        factory.opened = defer.Deferred()
        factory.waiting = None
        peer = await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(factory)
        await factory.opened
        self.addCleanup(peer.dropConnection, abort=True)
        return peer

    async def test_rate_holds(self) -> None:
        rate = 256 * 1024
        fixture = await start_tunnelservice(self, tunnel_rate=rate)
        opened = fixture.open_tunnel(["SSH"])
        source = await self.connect(fixture.port, SOURCE, opened.source_token)
        destination = await self.connect(fixture.port, DESTINATION, opened.destination_token)
        chunk = b"r" * 32000
        total = 20 * len(chunk)
        done = destination.received_all(total)
        began = reactor.seconds()
        start = Message(type=Message.STREAM_START, streamId=1, serviceId="SSH")
        source.sendMessage(encode(start), isBinary=True)
        record = encode(Message(type=Message.DATA, streamId=1, serviceId="SSH", payload=chunk))
        for _ in range(total // len(chunk)):
            source.sendMessage(record, isBinary=True)
        elapsed = (await done) - began
        # the burst (64 KB) goes at once, and the read that ends in debt
        # (64 KB at most) is relayed before the debt is paid; the rest at the rate
        fastest_allowed = (total - 2 * 65536) / rate
        self.assertGreater(elapsed, fastest_allowed)
        self.assertLess(elapsed, fastest_allowed * 3)
