"""
Process tests: C{twistd -n localproxy} and the C{localproxy} console script
run as children from an installed copy, outside the source tree: help,
version, bad options, settings export, and how they end (SIGTERM, a closed
tunnel, a rejected token).
"""

from __future__ import annotations

import signal
from pathlib import Path

from twisted.internet.defer import DeferredList
from twisted.trial.unittest import TestCase

from lpxy import __version__
from tests.support.apps import connect_client, start_app
from tests.support.entrypoints import REFERENCE_TEXT
from tests.support.installed import localproxy_argv, outside_dir, twistd_argv
from tests.support.processes import ChildProcess, spawn
from tests.support.proxies import listener_ports, make_config, start_proxy
from tests.support.tunnelservice import start_tunnelservice

SECRET = "process-test-secret-token"


def twistd(*args: str) -> list[str]:
    return twistd_argv("-n", "--pidfile=", "localproxy", *args)


class EntryPointTests(TestCase):
    """
    What both commands do before any connection.
    """

    timeout = 120

    async def runChild(self, argv: list[str], env: dict[str, str] | None = None) -> ChildProcess:
        child = spawn(self, argv, env)
        await child.ended
        return child

    async def test_help(self) -> None:
        """
        C{--help} and C{-h} list every option and exit 0.
        """
        for argv in (twistd("--help"), localproxy_argv("-h")):
            child = await self.runChild(argv)
            self.assertEqual(child.status, 0, child.output)
            for name in ("--access-token", "--destination-client-type", "--config-dir"):
                self.assertIn(name, child.stdout.decode())
        self.assertIn(
            "Usage: localproxy [options]", (await self.runChild(localproxy_argv("-h"))).output
        )

    async def test_version(self) -> None:
        """
        C{-V} prints the version and exits 0.
        """
        for argv in (twistd("-V"), localproxy_argv("--version")):
            child = await self.runChild(argv)
            self.assertEqual(child.status, 0, child.output)
            self.assertEqual(child.stdout.decode(), f"localproxy (lpxy) {__version__}\n")

    async def test_exportDefaultSettings(self) -> None:
        """
        C{--export-default-settings FILE} writes the reference's file.
        """
        for index, make in enumerate((twistd, localproxy_argv)):
            path = Path(outside_dir()) / f"settings-{index}.json"
            child = await self.runChild(make("--export-default-settings", str(path)))
            self.assertEqual(child.status, 0, child.output)
            self.assertEqual(path.read_text(), REFERENCE_TEXT)

    async def test_badOptionsTwistd(self) -> None:
        """
        Under twistd a bad option exits 1; after twistd's usage text come
        the reference's reason, lpxy's line and the reference's trailer; no
        traceback, no token.
        """
        child = await self.runChild(
            twistd("-r", "us-east-1", "-e", "h", "-s", "5555"),
            {"AWSIOT_TUNNEL_ACCESS_TOKEN": SECRET},
        )
        self.assertEqual(child.status, 1, child.output)
        last = child.stdout.decode().strip().splitlines()[-3:]
        self.assertTrue(
            last[0].endswith(
                ": Must specify one and only one of --region/-r or --proxy-endpoint/-e"
                " options"
            ),
            last,
        )
        self.assertEqual(
            last[1:],
            [
                "--region/-r and --proxy-endpoint/-e are exclusive: give only one",
                "Try 'localproxy --help' for a list of options.",
            ],
        )
        self.assertNotIn("Traceback", child.output)
        self.assertNotIn(SECRET, child.output)

    async def test_badOptionsConsole(self) -> None:
        """
        The console script writes the reference's reason, lpxy's line where
        it says more, and the reference's trailer to standard error, and
        exits 1, for each kind of mistake.
        """
        cases = {
            ("-r", "us-east-1", "-s", "99999"): "Port must be between 1 and 65535",
            ("-r", "us-east-1", "-s", "1", "-v", "x"):
                "the argument ('x') for option '--verbose' is invalid",
            ("-r", "us-east-1", "-m", "sideways"):
                "Mode value is wrong! Allowed values are: src, dst, source, destination",
            ("-r", "us-east-1", "-s", "1", "--settings-json", "/nonexistent.json"):
                "/nonexistent.json: cannot open file",
            ("--colour",): "unrecognised option '--colour'",
            ("-r", "us-east-1", "-s", "1", "--settings-json", "/dev/zero"):
                "--settings-json: /dev/zero is larger than 1 MiB (or endless);"
                " expected a small text file",
        }
        for args, first in cases.items():
            child = await self.runChild(
                localproxy_argv(*args), {"AWSIOT_TUNNEL_ACCESS_TOKEN": SECRET}
            )
            self.assertEqual(child.status, 1, child.output)
            self.assertEqual(child.stdout, b"")
            lines = child.stderr.decode().splitlines()
            self.assertEqual(lines[0], first, child.output)
            self.assertEqual(lines[-1], "Try 'localproxy --help' for a list of options.")
            self.assertLessEqual(len(lines), 3, child.output)
            self.assertNotIn(SECRET, child.output)

    async def test_nonZeroStatusUnderTwistd(self) -> None:
        """
        When the proxy service ends with a status, twistd exits with it,
        after its own shutdown (a stand-in service, from a .tac file).
        """
        cwd = outside_dir()
        Path(cwd, "fake.tac").write_text(FAKE_TAC)
        child = spawn(self, twistd_argv("-n", "--pidfile=", "-y", "fake.tac"), cwd=cwd)
        status = await child.ended
        self.assertEqual(status, 3, child.output)
        self.assertIn("fake stopped", child.output)
        self.assertIn("Server Shut Down.", child.output)


