"""
lpxy's proxy pair beside the reference C++ pair, through one tunnel service.

Brings up C{twistd tunnelservice} (TLS, a throw-away CA) of the installed
lpxy and, through it, an lpxy source and destination and, with
C{--reference PATH} (a built C{localproxy} of
aws-samples/aws-iot-securetunneling-localproxy), a reference source and
destination, each pair on its own tunnel with the same applications in this
process (an echo server and a sink). Both pairs stay up; every measurement
runs on one pair then the other, the order alternating from run to run, and
each figure is the median of the runs (three by default). Then it prints
issue 12's table, each figure beside the reference's, their ratio, the goal
and whether it is met:

- one-way bulk into the sink (MB/s), and during it each process's CPU
  seconds per GiB (source, destination, tunnel service);
- 1-byte round trip p50 on an established connection, and each proxy's CPU
  per round trip;
- 200 connections echoing at once (aggregate MB/s echoed), and 500 (each
  proxy's CPU per GiB carried, both directions counted, beside the bulk's);
- fairness: 1-byte round trips on one stream while a bulk stream runs on
  another stream of the same tunnel (p50 and the longest);
- idle RSS of each proxy; C{localproxy -V}, and start to listening (a fresh
  source's spawn until its port accepts);
- the tunnel service's memory per connected WebSocket peer (and what is
  left once they leave), and 500 clients connecting in one burst (time
  until every one had a byte echoed).

CPU comes from C{/proc/PID/stat} (user + system), steadier than wall-clock
on a loaded machine. C{--quick} shrinks every size for a smoke test;
C{--only NAME[,NAME...]} runs those measurements alone (L{MEASUREMENTS})
and the table leaves out the rows whose figures were not measured (idle RSS
is measured whenever the pairs start).

    python -m bench.compare [--reference PATH] [--runs N] [--quick] [--only NAME[,NAME...]]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, cast

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import defer, protocol, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.ssl import optionsForClientTLS

from bench.common import (
    Child,
    MiB,
    api,
    free_port,
    install,
    localproxy,
    report,
    rss_bytes,
    spawn,
    stop,
    twistd,
    until_listening,
    wait_for_port,
)
from bench.proxy import (
    Echo,
    SinkFactory,
    Writer,
    _Probe,
    listen,
    pinger,
    throughput,
    tunnel_ready,
)
from bench.proxy_cpu import cpu_seconds
from lpxy.wire import NEWEST_SUBPROTOCOL
from tests.support.certs import TestPKI, make_test_pki

GiB = 1024 * MiB
LPXY, REFERENCE = "lpxy", "C++"

FULL = {"bulk": 128 * MiB, "rtts": 1000, "echo200": (200, 1 * MiB), "echo500": (500, 512 * 1024),
        "burst": 500, "peers": 100, "versions": 5, "starts": 3}
MEASUREMENTS = ("bulk", "rtt", "echo200", "echo500", "fair", "burst", "version", "start",
                "peers")
"""What C{--only} selects from, in the order they run."""

QUICK = {"bulk": 8 * MiB, "rtts": 100, "echo200": (20, 128 * 1024), "echo500": (50, 64 * 1024),
         "burst": 50, "peers": 10, "versions": 2, "starts": 1}


# -- the pairs --------------------------------------------------------------


class Pair:
    """A source and a destination proxy of one implementation, on one tunnel."""

    def __init__(self, name: str, command: Callable[..., list[str]]) -> None:
        self.name = name
        self.command = command
        self.ports: dict[str, int] = {}
        self.pids: dict[str, int] = {}
        self.children: list[Child] = []
        self.idle_rss: dict[str, int] = {}

    async def start(self, bed: TestBed) -> None:
        tunnel = await bed.open_tunnel(list(bed.apps))
        common = bed.common_args()
        destination = spawn(
            f"{self.name}-destination",
            self.command(*common, "-d", ",".join(f"{k}={v}" for k, v in bed.apps.items())),
            {"AWSIOT_TUNNEL_ACCESS_TOKEN": tunnel["destinationAccessToken"]})
        self.children.append(destination)
        self.ports = {name: free_port() for name in bed.apps}
        source = spawn(
            f"{self.name}-source",
            self.command(*common, "-s", ",".join(f"{k}={v}" for k, v in self.ports.items())),
            {"AWSIOT_TUNNEL_ACCESS_TOKEN": tunnel["sourceAccessToken"]})
        self.children.append(source)
        for port in self.ports.values():
            await wait_for_port(port, source)
        await tunnel_ready(self.ports["ECHO"])
        self.pids = {"source": source.pid, "destination": destination.pid}
        await sleep(0.5)
        self.idle_rss = {name: rss_bytes(pid) for name, pid in self.pids.items()}

    async def stop(self) -> None:
        for child in reversed(self.children):
            await stop(child)


class TestBed:
    """The tunnel service, the applications and the settings both pairs use."""

    def __init__(self) -> None:
        self.apps: dict[str, int] = {}
        self.sink = SinkFactory()
        self.service: Child | None = None
        self.service_port = 0
        self.pki: TestPKI | None = None
        self.settings = Path()

    async def start(self) -> None:
        await install()
        work = Path(tempfile.mkdtemp(prefix="lpxy-compare-"))
        self.pki = make_test_pki(work)
        self.settings = work / "settings.json"
        self.settings.write_text(json.dumps(_settings(max_connections=1024)))
        self.apps = {"ECHO": await listen(protocol.Factory.forProtocol(Echo)),
                     "SINK": await listen(self.sink)}
        self.service_port = free_port()
        self.service = spawn("tunnelservice", twistd(
            "tunnelservice", "--db", ":memory:", "--port",
            self.pki.server_endpoint_string(self.service_port)))
        await wait_for_port(self.service_port, self.service)

    async def open_tunnel(self, services: list[str]) -> dict[str, Any]:
        assert self.pki is not None
        for _ in range(60):
            try:
                return await api(f"https://localhost:{self.service_port}", "OpenTunnel",
                                 {"destinationConfig": {"services": services}},
                                 trust=self.pki.ca_certificate())
            except SystemExit as e:  # the API's rate limit: wait, as a client would
                if "ThrottlingException" not in str(e):
                    raise
                await sleep(0.5)
        raise SystemExit("OpenTunnel stayed throttled")

    def common_args(self) -> list[str]:
        assert self.pki is not None
        return ["-e", f"localhost:{self.service_port}", "-c", str(self.pki.ca_dir),
                "-b", "127.0.0.1", "--settings-json", str(self.settings)]

    async def stop(self) -> None:
        if self.service is not None:
            await stop(self.service)


def _settings(max_connections: int) -> dict[str, Any]:
    """
    The reference's whole settings file (it reads no defaults beside one),
    with more connections per service than the 128 of both proxies' default.
    """
    from lpxy.proxy.settings import default_settings_tree

    settings: dict[str, Any] = default_settings_tree()
    settings["tunneling"]["proxy"]["tcp"]["max_active_connections"] = str(max_connections)
    return settings


def sleep(seconds: float) -> defer.Deferred[None]:
    return task.deferLater(reactor, seconds, lambda: None)


def cpu(pids: dict[str, int]) -> dict[str, float]:
    return {name: cpu_seconds(pid) for name, pid in pids.items()}


def spent(before: dict[str, float], pids: dict[str, int]) -> dict[str, float]:
    return {name: cpu_seconds(pid) - before[name] for name, pid in pids.items()}


# -- measurements (one pair, one run) ---------------------------------------


async def bulk(bed: TestBed, pair: Pair, total: int) -> dict[str, float]:
    pids = {**pair.pids, "service": _pid(bed.service)}
    before = cpu(pids)
    speed = await throughput(pair.ports["SINK"], bed.sink, total)
    used = spent(before, pids)
    return {"MB/s": speed, **{f"{k} s/GiB": v * GiB / total for k, v in used.items()}}


async def round_trips(pair: Pair, count: int) -> dict[str, float]:
    p = await pinger(pair.ports["ECHO"])
    before = cpu(pair.pids)
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        await p.ping()
        samples.append(time.perf_counter() - started)
    used = spent(before, pair.pids)
    p.transport.loseConnection()
    return {"p50 us": statistics.median(samples) * 1e6,
            **{f"{k} us": v * 1e6 / count for k, v in used.items()}}


class EchoWriter(Writer):
    """
    Has one byte echoed first (C{ready}: the connection is carried end to
    end), then on L{go} writes C{total} bytes into the echo application and
    waits for all of them back (C{done}).
    """

    def __init__(self, total: int) -> None:
        super().__init__(total)
        self.expected, self.received = total + 1, 0
        self.ready: defer.Deferred[None] = defer.Deferred()
        self.done: defer.Deferred[None] = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.setTcpNoDelay(True)
        self.transport.write(b"!")

    def go(self) -> None:
        self.transport.registerProducer(self, True)
        self.resumeProducing()

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        if not self.ready.called:
            self.ready.callback(None)
        if self.received >= self.expected and not self.done.called:
            self.transport.loseConnection()
            self.done.callback(None)

    def connectionLost(self, reason: object = None) -> None:
        if not self.ready.called:
            self.ready.errback(RuntimeError("closed before its first byte came back"))
        elif not self.done.called:
            self.done.errback(RuntimeError(f"echo ended after {self.received} bytes"))


async def echo_many(pair: Pair, count: int, each: int) -> dict[str, float]:
    """
    C{count} connections, each set up and carrying a byte in turn (the
    reference restarts its acceptor when a connection closes, resetting
    any still queued), then all echoing C{each} bytes at once.
    """
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", pair.ports["ECHO"])
    writers = []
    for _ in range(count):
        writer = EchoWriter(each)
        await endpoint.connect(protocol.Factory.forProtocol(lambda w=writer: w))
        await writer.ready
        writers.append(writer)
    before = cpu(pair.pids)
    started = time.perf_counter()
    for writer in writers:
        writer.go()
    await defer.gatherResults([w.done for w in writers])
    elapsed = time.perf_counter() - started
    used = spent(before, pair.pids)
    carried = 2 * count * each
    return {"MB/s": count * each / elapsed / 1e6,
            **{f"{k} s/GiB": v * GiB / carried for k, v in used.items()}}


async def fairness(bed: TestBed, pair: Pair, total: int) -> dict[str, float]:
    """Round trips on the echo stream while a bulk stream fills the sink."""
    p = await pinger(pair.ports["ECHO"])
    done = bed.sink.expect(total)
    writer = await TCP4ClientEndpoint(reactor, "127.0.0.1", pair.ports["SINK"]).connect(
        protocol.Factory.forProtocol(lambda: Writer(total)))
    samples = []
    while not done.called:
        started = time.perf_counter()
        await p.ping()
        samples.append(time.perf_counter() - started)
    await done
    writer.transport.loseConnection()
    p.transport.loseConnection()
    return {"p50 ms": statistics.median(samples) * 1e3, "max ms": max(samples) * 1e3}


async def burst(pair: Pair, count: int) -> dict[str, float]:
    """
    C{count} clients connect at once; each has a byte echoed. (The
    reference resets clients still queued whenever one closes.)
    """
    started = time.perf_counter()
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", pair.ports["ECHO"], timeout=10)

    async def one() -> bool:
        try:
            probe = await endpoint.connect(protocol.Factory.forProtocol(_Probe))
            return bool(await probe.answered.addTimeout(10, reactor))
        except Exception:
            return False

    answered = await defer.gatherResults([defer.ensureDeferred(one()) for _ in range(count)])
    return {"s": time.perf_counter() - started, "carried": float(sum(answered))}


async def timed_run(argv: list[str], env: dict[str, str] | None = None) -> float:
    started = time.perf_counter()
    child = spawn("version", argv, env)
    status = await child.ended
    if status != 0:
        raise child.failed(f"exited with {status}")
    return (time.perf_counter() - started) * 1e3


async def start_to_listening(bed: TestBed, pair: Pair) -> float:
    """A new source of C{pair}'s kind: spawn until its port accepts (polled every 2 ms)."""
    tunnel = await bed.open_tunnel(["ECHO"])
    port = free_port()
    started = time.monotonic()
    child = spawn(f"{pair.name}-start", pair.command(*bed.common_args(), "-s", f"ECHO={port}"),
                  {"AWSIOT_TUNNEL_ACCESS_TOKEN": tunnel["sourceAccessToken"]})
    try:
        return await until_listening(port, child, started)
    finally:
        await stop(child)


