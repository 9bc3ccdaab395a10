"""
C{twistd tunnelservice} under attack, beside an honest tunnel.

Starts a real C{twistd -n tunnelservice --db :memory:} process of the
installed lpxy (L{bench.common}) and an honest tunnel through it: two bare
protocol 3.0 WebSocket peers (L{bench.tunnelservice_relay}) carrying DATA at
a steady pace. Then runs each attack for a bounded time and count, one after
the other, from 127.0.0.1 while the honest side comes from 127.0.0.2 (API
calls) and 127.0.0.3 (the tunnel), so per-address limits and throttling fall
on the attacker. The attacks:

  1. one connection pipelining many C{ListTunnels} requests, never reading;
  2. a peer sending WebSocket pings, never reading the pongs;
  3. a peer sending C{STREAM_START}s with no partner, never reading the resets;
  4. many sockets sending a request header one byte every few seconds;
  5. oversized requests: too many tags, deeply nested JSON, an oversized
     access-token header, an oversized URL.

Per attack it prints the service's peak RSS growth, the honest tunnel's
throughput and its longest gap between received chunks, and the p99 of
honest C{OpenTunnel} calls made through C{twisted.web}'s Agent during the
attack (p50 beside it), each beside its goal. Latencies are timed in this
process's reactor, which also drives the attacker: on a busy machine they
include the benchmark's own delays.

    python -m bench.attacks [--seconds S] [--requests N] [--pings N]
        [--starts N] [--slow N] [--oversized N] [--calls N]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import warnings
from collections import Counter
from io import BytesIO
from typing import Any

from autobahn.twisted.websocket import WebSocketClientFactory
from twisted.internet import defer, protocol, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.task import LoopingCall, deferLater
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers

from bench.common import (
    MiB,
    PeakSampler,
    api,
    free_port,
    install,
    report,
    spawn,
    stop,
    twistd,
    wait_for_port,
)
from bench.tunnelservice_relay import SUBPROTOCOL, Peer
from lpxy.frames import Message, RecordDecoder, encode

ATTACKER = "127.0.0.1"
HONEST_API = "127.0.0.2"
HONEST_TUNNEL = "127.0.0.3"
PAYLOAD = 16384
TICK = 0.01  # the honest source sends one record a tick: about 1.6 MB/s

GOAL_GROWTH = 64 * MiB
GOAL_P99 = 0.250
GOAL_GAP = 1.0


def sleep(seconds: float) -> defer.Deferred[None]:
    return deferLater(reactor, seconds, lambda: None)


def ws_factory(port: int, mode: str, token: str) -> WebSocketClientFactory:
    factory = WebSocketClientFactory(
        f"ws://127.0.0.1:{port}/tunnel?local-proxy-mode={mode}",
        protocols=[SUBPROTOCOL], headers={"access-token": token},
    )
    factory.setProtocolOptions(maxFramePayloadSize=0, maxMessagePayloadSize=0,
                               autoFragmentSize=0)
    factory.protocol = Peer
    factory.decoder = RecordDecoder()
    factory.opened = defer.Deferred()
    factory.received = 0
    factory.expected = math.inf
    factory.done = defer.Deferred()
    return factory


async def ws_connect(port: int, mode: str, token: str, source: str) -> Peer:
    factory = ws_factory(port, mode, token)
    await TCP4ClientEndpoint(reactor, "127.0.0.1", port,
                             bindAddress=(source, 0)).connect(factory)
    peer: Peer = await factory.opened
    return peer


class GapWatch:
    """Wraps the honest destination's decoder: counts DATA bytes and the longest silence."""

    def __init__(self, decoder: RecordDecoder) -> None:
        self.decoder = decoder
        self.reset()

    def reset(self) -> None:
        self.started = self.last = time.perf_counter()
        self.bytes = 0
        self.longest = 0.0

    def feed(self, payload: bytes) -> list[Message]:
        now = time.perf_counter()
        messages = self.decoder.feed(payload)
        for message in messages:
            if message.type == Message.DATA:
                self.bytes += len(message.payload)
                self.longest = max(self.longest, now - self.last)
                self.last = now
        return messages

    def window(self) -> tuple[float, float]:
        """Throughput (MB/s) since the reset and the longest gap, counting the one still open."""
        now = time.perf_counter()
        longest = max(self.longest, now - self.last)
        return self.bytes / (now - self.started) / 1e6, longest