# A .tac file running makeService with a service that ends with status 3 as
# soon as the reactor runs.
FAKE_TAC = """
from twisted.application import service
from twisted.internet import defer, reactor
from twisted.logger import Logger

from lpxy.proxy.tap import Options, makeService


class Fake(service.Service):
    log = Logger()

    def __init__(self, config, reactor):
        self.done = defer.Deferred()

    def startService(self):
        service.Service.startService(self)
        reactor.callLater(0, self.done.callback, 3)

    def stopService(self):
        self.log.info("fake stopped")
        return service.Service.stopService(self)

    def whenDone(self):
        return self.done


options = Options(environ={"AWSIOT_TUNNEL_ACCESS_TOKEN": "t"})
options.parseOptions(["-e", "ws://127.0.0.1:1", "-s", "5555"])
application = service.Application("fake")
makeService(options, reactor, Fake).setServiceParent(application)
"""


class LifecycleTests(TestCase):
    """
    The real proxy against a real tunnel service on loopback: exit
    statuses of both commands.
    """

    timeout = 120

    async def start(
        self, make: object, token: str | None = None, *extra: str
    ) -> tuple[ChildProcess, object]:
        fixture = await start_tunnelservice(self)
        opened = fixture.open_tunnel()
        assert callable(make)
        child = spawn(
            self,
            make("-e", f"ws://127.0.0.1:{fixture.port}", "-d", "1", *extra),
            {"AWSIOT_TUNNEL_ACCESS_TOKEN": token or opened.destination_token},
        )
        return child, (fixture, opened)

    async def signalled(self, make: object, signal: str) -> None:
        """
        A client has a stream through the proxy (the destination, here the
        child) when the signal arrives: the proxy closes the stream itself
        (its application socket, and the client's through the reset), then
        exits 0.
        """
        app_port, app = await start_app(self)
        fixture = await start_tunnelservice(self)
        opened = fixture.open_tunnel(["SSH"])
        assert callable(make)
        child = spawn(
            self,
            make("-e", f"ws://127.0.0.1:{fixture.port}", "-d", f"SSH={app_port}"),
            {"AWSIOT_TUNNEL_ACCESS_TOKEN": opened.destination_token},
        )
        await child.wait_for("Successfully established websocket connection with proxy server: ws://127.0.0.1")
        source = await start_proxy(self, make_config(
            fixture, opened.source_token, "source", source_ports={"SSH": 0},
        ))
        client = await connect_client(self, listener_ports(source)["SSH"])
        connected = app.next_connection()
        assert client.transport is not None
        client.transport.write(b"ping")
        self.assertEqual(await client.received(4), b"ping")
        served = await connected
        self.assertNoResult(client.closed)

        child.signal(signal)
        await served.closed
        await client.closed
        status = await child.ended
        self.assertEqual(status, 0, child.output)
        self.assertIn(f"Received SIG{signal}", child.output)
        # Closed by the proxy, not by the process's end.
        self.assertIn("Stream closed: service 'SSH'", child.output)
        self.assertNotIn("Traceback", child.output)

    async def test_sigtermTwistd(self) -> None:
        """
        SIGTERM ends C{twistd localproxy} with status 0, its stream closed.
        """
        await self.signalled(twistd, "TERM")

    async def test_sigtermConsole(self) -> None:
        """
        SIGTERM ends C{localproxy} with status 0, its stream closed.
        """
        await self.signalled(localproxy_argv, "TERM")

    async def test_sigintTwistd(self) -> None:
        """
        SIGINT ends C{twistd localproxy} with status 0, its stream closed.
        """
        await self.signalled(twistd, "INT")

    async def test_sigintConsole(self) -> None:
        """
        SIGINT ends C{localproxy} with status 0, its stream closed.
        """
        await self.signalled(localproxy_argv, "INT")

    async def closed(self, make: object) -> None:
        child, (fixture, opened) = await self.start(make)  # type: ignore[misc]
        await child.wait_for("Successfully established websocket connection with proxy server: ws://127.0.0.1")
        fixture.close_tunnel(opened.tunnel_id)
        status = await child.ended
        self.assertEqual(status, 0, child.output)
        self.assertIn("closed the tunnel", child.output)
        self.assertNotIn("Traceback", child.output)

    async def test_closeTunnelTwistd(self) -> None:
        """
        CloseTunnel ends C{twistd localproxy} with status 0.
        """
        await self.closed(twistd)

    async def test_closeTunnelConsole(self) -> None:
        """
        CloseTunnel ends C{localproxy} with status 0.
        """
        await self.closed(localproxy_argv)

    async def rejected(self, make: object) -> None:
        child, _ = await self.start(make, token=SECRET)
        status = await child.ended
        self.assertEqual(status, 2, child.output)
        self.assertEqual(child.output.count("refused the connection"), 1, child.output)
        # Twisted's factory chatter and Autobahn's own handshake and drop
        # lines are debug.
        self.assertNotIn("Starting factory", child.output)
        self.assertNotIn("failing WebSocket opening handshake", child.output)
        self.assertNotIn("dropping connection", child.output)
        self.assertNotIn("retrying in", child.output)
        # Nor does ClientService announce a retry, nor Autobahn warn about
        # the dropped connection: the one error line stands alone.
        self.assertNotIn("Scheduling retry", child.output)
        self.assertNotIn("#warn]", child.output)
        self.assertNotIn("[warning]", child.output)
        self.assertNotIn("Traceback", child.output)
        self.assertNotIn(SECRET, child.output)

    async def test_rejectedTwistd(self) -> None:
        """
        A token the service refuses ends C{twistd localproxy} at once with
        status 2, without retrying.
        """
        await self.rejected(twistd)

    async def test_rejectedConsole(self) -> None:
        """
        The same for C{localproxy}.
        """
        await self.rejected(localproxy_argv)

    async def quiet(self, make: object, error: str, info: str, warn: str) -> None:
        child, _ = await self.start(make, SECRET, "-v", "2")
        status = await child.ended
        self.assertEqual(status, 2, child.output)
        self.assertIn(error + " Proxy server rejected web socket upgrade request: (HTTP/1.1 401",
                      child.output)
        self.assertNotIn(info, child.output)
        self.assertNotIn(warn, child.output)

    async def test_verbosityTwistd(self) -> None:
        """
        C{-v 2} leaves only errors in twistd's log, Twisted's own lines
        included.
        """
        await self.quiet(twistd, "#error]", "#info]", "#warn]")

    async def test_verbosityConsole(self) -> None:
        """
        The same for C{localproxy}.
        """
        await self.quiet(localproxy_argv, "[error]", "[info]", "[warning]")


