"""
The tunnel service behind HAProxy with 1 node and with 3, side by side.

For each size, a fresh PostgreSQL database, HAProxy and that many
C{twistd tunnelservice} nodes of the installed lpxy on loopback
(L{tests.support.cluster}); then:

- new-tunnel rate: OpenTunnel through HAProxy, both ends' WebSocket
  handshakes through HAProxy, then CloseTunnel; C{TUNNELS} of them, 16 at
  a time; tunnels a second;
- aggregate throughput: 12 tunnels at once, each source pushing
  C{MIB} MiB of DATA records to its destination through HAProxy and a node;
  MB/s over all of them;
- the CPU seconds each process spent during the throughput run (nodes,
  HAProxy and this benchmark's own peers), and the machine's cores.

The goal is 3 nodes giving at least 2.5 times one node's aggregate on a
machine with the cores for it (each node is one Python process, one core
at most); on fewer cores, the nodes, HAProxy and the peers share them, and
the table shows what this machine gives. Needs PostgreSQL, psycopg and
HAProxy. Run it on a quiet machine.

    python -m bench.cluster [MIB per tunnel] [TUNNELS]
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

from twisted.internet import defer, task
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest

from bench.common import MiB, api, report
from bench.tunnelservice_relay import Pusher, connect
from lpxy.frames import Message, encode
from tests.support.cluster import Cluster, haproxy_missing

_TICK = os.sysconf("SC_CLK_TCK")
STREAMS = 12
AT_ONCE = 16


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of process C{pid} and its children so far."""
    total = 0.0
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        total = (int(fields[11]) + int(fields[12])) / _TICK
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as children:
                total += sum(cpu_seconds(int(child)) for child in children.read().split())
    except FileNotFoundError:
        pass
    return total


async def new_tunnel_rate(url: str, port: int, count: int) -> float:
    semaphore = defer.DeferredSemaphore(AT_ONCE)

    async def one() -> None:
        tunnel = await api(url, "OpenTunnel", {"destinationConfig": {"services": ["BENCH"]}})
        destination = await connect(port, "destination", tunnel["destinationAccessToken"])
        source = await connect(port, "source", tunnel["sourceAccessToken"])
        await api(url, "CloseTunnel", {"tunnelId": tunnel["tunnelId"]})
        for peer in (source, destination):
            peer.transport.loseConnection()

    started = time.perf_counter()
    await defer.gatherResults([
        semaphore.run(lambda: defer.ensureDeferred(one())) for _ in range(count)
    ])
    return count / (time.perf_counter() - started)


async def throughput(url: str, port: int, per_tunnel: int) -> float:
    pairs = []
    for _ in range(STREAMS):
        tunnel = await api(url, "OpenTunnel", {"destinationConfig": {"services": ["BENCH"]}})
        destination = await connect(port, "destination", tunnel["destinationAccessToken"],
                                    expected=per_tunnel)
        source = await connect(port, "source", tunnel["sourceAccessToken"])
        source.sendMessage(encode(Message(type=Message.STREAM_START, streamId=1,
                                          serviceId="BENCH", connectionId=1)), isBinary=True)
        pairs.append((tunnel["tunnelId"], source, destination))
    started = time.perf_counter()
    for _, source, _ in pairs:
        pusher = Pusher(source, per_tunnel)
        source.transport.registerProducer(pusher, True)
        pusher.resumeProducing()
    await defer.gatherResults([destination.factory.done for _, _, destination in pairs])
    elapsed = time.perf_counter() - started
    for tunnel_id, source, destination in pairs:
        await api(url, "CloseTunnel", {"tunnelId": tunnel_id})
        for peer in (source, destination):
            peer.transport.loseConnection()
    return STREAMS * per_tunnel / elapsed / 1e6


async def measure(nodes: int, per_tunnel: int, tunnels: int) -> list[tuple[str, ...]]:
    from tests.support.postgres import database

    url = await deferToThread(database)
    cluster = Cluster(url, Path(tempfile.mkdtemp(prefix="lpxy-bench-cluster-")), slots=nodes,
                      node_args=["--api-rate", "10000"])
    try:
        await cluster.start(nodes=nodes)
        rate = await new_tunnel_rate(cluster.url, cluster.port, tunnels)
        pids = {n.name: n.process.pid for n in cluster.nodes if n.process is not None}
        pids["haproxy"] = cluster.haproxy_pid
        pids["peers (this process)"] = os.getpid()
        before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        speed = await throughput(cluster.url, cluster.port, per_tunnel)
        cpu = {name: cpu_seconds(pid) - before[name] for name, pid in pids.items()}
    finally:
        await cluster.stop()
    rows = [(f"{nodes} node(s)", f"{rate:.0f}", f"{speed:.1f}", "", "")]
    rows += [("", "", "", name, f"{seconds:.1f}") for name, seconds in cpu.items()]
    return rows


async def main(reactor_: object, mib: str = "32", tunnels: str = "200") -> None:
    missing = haproxy_missing()
    if missing is not None:
        raise SystemExit(missing)
    try:
        from tests.support.postgres import server

        await deferToThread(server)
    except SkipTest as e:
        raise SystemExit(str(e)) from None
    load = os.getloadavg()[0]
    print(f"{os.cpu_count()} cores; load average {load:.1f}"
          + (" (busy: figures are rough)" if load >= 3 else ""))
    rows = [("cluster", "new tunnels/s", f"MB/s ({STREAMS} tunnels)", "process",
             "CPU s (throughput run)")]
    for nodes in (1, 3):
        rows += await measure(nodes, int(mib) * MiB, int(tunnels))
    report(rows)


if __name__ == "__main__":
    task.react(lambda r, *a: defer.ensureDeferred(main(r, *a)), sys.argv[1:])