class HonestTunnel:
    """A tunnel whose source sends one DATA record each tick while the transport takes it."""

    def __init__(self, source: Peer, destination: Peer) -> None:
        self.source, self.destination = source, destination
        self.watch = GapWatch(destination.factory.decoder)
        destination.factory.decoder = self.watch
        self.record = encode(Message(type=Message.DATA, streamId=1, serviceId="BENCH",
                                     connectionId=1, payload=b"x" * PAYLOAD))
        self.paused = False
        source.transport.registerProducer(self, True)
        self.loop = LoopingCall(self.tick)

    def tick(self) -> None:
        if not self.paused:
            self.source.sendMessage(self.record, isBinary=True)

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        self.paused = True


async def open_honest_tunnel(port: int) -> HonestTunnel:
    tunnel = await api(f"http://127.0.0.1:{port}", "OpenTunnel",
                       {"destinationConfig": {"services": ["BENCH"]}})
    destination = await ws_connect(port, "destination", tunnel["destinationAccessToken"],
                                   HONEST_TUNNEL)
    source = await ws_connect(port, "source", tunnel["sourceAccessToken"], HONEST_TUNNEL)
    source.sendMessage(encode(Message(type=Message.STREAM_START, streamId=1,
                                      serviceId="BENCH", connectionId=1)), isBinary=True)
    honest = HonestTunnel(source, destination)
    honest.loop.start(TICK)
    return honest


class Caller:
    """Honest C{OpenTunnel} calls from their own address, each timed, each tunnel then closed."""

    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}/".encode()
        self.agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False),
                           connectTimeout=5, bindAddress=(HONEST_API, 0))

    async def call(self, operation: str, body: dict[str, Any]) -> tuple[int, bytes]:
        headers = Headers({"Content-Type": ["application/x-amz-json-1.1"],
                           "X-Amz-Target": [f"IoTSecuredTunneling.{operation}"]})
        response = await self.agent.request(
            b"POST", self.url, headers, FileBodyProducer(BytesIO(json.dumps(body).encode())))
        return response.code, await readBody(response)

    async def run(self, calls: int, seconds: float) -> tuple[list[float], Counter[str]]:
        """C{calls} calls spread over C{seconds}: latencies (inf for a failure) and outcomes."""
        latencies: list[float] = []
        outcomes: Counter[str] = Counter()
        for _ in range(calls):
            started = time.perf_counter()
            try:
                code, answer = await defer.ensureDeferred(
                    self.call("OpenTunnel", {"destinationConfig": {"services": ["BENCH"]}})
                ).addTimeout(5, reactor)
            except Exception as e:
                latencies.append(math.inf)
                outcomes[type(e).__name__] += 1
            else:
                latencies.append(time.perf_counter() - started if code == 200 else math.inf)
                outcomes[str(code)] += 1
                if code == 200:
                    await self.call("CloseTunnel", {"tunnelId": json.loads(answer)["tunnelId"]})
            await sleep(max(0.0, seconds / calls - (time.perf_counter() - started)))
        return latencies, outcomes


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]


class Raw(protocol.Protocol):
    """
    A raw TCP client. With C{read=False} it never reads; otherwise it keeps
    the HTTP status of the first answer line, and C{closed} fires when the
    connection ends.
    """

    def __init__(self, read: bool = True) -> None:
        self.read = read
        self.head = b""
        self.status = ""
        self.closed: defer.Deferred[str] = defer.Deferred()

    def connectionMade(self) -> None:
        if not self.read:
            self.transport.pauseProducing()

    def dataReceived(self, data: bytes) -> None:
        if not self.status:
            self.head += data
            if b"\r\n" in self.head:
                parts = self.head.split(b"\r\n", 1)[0].split()
                self.status = parts[1].decode() if len(parts) > 1 else "garbled"
                self.transport.loseConnection()

    def connectionLost(self, reason: Any) -> None:
        self.closed.callback(self.status or "closed without answer")


async def raw_connect(port: int, read: bool = True) -> Raw:
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5,
                                  bindAddress=(ATTACKER, 0))
    raw: Raw = await endpoint.connect(protocol.Factory.forProtocol(lambda: Raw(read)))
    return raw