class ConfigSourcesTests(TestCase):
    """
    A C{--config} file, the default C{./config} directory and the
    environment together, in a real C{twistd localproxy}.
    """

    timeout = 120

    async def destination(self, mapping: str) -> tuple[ChildProcess, int]:
        fixture = await start_tunnelservice(self)
        opened = fixture.open_tunnel(["SSH1"])
        cwd = outside_dir()
        Path(cwd, "proxy.conf").write_text(
            f"# the tunnel\nproxy-endpoint = ws://127.0.0.1:{fixture.port}\nmode = dst\n"
        )
        Path(cwd, "config").mkdir()
        Path(cwd, "config", "apps.ini").write_text(mapping)
        child = spawn(
            self,
            twistd("--config", "proxy.conf"),
            {"AWSIOT_TUNNEL_ACCESS_TOKEN": opened.destination_token},
            cwd=cwd,
        )
        await child.wait_for("Successfully established websocket connection with proxy server: ws://127.0.0.1")
        fixture.close_tunnel(opened.tunnel_id)
        return child, await child.ended

    async def test_mapped(self) -> None:
        """
        The tunnel's service is found in ./config: the proxy runs until the
        tunnel is closed, then exits 0.
        """
        child, status = await self.destination("SSH1 = 2222\n")
        self.assertEqual(status, 0, child.output)
        self.assertIn("closed the tunnel", child.output)

    async def test_unmapped(self) -> None:
        """
        The tunnel's service is in no ./config file: the destination exits
        1 naming it (so the directory was what the proxy read).
        """
        child, status = await self.destination("OTHER = 2222\n")
        self.assertEqual(status, 1, child.output)
        self.assertIn("service 'SSH1' of the tunnel is found in no --config-dir file", child.output)


