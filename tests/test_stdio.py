"""
Tests for L{lpxy.proxy.stdio}: C{--stdio SERVICE_ID}, one connection of a
source over standard input and output.

The options and the pieces are tested as plain objects; the source then
runs in the test's reactor against the real tunnel service and a
destination proxy, its standard input and output being pipes whose other
ends the test holds (C{StandardIO} on both sides).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.stdio import StandardIO
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer  # type: ignore[import-untyped]

from lpxy.proxy.channel import Channel, ServiceBinding, ServiceMismatch
from lpxy.proxy.config import ProxyConfig, resolve
from lpxy.proxy.connector import EXIT_CLOSED, EXIT_CONFIG, EXIT_GAVE_UP
from lpxy.proxy.relay import TunnelFlow
from lpxy.proxy.service import LocalProxyService
from lpxy.proxy.service_ids import ServiceMap
from lpxy.proxy.stdio import StdioRelay, StdioSource
from lpxy.proxy.tap import Options
from tests.support.apps import AppFactory, AppProtocol, start_app
from tests.support.logs import LogRecorder
from tests.support.proxies import make_config, start_proxy, tcp
from tests.support.tunnelservice import ServiceFixture, start_tunnelservice

ENV = {"AWSIOT_TUNNEL_ACCESS_TOKEN": "token"}


def resolved(*args: str) -> ProxyConfig:
    options = Options(environ=ENV, cwd=Path("/nonexistent"))
    options.parseOptions(["-e", "ws://127.0.0.1:1", *args])
    config: ProxyConfig = options["proxy-config"]
    return config


class OptionTests(SynchronousTestCase):
    """C{--stdio SERVICE_ID} as the command line gives it."""

    def refused(self, *args: str) -> str:
        with self.assertRaises(UsageError) as caught:
            resolved(*args)
        return str(caught.exception)

    def test_source(self) -> None:
        """--stdio makes a source that maps no port."""
        config = resolved("--stdio", "SSH1")
        self.assertEqual(
            (config.mode, config.stdio_service, dict(config.source_ports)),
            ("source", "SSH1", {}),
        )

    def test_fromConfigFile(self) -> None:
        """stdio = ID in a --config file does the same."""
        directory = Path(self.mktemp())
        directory.mkdir()
        (directory / "proxy.conf").write_text("stdio = HTTP\n")
        options = Options(environ=ENV, cwd=directory)
        options.parseOptions(["-e", "ws://127.0.0.1:1", "--config", "proxy.conf"])
        self.assertEqual(options["proxy-config"].stdio_service, "HTTP")

    def test_notAServiceId(self) -> None:
        """An id AWS would refuse names the option and the rule."""
        message = self.refused("--stdio", "SSH 1")
        self.assertIn("--stdio: expected the tunnel's service id", message)
        self.assertIn("a-zA-Z0-9:_-", message)

    def test_notWithMaps(self) -> None:
        """Neither -s nor -d goes with --stdio."""
        self.assertIn(
            "--stdio and --destination-app/-d are exclusive",
            self.refused("--stdio", "SSH", "-d", "22"),
        )
        self.assertIn(
            "--stdio and --source-listen-port/-s are exclusive",
            self.refused("--stdio", "SSH", "-s", "5555"),
        )

    def test_notDestination(self) -> None:
        """--stdio with -m dst is refused, naming both."""
        self.assertIn(
            "--stdio is a source, but --mode/-m is dst",
            self.refused("--stdio", "SSH", "-m", "dst"),
        )

    def test_notWithListeningOptions(self) -> None:
        """-b and --config-dir, which would do nothing, are refused."""
        self.assertIn(
            "--local-bind-address/-b is not used with --stdio",
            self.refused("--stdio", "SSH", "-b", "127.0.0.1"),
        )
        self.assertIn(
            "--config-dir is not used with --stdio",
            self.refused("--stdio", "SSH", "--config-dir", "x"),
        )

    def test_sourceModeAccepted(self) -> None:
        """-m src says what --stdio already means."""
        self.assertEqual(resolved("--stdio", "SSH", "-m", "src").mode, "source")

    def test_notUnderTwistd(self) -> None:
        """Under twistd, standard output is the log: --stdio is refused."""
        options = Options(environ=ENV)
        options.parent = {"logger": None, "logfile": None, "nodaemon": 1, "syslog": 0}
        with self.assertRaises(UsageError) as caught:
            options.parseOptions(["-e", "ws://127.0.0.1:1", "--stdio", "SSH"])
        self.assertIn(
            "--stdio is for the localproxy console script", str(caught.exception)
        )

    def test_resolveWithoutStdio(self) -> None:
        """Without --stdio nothing changes: no stdio service."""
        config = resolve(
            {"source-listen-port": "5555", "proxy-endpoint": "ws://127.0.0.1:1"},
            ENV, Path("/nonexistent"),
        )
        self.assertIsNone(config.stdio_service)


class ServiceMapTests(SynchronousTestCase):
    """The tunnel must announce --stdio's service, among any others."""

    def map(self) -> ServiceMap:
        return ServiceMap("source", ("SSH",), 3, False, 1, "SSH")

    def test_amongOthers(self) -> None:
        """Only the --stdio service is served, wherever it is listed."""
        self.assertEqual(self.map().served_ids(["A", "B", "C", "SSH"]), ["SSH"])

    def test_missing(self) -> None:
        """A tunnel without it is a mismatch naming the option and the ids."""
        with self.assertRaises(ServiceMismatch) as caught:
            self.map().served_ids(["A", "B"])
        self.assertEqual(
            str(caught.exception),
            "--stdio SSH: the tunnel has no service 'SSH' (its services: 'A', 'B');"
            " give one of them",
        )

    def test_none(self) -> None:
        """A tunnel that announces no services says so."""
        with self.assertRaises(ServiceMismatch) as caught:
            self.map().served_ids([])
        self.assertIn("(its services: none)", str(caught.exception))


