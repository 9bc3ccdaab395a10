"""
A smoke test of C{bench/compare.py}: C{--quick} (small sizes, one run, no
reference binary) brings up the tunnel service and an lpxy pair as
processes and prints every figure of issue 12's table with its goal;
C{--only} runs a subset and prints only its rows.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase

from tests.support.processes import run_bench

ROWS = (
    "one-way bulk",
    "1-byte round trip p50",
    "CPU per round trip, source / destination",
    "connections echoing at once, aggregate",
    "connections, proxy CPU per GiB, source / destination",
    "bulk, proxy CPU per GiB, source",
    "bulk, proxy CPU per GiB, destination",
    "tunnel service CPU per GiB, lpxy pair / C++ pair",
    "idle RSS per proxy",
    "localproxy -V / start to listening",
    "tunnel service memory per connected peer",
    "connects in one burst, all carried",
    "fairness: round trip beside a bulk stream",
)


RTT_ROWS = ("1-byte round trip p50", "CPU per round trip, source / destination")
ALWAYS = ("idle RSS per proxy",)
"""Measured whenever the pairs start, whatever C{--only} says."""


def compare(*args: str) -> Deferred[tuple[bytes, bytes, int]]:
    """Run C{python -m bench.compare ARGS} from the source tree."""
    return run_bench("compare", *args)


class CompareQuickTests(TestCase):
    timeout = 240

    def test_only_rtt(self) -> Deferred[None]:
        """
        C{--only rtt} prints the round trip's rows (and idle RSS, measured
        at the pairs' start), no row of a measurement that did not run.
        """
        def check(result: tuple[bytes, bytes, int]) -> None:
            out, err, status = result
            text = out.decode()
            self.assertEqual(status, 0, err.decode()[-2000:])
            lines = text.split("goals missed:")[0].splitlines()
            for row in ROWS:
                found = [line for line in lines if row in line]
                expected = 1 if row in RTT_ROWS + ALWAYS else 0
                self.assertEqual(len(found), expected, f"{row!r} in:\n{text}")

        return compare("--quick", "--only", "rtt").addCallback(check)

    def test_only_unknown(self) -> Deferred[None]:
        """An unknown name is refused before anything starts, naming --only and the choices."""
        def check(result: tuple[bytes, bytes, int]) -> None:
            _, err, status = result
            self.assertEqual(status, 1)
            self.assertIn("--only: unknown measurement 'rtts'", err.decode())
            self.assertIn("bulk, rtt, echo200", err.decode())

        return compare("--only", "rtt,rtts").addCallback(check)

    def test_every_row_with_its_goal(self) -> Deferred[None]:
        d = compare("--quick")

        def check(result: tuple[bytes, bytes, int]) -> None:
            out, err, status = result
            text = out.decode()
            self.assertEqual(status, 0, err.decode()[-2000:])
            lines = text.split("goals missed:")[0].splitlines()
            header = next(line for line in lines if line.startswith("figure"))
            self.assertEqual(header.split(), ["figure", "lpxy", "C++", "ratio", "goal", "met"])
            for row in ROWS:
                found = [line for line in lines if row in line]
                self.assertEqual(len(found), 1, f"{row!r} not printed once in:\n{text}")
                # Every row ends with its verdict: met, missed or not judged.
                self.assertIn(found[0].split()[-1], ("yes", "NO", "-"), found[0])
            self.assertIn("goals missed:", text)

        return d.addCallback(check)
