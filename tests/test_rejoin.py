"""
Process tests: a proxy killed with SIGKILL and started again with the same
environment (same access token, no C{-i}, same state directory) rejoins
its tunnel, because it sends the client token it kept; a spent or rotated
token still ends it with status 2; a source whose port is busy ends with
status 1 before it spends its token.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from twisted.trial.unittest import TestCase

from tests.support.apps import connect_client, echo_round_trip, start_app
from tests.support.installed import localproxy_argv, twistd_argv
from tests.support.processes import ChildProcess, spawn
from tests.support.proxies import listener_ports, make_config, start_proxy, tcp
from tests.support.sockets import unused_port
from tests.support.tunnelservice import ServiceFixture, start_tunnelservice

# A plain-text endpoint: -e ws://...
CONNECTED = "Successfully established websocket connection with proxy server: ws://127.0.0.1"


class RejoinTests(TestCase):
    """
    A restarted source or destination rejoins; other tokens do not.
    """

    timeout = 120

    async def setUp(self) -> None:
        self.fixture: ServiceFixture = await start_tunnelservice(self)
        self.tunnel = self.fixture.open_tunnel(["ECHO"])
        self.echo_port, _ = await start_app(self)
        self.endpoint = f"ws://127.0.0.1:{self.fixture.port}"
        self.state = str(Path(self.mktemp()).resolve())

    def source(self, port: int, state: str | None = None) -> ChildProcess:
        """The C{localproxy} source, its token from the environment."""
        return spawn(self, localproxy_argv(
            "-e", self.endpoint, "-s", f"ECHO={port}", "-b", "127.0.0.1",
            "--state-dir", state or self.state,
        ), {"AWSIOT_TUNNEL_ACCESS_TOKEN": self.tunnel.source_token})

    def destination(self, token: str | None = None) -> ChildProcess:
        """The C{twistd localproxy} destination, its state in C{STATE_DIRECTORY}."""
        return spawn(self, twistd_argv(
            "-n", "--pidfile=", "localproxy", "-e", self.endpoint,
            "-d", f"ECHO=127.0.0.1:{self.echo_port}",
        ), {
            "AWSIOT_TUNNEL_ACCESS_TOKEN": token or self.tunnel.destination_token,
            "STATE_DIRECTORY": self.state,
        })

    async def killed(self, child: ChildProcess) -> None:
        child.signal("KILL")
        self.assertEqual(await child.ended, -9)

    async def refused(self, child: ChildProcess, token: str) -> None:
        """C{child} ends with status 2 saying the service refused it."""
        status = await child.ended
        self.assertEqual(status, 2, child.output)
        self.assertIn("refused the connection", child.output)
        self.assertNotIn("Traceback", child.output)
        self.assertNotIn(token, child.output)

    async def test_sourceRestarted(self) -> None:
        """
        A source killed mid-session and started again reconnects; a new
        connection goes end to end; the client of the killed one was closed.
        """
        await start_proxy(self, make_config(
            self.fixture, self.tunnel.destination_token, "destination",
            destination_apps={"ECHO": tcp(self.echo_port)},
        ))
        port = unused_port()
        first = self.source(port)
        await first.wait_for(f"Listening for new connection on port {port}")
        await echo_round_trip(self, port)
        client = await connect_client(self, port)
        assert client.transport is not None
        client.transport.write(b"mid-session")
        self.assertEqual(await client.received(11), b"mid-session")

        await self.killed(first)
        await client.closed
        second = self.source(port)
        await second.wait_for(f"Listening for new connection on port {port}")
        await echo_round_trip(self, port, 300_000)
        self.assertNotIn("refused", second.output)
        self.assertNotIn("Traceback", second.output)
        self.assertNotIn(self.tunnel.source_token, first.output + second.output)
        second.signal("TERM")
        self.assertEqual(await second.ended, 0, second.output)

    async def test_destinationRestarted(self) -> None:
        """
        A destination killed mid-session and started again reconnects; a
        new connection through the source reaches the application again.
        """
        first = self.destination()
        await first.wait_for(CONNECTED)
        source = await start_proxy(self, make_config(
            self.fixture, self.tunnel.source_token, "source", source_ports={"ECHO": 0},
        ))
        port = listener_ports(source)["ECHO"]
        await echo_round_trip(self, port)
        client = await connect_client(self, port)
        assert client.transport is not None
        client.transport.write(b"mid-session")
        self.assertEqual(await client.received(11), b"mid-session")

        await self.killed(first)
        # The service resets the source's streams when its partner leaves.
        await client.closed
        second = self.destination()
        await second.wait_for(CONNECTED)
        await echo_round_trip(self, port, 300_000)
        self.assertNotIn("refused", second.output)
        self.assertNotIn("Traceback", second.output)
        second.signal("TERM")
        self.assertEqual(await second.ended, 0, second.output)

    async def test_otherStateDirectory(self) -> None:
        """
        Started with another state directory, a killed source sends
        another client token: its access token is spent, status 2.
        """
        port = unused_port()
        first = self.source(port)
        await first.wait_for(CONNECTED)
        await self.killed(first)
        await self.refused(
            self.source(port, str(Path(self.mktemp()).resolve())), self.tunnel.source_token
        )

    async def test_rotated(self) -> None:
        """
        After RotateTunnelAccessToken, a restarted destination with the old
        token is refused, status 2, its kept client token notwithstanding.
        """
        first = self.destination()
        await first.wait_for(CONNECTED)
        self.fixture.broker.rotate(self.tunnel.tunnel_id, "destination")
        # Rotation closes the live connection: Close 1000, status 0.
        self.assertEqual(await first.ended, 0, first.output)
        await self.refused(self.destination(), self.tunnel.destination_token)


class BindFirstTests(TestCase):
    """
    A source binds its ports before it connects.
    """

    timeout = 60

    async def busy(self, make: Callable[..., list[str]]) -> None:
        """
        A busy port ends the source at once with status 1 and the
        reference's words, without connecting: its access token is unspent,
        so a source with another client token is accepted afterwards.
        """
        fixture = await start_tunnelservice(self)
        tunnel = fixture.open_tunnel(["ECHO"])
        busy, _ = await start_app(self)
        child = spawn(self, make(
            "-e", f"ws://127.0.0.1:{fixture.port}", "-s", f"ECHO={busy}", "-b", "127.0.0.1",
            "--state-dir", self.mktemp(),
        ), {"AWSIOT_TUNNEL_ACCESS_TOKEN": tunnel.source_token})
        status = await child.ended
        self.assertEqual(status, 1, child.output)
        self.assertEqual(child.output.count(
            f"Could not bind to address: 127.0.0.1:{busy} -- Address already in use"
        ), 1, child.output)
        self.assertNotIn(CONNECTED, child.output)
        self.assertNotIn("Traceback", child.output)
        await start_proxy(self, make_config(
            fixture, tunnel.source_token, "source", source_ports={"ECHO": 0},
            connect_retry_count=0,
        ))

    async def test_busyPortConsole(self) -> None:
        """
        C{localproxy} with a busy port.
        """
        await self.busy(localproxy_argv)

    async def test_busyPortTwistd(self) -> None:
        """
        C{twistd localproxy} with a busy port (bound in
        C{privilegedStartService}).
        """
        await self.busy(lambda *args: twistd_argv("-n", "--pidfile=", "localproxy", *args))