def api_request(operation: str, body: bytes, path: str = "/") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            "Content-Type: application/x-amz-json-1.1\r\n"
            f"X-Amz-Target: IoTSecuredTunneling.{operation}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


async def idle(seconds: float) -> str:
    await sleep(seconds)
    return "no attack"


# Each attack runs for at most `seconds`, returns a note on what it did.

async def pipelined_list(port: int, count: int, seconds: float) -> str:
    raw = await raw_connect(port, read=False)
    request = api_request("ListTunnels", b"{}")
    deadline = time.perf_counter() + seconds
    sent = 0
    while sent < count and time.perf_counter() < deadline:
        batch = min(1000, count - sent)
        raw.transport.write(request * batch)
        sent += batch
        await sleep(0.01)
    await sleep(max(0.0, deadline - time.perf_counter()))
    raw.transport.abortConnection()
    return f"{sent} requests sent"


async def unread_peer(port: int, count: int, seconds: float, what: str) -> str:
    tunnel = await api(f"http://127.0.0.1:{port}", "OpenTunnel",
                       {"destinationConfig": {"services": ["BENCH"]}})
    peer = await ws_connect(port, "source", tunnel["sourceAccessToken"], ATTACKER)
    peer.transport.pauseProducing()
    start = encode(Message(type=Message.STREAM_START, streamId=1, serviceId="BENCH",
                           connectionId=1))
    deadline = time.perf_counter() + seconds
    sent = 0
    while sent < count and time.perf_counter() < deadline:
        batch = min(500, count - sent)
        if what == "ping":
            for _ in range(batch):
                peer.sendPing(b"p" * 125)
        else:
            peer.sendMessage(start * batch, isBinary=True)
        sent += batch
        await sleep(0.01)
    await sleep(max(0.0, deadline - time.perf_counter()))
    peer.transport.abortConnection()
    await api(f"http://127.0.0.1:{port}", "CloseTunnel", {"tunnelId": tunnel["tunnelId"]})
    return f"{sent} {what}s sent"


async def slow_headers(port: int, count: int, seconds: float) -> str:
    sockets: list[Raw] = []
    refused = 0
    for _ in range(count):
        try:
            sockets.append(await raw_connect(port))
        except Exception:
            refused += 1
    for raw in sockets:
        raw.transport.write(b"POST / HTTP/1.1\r\nX-Slow: ")
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        await sleep(min(2.0, max(0.0, deadline - time.perf_counter())))
        for raw in sockets:
            if not raw.closed.called:
                raw.transport.write(b"a")
    cut = sum(1 for raw in sockets if raw.closed.called)
    outcomes = Counter(raw.closed.result for raw in sockets if raw.closed.called)
    for raw in sockets:
        if not raw.closed.called:
            raw.transport.abortConnection()
    answers = ", ".join(f"{k} x{v}" for k, v in sorted(outcomes.items()))
    return (f"{len(sockets)} sockets, {refused} refused at connect, {cut} cut off"
            + (f" ({answers})" if answers else ""))


def oversized_requests() -> dict[str, bytes]:
    tags = json.dumps({"tags": [{"key": f"k{i}", "value": "v"} for i in range(150000)],
                       "destinationConfig": {"services": ["BENCH"]}}).encode()
    nested = b"[" * 30000 + b"]" * 30000
    token = (b"GET /tunnel?local-proxy-mode=source HTTP/1.1\r\nHost: 127.0.0.1\r\n"
             b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
             b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
             b"Sec-WebSocket-Protocol: " + SUBPROTOCOL.encode() + b"\r\n"
             b"access-token: " + b"t" * 17000 + b"\r\n\r\n")
    return {
        "150k tags": api_request("OpenTunnel", tags),
        "nested JSON": api_request("OpenTunnel", nested),
        "17 KB token": token,
        "100 KB URL": api_request("ListTunnels", b"{}", "/" + "u" * 100000),
    }


