"""
Where an lpxy source's start and its idle memory go.

Brings up C{twistd tunnelservice} (TLS, a throw-away CA) of the installed
lpxy, as L{bench.compare} does, then, for each run:

- starts a source with the C{localproxy} console script on a fresh tunnel
  and times its spawn until its port accepts (what C{bench.compare}'s
  "start to listening" measures: a source listens once its WebSocket to
  the service is open);
- starts the same source under L{bench.startup_probe} (the console script
  with a stopwatch) and prints its timeline: the interpreter, lpxy's
  imports, option parsing, the reactor, the DNS query, TCP connect, TLS
  handshake, WebSocket upgrade and the listening port, each with the
  process's CPU time (steadier than wall-clock on a loaded machine) and
  RSS then;
- starts a destination and a source under the probe on one tunnel, has a
  byte echoed through them, waits half a second (C{bench.compare}'s
  "idle RSS") and takes a snapshot of their memory: RSS, anonymous and
  file-backed, the modules loaded.

Then the breakdowns by layer (L{bench.startup_layers}): import time in the
proxy's own process (C{python -X importtime}, each module's own time
summed by layer) and memory (the modules the idle source had loaded,
imported layer by layer into a fresh interpreter: each layer's RSS on top
of those below it, and how much of that C{tracemalloc} sees as Python
objects). Figures are medians of the runs.

    python -m bench.startup [--runs N] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor, task
from twisted.internet.utils import getProcessOutputAndValue

from bench.common import Child, free_port, localproxy, report, spawn, stop, until_listening
from bench.compare import TestBed, sleep
from bench.proxy import tunnel_ready
from bench.startup_layers import LAYERS, OTHER, STDLIB, layer_of
from tests.support.installed import installed_env

HERE = Path(__file__).resolve().parent
PROBE = str(HERE / "startup_probe.py")
LAYERS_SCRIPT = str(HERE / "startup_layers.py")
MB = 1e6 / 1024  # /proc's kB (KiB) in a MB, as bench.compare counts them
#: The probe's mark once the tunnel is usable (startup_probe.READY).
READY = "tunnel ready (ports serve the tunnel)"


class Probed:
    """A proxy started under the probe: its child, and where its snapshot goes."""

    def __init__(self, name: str, args: list[str], env: dict[str, str],
                 python_flags: tuple[str, ...] = ()) -> None:
        self.out = Path(tempfile.mkdtemp(prefix="lpxy-startup-")) / f"{name}.json"
        env = {**env, "LPXY_PROBE_OUT": str(self.out)}
        env["LPXY_PROBE_T0"] = repr(time.monotonic())
        self.child: Child = spawn(name, [sys.executable, *python_flags, PROBE, *args], env)

    async def snapshot(self) -> dict[str, Any]:
        """
        Ask for the probe's snapshot (SIGUSR1) and read it, once the probe
        has seen its tunnel ready.
        """
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not self.child.ended.called:
            self.out.unlink(missing_ok=True)
            self.child.transport.signalProcess(signal.SIGUSR1)  # type: ignore[union-attr]
            while not (self.out.exists() or self.child.ended.called
                       or time.monotonic() > deadline):
                await sleep(0.005)
            if not self.out.exists():
                break
            data: dict[str, Any] = json.loads(self.out.read_text())
            if any(event[0] == READY for event in data["events"]):
                return data
            await sleep(0.02)
        raise self.child.failed("wrote no snapshot with its tunnel ready")


async def plain_start(bed: TestBed) -> float:
    """The console script itself: spawn until its port accepts."""
    tunnel = await bed.open_tunnel(["ECHO"])
    port = free_port()
    started = time.monotonic()
    child = spawn("plain-source", localproxy(*bed.common_args(), "-s", f"ECHO={port}"),
                  {"AWSIOT_TUNNEL_ACCESS_TOKEN": tunnel["sourceAccessToken"]})
    try:
        return await until_listening(port, child, started)
    finally:
        await stop(child)


async def probed_start(bed: TestBed, importtime: bool) -> dict[str, Any]:
    """A source under the probe: its timeline (and with C{importtime}, its import log)."""
    tunnel = await bed.open_tunnel(["ECHO"])
    port = free_port()
    flags = ("-X", "importtime") if importtime else ()
    probed = Probed("probed-source", [*bed.common_args(), "-s", f"ECHO={port}"],
                    {"AWSIOT_TUNNEL_ACCESS_TOKEN": tunnel["sourceAccessToken"]}, flags)
    started = time.monotonic()
    try:
        listening = await until_listening(port, probed.child, started)
        data = await probed.snapshot()
    finally:
        await stop(probed.child)
    data["listening_ms"] = listening
    if importtime:
        data["importtime"] = probed.child.log.read_text()
    return data


async def idle_pair(bed: TestBed) -> dict[str, dict[str, Any]]:
    """A destination and a source under the probe, one byte echoed, then half a second idle."""
    tunnel = await bed.open_tunnel(["ECHO"])
    port = free_port()
    destination = Probed("idle-destination", [*bed.common_args(), "-d", f"ECHO={bed.apps['ECHO']}"],
                         {"AWSIOT_TUNNEL_ACCESS_TOKEN": tunnel["destinationAccessToken"]})
    source = Probed("idle-source", [*bed.common_args(), "-s", f"ECHO={port}"],
                    {"AWSIOT_TUNNEL_ACCESS_TOKEN": tunnel["sourceAccessToken"]})
    try:
        await until_listening(port, source.child, time.monotonic())
        await tunnel_ready(port)
        await sleep(0.5)
        return {"source": await source.snapshot(), "destination": await destination.snapshot()}
    finally:
        await stop(source.child)
        await stop(destination.child)


async def layer_costs(modules: list[str], traced: bool = False) -> dict[str, Any]:
    """L{bench.startup_layers} in a fresh interpreter on C{modules}."""
    listing = Path(tempfile.mkdtemp(prefix="lpxy-startup-")) / "modules.json"
    listing.write_text(json.dumps(modules))
    flags = ["--traced"] if traced else []
    out, err, status = await getProcessOutputAndValue(
        sys.executable, [LAYERS_SCRIPT, str(listing), *flags], env=installed_env(),
        reactor=reactor)
    if status != 0:
        raise SystemExit(f"startup_layers failed: {err.decode()[-2000:]}")
    result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return result


def import_times(log: str) -> dict[str, tuple[float, int]]:
    """From a C{-X importtime} log: each layer's own import time (ms) and module count."""
    times: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for line in log.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        own, _, name = (part.strip() for part in line[len("import time:"):].split("|"))
        layer = layer_of(name)
        times[layer] += int(own) / 1e3
        counts[layer] += 1
    return {layer: (times[layer], counts[layer]) for layer in times}


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def mb(kb: float) -> str:
    return f"{kb / MB:.1f}"


