"""
C{twistd tunnelservice} under attack, beside an honest tunnel.

Starts a real C{twistd -n tunnelservice --db :memory:} process of the
installed lpxy (L{bench.common}) and an honest tunnel through it, as a user
runs one: a destination and a source C{localproxy} process (plain
C{ws://}), an echo server and a sink behind the destination, and a client in
this process writing 16 KiB to the source's sink port every 10 ms. Then runs
each attack for a bounded time and count, one after the other. The attacks
come from 127.0.0.4 (the tag flood from 127.0.1.x too), the honest API calls
from 127.0.0.2 and 127.0.0.5, the proxies from 127.0.0.1, so per-address
limits and throttling fall on the attacker. The attacks:

  1. one connection pipelining many C{ListTunnels} requests, never reading;
  2. a peer sending WebSocket pings, never reading the pongs;
  3. a peer sending C{STREAM_START}s with no partner, never reading the resets;
  4. many sockets sending a request header one byte every few seconds;
  5. oversized requests: too many tags, deeply nested JSON, an oversized
     access-token header, an oversized URL;
  6. a tag flood: many tunnels opened with 50 tags each (the most a tunnel
     may have, every key and value as long as allowed), one more tag on one
     of them (which must be refused with C{TooManyTagsException}), then
     C{DescribeTunnel} of a tagged tunnel and C{ListTunnels} timed.

Per attack it prints the service's peak RSS growth, the honest tunnel's
throughput and its longest gap between chunks reaching the sink, and the
p99 of honest C{OpenTunnel} calls made through C{twisted.web}'s Agent during
the attack (p50 beside it), each beside its goal. Latencies are timed in
this process's reactor, which also drives the attacker (but for the tag
flood's, a process of its own): on a busy machine they include the
benchmark's own delays.

    python -m bench.attacks [--seconds S] [--requests N] [--pings N]
        [--starts N] [--slow N] [--oversized N] [--tagged N] [--calls N]
        [--only ATTACK]... [--open-api]

The service runs with C{--credentials} holding two keys, as the README's
security section has an operator run it: every attack signs with the
attacker's key (the tag flood from 100 addresses, so the per-credential
throttle bounds it however many addresses it uses), the honest calls with
the other. C{--open-api} runs it with C{--insecure-open-api} instead, where
nothing bounds many callers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections import Counter
from io import BytesIO
from pathlib import Path
from typing import Any

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from twisted.internet import defer, protocol, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.interfaces import IPushProducer
from twisted.internet.task import LoopingCall, deferLater
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers
from zope.interface import implementer

from bench.common import (
    Child,
    MiB,
    PeakSampler,
    free_port,
    install,
    localproxy,
    report,
    spawn,
    stop,
    twistd,
    wait_for_port,
)
from bench.proxy import Echo, listen, tunnel_ready
from bench.tunnelservice_relay import SUBPROTOCOL, connect
from lpxy.frames import Message, encode
from lpxy.tunnelservice.auth import SIGNING_NAME

ATTACKER = "127.0.0.4"
HONEST_API = "127.0.0.2"
HONEST_READS = "127.0.0.5"  # the DescribeTunnel and ListTunnels timed in the tag flood
# The tag flood's addresses, each within the API's 20 calls a second per caller; with
# --credentials all sign with the attacker's one key, so the per-credential throttle bounds them.
FLOOD_ADDRESSES = [f"127.0.1.{i}" for i in range(1, 101)]
FLOOD_RATE = 18.0
MAX_TAGS = 50
PAYLOAD = 16384
TICK = 0.01  # the honest client writes one chunk a tick: about 1.6 MB/s

GOAL_GROWTH = 64 * MiB
GOAL_P99 = 0.250
GOAL_GAP = 1.0


class Key:
    """An access key of the service's --credentials file; signs API requests with botocore."""

    def __init__(self, profile: str, access_key: str, secret: str) -> None:
        self.profile = profile
        self.credentials = Credentials(access_key, secret)

    def section(self) -> str:
        return (f"[{self.profile}]\naws_access_key_id = {self.credentials.access_key}\n"
                f"aws_secret_access_key = {self.credentials.secret_key}\n")

    def sign(self, url: str, headers: dict[str, str], body: bytes) -> dict[str, str]:
        """C{headers} with the SigV4 ones (X-Amz-Date, Authorization) added."""
        request = AWSRequest(method="POST", url=url, data=body, headers=headers)
        SigV4Auth(self.credentials, SIGNING_NAME, "us-east-1").add_auth(request)
        return dict(request.headers.items())


