"""
C{twistd tunnelservice} as a real process, run from an installed copy:
options, signals, and restarts over a persistent database.
"""

from __future__ import annotations

import json
import os
import re
import socket
from typing import Any

from botocore.exceptions import ClientError
from twisted.internet.threads import deferToThread
from twisted.python.filepath import FilePath
from twisted.trial.unittest import TestCase

from tests.support.apps import connect_client, start_app
from tests.support.installed import installed_copy, localproxy_argv, twistd_argv
from tests.support.processes import ChildProcess, spawn
from tests.support.sockets import lasting_port
from tests.support.tunnelservice import api_client

_LISTENING = re.compile(r"Tunnel service listening on 127\.0\.0\.1 port (\d+)")
# What a proxy logs each time its tunnel connection opens (plain ws://).
CONNECTED = "Successfully established websocket connection with proxy server: ws://127.0.0.1"
SERVICES = "The tunnel announced services"


class TwistdTunnelServiceTests(TestCase):
    """C{twistd -n tunnelservice} from the installed copy: API, signals, exit statuses."""

    def setUp(self) -> None:
        # building the installed copy takes a while the first time
        installed_copy()

    def spawn(self, *args: str) -> ChildProcess:
        # Persistence is not the subject here: keep no database file.
        db = () if "--db" in args else ("--db", ":memory:")
        return spawn(self, twistd_argv("-n", "--pidfile=", "tunnelservice", *db, *args))

    async def start(self, *args: str) -> tuple[ChildProcess, int]:
        process = self.spawn(*args)
        # "ready" is logged once the reactor runs, after every port listens
        await process.wait_for("Tunnel service ready")
        listening = _LISTENING.search(process.output)
        assert listening is not None, process.output
        return process, int(listening.group(1))

    async def test_open_tunnel_and_sigterm(self) -> None:
        process, port = await self.start("--port", "tcp:0:interface=127.0.0.1")

        def open_tunnel() -> dict[str, Any]:
            client = api_client(f"http://127.0.0.1:{port}")
            opened = client.open_tunnel(destinationConfig={"services": ["SSH"]})
            described = client.describe_tunnel(tunnelId=opened["tunnelId"])
            return {"opened": opened, "described": described["tunnel"]}

        result = await deferToThread(open_tunnel)
        self.assertEqual(result["described"]["status"], "OPEN")
        self.assertEqual(result["described"]["destinationConfig"]["services"], ["SSH"])
        process.signal("TERM")
        self.assertEqual(await process.ended, 0)
        output = process.output
        self.assertIn(result["opened"]["tunnelId"], output)
        self.assertNotIn(result["opened"]["sourceAccessToken"], output)
        self.assertNotIn(result["opened"]["destinationAccessToken"], output)
        # loopback only: the one line saying the API is open, nothing about other machines
        self.assertEqual(output.count("The management API is open"), 1)
        self.assertNotIn("reachable beyond", output)

    async def test_open_api_beyond_loopback_refused(self) -> None:
        process = self.spawn("--port", "tcp:0:interface=127.0.0.1", "--port", "tcp:0")
        self.assertEqual(await process.ended, 1)
        self.assertIn("is reachable beyond this machine and the API has no --credentials",
                      process.output)
        self.assertNotIn("Traceback", process.output)

    async def test_warns_beyond_loopback(self) -> None:
        process, _ = await self.start(
            "--port", "tcp:0:interface=127.0.0.1", "--port", "tcp:0", "--insecure-open-api"
        )
        self.assertIn("is reachable beyond this machine and the API is open", process.output)
        process.signal("INT")
        self.assertEqual(await process.ended, 0)

    async def test_credentials(self) -> None:
        """With --credentials, boto3 signing with the file's key works and others are refused."""
        path = FilePath(self.mktemp())
        path.setContent(
            b"[default]\naws_access_key_id = AKIDPROCESS\n"
            b"aws_secret_access_key = process-secret\n"
        )
        process, port = await self.start(
            "--port", "tcp:0:interface=127.0.0.1", "--credentials", path.path
        )

        def calls() -> tuple[int, str]:
            url = f"http://127.0.0.1:{port}"
            signed = api_client(url, "AKIDPROCESS", "process-secret")
            tunnels = signed.list_tunnels()["tunnelSummaries"]
            stranger = api_client(url, "AKIDSTRANGER", "process-secret")
            try:
                stranger.list_tunnels()
            except ClientError as e:
                return len(tunnels), e.response["Error"]["Code"]
            raise AssertionError("an unknown key was accepted")

        self.assertEqual(await deferToThread(calls), (0, "UnrecognizedClientException"))
        self.assertNotIn("The management API is open", process.output)
        self.assertNotIn("process-secret", process.output)
        process.signal("TERM")
        self.assertEqual(await process.ended, 0)

    async def test_bad_credentials_file(self) -> None:
        process = self.spawn("--credentials", self.mktemp())
        self.assertEqual(await process.ended, 1)
        self.assertIn("--credentials", process.output)
        self.assertIn("no such file", process.output)
        self.assertNotIn("Traceback", process.output)

    async def test_bad_option(self) -> None:
        process = self.spawn("--max-services", "zero")
        self.assertEqual(await process.ended, 1)
        self.assertIn("--max-services must be a positive integer", process.output)
        self.assertNotIn("Traceback", process.output)

    async def test_port_in_use(self) -> None:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen(1)
            busy = taken.getsockname()[1]
            process = self.spawn("--port", f"tcp:{busy}:interface=127.0.0.1")
            self.assertEqual(await process.ended, 1)
        self.assertIn("Address already in use", process.output)
        self.assertNotIn("Traceback", process.output)


