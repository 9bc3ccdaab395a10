"""
The cluster simulation: PostgreSQL, HAProxy and three tunnel service nodes
on loopback (L{tests.support.cluster}), hundreds of tunnels opened through
the API with boto3, and the nodes failing under them.

L{simulate} runs the scenario and returns what it measured; a broken
promise raises L{SimulationFailed} saying which. In order:

  1. C{tunnels} tunnels opened through HAProxy with boto3, each with a
     L{TunnelPair}; every tunnel carries data (an echo); their ends spread
     over the nodes.
  2. The node holding the most ends is killed with SIGKILL: every tunnel
     carries data again within C{recovery_limit} seconds (their peers
     reconnect through HAProxy to the other nodes).
  3. CloseTunnel sent to one node closes a tunnel whose connections another
     node holds; so does RotateTunnelAccessToken for the rotated end.
  4. One tunnel's peers were left without reconnecting when the node died:
     DescribeTunnel shows its ends DISCONNECTED once the dead node's lease
     lapsed.
  5. A fourth node is started and HAProxy reloaded: new tunnels land on it
     too, and the old ones carry on.
  6. A node is drained with SIGTERM: its peers are closed with 1001,
     reconnect at once, and every tunnel carries data again.

C{python -m bench.cluster_sim} runs it and prints the figures; the test
C{tests.test_cluster_simulation} runs it smaller.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from tests.support.cluster import SERVICE, Cluster, Node, TunnelPair
from tests.support.tunnelservice import api_client

__all__ = ["SimulationFailed", "SimulationResult", "simulate"]


class SimulationFailed(AssertionError):
    """The cluster broke one of its promises."""


@attrs.define
class SimulationResult:
    """What a run measured (seconds unless said)."""

    tunnels: int = 0
    opened: float = 0.0
    first_echo: float = 0.0
    spread: dict[str, int] = attrs.Factory(dict)
    killed: str = ""
    recovery: float = 0.0
    cross_node_close: float = 0.0
    cross_node_rotation: float = 0.0
    lease_cleared: float = 0.0
    added: str = ""
    added_share: tuple[int, int] = (0, 0)
    drained: str = ""
    drain_recovery: float = 0.0

    def lines(self) -> list[str]:
        """The result as lines for a person."""
        return [
            f"{self.tunnels} tunnels opened through HAProxy in {self.opened:.1f} s; "
            f"all echoing after {self.first_echo:.1f} s",
            "tunnel ends per node: "
            + ", ".join(f"{k} {v}" for k, v in sorted(self.spread.items())),
            f"{self.killed} killed (SIGKILL): every tunnel carried data again after "
            f"{self.recovery:.1f} s",
            f"CloseTunnel on another node closed the tunnel's peers after "
            f"{self.cross_node_close:.2f} s; rotation after {self.cross_node_rotation:.2f} s",
            f"the dead node's abandoned ends shown DISCONNECTED after {self.lease_cleared:.1f} s "
            "(its lease lapsed)",
            f"{self.added} added: {self.added_share[0]} of {self.added_share[1]} new tunnels "
            "on it",
            f"{self.drained} drained (SIGTERM, 1001): every tunnel carried data again after "
            f"{self.drain_recovery:.1f} s",
        ]


def _now() -> float:
    return time.monotonic()


async def _in_threads(calls: list[Callable[[], Any]]) -> list[Any]:
    return await defer.gatherResults([deferToThread(call) for call in calls],  # type: ignore[no-any-return]
                                     consumeErrors=True)


async def _echo_all(pairs: list[TunnelPair], limit: float, what: str) -> float:
    started = _now()
    # every one to its end (no timer left behind), then the first failure
    results = await defer.DeferredList(
        [defer.ensureDeferred(pair.round_trip(timeout=limit)) for pair in pairs],
        consumeErrors=True,
    )
    failed = [value for ok, value in results if not ok]
    if failed:
        raise SimulationFailed(
            f"{what}: {len(failed)} of {len(pairs)} tunnels failed, the first: "
            f"{failed[0].getErrorMessage()}"
        )
    return _now() - started


def _holders(db_url: str) -> dict[str, dict[str, str]]:
    """Each connected tunnel end's node, from the database: {tunnel id: {mode: node}}."""
    import psycopg

    held: dict[str, dict[str, str]] = collections.defaultdict(dict)
    with psycopg.connect(db_url, autocommit=True) as connection:
        for tunnel_id, mode, node in connection.execute(
            "SELECT tunnel_id, mode, node FROM tunnel_ends WHERE connected"
        ):
            held[tunnel_id][mode] = node
    return held


