"""
Where the local proxy's time goes: CPU per megabyte in each process.

Brings up the same tunnelservice and source and destination proxies as
L{bench.proxy} (TLS on loopback), then repeats each measurement a few times
and prints medians, so that one change of the data path can be compared
with the next on a noisy machine:

- one-way throughput (MB/s) and, during it, the CPU time (user + system)
  each process spends per megabyte relayed, this benchmark's own process
  (the writing and reading applications) included;
- round trip p50 for 1 byte, and connection setup p50 (connect to first
  echoed byte, then close), each over several rounds, with each process's
  CPU time per round trip and per connection (clock ticks are coarse: a
  few rounds of a few hundred).

On a machine with few cores the processes compete for CPU, so the CPU per
megabyte is the steadier figure; throughput follows from it.

    python -m bench.proxy_cpu [MiB per run] [runs]
"""

from __future__ import annotations

import os
import statistics
import sys

from twisted.internet import defer, protocol, task

from bench.common import MiB, report
from bench.proxy import (
    Echo,
    SinkFactory,
    TLSTunnel,
    listen,
    round_trip_p50,
    setup_p50,
    throughput,
)

_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of process C{pid} so far."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


async def main(reactor_: object, mib: str = "256", runs: str = "5") -> None:
    total, rounds = int(mib) * MiB, int(runs)
    echo_port = await listen(protocol.Factory.forProtocol(Echo))
    sink = SinkFactory()
    sink_port = await listen(sink)
    apps = {"ECHO": echo_port, "SINK": sink_port}
    tunnel = TLSTunnel()
    try:
        await tunnel.start(apps)
        ports = tunnel.ports
        pids = {**tunnel.pids, "apps (bench)": os.getpid()}

        await throughput(ports["SINK"], sink, 16 * MiB)  # warm up
        speeds: list[float] = []
        cpu: dict[str, list[float]] = {name: [] for name in pids}
        for _ in range(rounds):
            before = {name: cpu_seconds(pid) for name, pid in pids.items()}
            speeds.append(await throughput(ports["SINK"], sink, total))
            for name, pid in pids.items():
                cpu[name].append((cpu_seconds(pid) - before[name]) * 1e9 / total)
        rtts: list[float] = []
        rtt_cpu: dict[str, list[float]] = {name: [] for name in pids}
        for _ in range(rounds):
            before = {name: cpu_seconds(pid) for name, pid in pids.items()}
            rtts.append(await round_trip_p50(ports["ECHO"], 300))
            for name, pid in pids.items():
                rtt_cpu[name].append((cpu_seconds(pid) - before[name]) * 1e6 / 300)
        setups: list[float] = []
        setup_cpu: dict[str, list[float]] = {name: [] for name in pids}
        for _ in range(rounds):
            before = {name: cpu_seconds(pid) for name, pid in pids.items()}
            setups.append(await setup_p50(ports["ECHO"], 100))
            for name, pid in pids.items():
                setup_cpu[name].append((cpu_seconds(pid) - before[name]) * 1e6 / 100)

        def spread(values: list[float], fmt: str) -> str:
            return (f"{statistics.median(values):{fmt}} "
                    f"({min(values):{fmt}}..{max(values):{fmt}})")

        rows = [("measure", f"median (min..max) of {rounds}")]
        rows.append((f"throughput {mib} MiB, MB/s", spread(speeds, ".1f")))
        for name, values in cpu.items():
            rows.append((f"CPU {name}, ms/MB", spread(values, ".2f")))
        rows.append(("round trip p50, ms", spread(rtts, ".3f")))
        for name, values in rtt_cpu.items():
            rows.append((f"CPU {name}, us/round trip", spread(values, ".0f")))
        rows.append(("setup p50, ms", spread(setups, ".3f")))
        for name, values in setup_cpu.items():
            rows.append((f"CPU {name}, us/connection", spread(values, ".0f")))
        report(rows)
    finally:
        await tunnel.stop()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    task.react(lambda r, *a: defer.ensureDeferred(main(r, *a)), sys.argv[1:])