class _Peer(WebSocketClientProtocol):
    def onOpen(self) -> None:
        self.factory.opened.callback(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        pass


async def memory_per_peer(bed: TestBed, count: int) -> dict[str, float]:
    """The service's RSS growth per connected WebSocket peer (TLS), and after they leave."""
    assert bed.pki is not None and bed.service is not None
    pid = bed.service.pid
    tunnels = [await bed.open_tunnel(["ECHO"]) for _ in range((count + 1) // 2)]
    tls = optionsForClientTLS("localhost", trustRoot=bed.pki.ca_certificate())
    await sleep(0.5)
    before = rss_bytes(pid)
    peers = []
    for i in range(count):
        mode = "source" if i % 2 == 0 else "destination"
        token = tunnels[i // 2][f"{mode}AccessToken"]
        factory = WebSocketClientFactory(
            f"wss://localhost:{bed.service_port}/tunnel?local-proxy-mode={mode}",
            protocols=[NEWEST_SUBPROTOCOL], headers={"access-token": token})
        factory.protocol = _Peer
        factory.opened = defer.Deferred()
        await wrapClientTLS(tls, TCP4ClientEndpoint(
            reactor, "127.0.0.1", bed.service_port)).connect(factory)
        peers.append(await factory.opened)
    await sleep(0.5)
    connected = rss_bytes(pid)
    for peer in peers:
        peer.dropConnection(abort=True)
    await sleep(1.0)
    left = rss_bytes(pid)
    return {"KB/peer": (connected - before) / count / 1024,
            "left KB/peer": (left - before) / count / 1024}


def _pid(child: Child | None) -> int:
    assert child is not None
    return child.pid


# -- the table ----------------------------------------------------------------


async def watched(children: list[Child], work: Awaitable[dict[str, float]]) -> dict[str, float]:
    """
    C{work}'s figures, or the benchmark ended naming the first of
    C{children} to exit while it ran: a crashed proxy would otherwise leave
    the measurement waiting for bytes that never come.
    """
    exits: list[defer.Deferred[Any]] = []
    for child in children:
        if child.ended.called:
            raise child.failed(f"had exited (status {child.ended.result})")
        exited: defer.Deferred[Any] = defer.Deferred()
        child.ended.addBoth(_pass_on_once, exited)
        exits.append(exited.addCallback(lambda status, child=child: (child, status)))
    index, value = await defer.race([defer.ensureDeferred(work), *exits])
    if index == 0:
        return cast(dict[str, float], value)
    child, status = value
    raise child.failed(f"exited with {status} during a measurement")


def _pass_on_once(result: Any, to: defer.Deferred[Any]) -> Any:
    if not to.called:  # a race's loser, cancelled when the measurement won
        to.callback(result)
    return result


def median_of(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


class Table:
    """Issue 12's rows: figure, lpxy, C++, ratio, goal, met."""

    def __init__(self, with_reference: bool) -> None:
        self.rows: list[tuple[str, ...]] = [("figure", LPXY, REFERENCE, "ratio", "goal", "met")]
        self.ref = with_reference
        self.missed: list[str] = []

    def add(self, figure: str, ours: str, theirs: str | None, ratio: float | None,
            goal: str, met: bool | None) -> None:
        verdict = "-" if met is None else ("yes" if met else "NO")
        if met is False:
            self.missed.append(figure)
        self.rows.append((figure, ours, theirs if theirs is not None else "-",
                          "-" if ratio is None else f"{ratio:.2f}x", goal, verdict))


async def main(reactor_: object, *argv: str) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__.split(
        "\n\n")[0])
    parser.add_argument("--reference", metavar="PATH",
                        help="the reference proxy's localproxy binary (built from source)")
    parser.add_argument("--runs", type=int, default=3, help="runs per figure (median)")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke test")
    parser.add_argument("--only", metavar="NAME[,NAME...]",
                        help="run only these measurements: " + ", ".join(MEASUREMENTS))
    args = parser.parse_args(argv)
    selected = only(args.only)
    sizes = QUICK if args.quick else FULL
    runs = 1 if args.quick else args.runs

    bed = TestBed()
    pairs = [Pair(LPXY, localproxy)]
    if args.reference:
        reference = str(Path(args.reference).resolve())
        pairs.append(Pair(REFERENCE, lambda *a: [reference, *a]))
    try:
        await bed.start()
        for pair in pairs:
            await pair.start(bed)
        results: dict[str, dict[str, list[dict[str, float]]]] = {p.name: {} for p in pairs}

        async def each(name: str, measure: Callable[[Pair], Awaitable[dict[str, float]]]) -> None:
            for run in range(runs):
                order = pairs if run % 2 == 0 else pairs[::-1]
                for pair in order:
                    children = [*pair.children, *([bed.service] if bed.service else [])]
                    figure = await watched(children, measure(pair))
                    results[pair.name].setdefault(name, []).append(figure)

        async def version(pair: Pair) -> dict[str, float]:
            await timed_run(pair.command("-V"))  # warm the file cache
            times = [await timed_run(pair.command("-V")) for _ in range(sizes["versions"])]
            return {"ms": statistics.median(times)}

        async def start(pair: Pair) -> dict[str, float]:
            times = [await start_to_listening(bed, pair) for _ in range(sizes["starts"])]
            return {"ms": statistics.median(times)}

        measures: dict[str, Callable[[Pair], Awaitable[dict[str, float]]]] = {
            "bulk": lambda p: bulk(bed, p, sizes["bulk"]),
            "rtt": lambda p: round_trips(p, sizes["rtts"]),
            "echo200": lambda p: echo_many(p, *sizes["echo200"]),
            "echo500": lambda p: echo_many(p, *sizes["echo500"]),
            "fair": lambda p: fairness(bed, p, sizes["bulk"]),
            "burst": lambda p: burst(p, sizes["burst"]),
            "version": version,
            "start": start,
        }
        await throughput(pairs[0].ports["SINK"], bed.sink, 4 * MiB)  # warm up
        for name, measure in measures.items():
            if name in selected:
                await each(name, measure)
        peers = None
        if "peers" in selected:
            peers = median_of([await memory_per_peer(bed, sizes["peers"]) for _ in range(runs)])
        figures = {name: {k: median_of(v) for k, v in r.items()} for name, r in results.items()}
        idle = {p.name: p.idle_rss for p in pairs}
    finally:
        for pair in reversed(pairs):
            await pair.stop()
        await bed.stop()

    table = build_table(figures, idle, peers, sizes, bool(args.reference))
    sys.stdout.write(f"{runs} run(s), medians; sizes: bulk {sizes['bulk'] // MiB} MiB, "
                     f"{sizes['rtts']} round trips, echo {sizes['echo200'][0]} x "
                     f"{sizes['echo200'][1] // 1024} KiB and {sizes['echo500'][0]} x "
                     f"{sizes['echo500'][1] // 1024} KiB, burst {sizes['burst']}, "
                     f"{sizes['peers']} peers\n\n")
    report(table.rows)
    sys.stdout.write(f"\ngoals missed: {', '.join(table.missed) or 'none'}\n")


def only(names: str | None) -> frozenset[str]:
    """
    The measurements C{--only} selects (every one without it); an unknown
    name ends the program with an error naming the option and the choices.
    """
    if names is None:
        return frozenset(MEASUREMENTS)
    chosen = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in MEASUREMENTS]
    if unknown or not chosen:
        raise SystemExit(
            f"--only: unknown measurement {', '.join(map(repr, unknown)) or '(none given)'}; "
            f"choose from {', '.join(MEASUREMENTS)}, separated by commas"
        )
    return frozenset(chosen)


def build_table(figures: dict[str, dict[str, dict[str, float]]], idle: dict[str, dict[str, int]],
                peers: dict[str, float] | None, sizes: dict[str, Any], ref: bool) -> Table:
    """
    Issue 12's table from the medians (C{figures[pair][measure][key]}),
    without the rows of measurements that did not run.
    """
    t = Table(ref)
    ours = figures[LPXY]
    theirs = figures.get(REFERENCE)

    def get(measure: str, key: str) -> tuple[float, float | None]:
        mine = ours[measure][key]
        other = theirs[measure][key] if theirs is not None else None
        return mine, other

    def ratio(mine: float, other: float | None) -> float | None:
        return None if other in (None, 0) else mine / other  # type: ignore[operator]

    def pair_fmt(fmt: str, *values: float | None) -> str | None:
        if any(v is None for v in values):
            return None
        return " / ".join(format(v, fmt) for v in values)  # type: ignore[arg-type]

    if "bulk" in ours:
        mine, other = get("bulk", "MB/s")
        r = ratio(mine, other)
        t.add(f"one-way bulk, {sizes['bulk'] // MiB} MiB, MB/s", f"{mine:.0f}",
              pair_fmt(".0f", other), r, ">= 2.0x", None if r is None else r >= 2.0)
    if "rtt" in ours:
        mine, other = get("rtt", "p50 us")
        r = ratio(mine, other)
        t.add("1-byte round trip p50, us", f"{mine:.0f}", pair_fmt(".0f", other), r,
              "<= 1.5x", None if r is None else r <= 1.5)
        src, ref_src = get("rtt", "source us")
        dst, ref_dst = get("rtt", "destination us")
        t.add("CPU per round trip, source / destination, us", f"{src:.0f} / {dst:.0f}",
              pair_fmt(".0f", ref_src, ref_dst), ratio(src + dst, None if ref_src is None
                                                       else ref_src + (ref_dst or 0)),
              "<= 150 each", max(src, dst) <= 150)
    if "echo200" in ours:
        n200 = sizes["echo200"][0]
        mine, other = get("echo200", "MB/s")
        r = ratio(mine, other)
        t.add(f"{n200} connections echoing at once, aggregate MB/s", f"{mine:.1f}",
              pair_fmt(".1f", other), r, ">= 1.5x", None if r is None else r >= 1.5)
    if "echo500" in ours:
        n500 = sizes["echo500"][0]
        src, ref_src = get("echo500", "source s/GiB")
        dst, ref_dst = get("echo500", "destination s/GiB")
        figure = f"{n500} connections, proxy CPU per GiB, source / destination, s"
        carried = (f"{src:.2f} / {dst:.2f}", pair_fmt(".2f", ref_src, ref_dst),
                   ratio(src + dst, None if ref_src is None else ref_src + (ref_dst or 0)))
        if "bulk" in ours:
            bulk_src, bulk_dst = ours["bulk"]["source s/GiB"], ours["bulk"]["destination s/GiB"]
            t.add(figure, *carried,
                  f"<= 1.2x bulk ({1.2 * bulk_src:.2f} / {1.2 * bulk_dst:.2f})",
                  src <= 1.2 * bulk_src and dst <= 1.2 * bulk_dst)
        else:
            t.add(figure, *carried, "<= 1.2x bulk (bulk not measured)", None)
    if "bulk" in ours:
        bulk_src = ours["bulk"]["source s/GiB"]
        t.add("bulk, proxy CPU per GiB, source, s", f"{bulk_src:.2f}",
              pair_fmt(".2f", theirs["bulk"]["source s/GiB"] if theirs else None),
              ratio(bulk_src, theirs["bulk"]["source s/GiB"] if theirs else None), "-", None)
        mine, other = get("bulk", "destination s/GiB")
        t.add("bulk, proxy CPU per GiB, destination, s", f"{mine:.2f}", pair_fmt(".2f", other),
              ratio(mine, other), "<= 1.5", mine <= 1.5)
        mine, other = get("bulk", "service s/GiB")
        t.add("tunnel service CPU per GiB, lpxy pair / C++ pair, s", f"{mine:.2f}",
              pair_fmt(".2f", other), None, "<= 2.5 / <= 3.5",
              mine <= 2.5 and (other is None or other <= 3.5))
    rss = max(idle[LPXY].values()) / 1e6
    ref_rss = max(idle[REFERENCE].values()) / 1e6 if REFERENCE in idle else None
    t.add("idle RSS per proxy (the larger), MB", f"{rss:.1f}", pair_fmt(".1f", ref_rss),
          ratio(rss, ref_rss), "< 35", rss < 35)
    if "version" in ours or "start" in ours:
        # Either half alone is "-" on the other side of the slash.
        v, ref_v = get("version", "ms") if "version" in ours else (None, None)
        s, ref_s = get("start", "ms") if "start" in ours else (None, None)
        shown = " / ".join("-" if x is None else f"{x:.0f}" for x in (v, s))
        theirs_shown = (None if theirs is None else
                        " / ".join("-" if x is None else f"{x:.0f}" for x in (ref_v, ref_s)))
        t.add("localproxy -V / start to listening, ms", shown, theirs_shown, None,
              "< 80 / < 150", (v is None or v < 80) and (s is None or s < 150))
    if peers is not None:
        t.add(f"tunnel service memory per connected peer ({sizes['peers']}), KB",
              f"{peers['KB/peer']:.1f} ({peers['left KB/peer']:.1f} left after)", None, None,
              "<= 16", peers["KB/peer"] <= 16)
    if "burst" in ours:
        n = sizes["burst"]
        secs, ref_secs = get("burst", "s")
        carried_n = ours["burst"]["carried"]
        t.add(f"{n} connects in one burst, all carried, s",
              f"{secs:.2f} ({carried_n:.0f} carried)",
              None if theirs is None
              else f"{ref_secs:.2f} ({theirs['burst']['carried']:.0f} carried)",
              ratio(secs, ref_secs), "< 2", secs < 2 and carried_n == n)
    if "fair" in ours:
        p50, ref_p50 = get("fair", "p50 ms")
        longest, ref_longest = get("fair", "max ms")
        r = ratio(p50, ref_p50)
        t.add("fairness: round trip beside a bulk stream, p50 / max, ms",
              f"{p50:.1f} / {longest:.1f}", pair_fmt(".1f", ref_p50, ref_longest), r,
              "max < 1000, p50 <= 1.5x", longest < 1000 and (r is None or r <= 1.5))
    return t


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    task.react(lambda r, *a: defer.ensureDeferred(main(r, *a)), sys.argv[1:])