class RecordingSink:
    """A relay's sink that records what the relay tells it."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.closed: list[Channel] = []

    def send_data(self, channel: Channel, payload: bytes | memoryview) -> None:
        self.sent.append(bytes(payload))

    def local_closed(self, channel: Channel) -> None:
        self.closed.append(channel)


class HalfCloseTransport(StringTransport):
    """A StringTransport that says whether it was told to close, and how."""

    disconnected = False

    def connectionLost(self, reason: Failure) -> None:
        self.disconnected = True
        assert self.protocol is not None
        self.protocol.connectionLost(reason)


def relay_on(transport: StringTransport) -> tuple[StdioRelay, RecordingSink, TunnelFlow]:
    sink, flow = RecordingSink(), TunnelFlow()
    channel = Channel(ServiceBinding("SSH", "SSH"), "SSH", 1, 1, b"")
    relay = StdioRelay(channel, sink, flow, Clock())
    transport.protocol = relay
    relay.makeConnection(transport)
    return relay, sink, flow


class StdioRelayTests(SynchronousTestCase):
    """The half-closes of standard input and output end the stream both ways."""

    def test_endOfInput(self) -> None:
        """
        End of standard input: what was read is sent, the peer is told,
        and standard output is closed after what it holds.
        """
        transport = HalfCloseTransport()
        relay, sink, _ = relay_on(transport)
        relay.dataReceived(b"last words")
        relay.deliver(b"reply")
        relay.readConnectionLost()
        self.assertEqual(sink.sent, [b"last words"])
        self.assertEqual(sink.closed, [relay.channel])
        self.assertEqual(transport.value(), b"reply")
        self.assertTrue(transport.disconnecting)
        self.assertIsNone(transport.producer)
        self.assertNoResult(relay.ended)

    def test_outputClosed(self) -> None:
        """
        Standard output closed by its reader: the peer is told, and the
        connection ends without waiting for standard input.
        """
        transport = HalfCloseTransport()
        relay, sink, _ = relay_on(transport)
        relay.writeConnectionLost()
        self.assertEqual(sink.closed, [relay.channel])
        self.assertTrue(transport.disconnected)
        self.successResultOf(relay.ended)

    def test_peerEnds(self) -> None:
        """The peer's end closes standard output and tells nobody back."""
        transport = HalfCloseTransport()
        relay, sink, _ = relay_on(transport)
        relay.close()
        self.assertTrue(transport.disconnecting)
        relay.readConnectionLost()
        self.assertEqual(sink.closed, [])

    def test_inputPausedWhileWebSocketFull(self) -> None:
        """
        Standard input is not read while the WebSocket's buffer is full
        (from the first read after it filled).
        """
        transport = HalfCloseTransport()
        relay, _, flow = relay_on(transport)
        flow.pauseProducing()
        relay.dataReceived(b"more")
        self.assertEqual(transport.producerState, "paused")
        flow.resumeProducing()
        self.assertEqual(transport.producerState, "producing")

    def test_outputFullPausesWebSocket(self) -> None:
        """A backed-up standard output stops the WebSocket's reading."""
        transport = HalfCloseTransport()
        relay, _, flow = relay_on(transport)
        self.assertIs(transport.producer, relay)
        relay.pauseProducing()
        self.assertTrue(flow.reading_paused)
        relay.resumeProducing()
        self.assertFalse(flow.reading_paused)