class RestartTests(TestCase):
    """
    C{twistd -n tunnelservice --db FILE} stopped (SIGTERM, SIGKILL) and
    started again mid-session, between two real C{localproxy} processes from
    the installed copy (the source the console script keeping its made-up
    client token in C{--state-dir}, the destination C{twistd localproxy}
    given one in C{AWSIOT_TUNNEL_CLIENT_TOKEN}): the tunnel is still open,
    both proxies reconnect with their client tokens, and a new connection
    goes through.
    """

    timeout = 120

    def setUp(self) -> None:
        installed_copy()
        self.db = os.path.abspath(self.mktemp())
        # The restarted service listens on this port again.
        self.port = lasting_port()
        self.endpoint = f"ws://127.0.0.1:{self.port}"
        # Reconnect 0.1 s after the service goes instead of the reference's 2.5 s.
        settings = FilePath(self.mktemp())
        settings.setContent(json.dumps(
            {"tunneling": {"proxy": {"websocket": {"retry_delay_ms": "100"}}}}
        ).encode())
        self.settings = settings.path

    async def start_service(self) -> ChildProcess:
        process = spawn(self, twistd_argv(
            "-n", "--pidfile=", "tunnelservice", "--db", self.db,
            "--port", f"tcp:{self.port}:interface=127.0.0.1",
        ))
        await process.wait_for("Tunnel service ready")
        return process

    def call(self, name: str, **kwargs: Any) -> Any:
        """One API call, in a thread."""
        def run() -> Any:
            return getattr(api_client(f"http://127.0.0.1:{self.port}"), name)(**kwargs)

        return deferToThread(run)

    def destination(self, token: str, client_token: str, app_port: int) -> ChildProcess:
        return spawn(self, twistd_argv(
            "-n", "--pidfile=", "localproxy", "-e", self.endpoint,
            "-d", f"ECHO=127.0.0.1:{app_port}", "--settings-json", self.settings,
        ), {"AWSIOT_TUNNEL_ACCESS_TOKEN": token, "AWSIOT_TUNNEL_CLIENT_TOKEN": client_token})

    def source(self, token: str, port: int, state: str) -> ChildProcess:
        return spawn(self, localproxy_argv(
            "-e", self.endpoint, "-s", f"ECHO={port}", "-b", "127.0.0.1",
            "--settings-json", self.settings, "--state-dir", state,
        ), {"AWSIOT_TUNNEL_ACCESS_TOKEN": token})

    async def round_trip(self, source_port: int, message: bytes) -> None:
        client = await connect_client(self, source_port)
        assert client.transport is not None
        client.transport.write(message)
        self.assertEqual(await client.received(len(message)), message)
        client.transport.loseConnection()
        await client.closed

    async def restart(self, signal: str) -> None:
        app_port, _ = await start_app(self)
        service = await self.start_service()
        opened = await self.call(
            "open_tunnel", destinationConfig={"services": ["ECHO"]},
            timeoutConfig={"maxLifetimeTimeoutMinutes": 30}, tags=[{"key": "k", "value": "v"}],
        )
        tunnel_id = opened["tunnelId"]
        client_token = "destination-client-token-" + "d" * 16
        destination = self.destination(opened["destinationAccessToken"], client_token, app_port)
        await destination.wait_for(CONNECTED)
        source_port = lasting_port()
        state = os.path.abspath(self.mktemp())
        source = self.source(opened["sourceAccessToken"], source_port, state)
        await source.wait_for(f"Listening for new connection on port {source_port}")
        for mode in ("source", "destination"):
            await service.wait_for(f"Peer connected: {mode} of tunnel {tunnel_id}")
        await self.round_trip(source_port, b"before")

        # A connection opened before the restart carries data until the
        # service goes; then the proxies reset it (its stream went with the
        # WebSocket) and it is closed, not left hanging.
        open_stream = await connect_client(self, source_port)
        assert open_stream.transport is not None
        open_stream.transport.write(b"open")
        self.assertEqual(await open_stream.received(4), b"open")
        service.signal(signal)
        status = await service.ended
        self.assertEqual(status, 0 if signal == "TERM" else -9, service.output)
        await open_stream.closed

        again = await self.start_service()
        self.assertIn("1 tunnels", again.output)
        for mode in ("source", "destination"):
            await again.wait_for(f"Peer connected: {mode} of tunnel {tunnel_id}")
        # Connected is not yet ready: a source serves its clients once the
        # tunnel's services arrived, a message after the handshake's answer
        # (and a read of its own, as the service sends each at once).
        for proxy in (source, destination):
            await proxy.wait_for(SERVICES, times=2)
        await self.round_trip(source_port, b"after " + signal.encode())
        described = (await self.call("describe_tunnel", tunnelId=tunnel_id))["tunnel"]
        self.assertEqual(described["status"], "OPEN")
        self.assertEqual(described["sourceConnectionState"]["status"], "CONNECTED")
        self.assertEqual(described["destinationConnectionState"]["status"], "CONNECTED")
        self.assertEqual(described["tags"], [{"key": "k", "value": "v"}])
        self.assertEqual(described["timeoutConfig"]["maxLifetimeTimeoutMinutes"], 30)

        # Closed through the API: both proxies are told and end with 0; the
        # tunnel still describes as CLOSED after one more restart.
        await self.call("close_tunnel", tunnelId=tunnel_id)
        for proxy in (source, destination):
            self.assertEqual(await proxy.ended, 0, proxy.output)
            self.assertIn("The tunneling service closed the tunnel", proxy.output)
            self.assertNotIn("refused the connection", proxy.output)
        again.signal("TERM")
        self.assertEqual(await again.ended, 0, again.output)
        third = await self.start_service()
        described = (await self.call("describe_tunnel", tunnelId=tunnel_id))["tunnel"]
        self.assertEqual(described["status"], "CLOSED")
        third.signal("TERM")
        self.assertEqual(await third.ended, 0, third.output)

        kept = FilePath(state).children()
        self.assertEqual(len(kept), 1)
        secrets = (
            opened["sourceAccessToken"], opened["destinationAccessToken"],
            client_token, kept[0].getContent().decode().strip(),
        )
        for child in (service, again, third, source, destination):
            self.assertNotIn("Traceback", child.output)
            for secret in secrets:
                self.assertNotIn(secret, child.output)

    async def test_sigterm(self) -> None:
        await self.restart("TERM")

    async def test_sigkill(self) -> None:
        await self.restart("KILL")
