"""
End to end through a web proxy: the source proxy reaches the tunnel
service through an HTTP CONNECT proxy (a small fake one, on loopback),
with C{wss} inside the CONNECT tunnel, and echo data flows between a
client and the destination's application.
"""

from __future__ import annotations

from base64 import b64encode
from pathlib import Path
from typing import Any
from urllib.parse import quote

from attrs import evolve
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.trial.unittest import TestCase

from lpxy.proxy.config import ProxyConfig, TunnelEndpoint, WebProxy
from lpxy.proxy.service import EXIT_GAVE_UP
from lpxy.proxy.tap import Options
from tests.support.apps import connect_client, echo_round_trip, start_app
from tests.support.certs import TestPKI, make_test_pki
from tests.support.logs import LogRecorder
from tests.support.proxies import make_config, start_configured_pair, start_proxy, tcp
from tests.support.sockets import no_delay
from tests.support.tunnelservice import start_tunnelservice
from tests.support.webproxy import ConnectProxyFactory

USER = "proxy user"
PASSWORD = "pa:ss@w0rd"
AUTHORIZATION = "Basic " + b64encode(f"{USER}:{PASSWORD}".encode()).decode("ascii")


class WebProxyTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def setUp(self) -> Any:
        directory = Path(self.mktemp()).absolute()
        directory.mkdir()
        self.pki: TestPKI = make_test_pki(directory)
        self.web_proxy = ConnectProxyFactory(AUTHORIZATION)
        self.proxy_port = yield Deferred.fromCoroutine(self.web_proxy.listen(self))
        self.fixture = yield start_tunnelservice(
            self, tls=self.pki
        )
        self.service = TunnelEndpoint("127.0.0.1", self.fixture.port, tls=True)
        self.app_port, self.app = yield Deferred.fromCoroutine(start_app(self))
        self.opened = self.fixture.open_tunnel(["SSH"])

    def configs(
        self, web_proxy: WebProxy | None, **source: Any
    ) -> tuple[ProxyConfig, ProxyConfig]:
        """The destination's (direct) and the source's (through C{web_proxy})."""
        trust = {"endpoint": self.service, "capath": str(self.pki.ca_dir)}
        destination = evolve(
            make_config(self.fixture, self.opened.destination_token, "destination",
                        destination_apps={"SSH": tcp(self.app_port)}),
            **trust,
        )
        source_config = evolve(
            make_config(self.fixture, self.opened.source_token, "source",
                        source_ports={"SSH": 0}, **source),
            web_proxy=web_proxy, **trust,
        )
        return destination, source_config

    def assertConnects(self, count: int) -> None:
        """C{count} CONNECT requests, each for the service, with credentials."""
        target = f"127.0.0.1:{self.fixture.port}"
        self.assertEqual(len(self.web_proxy.requests), count)
        for request in self.web_proxy.requests:
            self.assertEqual(request.line, f"CONNECT {target} HTTP/1.1")
            self.assertEqual(request.headers["host"], target)
            self.assertEqual(request.headers["proxy-authorization"], AUTHORIZATION)
        self.assertEqual(self.web_proxy.opened, count)

    @inlineCallbacks
    def test_through_connect_proxy(self) -> Any:
        """
        One CONNECT, with the credentials; TLS to the service inside it;
        data both ways; Nagle off on the socket to the web proxy.
        """
        logs = LogRecorder(self)
        destination, source = self.configs(
            WebProxy("127.0.0.1", self.proxy_port, False, USER, PASSWORD)
        )
        pair = yield Deferred.fromCoroutine(
            start_configured_pair(self, destination, source, self.opened.tunnel_id)
        )
        for _ in range(2):
            yield Deferred.fromCoroutine(echo_round_trip(self, pair.ports["SSH"], 300_000))
        self.assertConnects(1)
        self.assertEqual(len(self.app.accepted), 2)
        protocol = pair.source.connector.protocol
        assert protocol is not None
        self.assertTrue(no_delay(protocol.transport))
        for text in logs.texts():
            self.assertNotIn(PASSWORD, text)
            self.assertNotIn(AUTHORIZATION, text)

    @inlineCallbacks
    def test_reconnect_through_proxy(self) -> Any:
        """A cut WebSocket comes back through a second CONNECT."""
        destination, source = self.configs(
            WebProxy("127.0.0.1", self.proxy_port, False, USER, PASSWORD)
        )
        pair = yield Deferred.fromCoroutine(
            start_configured_pair(self, destination, source, self.opened.tunnel_id)
        )
        client = yield Deferred.fromCoroutine(connect_client(self, pair.ports["SSH"]))
        client.transport.write(b"before")
        yield client.received(6)
        protocol = pair.source.connector.protocol
        assert protocol is not None
        # The web proxy drops the connection: the source loses its
        # WebSocket, resets the stream (closing the client), reconnects.
        [inbound] = self.web_proxy.live
        inbound.transport.abortConnection()
        yield client.closed
        yield pair.source.client.whenConnected()
        self.assertIsNot(pair.source.connector.protocol, protocol)
        yield Deferred.fromCoroutine(echo_round_trip(self, pair.ports["SSH"]))
        self.assertConnects(2)

    @inlineCallbacks
    def test_credentials_refused(self) -> Any:
        """
        A 407 is a failed attempt like any other: retried up to
        C{connect_retry_count}, then the proxy gives up; the password shows
        in no log.
        """
        logs = LogRecorder(self)
        _, source = self.configs(
            WebProxy("127.0.0.1", self.proxy_port, False, USER, "wrong"),
            connect_retry_count=1, retry_delay_ms=1,
        )
        proxy = yield Deferred.fromCoroutine(start_proxy(self, source, wait=False))
        status = yield proxy.whenDone()
        self.assertEqual(status, EXIT_GAVE_UP)
        self.assertEqual(len(self.web_proxy.requests), 2)
        self.assertEqual(self.web_proxy.opened, 0)
        failures = logs.texts("Could not connect to")
        self.assertEqual(len(failures), 2, failures)
        for text in failures:
            self.assertIn("407", text)
        for text in logs.texts():
            self.assertNotIn("wrong", text)
        self.assertFalse(self.fixture.broker.describe(self.opened.tunnel_id).source.connected)

    @inlineCallbacks
    def test_https_proxy_from_environment(self) -> Any:
        """
        The web proxy as C{https_proxy} gives it (percent-encoded
        credentials), through the real option parsing.
        """
        url = (f"http://{quote(USER, safe='')}:{quote(PASSWORD, safe='')}"
               f"@127.0.0.1:{self.proxy_port}")
        cwd = Path(self.mktemp()).absolute()
        cwd.mkdir()
        options = Options(
            environ={
                "https_proxy": url,
                "AWSIOT_TUNNEL_ACCESS_TOKEN": self.opened.source_token,
                "STATE_DIRECTORY": str(cwd / "state"),
            },
            cwd=cwd,
        )
        options.parseOptions([
            "-e", f"127.0.0.1:{self.fixture.port}",
            "--capath", str(self.pki.ca_cert_path),
            "-m", "src", "-b", "127.0.0.1",
        ])
        source: ProxyConfig = options["proxy-config"]
        self.assertEqual(
            source.web_proxy, WebProxy("127.0.0.1", self.proxy_port, False, USER, PASSWORD)
        )
        destination, _ = self.configs(None)
        pair = yield Deferred.fromCoroutine(
            start_configured_pair(self, destination, source, self.opened.tunnel_id)
        )
        yield Deferred.fromCoroutine(echo_round_trip(self, pair.ports["SSH"]))
        self.assertConnects(1)