class StdioSourceTests(SynchronousTestCase):
    """The source's bookkeeping of its one connection."""

    def test_binding(self) -> None:
        """The binding whose key is the --stdio id."""
        source = StdioSource("SSH", lambda p: lambda: None, Clock())
        ssh = ServiceBinding("SSH", "SSH")
        self.assertIs(source.binding([ServiceBinding("A", "A"), ssh]), ssh)
        self.assertIsNone(source.binding([ServiceBinding("A", "A")]))

    def test_closedNeverStarted(self) -> None:
        """Nothing to flush when the connection never began."""
        source = StdioSource("SSH", lambda p: lambda: None, Clock())
        self.successResultOf(source.closed())

    def test_closedWaitsThenGivesUp(self) -> None:
        """
        closed() waits for standard output, at most the time limit;
        the descriptors are let go once the connection is gone.
        """
        clock = Clock()
        released: list[bool] = []
        opened: list[Protocol] = []

        def open_stdio(protocol: Protocol) -> Callable[[], None]:
            opened.append(protocol)
            return lambda: released.append(True)

        source = StdioSource("SSH", open_stdio, clock)
        transport = HalfCloseTransport()
        relay, _, _ = relay_on(transport)
        source.start(relay)
        self.assertEqual(opened, [relay])
        d = source.closed(timeout=5)
        clock.advance(4)
        self.assertNoResult(d)
        clock.advance(1)
        self.successResultOf(d)
        self.assertEqual(released, [])
        relay.connectionLost(None)
        self.assertEqual(released, [True])
        self.successResultOf(source.closed())


# --- in the reactor, through the real tunnel service ----------------------------


@implementer(IHalfCloseableProtocol)
class PipePeer(Protocol):
    """
    The test's end of the proxy's standard input and output: what it
    writes the proxy reads; what the proxy writes arrives here.
    """

    def __init__(self, input_ended: Callable[[], None]) -> None:
        self.received = bytearray()
        self.output_ended: Deferred[None] = Deferred()
        self._input_ended = input_ended
        self._waiting: list[tuple[int, Deferred[bytes]]] = []

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        waiting, self._waiting = self._waiting, []
        for size, d in waiting:
            self._check(size, d)

    def _check(self, size: int, d: Deferred[bytes]) -> None:
        if len(self.received) >= size:
            d.callback(bytes(self.received))
        else:
            self._waiting.append((size, d))

    def when_received(self, size: int) -> Deferred[bytes]:
        d: Deferred[bytes] = Deferred()
        self._check(size, d)
        return d

    def readConnectionLost(self) -> None:
        if not self.output_ended.called:
            self.output_ended.callback(None)

    def writeConnectionLost(self) -> None:
        self._input_ended()

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.readConnectionLost()


