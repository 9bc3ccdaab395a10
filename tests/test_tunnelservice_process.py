"""
C{twistd tunnelservice} as a real process, run from an installed copy.
"""

from __future__ import annotations

import re
import signal
import socket
from typing import Any

import boto3
from twisted.internet import defer, reactor
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tests.support.installed import installed_copy, installed_env, outside_dir, twistd_argv

_LISTENING = re.compile(rb"Tunnel service listening on 127\.0\.0\.1 port (\d+)")


class _Twistd(ProcessProtocol):
    """Collects the output; lets a test wait for a pattern in it, or for the end."""

    def __init__(self) -> None:
        self.output = b""
        self.ended: defer.Deferred[int | None] = defer.Deferred()
        self._waiting: list[tuple[re.Pattern[bytes], defer.Deferred[re.Match[bytes]]]] = []

    def wait_for(self, pattern: bytes) -> defer.Deferred[re.Match[bytes]]:
        """Fire with the first match of C{pattern} in the output."""
        d: defer.Deferred[re.Match[bytes]] = defer.Deferred()
        self._waiting.append((re.compile(pattern), d))
        self._check()
        return d

    def _check(self) -> None:
        found, still = [], []
        for pattern, d in self._waiting:
            match = pattern.search(self.output)
            if match:
                found.append((d, match))
            else:
                still.append((pattern, d))
        self._waiting = still
        for d, match in found:
            d.callback(match)

    def outReceived(self, data: bytes) -> None:
        self.output += data
        self._check()

    errReceived = outReceived

    def processEnded(self, reason: Any) -> None:
        waiting, self._waiting = self._waiting, []
        for pattern, d in waiting:
            d.errback(RuntimeError(
                f"ended without {pattern.pattern!r}:\n{self.output.decode(errors='replace')}"))
        if isinstance(reason.value, (ProcessDone, ProcessTerminated)):
            self.ended.callback(reason.value.exitCode)
        else:
            self.ended.errback(reason)


class TwistdTunnelServiceTests(TestCase):
    def setUp(self) -> None:
        # building the installed copy takes a while the first time
        installed_copy()

    def spawn(self, *args: str) -> _Twistd:
        process = _Twistd()
        transport = reactor.spawnProcess(
            process,
            twistd_argv()[0],
            twistd_argv("-n", "--pidfile=", "tunnelservice", *args),
            env=installed_env(),
            path=outside_dir(),
        )

        def stop() -> defer.Deferred[int | None]:
            if not process.ended.called:
                transport.signalProcess("KILL")
            return process.ended

        self.addCleanup(stop)
        self.transport = transport
        return process

    async def start(self, *args: str) -> tuple[_Twistd, int]:
        process = self.spawn(*args)
        port = int((await process.wait_for(_LISTENING.pattern)).group(1))
        await process.wait_for(b"Tunnel service ready")
        return process, port

    async def test_open_tunnel_and_sigterm(self) -> None:
        process, port = await self.start("--port", "tcp:0:interface=127.0.0.1")

        def open_tunnel() -> dict[str, Any]:
            client = boto3.client(
                "iotsecuretunneling",
                endpoint_url=f"http://127.0.0.1:{port}",
                region_name="us-east-1",
                aws_access_key_id="x",
                aws_secret_access_key="x",
            )
            opened = client.open_tunnel(destinationConfig={"services": ["SSH"]})
            described = client.describe_tunnel(tunnelId=opened["tunnelId"])
            return {"opened": opened, "described": described["tunnel"]}

        result = await deferToThread(open_tunnel)
        self.assertEqual(result["described"]["status"], "OPEN")
        self.assertEqual(result["described"]["destinationConfig"]["services"], ["SSH"])
        self.transport.signalProcess(signal.SIGTERM)
        self.assertEqual(await process.ended, 0)
        output = process.output
        self.assertIn(result["opened"]["tunnelId"].encode(), output)
        self.assertNotIn(result["opened"]["sourceAccessToken"].encode(), output)
        self.assertNotIn(result["opened"]["destinationAccessToken"].encode(), output)
        self.assertNotIn(b"not verified", output)  # loopback only: no warning

    async def test_warns_beyond_loopback(self) -> None:
        process, _ = await self.start(
            "--port", "tcp:0:interface=127.0.0.1", "--port", "tcp:0"
        )
        self.assertIn(b"signatures are not verified", process.output)
        self.transport.signalProcess(signal.SIGINT)
        self.assertEqual(await process.ended, 0)

    async def test_bad_option(self) -> None:
        process = self.spawn("--max-services", "zero")
        self.assertEqual(await process.ended, 1)
        self.assertIn(b"--max-services must be a positive integer", process.output)
        self.assertNotIn(b"Traceback", process.output)

    async def test_port_in_use(self) -> None:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen(1)
            busy = taken.getsockname()[1]
            process = self.spawn("--port", f"tcp:{busy}:interface=127.0.0.1")
            self.assertEqual(await process.ended, 1)
        self.assertIn(b"Address already in use", process.output)
        self.assertNotIn(b"Traceback", process.output)