ATTACKER_KEY = Key("attacker", "AKIAATTACKER00000001", "attacker-secret-" + "a" * 24)
HONEST_KEY = Key("honest", "AKIAHONEST0000000001", "honest-secret-" + "h" * 26)
# Set by main: None on an open API (--insecure-open-api), no request signed.
KEYS: dict[str, Key | None] = {"attacker": ATTACKER_KEY, "honest": HONEST_KEY}


def sleep(seconds: float) -> defer.Deferred[None]:
    return deferLater(reactor, seconds, lambda: None)


class GapWatch:
    """Bytes reaching the honest sink, and the longest silence between two chunks."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.started = self.last = time.perf_counter()
        self.bytes = 0
        self.longest = 0.0

    def received(self, count: int) -> None:
        now = time.perf_counter()
        self.bytes += count
        self.longest = max(self.longest, now - self.last)
        self.last = now

    def window(self) -> tuple[float, float]:
        """Throughput (MB/s) since the reset and the longest gap, counting the one still open."""
        now = time.perf_counter()
        longest = max(self.longest, now - self.last)
        return self.bytes / (now - self.started) / 1e6, longest


class WatchedSink(protocol.Protocol):
    """The application behind the destination proxy: reads everything, tells the watch."""

    def dataReceived(self, data: bytes) -> None:
        self.factory.watch.received(len(data))


@implementer(IPushProducer)
class PacedClient(protocol.Protocol):
    """The honest client at the source's port: a chunk a tick while the transport takes it."""

    def __init__(self) -> None:
        self.paused = False
        self.chunk = b"x" * PAYLOAD
        self.loop = LoopingCall(self.tick)

    def connectionMade(self) -> None:
        self.transport.setTcpNoDelay(True)
        self.transport.registerProducer(self, True)

    def tick(self) -> None:
        if not self.paused:
            self.transport.write(self.chunk)

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        self.paused = True


class HonestTunnel:
    """
    A real tunnel: destination and source C{localproxy} processes joined by
    the service, an echo server and a watched sink behind the destination,
    a paced client writing into the source.
    """

    def __init__(self) -> None:
        self.watch = GapWatch()
        self.processes: list[Child] = []
        self.client: PacedClient | None = None

    async def start(self, service_port: int) -> None:
        sinks = protocol.Factory.forProtocol(WatchedSink)
        sinks.watch = self.watch
        apps = {"ECHO": await listen(protocol.Factory.forProtocol(Echo)),
                "BENCH": await listen(sinks)}
        tunnel = await Caller(service_port, "127.0.0.1", KEYS["honest"]).json(
            "OpenTunnel", {"destinationConfig": {"services": list(apps)}})
        endpoint = ["-e", f"ws://127.0.0.1:{service_port}"]
        self.processes.append(spawn(
            "destination",
            localproxy(*endpoint, "-d", ",".join(f"{k}={v}" for k, v in apps.items())),
            {"AWSIOT_TUNNEL_ACCESS_TOKEN": tunnel["destinationAccessToken"]}))
        ports = {name: free_port() for name in apps}
        source = spawn(
            "source",
            localproxy(*endpoint, "-b", "127.0.0.1",
                       "-s", ",".join(f"{k}={v}" for k, v in ports.items())),
            {"AWSIOT_TUNNEL_ACCESS_TOKEN": tunnel["sourceAccessToken"]})
        self.processes.append(source)
        for port in ports.values():
            await wait_for_port(port, source)
        await tunnel_ready(ports["ECHO"])
        client = self.client = PacedClient()
        await TCP4ClientEndpoint(reactor, "127.0.0.1", ports["BENCH"]).connect(
            protocol.Factory.forProtocol(lambda: client))
        client.loop.start(TICK)

    async def stop(self) -> None:
        if self.client is not None and self.client.loop.running:
            self.client.loop.stop()
        for child in reversed(self.processes):
            await stop(child)