async def _settled(
    db_url: str, done: Callable[[dict[str, dict[str, str]]], bool], timeout: float = 10
) -> dict[str, dict[str, str]]:
    """
    The connected ends (L{_holders}) once C{done} says they are as expected,
    or as they are after C{timeout} seconds: the nodes write behind.
    """
    deadline = _now() + timeout
    while True:
        held = await deferToThread(_holders, db_url)
        if done(held) or _now() > deadline:
            return held
        await deferLater(reactor, 0.2, lambda: None)


async def _open(client: Any, count: int, cluster_url: str) -> list[TunnelPair]:
    answers = await _in_threads([
        lambda: client.open_tunnel(destinationConfig={"services": [SERVICE]},
                                   timeoutConfig={"maxLifetimeTimeoutMinutes": 60})
        for _ in range(count)
    ])
    port = int(cluster_url.rsplit(":", 1)[1])
    return [
        TunnelPair("127.0.0.1", port, a["tunnelId"], a["sourceAccessToken"],
                   a["destinationAccessToken"])
        for a in answers
    ]


async def simulate(
    db_url: str,
    directory: Path,
    tunnels: int = 300,
    added_tunnels: int = 60,
    recovery_limit: float = 10.0,
    say: Callable[[str], None] = lambda line: None,
    cleanup: Callable[[Callable[[], Any]], None] | None = None,
) -> SimulationResult:
    """
    Run the scenario (see the module's docstring) on a fresh database at
    C{db_url}, the processes' logs in C{directory}.

    @param cleanup: registers what stops the peers and the processes (a
        test's C{addCleanup}, which waits for it even when the test is
        cancelled); they are stopped at the end otherwise.
    @raise SimulationFailed: a promise was broken.
    """
    result = SimulationResult(tunnels=tunnels)
    # one caller opens hundreds of tunnels at once: above the default API rate
    cluster = Cluster(db_url, directory, node_args=["--api-rate", "1000"])
    pairs: list[TunnelPair] = []

    async def stop() -> None:
        await defer.gatherResults([defer.ensureDeferred(pair.stop()) for pair in pairs])
        await cluster.stop()

    if cleanup is not None:
        cleanup(lambda: defer.ensureDeferred(stop()))
    try:
        await cluster.start(nodes=3)
        say(f"3 nodes and HAProxy up; logs in {directory}")
        client = await deferToThread(api_client, cluster.url)

        # 1. tunnels through the API, a pair of peers each, data through each
        started = _now()
        pairs = await _open(client, tunnels, cluster.url)
        result.opened = _now() - started
        await defer.gatherResults([pair.start() for pair in pairs])
        result.first_echo = await _echo_all(pairs, 30, "first echo")
        held = await _settled(db_url, lambda held: len(held) == tunnels and all(
            len(ends) == 2 for ends in held.values()))
        spread = collections.Counter(node for ends in held.values() for node in ends.values())
        result.spread = dict(spread)
        split = [t for t, ends in held.items() if len(set(ends.values())) != 1]
        both = [t for t, ends in held.items() if len(ends) == 2]
        if split or len(both) != tunnels:
            raise SimulationFailed(
                f"{len(both)} of {tunnels} tunnels with both ends connected; "
                f"{len(split)} with their ends on two nodes"
            )
        if len(spread) != 3:
            raise SimulationFailed(f"tunnel ends not spread over the three nodes: {spread}")
        say("\n".join(result.lines()[:2]))

        # 2. the busiest node killed; one of its tunnels' peers left behind
        victim = next(n for n in cluster.nodes if n.name == spread.most_common(1)[0][0])
        abandoned = next(p for p in pairs if held[p.tunnel_id]["source"] == victim.name)
        abandoned.freeze()
        live = [p for p in pairs if p is not abandoned]
        result.killed = victim.name
        killed_at = _now()
        await cluster.kill(victim)
        result.recovery = await _echo_all(live, recovery_limit, f"after {victim.name} died")
        result.recovery = _now() - killed_at
        if result.recovery > recovery_limit:
            raise SimulationFailed(f"tunnels carried data again only after {result.recovery:.1f} s")
        say(result.lines()[2])

        # 3. CloseTunnel and rotation through a node that does not hold the tunnel
        running = [n for n in cluster.nodes if n.running]
        names = {n.name for n in running}
        held = await _settled(db_url, lambda held: all(
            set(held.get(p.tunnel_id, {}).values()) <= names
            and len(held.get(p.tunnel_id, {})) == 2 for p in live[:2]))
        result.cross_node_close = await _cross_node(
            live[0], held, running,
            lambda node, tunnel_id: api_client(node.api_url).close_tunnel(tunnelId=tunnel_id),
            "tunnel closed",
        )
        result.cross_node_rotation = await _cross_node(
            live[1], held, running,
            lambda node, tunnel_id: api_client(node.api_url).rotate_tunnel_access_token(
                tunnelId=tunnel_id, clientMode="SOURCE"),
            "access token rotated",
        )
        live = live[2:]
        say(result.lines()[3])

        # 4. the dead node's lease lapses: its abandoned ends are described disconnected
        deadline = killed_at + 30
        while True:
            state = await deferToThread(client.describe_tunnel, tunnelId=abandoned.tunnel_id)
            ends = [state["tunnel"][f"{m}ConnectionState"]["status"]
                    for m in ("source", "destination")]
            if ends == ["DISCONNECTED", "DISCONNECTED"]:
                break
            if _now() > deadline:
                raise SimulationFailed(f"the dead node's ends still described {ends} after 30 s")
            await deferLater(reactor, 0.2, lambda: None)
        result.lease_cleared = _now() - killed_at
        say(result.lines()[4])

        # 5. a node added takes its share of new tunnels; the old ones carry on
        added = await cluster.add_node()
        result.added = added.name
        new = await _open(client, added_tunnels, cluster.url)
        pairs += new
        await defer.gatherResults([pair.start() for pair in new])
        await _echo_all(new + live, 30, "after a node was added")
        held = await _settled(db_url, lambda held: all(
            len(held.get(p.tunnel_id, {})) == 2 for p in new))
        on_added = sum(1 for p in new if set(held[p.tunnel_id].values()) == {added.name})
        result.added_share = (on_added, added_tunnels)
        if on_added == 0:
            raise SimulationFailed(f"none of {added_tunnels} new tunnels went to {added.name}")
        say(result.lines()[5])

        # 6. a node drained: 1001, reconnection at once
        live = new + live
        drained = next(n for n in cluster.nodes if n.running and n is not added)
        result.drained = drained.name
        drained_at = _now()
        cluster.kill(drained, "TERM")
        await _echo_all(live, recovery_limit, f"after {drained.name} was drained")
        result.drain_recovery = _now() - drained_at
        status = await drained.process.ended  # type: ignore[union-attr]
        if status != 0:
            raise SimulationFailed(f"{drained.name} exited with {status} after SIGTERM")
        say(result.lines()[6])
        return result
    finally:
        if cleanup is None:
            await stop()


async def _cross_node(
    pair: TunnelPair,
    held: dict[str, dict[str, str]],
    running: list[Node],
    call: Callable[[Node, str], Any],
    reason: str,
) -> float:
    holder = held[pair.tunnel_id]["source"]
    other = next(n for n in running if n.name != holder)
    started = _now()
    await deferToThread(call, other, pair.tunnel_id)
    try:
        got = await pair.closed.addTimeout(5, reactor)
    except defer.TimeoutError:
        raise SimulationFailed(
            f"{reason!r} on {other.name} did not reach the peers on {holder} within 5 s"
        ) from None
    if got != reason:
        raise SimulationFailed(f"peers of a tunnel on {holder} closed with {got!r}, not {reason!r}")
    return _now() - started