class Pipes:
    """
    Two pipes: the proxy's standard input and output, and the test's
    L{PipePeer} on their other ends. Every descriptor is closed at cleanup.
    """

    def __init__(self, case: TestCase) -> None:
        self.stdin_r, self.stdin_w = os.pipe()
        self.stdout_r, self.stdout_w = os.pipe()
        self._open = {self.stdin_r, self.stdin_w, self.stdout_r, self.stdout_w}
        self.peer = PipePeer(self._input_ended)
        self._peer_io = StandardIO(
            self.peer, stdin=self.stdout_r, stdout=self.stdin_w, reactor=reactor
        )
        self.released = False
        case.addCleanup(self._close)

    def open_stdio(self, protocol: Protocol) -> Callable[[], None]:
        """The proxy's side, as L{lpxy.proxy.stdio.standard_io} gives it."""
        StandardIO(protocol, stdin=self.stdin_r, stdout=self.stdout_w, reactor=reactor)

        def release() -> None:
            self.released = True
            self._close_fd(self.stdin_r)
            self._close_fd(self.stdout_w)

        return release

    def write(self, data: bytes) -> None:
        self._peer_io.write(data)

    def end_input(self) -> None:
        """End of file on the proxy's standard input, once written."""
        self._peer_io.loseWriteConnection()

    def _input_ended(self) -> None:
        # StandardIO leaves its descriptors open.
        self._close_fd(self.stdin_w)

    def _close_fd(self, fd: int) -> None:
        if fd in self._open:
            self._open.discard(fd)
            os.close(fd)

    def _close(self) -> None:
        if not self._peer_io.disconnected:
            self._peer_io.connectionLost(Failure(ConnectionDone()))
        self._close_fd(self.stdout_r)
        self._close_fd(self.stdin_w)
        if not self.released:
            self._close_fd(self.stdin_r)
            self._close_fd(self.stdout_w)