class Caller:
    """API calls from their own address, each timed."""

    def __init__(self, port: int, address: str = HONEST_API, key: Key | None = None) -> None:
        self.url = f"http://127.0.0.1:{port}/"
        self.key = key
        self.agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False),
                           connectTimeout=5, bindAddress=(address, 0))

    async def call(self, operation: str, body: dict[str, Any]) -> tuple[int, bytes]:
        data = json.dumps(body).encode()
        fields = {"Content-Type": "application/x-amz-json-1.1",
                  "X-Amz-Target": f"IoTSecuredTunneling.{operation}"}
        if self.key is not None:
            fields = self.key.sign(self.url, fields, data)
        response = await self.agent.request(
            b"POST", self.url.encode(), Headers({k: [v] for k, v in fields.items()}),
            FileBodyProducer(BytesIO(data)))
        return response.code, await readBody(response)

    async def json(self, operation: str, body: dict[str, Any]) -> dict[str, Any]:
        """One call that must succeed: its decoded answer."""
        code, answer = await self.call(operation, body)
        if code != 200:
            raise SystemExit(f"{operation} answered {code}: {answer!r}")
        result: dict[str, Any] = json.loads(answer)
        return result

    async def timed(self, operation: str, body: dict[str, Any]) -> tuple[float, str, bytes]:
        """One call: its latency (inf unless answered 200), its outcome and its answer."""
        started = time.perf_counter()
        try:
            code, answer = await defer.ensureDeferred(
                self.call(operation, body)).addTimeout(5, reactor)
        except Exception as e:
            return math.inf, type(e).__name__, b""
        return (time.perf_counter() - started if code == 200 else math.inf), str(code), answer

    async def run(self, calls: int, seconds: float) -> tuple[list[float], Counter[str]]:
        """C{calls} OpenTunnels spread over C{seconds}: latencies (inf for a failure), outcomes."""
        latencies: list[float] = []
        outcomes: Counter[str] = Counter()
        for _ in range(calls):
            started = time.perf_counter()
            latency, outcome, answer = await self.timed(
                "OpenTunnel", {"destinationConfig": {"services": ["BENCH"]}})
            latencies.append(latency)
            outcomes[outcome] += 1
            if outcome == "200":
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


def api_request(port: int, operation: str, body: bytes, path: str = "/") -> bytes:
    """A raw API request, signed with the attacker's key unless the API is open."""
    fields = {"Content-Type": "application/x-amz-json-1.1",
              "X-Amz-Target": f"IoTSecuredTunneling.{operation}"}
    key = KEYS["attacker"]
    if key is not None:
        fields = key.sign(f"http://127.0.0.1:{port}{path}", fields, body)
    head = "".join(f"{k}: {v}\r\n" for k, v in fields.items())
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{head}"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


async def idle(seconds: float) -> str:
    await sleep(seconds)
    return "no attack"


# Each attack runs for at most `seconds`, returns a note on what it did.

async def pipelined_list(port: int, count: int, seconds: float) -> str:
    raw = await raw_connect(port, read=False)
    request = api_request(port, "ListTunnels", b"{}")
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
    attacker = Caller(port, ATTACKER, KEYS["attacker"])
    tunnel = await attacker.json("OpenTunnel", {"destinationConfig": {"services": ["BENCH"]}})
    peer = await connect(port, "source", tunnel["sourceAccessToken"], bind=ATTACKER,
                         expected=math.inf)
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
    await attacker.json("CloseTunnel", {"tunnelId": tunnel["tunnelId"]})
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