def print_timeline(plain: list[float], probed: list[dict[str, Any]]) -> None:
    ready = [next(event for event in p["events"] if event[0] == READY) for p in probed]
    listening = median([p["listening_ms"] for p in probed])
    sys.stdout.write(
        f"start to listening, lpxy source (median of {len(probed)}): console script"
        f" {median(plain):.0f} ms; under the probe {listening:.0f} ms, tunnel ready"
        f" {median([event[1] for event in ready]):.0f} ms using"
        f" {median([event[4] for event in ready]):.0f} ms of CPU\n\n")
    names: list[str] = []
    at: dict[str, list[float]] = defaultdict(list)
    rss: dict[str, list[float]] = defaultdict(list)
    cpu: dict[str, list[float]] = defaultdict(list)
    for p in probed:
        for name, ms, kb, _, cpu_ms in p["events"]:
            if name.startswith("snapshot"):
                continue
            if name not in names:
                names.append(name)
            at[name].append(ms)
            rss[name].append(kb)
            cpu[name].append(cpu_ms)
    names.sort(key=lambda n: median(at[n]))
    rows = [("step (the probe's marks)", "ms since spawn", "+ms", "CPU ms", "+CPU ms", "RSS MB")]
    previous = previous_cpu = 0.0
    for name in names:
        t, c = median(at[name]), median(cpu[name])
        rows.append((name, f"{t:.1f}", f"{t - previous:.1f}", f"{c:.1f}", f"{c - previous_cpu:.1f}",
                     mb(median(rss[name]))))
        previous, previous_cpu = t, c
    rows.append(("port accepts (seen by the benchmark)", f"{listening:.1f}",
                 f"{listening - previous:.1f}", "", "", ""))
    report(rows)


