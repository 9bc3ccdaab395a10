"""
The cluster simulation on loopback: PostgreSQL, HAProxy and three
C{twistd tunnelservice} nodes of the installed lpxy; 300 tunnels opened
through the API with boto3, each with a pair of light WebSocket peers; a
node killed, a tunnel closed through another node, a node added, a node
drained (L{tests.support.simulation} says what is checked). Needs
PostgreSQL's server programs, psycopg and HAProxy.

    python -m bench.cluster_sim [TUNNELS]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from twisted.internet import defer, task
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest

from tests.support.cluster import haproxy_missing
from tests.support.simulation import simulate


async def main(reactor: object, tunnels: str = "300") -> None:
    missing = haproxy_missing()
    if missing is not None:
        raise SystemExit(missing)
    from tests.support.postgres import database

    try:
        url = await deferToThread(database)
    except SkipTest as e:
        raise SystemExit(str(e)) from None
    directory = Path(tempfile.mkdtemp(prefix="lpxy-cluster-"))
    result = await simulate(url, directory, tunnels=int(tunnels), say=print)
    print("\n".join(result.lines()))


if __name__ == "__main__":
    task.react(lambda r, *a: defer.ensureDeferred(main(r, *a)), sys.argv[1:])