def oversized_requests(port: int) -> dict[str, bytes]:
    tags = json.dumps({"tags": [{"key": f"k{i}", "value": "v"} for i in range(150000)],
                       "destinationConfig": {"services": ["BENCH"]}}).encode()
    nested = b"[" * 30000 + b"]" * 30000
    token = (b"GET /tunnel?local-proxy-mode=source HTTP/1.1\r\nHost: 127.0.0.1\r\n"
             b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
             b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
             b"Sec-WebSocket-Protocol: " + SUBPROTOCOL.encode() + b"\r\n"
             b"access-token: " + b"t" * 17000 + b"\r\n\r\n")
    return {
        "150k tags": api_request(port, "OpenTunnel", tags),
        "nested JSON": api_request(port, "OpenTunnel", nested),
        "17 KB token": token,
        "100 KB URL": api_request(port, "ListTunnels", b"{}", "/" + "u" * 100000),
    }


async def oversized(port: int, count: int, seconds: float) -> str:
    requests = oversized_requests(port)
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


def flood_tags(count: int = MAX_TAGS) -> list[dict[str, str]]:
    """C{count} tags, every key and value as long as the API allows (128 and 256)."""
    return [{"key": f"k{i:03d}".ljust(128, "k"), "value": "v" * 256} for i in range(count)]


def latency_text(latencies: list[float]) -> str:
    worst = p99(latencies)
    failed = sum(1 for v in latencies if not math.isfinite(v))
    return (f"p50 {statistics.median(latencies) * 1000:.0f} ms, p99 "
            + (f"{worst * 1000:.0f} ms" if math.isfinite(worst) else "failed")
            + f" (<{GOAL_P99 * 1000:.0f}) {'ok' if worst < GOAL_P99 else 'MISSED'}"
            + (f", {failed}/{len(latencies)} failed" if failed else ""))


