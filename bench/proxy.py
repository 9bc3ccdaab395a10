"""
The local proxy end to end, beside a plain Twisted TCP relay.

Brings up C{twistd tunnelservice} (TLS, a throw-away CA) and a destination
and a source C{localproxy} over it, all of the installed lpxy
(L{bench.common}), with three applications in this process:
an echo server, a sink and a sink that does not read for 5 seconds. The same
measurements run through C{twistd portforward} (Twisted's own TCP relay, no
tunnel) as the baseline of this run:

- one-way throughput for 256 MiB into the sink (MB/s, and the ratio to the relay);
- round trip p50 for 1 byte on an established connection;
- connection setup p50: connect to first echoed byte;
- each process's idle RSS, and its peak RSS growth while 256 MiB is pushed into
  the application that does not read for 5 s (must stay under 48 MB).

    python -m bench.proxy [MiB]
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from twisted.internet import defer, protocol, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

from bench.common import (
    Child,
    MiB,
    PeakSampler,
    api,
    free_port,
    install,
    localproxy,
    report,
    rss_bytes,
    spawn,
    stop,
    twistd,
    wait_for_port,
)
from tests.support.certs import make_test_pki

CHUNK = b"\0" * 65536


class Echo(protocol.Protocol):
    def connectionMade(self) -> None:
        self.transport.setTcpNoDelay(True)

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)


class Sink(protocol.Protocol):
    """Counts bytes; with C{stall}, does not read for that long at first."""

    def connectionMade(self) -> None:
        self.count = 0
        if self.factory.stall:
            self.transport.pauseProducing()
            reactor.callLater(self.factory.stall, self.transport.resumeProducing)

    def dataReceived(self, data: bytes) -> None:
        self.count += len(data)
        if self.count >= self.factory.expected and not self.factory.done.called:
            self.factory.done.callback(time.perf_counter())


class SinkFactory(protocol.Factory):
    protocol = Sink

    def __init__(self, stall: float = 0.0) -> None:
        self.stall = stall

    def expect(self, total: int) -> defer.Deferred[float]:
        self.expected, self.done = total, defer.Deferred()
        return self.done


@implementer(IPushProducer)
class Writer(protocol.Protocol):
    """
    Writes C{total} bytes as fast as the transport takes them, then stops
    being its producer (C{loseConnection} would wait for that).
    """

    chunk = CHUNK

    def __init__(self, total: int) -> None:
        self.left, self.paused = total, False

    def connectionMade(self) -> None:
        self.transport.setTcpNoDelay(True)
        self.transport.registerProducer(self, True)
        self.resumeProducing()

    def resumeProducing(self) -> None:
        self.paused = False
        while not self.paused and self.left > 0:
            self.transport.write(self.chunk)
            self.left -= len(self.chunk)
        if self.left <= 0 and self.transport.producer is self:
            self.transport.unregisterProducer()
            self.all_written()

    def all_written(self) -> None:
        """Called once, when the last byte is handed to the transport."""

    def pauseProducing(self) -> None:
        self.paused = True

    def stopProducing(self) -> None:
        self.left = 0


class Pinger(protocol.Protocol):
    """Sends one byte at a time and fires a Deferred on each echo."""

    def connectionMade(self) -> None:
        self.transport.setTcpNoDelay(True)
        self.waiting: defer.Deferred[None] | None = None
        self.factory.connected.callback(self)

    def ping(self) -> defer.Deferred[None]:
        self.waiting = defer.Deferred()
        self.transport.write(b"x")
        return self.waiting

    def dataReceived(self, data: bytes) -> None:
        waiting, self.waiting = self.waiting, None
        if waiting is not None:
            waiting.callback(None)


async def connect(port: int, proto: protocol.Protocol) -> protocol.Protocol:
    return await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(
        protocol.Factory.forProtocol(lambda: proto)
    )


async def pinger(port: int) -> Pinger:
    factory = protocol.Factory.forProtocol(Pinger)
    factory.connected = defer.Deferred()
    await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(factory)
    return await factory.connected


async def throughput(port: int, sink: SinkFactory, total: int) -> float:
    done = sink.expect(total)
    started = time.perf_counter()
    writer = await connect(port, Writer(total))
    finished = await done
    writer.transport.loseConnection()
    return total / (finished - started) / 1e6


async def round_trip_p50(port: int, count: int = 1000) -> float:
    p = await pinger(port)
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        await p.ping()
        samples.append(time.perf_counter() - started)
    p.transport.loseConnection()
    return statistics.median(samples) * 1e3


async def setup_p50(port: int, count: int = 200) -> float:
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        p = await pinger(port)
        await p.ping()
        samples.append(time.perf_counter() - started)
        p.transport.loseConnection()
    return statistics.median(samples) * 1e3


async def stalled_growth(
    port: int, stall: SinkFactory, total: int, pids: dict[str, int]
) -> dict[str, int]:
    sampler = PeakSampler(pids)
    sampler.start()
    done = stall.expect(total)
    writer = await connect(port, Writer(total))
    await done
    writer.transport.loseConnection()
    return sampler.stop()


async def listen(factory: protocol.Factory) -> int:
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
    return port.getHost().port


class _Probe(protocol.Protocol):
    """Sends one byte; C{answered} fires with whether it came back."""

    def __init__(self) -> None:
        self.answered: defer.Deferred[bool] = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(b"?")

    def dataReceived(self, data: bytes) -> None:
        if not self.answered.called:
            self.answered.callback(True)
        self.transport.loseConnection()

    def connectionLost(self, reason: object = None) -> None:
        if not self.answered.called:
            self.answered.callback(False)


async def tunnel_ready(port: int, seconds: float = 30) -> None:
    """
    Wait until a byte sent to the source's echo port comes back: the source
    listens as soon as it is connected, possibly before the destination is,
    and the service resets the streams of a tunnel with one end missing.
    """
    deadline = reactor.seconds() + seconds
    while reactor.seconds() < deadline:
        factory = protocol.Factory.forProtocol(_Probe)
        try:
            probe = await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(factory)
            answered = await probe.answered.addTimeout(2, reactor)
        except Exception:
            answered = False
        if answered:
            return
        await task.deferLater(reactor, 0.1, lambda: None)
    raise SystemExit("the tunnel never carried a byte end to end")


class TLSTunnel:
    """
    C{twistd tunnelservice} on a TLS port (a throw-away CA) and a destination
    and a source C{localproxy} joined by one tunnel, as child processes of
    the installed lpxy. C{ports} maps each service id to the source's
    listening port.
    """

    def __init__(self) -> None:
        self.processes: list[Child] = []
        self.ports: dict[str, int] = {}
        self.pids: dict[str, int] = {}

    async def start(self, apps: dict[str, int], echo: str = "ECHO") -> None:
        await install()
        pki = make_test_pki(Path(tempfile.mkdtemp(prefix="lpxy-bench-")))
        service_port = free_port()
        service = self.spawn("tunnelservice", twistd(
            "tunnelservice", "--db", ":memory:", "--port",
            pki.server_endpoint_string(service_port)))
        await wait_for_port(service_port, service)
        tunnel = await api(f"https://localhost:{service_port}", "OpenTunnel",
                           {"destinationConfig": {"services": list(apps)}},
                           trust=pki.ca_certificate())
        common = ["-e", f"localhost:{service_port}", "-c", str(pki.ca_cert_path),
                  "-b", "127.0.0.1"]
        destination = self.spawn(
            "destination",
            localproxy(*common, "-d", ",".join(f"{k}={v}" for k, v in apps.items())),
            {"AWSIOT_TUNNEL_ACCESS_TOKEN": tunnel["destinationAccessToken"]})
        self.ports = {name: free_port() for name in apps}
        source = self.spawn(
            "source",
            localproxy(*common, "-s", ",".join(f"{k}={v}" for k, v in self.ports.items())),
            {"AWSIOT_TUNNEL_ACCESS_TOKEN": tunnel["sourceAccessToken"]})
        for port in self.ports.values():
            await wait_for_port(port, source)
        await tunnel_ready(self.ports[echo])
        self.pids = {"tunnelservice": service.pid, "source": source.pid,
                     "destination": destination.pid}

    def spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Child:
        """Start a process that L{stop} ends."""
        child = spawn(name, argv, env)
        self.processes.append(child)
        return child

    async def stop(self) -> None:
        """End every process started, the last first."""
        for child in reversed(self.processes):
            await stop(child)


async def main(reactor_: object, mib: str = "256") -> None:
    total = int(mib) * MiB
    echo_port = await listen(protocol.Factory.forProtocol(Echo))
    sink, stall = SinkFactory(), SinkFactory(stall=5.0)
    sink_port, stall_port = await listen(sink), await listen(stall)
    apps = {"ECHO": echo_port, "SINK": sink_port, "STALL": stall_port}

    tunnel = TLSTunnel()
    try:
        await tunnel.start(apps)
        tunnel_ports = tunnel.ports

        relay_ports = {name: free_port() for name in apps}
        relays = {}
        for name, port in relay_ports.items():
            relays[name] = tunnel.spawn(
                f"portforward-{name}",
                twistd("portforward", "--port", f"tcp:{port}:interface=127.0.0.1",
                       "--host", "127.0.0.1", "--dest_port", str(apps[name])))
            await wait_for_port(port, relays[name])

        proxy_pids = tunnel.pids
        idle = {name: rss_bytes(pid) for name, pid in proxy_pids.items()}
        idle["relay"] = rss_bytes(relays["STALL"].pid)

        lp_speed = await throughput(tunnel_ports["SINK"], sink, total)
        relay_speed = await throughput(relay_ports["SINK"], sink, total)
        lp_rtt = await round_trip_p50(tunnel_ports["ECHO"])
        relay_rtt = await round_trip_p50(relay_ports["ECHO"])
        lp_setup = await setup_p50(tunnel_ports["ECHO"])
        relay_setup = await setup_p50(relay_ports["ECHO"])
        growth = await stalled_growth(tunnel_ports["STALL"], stall, total, proxy_pids)
        growth.update(await stalled_growth(relay_ports["STALL"], stall, total,
                                           {"relay": relays["STALL"].pid}))

        rows = [("measure", "lpxy (TLS tunnel)", "twistd portforward", "ratio")]
        rows.append((f"throughput {mib} MiB, MB/s", f"{lp_speed:.1f}", f"{relay_speed:.1f}",
                     f"{lp_speed / relay_speed:.2f}"))
        rows.append(("round trip p50, ms", f"{lp_rtt:.3f}", f"{relay_rtt:.3f}",
                     f"{lp_rtt / relay_rtt:.2f}"))
        rows.append(("setup p50, ms", f"{lp_setup:.3f}", f"{relay_setup:.3f}",
                     f"{lp_setup / relay_setup:.2f}"))
        report(rows)
        sys.stdout.write("\n")
        mem = [("process", "idle RSS MB", f"peak growth MB ({mib} MiB into a 5 s stall)")]
        for name in ("tunnelservice", "source", "destination", "relay"):
            mem.append((name, f"{idle[name] / 1e6:.1f}", f"{growth[name] / 1e6:.1f}"))
        report(mem)
    finally:
        await tunnel.stop()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    task.react(lambda r, *a: defer.ensureDeferred(main(r, *a)), sys.argv[1:])
