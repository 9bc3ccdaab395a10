"""
C{twistd tunnelservice} as a real process, run from an installed copy.
"""

from __future__ import annotations

import re
import socket
from typing import Any

from botocore.exceptions import ClientError
from twisted.internet.threads import deferToThread
from twisted.python.filepath import FilePath
from twisted.trial.unittest import TestCase

from tests.support.installed import installed_copy, twistd_argv
from tests.support.processes import ChildProcess, spawn
from tests.support.tunnelservice import api_client

_LISTENING = re.compile(r"Tunnel service listening on 127\.0\.0\.1 port (\d+)")


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