class LogRotationTests(TestCase):
    """
    twistd's own log file handling stays in place under C{twistd
    localproxy}: SIGUSR1 rotates C{--logfile}, as with any twistd
    application.
    """

    timeout = 120

    async def test_sigusr1RotatesLogfile(self) -> None:
        """
        SIGUSR1 moves C{--logfile} to C{.1} and goes on logging to a new
        file; the process keeps running and still ends with status 0 on
        SIGTERM.
        """
        # A plain TCP listener stands in for the tunnel endpoint: each
        # connection from the child shows that its reactor is running.
        endpoint_port, endpoint = await start_app(self, echo=False)
        cwd = outside_dir()
        Path(cwd, "settings.json").write_text(
            '{"tunneling": {"proxy": {"websocket": {"retry_delay_ms": "100"}}}}'
        )
        first = endpoint.next_connection()
        child = spawn(
            self,
            twistd_argv(
                "-n", "--pidfile=", "--logfile=proxy.log", "localproxy",
                "-e", f"ws://127.0.0.1:{endpoint_port}", "-d", "1",
                "--settings-json", "settings.json",
            ),
            {"AWSIOT_TUNNEL_ACCESS_TOKEN": SECRET},
            cwd=cwd,
        )
        connection = await first
        assert child.transport is not None
        # signalProcess takes only TERM, INT and KILL by name
        child.transport.signalProcess(signal.SIGUSR1)
        # The rotation runs in the child's reactor right after the signal;
        # the child's next connection (it retries once this one drops)
        # comes after it.
        second = endpoint.next_connection()
        assert connection.transport is not None
        connection.transport.loseConnection()
        await DeferredList([second, child.ended], fireOnOneCallback=True)
        self.assertIsNone(child.status, "SIGUSR1 ended the child:\n" + child.output)
        child.signal("TERM")
        status = await child.ended
        rotated = Path(cwd, "proxy.log.1").read_text()
        current = Path(cwd, "proxy.log").read_text()
        self.assertEqual(status, 0, rotated + current + child.output)
        self.assertIn("starting up.", rotated)
        self.assertNotIn("starting up.", current)
        self.assertNotIn("Received SIGTERM", rotated)
        self.assertIn("Received SIGTERM", current)
        self.assertIn("Server Shut Down.", current)
        self.assertNotIn(SECRET, rotated + current)
