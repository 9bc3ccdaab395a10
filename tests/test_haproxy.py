"""
The HAProxy configuration in C{contrib/haproxy/} in front of tunnel service
nodes: HAProxy accepts it (TLS and plain), and it sends both ends of every
tunnel to one node, by the routing key of the access token in the header or
in the cookie. Skipped where HAProxy is not installed.

The nodes here are two L{TunnelService}s in the test's reactor sharing one
in-memory store (what PostgreSQL gives separate processes), each behind a
PROXY-protocol port as the README's deployment has them.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.endpoints import serverFromString
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase

from lpxy.tunnelservice.service import TunnelService
from lpxy.tunnelservice.store import MemoryTunnelStore
from tests.support.certs import make_test_pki
from tests.support.cluster import Server, TunnelPair, haproxy_config, haproxy_missing
from tests.support.processes import spawn
from tests.support.sockets import listening, unused_port
from tests.support.tunnelservice import ListeningEndpoint, api_client


def _skip_without_haproxy() -> None:
    reason = haproxy_missing()
    if reason is not None:
        raise SkipTest(reason)


class ConfigTests(TestCase):
    """HAProxy's own check accepts the template filled in, TLS or plain."""

    def check(self, text: str) -> None:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(text)
        result = subprocess.run(
            ["haproxy", "-c", "-f", path], capture_output=True, text=True, timeout=30
        )
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)

    def servers(self) -> list[Server]:
        return [Server(f"node{i}", "10.0.0.1", 8000 + i) for i in (1, 2, 3)] + [
            Server("node4", "10.0.0.1", 8004, enabled=False)
        ]

    def test_plain(self) -> None:
        _skip_without_haproxy()
        text = haproxy_config("127.0.0.1:8080", self.servers())
        self.assertIn("hash-type consistent", text)
        self.assertIn("server node4 10.0.0.1:8004 send-proxy-v2 check check-send-proxy disabled",
                      text)
        self.assertNotIn("$", text)
        self.check(text)

    def test_tls(self) -> None:
        _skip_without_haproxy()
        directory = Path(self.mktemp())
        directory.mkdir()
        pki = make_test_pki(directory)
        pem = self.mktemp()
        with open(pem, "wb") as f:
            f.write(pki.server_cert_path.read_bytes() + pki.server_key_path.read_bytes())
        self.check(haproxy_config(f"127.0.0.1:8443 ssl crt {pem} alpn http/1.1", self.servers()))


async def _wait_listening(port: int, child: Any) -> None:
    if not await listening(port, lambda: child.status is not None, timeout=10):
        if child.status is not None:
            raise AssertionError(f"haproxy ended with {child.status}:\n{child.output}")
        raise AssertionError(f"haproxy never listened on {port}:\n{child.output}")


class RoutingTests(TestCase):
    """Both ends of each tunnel meet on one node through HAProxy."""

    timeout = 60

    async def setUp(self) -> None:
        _skip_without_haproxy()
        store = MemoryTunnelStore()
        self.nodes: list[TunnelService] = []
        servers = []
        for i in range(2):
            endpoint = ListeningEndpoint(
                serverFromString(reactor, "haproxy:tcp:0:interface=127.0.0.1")
            )
            node = TunnelService(reactor, [endpoint], store=store)
            node.startService()
            self.addCleanup(node.stopService)
            port = (await endpoint.listening).getHost().port
            # No health checks: a busy test reactor answering one late would
            # take its node out, and this is about the hashing.
            servers.append(Server(f"node{i}", "127.0.0.1", port, checked=False))
            self.nodes.append(node)
        self.port = unused_port()
        config = self.mktemp()
        with open(config, "w") as f:
            f.write(haproxy_config(f"127.0.0.1:{self.port}", servers))
        self.haproxy = spawn(self, ["haproxy", "-W", "-db", "-f", os.path.abspath(config)])
        await _wait_listening(self.port, self.haproxy)

    def attached(self, node: TunnelService) -> set[str]:
        return {tunnel_id for tunnel_id, _ in node.broker._live}

    async def pairs(self, count: int, cookie: bool) -> list[TunnelPair]:
        made = []
        for i in range(count):
            opened = self.nodes[i % 2].broker.open_tunnel(["SIM"])
            pair = TunnelPair("127.0.0.1", self.port, opened.tunnel_id, opened.source_token,
                              opened.destination_token, cookie=cookie)
            self.addCleanup(pair.stop)
            made.append(pair)
        await defer.gatherResults([pair.start() for pair in made])
        return made

    async def check_routing(self, cookie: bool) -> None:
        pairs = await self.pairs(24, cookie)
        await defer.gatherResults([defer.ensureDeferred(p.round_trip()) for p in pairs])
        on = [self.attached(node) for node in self.nodes]
        # each tunnel's two ends on one node, and both nodes used
        for node in self.nodes:
            for tunnel_id in self.attached(node):
                self.assertEqual(
                    {mode for t, mode in node.broker._live if t == tunnel_id},
                    {"source", "destination"},
                )
        self.assertEqual(on[0] | on[1], {p.tunnel_id for p in pairs})
        self.assertFalse(on[0] & on[1])
        self.assertTrue(on[0] and on[1], on)

    async def test_header(self) -> None:
        """The access-token header's routing key picks the node."""
        await self.check_routing(cookie=False)

    async def test_cookie(self) -> None:
        """So does the awsiot-tunnel-token cookie's."""
        await self.check_routing(cookie=True)

    async def test_api_any_node(self) -> None:
        """API requests and health checks pass through to the nodes."""
        client = await deferToThread(api_client, f"http://127.0.0.1:{self.port}")
        answer = await deferToThread(
            client.open_tunnel, destinationConfig={"services": ["SIM"]}
        )
        self.assertIsNotNone(self.nodes[0].broker.store.get(answer["tunnelId"]))