class StdioTunnelTests(TestCase):
    """A --stdio source through the tunnel service to a destination proxy."""

    timeout = 30

    async def start(
        self, echo: bool = True, services: list[str] | None = None, stdio: str = "SSH"
    ) -> tuple[LocalProxyService, Pipes, Any, ServiceFixture, str]:
        port, app = await start_app(self, echo=echo)
        fixture = await start_tunnelservice(self)
        opened = fixture.open_tunnel(services or ["SSH"])
        await start_proxy(self, make_config(
            fixture, opened.destination_token, "destination",
            destination_apps={name: tcp(port) for name in services or ["SSH"]},
        ))
        pipes = Pipes(self)
        config = make_config(fixture, opened.source_token, "source")
        config = ProxyConfig(**{**_fields(config), "stdio_service": stdio})
        source = LocalProxyService(config, reactor, open_stdio=pipes.open_stdio)
        source.startService()

        async def stop() -> None:
            if source.running:
                await source.stopService()

        self.addCleanup(lambda: Deferred.fromCoroutine(stop()))
        return source, pipes, app, fixture, opened.tunnel_id

    async def test_echoThenEndOfInput(self) -> None:
        """
        1 MB goes through and comes back; then the end of standard input
        ends the stream and the proxy with status 0, standard output closed.
        """
        logs = LogRecorder(self)
        source, pipes, app, _, _ = await self.start(services=["HTTP", "SSH"])
        payload = os.urandom(1_000_000)
        connected = app.next_connection()
        pipes.write(payload)
        self.assertEqual(await pipes.peer.when_received(len(payload)), payload)
        served = await connected
        pipes.end_input()
        self.assertEqual(await source.whenDone(), EXIT_CLOSED)
        await pipes.peer.output_ended
        await served.closed
        self.assertTrue(pipes.released)
        self.assertEqual(len(logs.texts("End of standard input: ending the stream")), 1)
        self.assertEqual(
            len(logs.texts("Carrying service 'SSH' over standard input and output")), 1
        )
        opened = "Stream open: service 'SSH' stream 1 connection 1, local peer standard"
        self.assertEqual(len(logs.texts(opened)), 1)

    async def test_peerEnds(self) -> None:
        """
        The application answers and closes: standard output gets all it
        sent, then its end, and the proxy ends with status 0.
        """
        source, pipes, app, _, _ = await self.start(echo=False)
        connected = app.next_connection()
        request = b"hello"
        heard = read_by_app(app, len(request))
        pipes.write(request)
        served = await connected
        # The application reads the request before answering, as a server
        # does: a socket closed with unread input is reset by the kernel,
        # which drops whatever of the answer it has not sent yet (how much
        # depends on how far the destination proxy has read).
        await heard
        payload = os.urandom(3_000_000)
        assert served.transport is not None
        served.transport.write(payload)
        served.transport.loseConnection()
        await pipes.peer.output_ended
        self.assertEqual(bytes(pipes.peer.received), payload)
        self.assertEqual(await source.whenDone(), EXIT_CLOSED)

    async def test_backedUpOutputPausesWebSocket(self) -> None:
        """
        While nobody reads standard output, the source stops reading the
        WebSocket; once read, everything arrives.
        """
        source, pipes, app, _, _ = await self.start(echo=False)
        connected = app.next_connection()
        pipes._peer_io.pauseProducing()
        pipes.write(b"go")
        served = await connected
        payload = os.urandom(4_000_000)
        assert served.transport is not None
        served.transport.write(payload)
        assert source.connector.stdio is not None
        flow = source.connector.flow
        paused: Deferred[None] = Deferred()
        add_pauser = flow.add_pauser

        def watched(pauser: Any) -> None:
            add_pauser(pauser)
            if pauser is source.connector.stdio.relay and not paused.called:
                paused.callback(None)

        flow.add_pauser = watched  # type: ignore[method-assign]
        await paused
        self.assertTrue(flow.reading_paused)
        self.assertLess(len(pipes.peer.received), len(payload))
        pipes._peer_io.resumeProducing()
        self.assertEqual(await pipes.peer.when_received(len(payload)), payload)

    async def test_tunnelClosedCutsStream(self) -> None:
        """
        The tunnel closed while the stream is open: an error line, standard
        output closed, and a non-zero status.
        """
        logs = LogRecorder(self)
        source, pipes, app, fixture, tunnel_id = await self.start()
        connected = app.next_connection()
        pipes.write(b"ping")
        await pipes.peer.when_received(4)
        await connected
        fixture.close_tunnel(tunnel_id)
        self.assertEqual(await source.whenDone(), EXIT_GAVE_UP)
        await pipes.peer.output_ended
        [line] = logs.texts("while the stream over standard input and output was open")
        self.assertIn("close code 1000", line)

    async def test_unknownService(self) -> None:
        """An id the tunnel does not announce ends the proxy with status 1."""
        logs = LogRecorder(self)
        source, pipes, _, _, _ = await self.start(services=["SSH"], stdio="HTTP")
        self.assertEqual(await source.whenDone(), EXIT_CONFIG)
        self.assertEqual(
            len(logs.texts("--stdio HTTP: the tunnel has no service 'HTTP'")), 1
        )
        self.assertFalse(pipes.released)


def read_by_app(app: AppFactory, size: int) -> Deferred[None]:
    """Fires once the application's connection has read C{size} bytes."""
    heard: Deferred[None] = Deferred()
    on_data = app.on_data

    def counted(protocol: AppProtocol, data: bytes) -> None:
        on_data(protocol, data)
        if protocol.received >= size and not heard.called:
            heard.callback(None)

    app.on_data = counted  # type: ignore[method-assign]
    return heard


def _fields(config: ProxyConfig) -> dict[str, Any]:
    import attrs

    return attrs.asdict(config, recurse=False)

