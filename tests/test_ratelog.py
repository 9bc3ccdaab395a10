"""
Tests for L{lpxy.tunnelservice.ratelog.RateLimitedLog} on a L{Clock}.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from lpxy.tunnelservice.ratelog import RateLimitedLog


class RateLimitedLogTests(SynchronousTestCase):
    """At most one report per interval, with the count."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.reports: list[tuple[float, int, str]] = []
        self.log = RateLimitedLog(
            self.clock, 10, lambda count, detail: self.reports.append(
                (self.clock.seconds(), count, detail)
            )
        )

    def test_first_at_once(self) -> None:
        self.log.event("one")
        self.assertEqual(self.reports, [(0, 1, "one")])

    def test_burst_counted(self) -> None:
        """A burst: the first at once, the rest in one report at the interval's end."""
        for n in range(500):
            self.log.event(f"n{n}")
            self.clock.advance(1 / 128)
        self.assertEqual(self.reports, [(0, 1, "n0")])
        self.clock.advance(10 - self.clock.seconds())
        self.assertEqual(len(self.reports), 2)
        self.assertEqual(self.reports[1][1:], (499, "n499"))
        self.assertEqual(self.reports[1][0], 10)

    def test_one_per_interval(self) -> None:
        for _ in range(100):
            self.log.event()
            self.log.event()
            self.clock.advance(1)
        times = [at for at, _, _ in self.reports]
        self.assertEqual(times, list(range(0, 101, 10)))
        self.clock.advance(10)
        self.assertEqual(sum(count for _, count, _ in self.reports), 200)

    def test_quiet_again(self) -> None:
        """After a quiet interval, nothing is pending and the next event is reported at once."""
        self.log.event()
        self.clock.advance(10)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(100)
        self.log.event("later")
        self.assertEqual(self.reports, [(0, 1, ""), (110, 1, "later")])

    def test_stop(self) -> None:
        """Stopping reports what is counted and leaves nothing scheduled."""
        self.log.event()
        self.log.event()
        self.log.event()
        self.log.stop()
        self.assertEqual([count for _, count, _ in self.reports], [1, 2])
        self.assertEqual(self.clock.getDelayedCalls(), [])
