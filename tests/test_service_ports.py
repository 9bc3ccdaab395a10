"""
Tests for L{lpxy.tunnelservice.service.TunnelService}'s API-only and
data-only ports (C{--api-port}, C{--data-port}), on real loopback sockets.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import reactor
from twisted.internet.endpoints import serverFromString
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from lpxy.tunnelservice.service import TunnelService
from tests.support.tunnelservice import ListeningEndpoint, api_client

LOOPBACK = "tcp:0:interface=127.0.0.1"


def exchange(port: int, request: bytes) -> tuple[int, bytes]:
    """Send one request that asks the service to close; the status and the whole answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    return int(answer.split(b" ", 2)[1]), answer


def upgrade(token: str) -> bytes:
    return (
        "GET /tunnel?local-proxy-mode=source HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        f"Sec-WebSocket-Protocol: aws.iot.securetunneling-3.0\r\naccess-token: {token}\r\n\r\n"
    ).encode()


POST_LIST = (
    b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: 2\r\n"
    b"X-Amz-Target: IoTSecuredTunneling.ListTunnels\r\n\r\n{}"
)


class SplitPortTests(TestCase):
    """An API-only port and a data-only port, each refusing the other's requests."""

    async def start(
        self,
        endpoints: tuple[str, ...] = (),
        api_endpoints: tuple[str, ...] = (),
        data_endpoints: tuple[str, ...] = (),
    ) -> tuple[TunnelService, list[int]]:
        """Start a service on these ports; its port numbers: both, API, then data."""
        listening = [
            [ListeningEndpoint(serverFromString(reactor, e)) for e in group]
            for group in (endpoints, api_endpoints, data_endpoints)
        ]
        service = TunnelService(
            reactor, listening[0], api_endpoints=listening[1], data_endpoints=listening[2]
        )
        service.startService()
        self.addCleanup(service.stopService)
        ports = [(await e.listening).getHost().port for group in listening for e in group]
        return service, ports

    async def test_each_port_its_plane(self) -> None:
        service, (api_port, data_port) = await self.start(
            api_endpoints=(LOOPBACK,), data_endpoints=(LOOPBACK,)
        )
        opened = service.broker.open_tunnel(["SSH"])

        def listed() -> Any:
            return api_client(f"http://127.0.0.1:{api_port}").list_tunnels()
        summaries = (await deferToThread(listed))["tunnelSummaries"]
        self.assertEqual([s["tunnelId"] for s in summaries], [opened.tunnel_id])

        status, answer = await deferToThread(exchange, data_port, POST_LIST)
        self.assertEqual(status, 400)
        self.assertIn(b"this port serves tunnels only, on GET /tunnel", answer)

        status, answer = await deferToThread(exchange, api_port, upgrade(opened.source_token))
        self.assertEqual(status, 400)
        self.assertIn(b"this port serves the API only, on POST /", answer)
        self.assertFalse(service.broker.describe(opened.tunnel_id).source.connected)

        # The data port reaches the broker: an unknown token is refused by it.
        status, answer = await deferToThread(exchange, data_port, upgrade("nope"))
        self.assertEqual(status, 401)
        self.assertIn(b"Invalid access token", answer)

    async def test_both_on_port(self) -> None:
        """C{endpoints} (C{--port}) still serve both beside split ports."""
        _, (both, api_port) = await self.start((LOOPBACK,), api_endpoints=(LOOPBACK,))
        status, answer = await deferToThread(exchange, both, POST_LIST)
        self.assertEqual(status, 200, answer)
        status, answer = await deferToThread(exchange, both, upgrade("nope"))
        self.assertEqual(status, 401)
        status, answer = await deferToThread(exchange, api_port, upgrade("nope"))
        self.assertEqual(status, 400)

    async def test_open_api_rule_ignores_data_ports(self) -> None:
        """Without credentials, a data port may face the network; an API port may not."""
        _, ports = await self.start(api_endpoints=(LOOPBACK,), data_endpoints=("tcp:0",))
        self.assertEqual(len(ports), 2)
        service = TunnelService(reactor, [], api_endpoints=["tcp:0"], data_endpoints=[LOOPBACK])
        self.addCleanup(service.stopService)
        e = self.assertRaises(SystemExit, service.startService)
        self.assertIn("is reachable beyond this machine and the API has no --credentials",
                      str(e))