async def oversized(port: int, count: int, seconds: float) -> str:
    requests = oversized_requests()
    outcomes: dict[str, Counter[str]] = {name: Counter() for name in requests}
    deadline = time.perf_counter() + seconds
    sent = 0

    async def one(name: str, request: bytes) -> None:
        raw = await raw_connect(port)
        raw.transport.write(request)
        try:
            outcomes[name][await raw.closed.addTimeout(5, reactor)] += 1
        except defer.TimeoutError:
            outcomes[name]["no answer in 5 s"] += 1

    while sent < count and time.perf_counter() < deadline:
        batch = [one(name, request) for name, request in requests.items()]
        await defer.gatherResults([defer.ensureDeferred(b) for b in batch])
        sent += len(batch)
    return f"{sent} requests: " + "; ".join(
        f"{name} " + ",".join(f"{k} x{v}" for k, v in sorted(c.items()))
        for name, c in outcomes.items())


async def measure(port: int, pid: int, honest: HonestTunnel, caller: Caller,
                  name: str, attack: Any, calls: int, seconds: float) -> tuple[str, ...]:
    sampler = PeakSampler({"service": pid}, interval=0.05)
    sampler.start()
    honest.watch.reset()
    calling = defer.ensureDeferred(caller.run(calls, seconds))
    note = await attack
    latencies, outcomes = await calling
    throughput, gap = honest.watch.window()
    growth = sampler.stop()["service"]
    worst = p99(latencies)
    failed = sum(v for k, v in outcomes.items() if k != "200")

    def verdict(ok: bool) -> str:
        return "ok" if ok else "MISSED"

    sys.stdout.write(f"{name}: {note}\n")
    sys.stdout.flush()
    return (
        name,
        f"{growth / 1e6:.1f} {verdict(growth < GOAL_GROWTH)}",
        f"{throughput:.2f}",
        f"{gap * 1000:.0f} {verdict(gap < GOAL_GAP)}",
        f"{statistics.median(latencies) * 1000:.0f}",
        (f"{worst * 1000:.0f}" if math.isfinite(worst) else "failed")
        + f" {verdict(worst < GOAL_P99)}"
        + (f" ({failed}/{len(latencies)} failed)" if failed else ""),
    )


async def main(reactor_: object, *argv: str) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.attacks")
    parser.add_argument("--seconds", type=float, default=12, help="each attack's length")
    parser.add_argument("--requests", type=int, default=50000, help="pipelined ListTunnels")
    parser.add_argument("--pings", type=int, default=200000, help="unread pings")
    parser.add_argument("--starts", type=int, default=200000, help="unanswered STREAM_STARTs")
    parser.add_argument("--slow", type=int, default=200, help="slow-header sockets")
    parser.add_argument("--oversized", type=int, default=200, help="oversized requests")
    parser.add_argument("--calls", type=int, default=40, help="honest OpenTunnels per attack")
    args = parser.parse_args(argv)

    await install()
    port = free_port()
    service = spawn("tunnelservice", twistd("tunnelservice", "--db", ":memory:",
                                            "--port", f"tcp:{port}:interface=127.0.0.1"))
    try:
        await wait_for_port(port, service)
        honest = await open_honest_tunnel(port)
        caller = Caller(port)
        s = args.seconds
        attacks = [
            ("none (baseline)", lambda: idle(s)),
            ("pipelined ListTunnels", lambda: pipelined_list(port, args.requests, s)),
            ("unread pongs", lambda: unread_peer(port, args.pings, s, "ping")),
            ("unread resets", lambda: unread_peer(port, args.starts, s, "STREAM_START")),
            ("slow headers", lambda: slow_headers(port, args.slow, s)),
            ("oversized requests", lambda: oversized(port, args.oversized, s)),
        ]
        rows = [("attack", "RSS growth MB (<64)", "honest MB/s",
                 "longest gap ms (<1000)", "OpenTunnel p50 ms",
                 "OpenTunnel p99 ms (<250)")]
        for name, attack in attacks:
            rows.append(await measure(port, service.pid, honest, caller, name,
                                      defer.ensureDeferred(attack()), args.calls, s))
            await sleep(1)
        honest.loop.stop()
        report(rows)
    finally:
        await stop(service)


if __name__ == "__main__":
    # readBody's notice about Agent's own transport wrapper, not about this benchmark.
    warnings.filterwarnings("ignore", "Using readBody", DeprecationWarning)
    task.react(lambda r, *a: defer.ensureDeferred(main(r, *a)), sys.argv[1:])
