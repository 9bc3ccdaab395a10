"""
Relay throughput and memory of C{twistd tunnelservice}.

Two WebSocket peers on loopback (a source and a destination speaking
protocol 3.0) relay 256 MiB through a real C{twistd -n tunnelservice}
process of the installed lpxy (L{bench.common}), once freely and once with
the receiving peer not reading for 5 seconds. Prints the throughput and the
service's peak RSS growth, which must stay under 48 MB: the service may
buffer only a bounded amount while a peer is slow.

    python -m bench.tunnelservice_relay [MiB]
"""

from __future__ import annotations

import sys
import time

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

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
from lpxy.frames import Message, RecordDecoder, encode
from lpxy.wire import NEWEST_SUBPROTOCOL

SUBPROTOCOL = NEWEST_SUBPROTOCOL
PAYLOAD = 64512


class Peer(WebSocketClientProtocol):
    """A bare protocol 3.0 peer: the source pushes DATA, the destination counts it."""

    def onOpen(self) -> None:
        self.factory.opened.callback(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        for message in self.factory.decoder.feed(payload):
            if message.type == Message.DATA:
                self.factory.received += len(message.payload)
                if self.factory.received >= self.factory.expected and not self.factory.done.called:
                    self.factory.done.callback(time.perf_counter())


@implementer(IPushProducer)
class Pusher:
    """Sends DATA as fast as the WebSocket transport takes it."""

    def __init__(self, peer: Peer, total: int) -> None:
        self.peer, self.left, self.paused = peer, total, False
        record = encode(Message(type=Message.DATA, streamId=1, serviceId="BENCH",
                                connectionId=1, payload=b"x" * PAYLOAD))
        self.batch = record * 2

    def resumeProducing(self) -> None:
        self.paused = False
        while not self.paused and self.left > 0:
            self.peer.sendMessage(self.batch, isBinary=True)
            self.left -= 2 * PAYLOAD
        if self.left <= 0:
            self.peer.transport.unregisterProducer()

    def pauseProducing(self) -> None:
        self.paused = True

    def stopProducing(self) -> None:
        self.left = 0


async def connect(
    port: int, mode: str, token: str, bind: str | None = None, **attrs: object
) -> Peer:
    """A L{Peer} on the service at C{port}, from address C{bind} if given."""
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
    factory.expected = 0
    factory.done = defer.Deferred()
    for k, v in attrs.items():
        setattr(factory, k, v)
    bind_address = None if bind is None else (bind, 0)
    await TCP4ClientEndpoint(reactor, "127.0.0.1", port, bindAddress=bind_address).connect(factory)
    return await factory.opened


async def run_once(port: int, total: int, stall: float, service_pid: int) -> tuple[float, int]:
    tunnel = await api(f"http://127.0.0.1:{port}", "OpenTunnel",
                       {"destinationConfig": {"services": ["BENCH"]}})
    destination = await connect(port, "destination", tunnel["destinationAccessToken"],
                                expected=total)
    source = await connect(port, "source", tunnel["sourceAccessToken"])
    source.sendMessage(encode(Message(type=Message.STREAM_START, streamId=1,
                                      serviceId="BENCH", connectionId=1)), isBinary=True)
    sampler = PeakSampler({"service": service_pid})
    sampler.start()
    if stall:
        destination.transport.pauseProducing()
        reactor.callLater(stall, destination.transport.resumeProducing)
    started = time.perf_counter()
    pusher = Pusher(source, total)
    source.transport.registerProducer(pusher, True)
    pusher.resumeProducing()
    finished = await destination.factory.done
    growth = sampler.stop()["service"]
    await api(f"http://127.0.0.1:{port}", "CloseTunnel", {"tunnelId": tunnel["tunnelId"]})
    return total / (finished - started - stall) / 1e6, growth


async def main(reactor_: object, mib: str = "256") -> None:
    total = int(mib) * MiB
    await install()
    port = free_port()
    service = spawn("tunnelservice", twistd("tunnelservice", "--db", ":memory:",
                                            "--port", f"tcp:{port}:interface=127.0.0.1"))
    try:
        await wait_for_port(port, service)
        rows = [("run", "MiB", "throughput MB/s", "service peak RSS growth MB")]
        for name, stall in (("free", 0.0), ("receiver stalled 5 s", 5.0)):
            speed, growth = await run_once(port, total, stall, service.pid)
            rows.append((name, mib, f"{speed:.1f}", f"{growth / 1e6:.1f}"))
        report(rows)
    finally:
        await stop(service)


if __name__ == "__main__":
    task.react(lambda r, *a: defer.ensureDeferred(main(r, *a)), sys.argv[1:])