def print_imports(texts: list[str]) -> float:
    logs = [import_times(text) for text in texts]
    layers = sorted({layer for log in logs for layer in log},
                    key=lambda layer: -median([log.get(layer, (0.0, 0))[0] for log in logs]))
    rows = [("layer", "import ms (own time)", "modules")]
    total = 0.0
    for layer in layers:
        ms = median([log.get(layer, (0.0, 0))[0] for log in logs])
        total += ms
        rows.append((layer, f"{ms:.1f}", str(max(log.get(layer, (0.0, 0))[1] for log in logs))))
    rows.append(("total", f"{total:.1f}", ""))
    sys.stdout.write(f"\nimport time by layer, in the source's own process (-X importtime,"
                     f" median of {len(logs)})\n")
    report(rows)
    return total


def print_memory(idle: list[dict[str, dict[str, Any]]], layers: list[dict[str, Any]],
                 traced: list[dict[str, Any]]) -> None:
    rows = [("proxy at idle (median)", "RSS MB", "anonymous MB", "file-backed MB",
             "modules", "gc objects")]
    for role in ("source", "destination"):
        rollups = [run[role]["events"][-1][3] for run in idle]
        rows.append((role, mb(median([r["Rss"] for r in rollups])),
                     mb(median([r["Anonymous"] for r in rollups])),
                     mb(median([r["Rss"] - r["Anonymous"] for r in rollups])),
                     str(len(idle[0][role]["modules"])),
                     str(int(median([run[role]["gc_objects"] for run in idle])))))
    sys.stdout.write("\nidle memory\n")
    report(rows)

    sys.stdout.write("\nmemory by layer: the idle source's modules imported layer by layer,"
                     " bottom up, into a fresh interpreter, each with the standard library"
                     " modules it is the first to pull in (median)\n")
    order = ["interpreter (python -c)", *(name for name, _ in LAYERS), STDLIB, OTHER]
    rows = [("layer", "RSS MB", "of it Python objects MB", "import ms", "modules",
             "+ stdlib modules")]
    for name in order:
        found = [row for run in layers for row in run["rows"] if row["layer"] == name]
        if not found or (name != order[0] and not any(
                row["modules"] or row["stdlib"] for row in found)):
            continue
        python = [row["rss_kb"] for run in traced for row in run["rows"] if row["layer"] == name]
        rows.append((name, mb(median([row["rss_kb"] for row in found])),
                     mb(median(python)) if python else "-",
                     f"{median([row['ms'] for row in found]):.0f}",
                     str(found[0]["modules"]), str(found[0]["stdlib"])))
    rows.append(("total", mb(median([run["total_kb"] for run in layers])),
                 mb(median([run["total_kb"] for run in traced])) if traced else "-", "", "", ""))
    report(rows)
    if traced:
        sys.stdout.write("(Python objects: what tracemalloc saw allocated while the layer was"
                         " imported, in another fresh interpreter; the rest of a layer's RSS"
                         " is native: shared libraries, their relocations, C heaps)\n")



async def main(args: argparse.Namespace) -> None:
    runs = 1 if args.quick else args.runs
    bed = TestBed()
    plain: list[float] = []
    probed: list[dict[str, Any]] = []
    idle: list[dict[str, dict[str, Any]]] = []
    layers: list[dict[str, Any]] = []
    logs: list[str] = []
    traced: list[dict[str, Any]] = []
    try:
        await bed.start()
        await plain_start(bed)  # warm the file cache
        for _ in range(runs):
            plain.append(await plain_start(bed))
            probed.append(await probed_start(bed, importtime=False))
        for _ in range(1 if args.quick else 3):
            logs.append((await probed_start(bed, importtime=True))["importtime"])
        for _ in range(runs):
            idle.append(await idle_pair(bed))
        modules = idle[0]["source"]["modules"]
        for _ in range(runs):
            layers.append(await layer_costs(modules))
            traced.append(await layer_costs(modules, traced=True))
    finally:
        await bed.stop()
    load = os.getloadavg()
    sys.stdout.write(f"{runs} run(s); load average {load[0]:.2f} {load[1]:.2f}\n\n")
    print_timeline(plain, probed)
    print_imports(logs)
    print_memory(idle, layers, traced)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="one run: a smoke test")
    task.react(lambda _reactor: defer.ensureDeferred(main(parser.parse_args())))
