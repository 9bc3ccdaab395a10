"""
A tunnel service cluster on loopback, for the cluster tests, the simulation
(L{tests.support.simulation}, C{python -m bench.cluster_sim}) and the
cluster benchmark: a L{Cluster} is HAProxy configured from
C{contrib/haproxy/haproxy.cfg.template} in front of C{twistd tunnelservice}
processes of the installed lpxy (L{tests.support.installed}) sharing one
PostgreSQL database; L{TunnelPair}s are light tunnel peers that reconnect as
lpxy's proxies do.

Each node listens twice: behind HAProxy with the PROXY protocol (the
README's deployment) and on a plain loopback API port, so that a caller can
send an API request to one chosen node.

A L{TunnelPair} is a tunnel's two ends as bare protocol 3.0 WebSocket
peers: the destination echoes every DATA record, the source starts a
stream and waits for its echo (L{TunnelPair.round_trip}). Both ends keep
a client token, so that they rejoin their tunnel after a lost connection:
at once after a close 1001 (a node going away), after a short delay
otherwise, and never after 1000 (the tunnel was closed).
"""

from __future__ import annotations

import shutil
import socket
import string
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import txaio
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from lpxy._ws import cancel_autobahn_timers
from lpxy.frames import Message, RecordDecoder, encode
from lpxy.wire import CLOSE_GOING_AWAY, CLOSE_NORMAL, NEWEST_SUBPROTOCOL
from tests.support.logged import LoggedChild, spawn_logged
from tests.support.sockets import listening, unused_port

__all__ = [
    "HAPROXY_TEMPLATE",
    "SERVICE",
    "Cluster",
    "Node",
    "Server",
    "TunnelPair",
    "haproxy_config",
    "haproxy_missing",
]

ROOT = Path(__file__).resolve().parents[2]
HAPROXY_TEMPLATE = ROOT / "contrib" / "haproxy" / "haproxy.cfg.template"
SERVICE = "SIM"


@attrs.frozen
class Server:
    """One node as HAProxy sees it."""

    name: str
    host: str
    port: int
    enabled: bool = True
    checked: bool = True
    """Health-checked (a test of the hashing alone leaves checks out)."""

    def line(self) -> str:
        """Its C{server} line: PROXY protocol to the node, health-checked."""
        line = f"    server {self.name} {self.host}:{self.port} send-proxy-v2"
        if self.checked:
            line += " check check-send-proxy"
        return line if self.enabled else line + " disabled"


def haproxy_config(
    bind: str, servers: Sequence[Server], global_lines: Sequence[str] = ()
) -> str:
    """
    The HAProxy configuration for C{servers}: the template in C{contrib/}
    filled in (see its header for C{bind}).
    """
    template = string.Template(HAPROXY_TEMPLATE.read_text())
    return template.substitute(
        bind=bind,
        servers="\n".join(server.line() for server in servers),
        **{"global": "\n".join(f"    {line}" for line in global_lines)},
    )


def haproxy_missing() -> str | None:
    """Why HAProxy cannot be run here, or L{None} when it can."""
    if shutil.which("haproxy") is None:
        return "HAProxy is not installed (apt-get install haproxy; .ci/run does it)"
    return None