def cpu_seconds(pid: int) -> float:
    """The user and system CPU time process C{pid} has used so far (from /proc)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def flood_open(port: int, count: int, seconds: float) -> dict[str, Any]:
    """
    The tag flood's attacker, run in its own process (C{--flood-attacker}):
    up to C{count} tunnels opened with 50 tags each for C{seconds}, from many
    addresses (each within the API's rate) signing with the attacker's one
    key, each address trying until the time is over or C{count} are open;
    then one more tag on one of them. Returns what happened and this
    process's CPU time, for the benchmark to report.
    """
    opening_ends = time.perf_counter() + seconds
    body = {"destinationConfig": {"services": ["BENCH"]}, "tags": flood_tags()}
    opened: list[dict[str, Any]] = []
    outcomes: Counter[str] = Counter()

    async def opener(address: str) -> None:
        caller = Caller(port, address, KEYS["attacker"])
        while len(opened) < count:
            if time.perf_counter() > opening_ends:
                return
            began = time.perf_counter()
            _, outcome, answer = await caller.timed("OpenTunnel", body)
            if outcome == "200":
                opened.append(json.loads(answer))
            else:
                outcome += " " + json.loads(answer or b"{}").get("__type", "")
            outcomes[outcome.strip()] += 1
            await sleep(max(0.0, 1 / FLOOD_RATE - (time.perf_counter() - began)))

    await defer.gatherResults([defer.ensureDeferred(opener(address))
                               for address in FLOOD_ADDRESSES])
    cpu = own_cpu_seconds()
    result: dict[str, Any] = {"opened": len(opened), "outcomes": dict(outcomes), "cpu": cpu}
    if not opened:
        return result
    target = opened[0]
    for _ in range(50):  # the attacker's key may be throttled still
        code, answer = await Caller(port, ATTACKER, KEYS["attacker"]).call(
            "TagResource", {"resourceArn": target["tunnelArn"],
                            "tags": [{"key": "one-too-many", "value": "x"}]})
        if b"ThrottlingException" not in answer:
            break
        await sleep(0.1)
    result["refusal"] = (f"{code} {json.loads(answer).get('__type', answer[:80])}"
                         if answer else str(code))
    result["target"] = target["tunnelId"]
    return result


async def flood_attacker(port: int, count: int, seconds: float, open_api: bool) -> dict[str, Any]:
    """
    Runs L{flood_open} in a child process (this module with
    C{--flood-attacker}), so its signing and sending cost this process
    nothing: the honest calls are timed in a process that does nothing else.
    """
    handle, name = tempfile.mkstemp(prefix="lpxy-flood-", suffix=".json")
    os.close(handle)
    result_file = Path(name)
    argv = [sys.executable, "-m", "bench.attacks", "--flood-attacker", str(port),
            "--tagged", str(count), "--seconds", str(seconds), "--flood-result", name]
    if open_api:
        argv.append("--open-api")
    child = Child("flood-attacker", Path(tempfile.gettempdir()) / "lpxy-flood-attacker.log")
    root = Path(__file__).resolve().parent.parent
    reactor.spawnProcess(  # type: ignore[attr-defined]
        child, argv[0], argv, env=dict(os.environ, PYTHONPATH=str(root)), path=str(root),
        childFDs={0: "w", 1: 1, 2: 2})
    status = await child.ended
    try:
        if status != 0:
            raise child.failed(f"exited with {status}")
        result: dict[str, Any] = json.loads(result_file.read_text())
    finally:
        result_file.unlink()
    return result


async def tag_flood(port: int, pid: int, count: int, calls: int, seconds: float,
                    open_api: bool) -> str:
    """
    The tag flood (L{flood_open}, in its own process) in the first half of
    C{seconds}, the service's and this process's CPU over it; then C{calls}
    C{DescribeTunnel}s of a tagged tunnel and as many C{ListTunnels} (a
    page of 100) timed in the second half, signed with the honest key.
    """
    started = time.perf_counter()
    service_cpu, own_cpu = cpu_seconds(pid), own_cpu_seconds()
    flood = await flood_attacker(port, count, seconds / 2, open_api)
    wall = time.perf_counter() - started
    service_share = (cpu_seconds(pid) - service_cpu) / wall
    own_share = (own_cpu_seconds() - own_cpu) / wall
    cpu = (f"CPU over the flood's {wall:.1f} s: service {service_share:.0%},"
           f" attacker process {flood['cpu'] / wall:.0%}, benchmark process {own_share:.0%}")
    outcomes: dict[str, int] = flood["outcomes"]
    if not flood["opened"]:
        return f"no tunnel opened ({outcomes}); {cpu}"
    refusal = flood["refusal"]
    reads = Caller(port, HONEST_READS, KEYS["honest"])
    described: list[float] = []
    listed: list[float] = []
    pace = max(1 / FLOOD_RATE, (started + seconds - time.perf_counter()) / (2 * calls))
    for _ in range(calls):
        for operation, request, latencies in (
            ("DescribeTunnel", {"tunnelId": flood["target"]}, described),
            ("ListTunnels", {"maxResults": 100}, listed),
        ):
            began = time.perf_counter()
            latency, _, _ = await reads.timed(operation, request)
            latencies.append(latency)
            await sleep(max(0.0, pace - (time.perf_counter() - began)))
    refused = sum(v for k, v in outcomes.items() if k != "200")
    attempts = sum(outcomes.values())
    return (f"{flood['opened']} tunnels opened with {MAX_TAGS} tags each from {attempts} attempts"
            f" in {seconds / 2:.0f} s"
            + (f" ({refused} refused: "
               f"{ {k: v for k, v in outcomes.items() if k != '200'} })" if refused else "")
            + f"; a {MAX_TAGS + 1}st tag: {refusal}"
            + f" ({'ok' if 'TooManyTagsException' in refusal else 'MISSED'});"
            + f" DescribeTunnel {latency_text(described)}; ListTunnels {latency_text(listed)}"
            + f"; {cpu}")


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


ATTACKS = ("baseline", "pipelined", "pongs", "resets", "slow", "oversized", "tag-flood")


async def main(reactor_: object, *argv: str) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.attacks")
    parser.add_argument("--seconds", type=float, default=12, help="each attack's length")
    parser.add_argument("--requests", type=int, default=50000, help="pipelined ListTunnels")
    parser.add_argument("--pings", type=int, default=200000, help="unread pings")
    parser.add_argument("--starts", type=int, default=200000, help="unanswered STREAM_STARTs")
    parser.add_argument("--slow", type=int, default=200, help="slow-header sockets")
    parser.add_argument("--oversized", type=int, default=200, help="oversized requests")
    parser.add_argument("--tagged", type=int, default=2000, help="tunnels with 50 tags")
    parser.add_argument("--calls", type=int, default=40, help="honest OpenTunnels per attack")
    parser.add_argument("--only", action="append", choices=list(ATTACKS), metavar="ATTACK",
                        help="run only this attack (repeatable): " + ", ".join(ATTACKS))
    parser.add_argument("--open-api", action="store_true",
                        help="run the service without --credentials (--insecure-open-api)")
    parser.add_argument("--flood-attacker", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--flood-result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.open_api:
        KEYS.update(attacker=None, honest=None)
    if args.flood_attacker:  # the tag flood's own process (flood_attacker)
        result = await flood_open(args.flood_attacker, args.tagged, args.seconds)
        Path(args.flood_result).write_text(json.dumps(result))
        return

    await install()
    port = free_port()
    options = ["--db", ":memory:", "--port", f"tcp:{port}:interface=127.0.0.1"]
    if args.open_api:
        options.append("--insecure-open-api")
        label = ", open API (--insecure-open-api): no per-credential bound, saturates by design"
    else:
        credentials = Path(tempfile.mkdtemp(prefix="lpxy-attacks-")) / "credentials"
        credentials.write_text(ATTACKER_KEY.section() + HONEST_KEY.section())
        options += ["--credentials", str(credentials)]
        label = " (per-credential: one attacker key)"
    service = spawn("tunnelservice", twistd("tunnelservice", *options))
    honest = HonestTunnel()
    try:
        await wait_for_port(port, service)
        await honest.start(port)
        caller = Caller(port, HONEST_API, KEYS["honest"])
        s = args.seconds
        runs = {
            "baseline": ("none (baseline)", lambda: idle(s)),
            "pipelined": ("pipelined ListTunnels",
                          lambda: pipelined_list(port, args.requests, s)),
            "pongs": ("unread pongs", lambda: unread_peer(port, args.pings, s, "ping")),
            "resets": ("unread resets",
                       lambda: unread_peer(port, args.starts, s, "STREAM_START")),
            "slow": ("slow headers", lambda: slow_headers(port, args.slow, s)),
            "oversized": ("oversized requests", lambda: oversized(port, args.oversized, s)),
            "tag-flood": ("tag flood" + label,
                          lambda: tag_flood(port, service.pid, args.tagged, args.calls, s,
                                            args.open_api)),
        }
        attacks = [runs[slug] for slug in ATTACKS if not args.only or slug in args.only]
        rows = [("attack", "RSS growth MB (<64)", "honest MB/s",
                 "longest gap ms (<1000)", "OpenTunnel p50 ms",
                 "OpenTunnel p99 ms (<250)")]
        for name, attack in attacks:
            rows.append(await measure(port, service.pid, honest, caller, name,
                                      defer.ensureDeferred(attack()), args.calls, s))
            await sleep(1)
        report(rows)
    finally:
        await honest.stop()
        await stop(service)
        if not args.open_api:
            shutil.rmtree(credentials.parent)


if __name__ == "__main__":
    # readBody's notice about Agent's own transport wrapper, not about this benchmark.
    warnings.filterwarnings("ignore", "Using readBody", DeprecationWarning)
    task.react(lambda r, *a: defer.ensureDeferred(main(r, *a)), sys.argv[1:])
