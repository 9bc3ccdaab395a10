"""
The cluster simulation (L{tests.support.simulation}): PostgreSQL, HAProxy
and three C{twistd tunnelservice} processes on loopback, 300 tunnels, a node
killed, cross-node CloseTunnel and rotation, the dead node's lease, a node
added and one drained. Skipped, saying what to install, where PostgreSQL,
psycopg or HAProxy is missing.
"""

from __future__ import annotations

import time
from pathlib import Path

from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.trial.unittest import SkipTest, TestCase

from tests.support.cluster import haproxy_missing
from tests.support.simulation import simulate


class SimulationTests(TestCase):
    # About 40 s on two idle cores; much more when other suites share them.
    timeout = 400

    async def test_simulation(self) -> None:
        missing = haproxy_missing()
        if missing is not None:
            raise SkipTest(missing)
        from tests.support.postgres import database

        url = await deferToThread(database)
        directory = Path(self.mktemp())
        directory.mkdir(parents=True)
        log = Logger()
        started = time.monotonic()
        result = await simulate(
            url, directory, tunnels=300, added_tunnels=60, cleanup=self.addCleanup,
            say=lambda line: log.info("{elapsed:.1f} s: {line}", line=line,
                                      elapsed=time.monotonic() - started),
        )
        self.assertLessEqual(result.recovery, 10.0)
        self.assertEqual(sum(result.spread.values()), 600)
        self.assertGreater(result.added_share[0], 0)
        self.assertLess(result.drain_recovery, 10.0)