class _Peer(WebSocketClientProtocol):
    """One end of a L{TunnelPair}."""

    # at debug, Autobahn would log the request, token included
    log = txaio.make_logger(level="info")  # type: ignore[attr-defined]

    def onOpen(self) -> None:
        self._decoder = RecordDecoder()
        self.factory.pair._opened(self.factory.mode, self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        for message in self._decoder.feed(payload):
            self.factory.pair._received(self.factory.mode, self, message)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        # A close of ours the node dropped unanswered leaves a timer behind.
        cancel_autobahn_timers(self)
        self.factory.pair._closed(self.factory.mode, self, code if wasClean else None, reason)
        self.factory.gone.callback(None)


class TunnelPair:
    """
    A tunnel's source and destination, connected through C{host}:C{port}.

    @ivar closed_reason: the reason of the 1000 close that ended the
        tunnel, once one has.
    @ivar reconnections: connections opened after the first of each end.

    @param cookie: send the access token in the C{awsiot-tunnel-token}
        cookie instead of the C{access-token} header.
    """

    def __init__(
        self,
        host: str,
        port: int,
        tunnel_id: str,
        source_token: str,
        destination_token: str,
        retry_delay: float = 0.5,
        cookie: bool = False,
    ) -> None:
        self.host = host
        self.port = port
        self.tunnel_id = tunnel_id
        self._tokens = {"source": source_token, "destination": destination_token}
        self._client_tokens = {mode: uuid.uuid4().hex for mode in self._tokens}
        self._retry_delay = retry_delay
        self._cookie = cookie
        self._peers: dict[str, _Peer | None] = {"source": None, "destination": None}
        self._waiting_open: dict[str, list[defer.Deferred[None]]] = {
            mode: [] for mode in self._tokens
        }
        self._stream = 0
        self._echo: tuple[int, bytes, defer.Deferred[bool]] | None = None
        self._stopped = False
        self.closed_reason: str | None = None
        self.closed = defer.Deferred[str]()
        self.reconnections = 0
        self._connected_once: set[str] = set()
        self._attempts: set[defer.Deferred[Any]] = set()
        self._calls: list[Any] = []
        self._gone: list[defer.Deferred[None]] = []

    def start(self) -> defer.Deferred[None]:
        """Connect both ends; fire once both are open."""
        for mode in self._tokens:
            self._connect(mode)
        return defer.gatherResults([self._open(mode) for mode in self._tokens]).addCallback(
            lambda _: None
        )

    def _open(self, mode: str) -> defer.Deferred[None]:
        if self._peers[mode] is not None:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._waiting_open[mode].append(d)
        return d

    def _connect(self, mode: str) -> None:
        if self._stopped or self.closed_reason is not None:
            return
        headers = {"client-token": self._client_tokens[mode]}
        if self._cookie:
            headers["cookie"] = f"awsiot-tunnel-token={self._tokens[mode]}"
        else:
            headers["access-token"] = self._tokens[mode]
        factory = WebSocketClientFactory(
            f"ws://{self.host}:{self.port}/tunnel?local-proxy-mode={mode}",
            protocols=[NEWEST_SUBPROTOCOL],
            headers=headers,
        )
        factory.protocol = _Peer
        factory.setProtocolOptions(openHandshakeTimeout=5, autoFragmentSize=0)
        factory.pair = self
        factory.mode = mode
        factory.gone = defer.Deferred()
        self._gone.append(factory.gone)
        endpoint = TCP4ClientEndpoint(reactor, self.host, self.port, timeout=5)
        attempt = endpoint.connect(factory)
        self._attempts.add(attempt)

        def failed(_: Any) -> None:
            factory.gone.callback(None)
            self._retry(mode, self._retry_delay)

        attempt.addCallbacks(lambda _: None, failed)
        attempt.addBoth(lambda _: self._attempts.discard(attempt))

    def _retry(self, mode: str, delay: float) -> None:
        if not self._stopped and self.closed_reason is None:
            call = reactor.callLater(delay, self._connect, mode)  # type: ignore[attr-defined]
            self._calls = [c for c in self._calls if c.active()] + [call]

    def _opened(self, mode: str, peer: _Peer) -> None:
        if mode in self._connected_once:
            self.reconnections += 1
        self._connected_once.add(mode)
        self._peers[mode] = peer
        waiting, self._waiting_open[mode] = self._waiting_open[mode], []
        for d in waiting:
            d.callback(None)

    def _closed(self, mode: str, peer: _Peer, code: int | None, reason: str | None) -> None:
        if self._peers[mode] is peer:
            self._peers[mode] = None
        if code == CLOSE_NORMAL:
            if self.closed_reason is None:
                self.closed_reason = reason or ""
                self.closed.callback(self.closed_reason)
            return
        self._retry(mode, 0 if code == CLOSE_GOING_AWAY else self._retry_delay)

    def _received(self, mode: str, peer: _Peer, message: Any) -> None:
        if mode == "destination":
            if message.type == Message.DATA:
                peer.sendMessage(encode(Message(
                    type=Message.DATA, streamId=message.streamId, serviceId=message.serviceId,
                    connectionId=message.connectionId, payload=message.payload,
                )), isBinary=True)
            return
        echo = self._echo
        if echo is None or message.streamId != echo[0]:
            return
        if message.type == Message.DATA:
            self._echo = None
            echo[2].callback(message.payload == echo[1])
        elif message.type == Message.STREAM_RESET:
            self._echo = None
            echo[2].callback(False)

    async def round_trip(self, payload: bytes = b"ping", timeout: float = 10.0) -> float:
        """
        Start a stream, send C{payload} and wait for its echo, starting over
        (a new stream) until it comes back whole or C{timeout} passes.

        @return: the seconds it took.
        @raise TimeoutError: no echo within C{timeout}.
        """
        started = reactor.seconds()  # type: ignore[attr-defined]
        deadline = started + timeout
        while reactor.seconds() < deadline:  # type: ignore[attr-defined]
            if self.closed_reason is not None:
                raise TimeoutError(f"tunnel {self.tunnel_id} closed: {self.closed_reason}")
            source = self._peers["source"]
            if source is None or self._peers["destination"] is None or (
                source.state != source.STATE_OPEN
            ):
                await deferLater(reactor, 0.05, lambda: None)
                continue
            self._stream += 1
            d: defer.Deferred[bool] = defer.Deferred()
            self._echo = (self._stream, payload, d)
            source.sendMessage(
                encode(Message(type=Message.STREAM_START, streamId=self._stream,
                               serviceId=SERVICE, connectionId=1))
                + encode(Message(type=Message.DATA, streamId=self._stream,
                                 serviceId=SERVICE, connectionId=1, payload=payload)),
                isBinary=True,
            )
            d.addTimeout(1.0, reactor)
            try:
                if await d:
                    return reactor.seconds() - started  # type: ignore[attr-defined,no-any-return]
            except defer.TimeoutError:
                self._echo = None
            await deferLater(reactor, 0.05, lambda: None)
        raise TimeoutError(f"tunnel {self.tunnel_id}: no echo within {timeout} s")

    def freeze(self) -> None:
        """
        Reconnect no more, leaving the connections as they are: the peers
        of a proxy that is gone when its node dies.
        """
        self._stopped = True

    async def stop(self) -> None:
        """Close both ends (1000 from our side) and reconnect no more."""
        self._stopped = True
        for call in self._calls:
            if call.active():
                call.cancel()
        for attempt in list(self._attempts):
            attempt.cancel()
        for peer in list(self._peers.values()):
            if peer is not None and peer.state == peer.STATE_OPEN:
                peer.sendClose(CLOSE_NORMAL)
        await defer.gatherResults([g for g in self._gone if not g.called])


def _spawn(name: str, argv: list[str], directory: Path, env: dict[str, str] | None) -> LoggedChild:
    """Start a process of the cluster, its output appended to C{name}.log in C{directory}."""
    child = LoggedChild(name, directory / f"{name}.log")
    return spawn_logged(child, argv, append=True, env=env, cwd=directory)


async def _wait_port(port: int, child: LoggedChild, timeout: float = 30) -> None:
    if not await listening(port, lambda: child.ended.called, timeout):
        if child.ended.called:
            raise RuntimeError(f"{child.name} ended with {child.ended.result}:\n{child.output()}")
        raise RuntimeError(f"{child.name} never listened on {port}:\n{child.output()}")


@attrs.define
class Node:
    """One C{twistd tunnelservice} of the cluster."""

    name: str
    port: int
    """Behind HAProxy (PROXY protocol)."""
    api_port: int
    """Plain HTTP on loopback, to call this node's API directly."""
    process: LoggedChild | None = None

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def running(self) -> bool:
        return self.process is not None and not self.process.ended.called


class Cluster:
    """
    HAProxy and up to C{slots} tunnel service nodes sharing the database
    at C{db_url}, on loopback, with their logs in C{directory}.

    Each slot has a C{server} line from the start (disabled until its node
    runs); L{add_node} starts a node and reloads HAProxy's configuration,
    as an operator adding a node does.
    """

    def __init__(self, db_url: str, directory: Path, slots: int = 4,
                 node_args: Sequence[str] = ()) -> None:
        self.db_url = db_url
        self.directory = directory.resolve()
        self.nodes = [Node(f"node{i + 1}", unused_port(), unused_port()) for i in range(slots)]
        self.port = unused_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._node_args = list(node_args)
        self._config = self.directory / "haproxy.cfg"
        # (a Unix socket's path is short: not under a test's directory)
        self._stats = Path(tempfile.mkdtemp(prefix="lpxy-ha-")) / "stats.sock"
        self._haproxy: LoggedChild | None = None

    def _write_config(self) -> None:
        servers = [Server(n.name, "127.0.0.1", n.port, enabled=n.running) for n in self.nodes]
        self._config.write_text(haproxy_config(
            f"127.0.0.1:{self.port}", servers,
            [f"stats socket {self._stats} mode 600 level admin"],
        ))

    async def start(self, nodes: int = 3) -> None:
        """Start C{nodes} nodes, then HAProxy in front of them."""
        from tests.support.installed import installed_copy

        await deferToThread(installed_copy)
        await defer.gatherResults([
            defer.ensureDeferred(self._start_node(node)) for node in self.nodes[:nodes]
        ])
        self._write_config()
        self._haproxy = _spawn(
            "haproxy", ["haproxy", "-W", "-db", "-f", str(self._config)], self.directory, None
        )
        await _wait_port(self.port, self._haproxy)

    async def _start_node(self, node: Node) -> None:
        from tests.support.installed import installed_env, twistd_argv

        argv = twistd_argv(
            "-n", "--pidfile=", "tunnelservice",
            "--port", f"haproxy:tcp:{node.port}:interface=127.0.0.1",
            "--api-port", f"tcp:{node.api_port}:interface=127.0.0.1",
            "--db", self.db_url, "--node-name", node.name,
            # every peer comes from 127.0.0.1 here
            "--max-connections-per-address", "100000",
            *self._node_args,
        )
        node.process = _spawn(node.name, argv, self.directory, installed_env())
        await _wait_port(node.port, node.process)
        await _wait_port(node.api_port, node.process)

    async def add_node(self) -> Node:
        """Start the next slot's node and reload HAProxy to send it tunnels."""
        node = next(n for n in self.nodes if n.process is None)
        await self._start_node(node)
        self._write_config()
        assert self._haproxy is not None
        self._haproxy.signal("USR2")
        await self.wait_state(node.name, "UP")
        return node

    def kill(self, node: Node, signal: str = "KILL") -> defer.Deferred[int]:
        """Signal a node's process; fire with its exit status."""
        assert node.process is not None
        node.process.signal(signal)
        return node.process.ended

    @property
    def haproxy_pid(self) -> int:
        """HAProxy's master process (its worker is a child)."""
        assert self._haproxy is not None
        return self._haproxy.pid

    async def states(self) -> dict[str, str]:
        """Each server's state in the tunnels backend, as HAProxy has it (UP, DOWN, MAINT)."""
        answer = await _ask_socket(self._stats, "show stat\n")
        states = {}
        for line in answer.splitlines():
            fields = line.split(",")
            if len(fields) > 17 and fields[0] == "tunnels" and fields[1].startswith("node"):
                states[fields[1]] = fields[17].split(" ")[0]
        return states

    async def wait_state(self, name: str, state: str, timeout: float = 15) -> None:
        deadline = reactor.seconds() + timeout  # type: ignore[attr-defined]
        while reactor.seconds() < deadline:  # type: ignore[attr-defined]
            try:
                if (await self.states()).get(name) == state:
                    return
            except OSError:
                pass  # the reloading master's socket
            await deferLater(reactor, 0.1, lambda: None)
        raise RuntimeError(f"HAProxy never saw {name} {state}: {await self.states()}")

    async def stop(self) -> None:
        """Stop every node (SIGTERM, then SIGKILL after 10 s) and HAProxy."""
        children = [n.process for n in self.nodes if n.running] + (
            [self._haproxy] if self._haproxy is not None else []
        )
        for child in children:
            if child is not None and not child.ended.called:
                child.signal("TERM")
        for child in children:
            if child is None or child.ended.called:
                continue
            timer = reactor.callLater(10, child.signal, "KILL")  # type: ignore[attr-defined]
            await child.ended
            if timer.active():
                timer.cancel()


async def _ask_socket(path: Path, command: str) -> str:
    def ask() -> str:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(str(path))
            s.sendall(command.encode())
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode(errors="replace")

    return await deferToThread(ask)
