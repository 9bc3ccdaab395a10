"""
The tunnel service's CPU per GiB relayed, with the lpxy pair and, given
C{--reference PATH}, the reference C++ pair (whose 4 KiB frames are the
costly case), through one TLS tunnel service, alternated, medians.

With C{--profile SECONDS} it pauses for that long before the runs and prints
the service's pid, for C{py-spy record -p PID} during the bulk runs.

    python -m bench.service_cpu [--reference PATH] [--mib N] [--runs N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

from twisted.internet import defer, task

from bench.common import MiB, localproxy, report
from bench.compare import LPXY, REFERENCE, Pair, TestBed, bulk, sleep
from bench.proxy import throughput


async def main(reactor_: object, *argv: str) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.service_cpu",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference", metavar="PATH",
                        help="the reference proxy's localproxy binary (built from source)")
    parser.add_argument("--mib", type=int, default=128, help="MiB per bulk run")
    parser.add_argument("--runs", type=int, default=3, help="runs per pair (median)")
    parser.add_argument("--profile", type=float, default=0.0, metavar="SECONDS",
                        help="print the service's pid and wait this long before the runs")
    parser.add_argument("--only", choices=[LPXY, REFERENCE], help="one pair only")
    args = parser.parse_args(argv)

    bed = TestBed()
    pairs = [] if args.only == REFERENCE else [Pair(LPXY, localproxy)]
    if args.reference and args.only != LPXY:
        reference = str(Path(args.reference).resolve())
        pairs.append(Pair(REFERENCE, lambda *a: [reference, *a]))
    results: dict[str, list[dict[str, float]]] = {p.name: [] for p in pairs}
    try:
        await bed.start()
        for pair in pairs:
            await pair.start(bed)
            await throughput(pair.ports["SINK"], bed.sink, 8 * MiB)  # warm up
        if args.profile:
            assert bed.service is not None
            sys.stdout.write(f"service pid {bed.service.pid}\n")
            sys.stdout.flush()
            await sleep(args.profile)
        for run in range(args.runs):
            for pair in pairs if run % 2 == 0 else pairs[::-1]:
                results[pair.name].append(await bulk(bed, pair, args.mib * MiB))
    finally:
        for pair in reversed(pairs):
            await pair.stop()
        await bed.stop()
    rows = [("pair", "service s/GiB", "runs", "source s/GiB", "destination s/GiB", "MB/s")]
    for name, runs in results.items():
        med = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        rows.append((name, f"{med['service s/GiB']:.2f}",
                     " ".join(f"{r['service s/GiB']:.2f}" for r in runs),
                     f"{med['source s/GiB']:.2f}", f"{med['destination s/GiB']:.2f}",
                     f"{med['MB/s']:.0f}"))
    sys.stdout.write(f"{args.runs} runs of {args.mib} MiB, load {os.getloadavg()[0]:.2f}\n")
    report(rows)


if __name__ == "__main__":
    task.react(lambda r, *a: defer.ensureDeferred(main(r, *a)), sys.argv[1:])
