"""
End to end over TLS: the tunnel service on a TLS port with a certificate
from a test CA made here, a destination and a source proxy talking C{wss}
to it, echo data through them; trust from C{--capath} (a hashed directory or
a PEM bundle), none (refused) and C{-k}; C{TCP_NODELAY} on every real
socket.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from attrs import evolve
from OpenSSL import SSL
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.trial.unittest import TestCase

from lpxy.proxy.config import ProxyConfig, TunnelEndpoint
from lpxy.proxy.service import EXIT_GAVE_UP
from tests.support.apps import (
    AppFactory,
    AppProtocol,
    Pusher,
    connect_client,
    echo_round_trip,
    start_app,
)
from tests.support.certs import TestPKI, make_test_pki
from tests.support.logs import LogRecorder
from tests.support.proxies import make_config, start_configured_pair, start_proxy, tcp
from tests.support.sockets import buffered, no_delay
from tests.support.tunnelservice import ServiceFixture, start_tunnelservice
from tests.support.waiting import gather, turns


def over_tls(
    config: ProxyConfig, fixture: ServiceFixture, capath: str | Path | None,
    verify: bool = True, host: str = "127.0.0.1",
) -> ProxyConfig:
    """C{config}, reaching C{fixture}'s TLS port with this trust."""
    return evolve(
        config,
        endpoint=TunnelEndpoint(host, fixture.port, tls=True),
        capath=None if capath is None else str(capath),
        verify_ssl=verify,
    )


class TLSTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def setUp(self) -> Any:
        directory = Path(self.mktemp())
        directory.mkdir()
        self.pki: TestPKI = make_test_pki(directory)
        self.fixture = yield start_tunnelservice(
            self, tls=self.pki
        )
        self.app_port, self.app = yield Deferred.fromCoroutine(start_app(self))
        self.opened = self.fixture.open_tunnel(["SSH"])

    def configs(
        self, capath: str | Path | None, verify: bool = True, **source: Any
    ) -> tuple[ProxyConfig, ProxyConfig]:
        """The destination's (trusting the test CA) and the source's."""
        destination = over_tls(
            make_config(self.fixture, self.opened.destination_token, "destination",
                        destination_apps={"SSH": tcp(self.app_port)}),
            self.fixture, self.pki.ca_dir,
        )
        source_config = over_tls(
            make_config(self.fixture, self.opened.source_token, "source",
                        source_ports={"SSH": 0}, **source),
            self.fixture, capath, verify,
        )
        return destination, source_config

    @inlineCallbacks
    def relay(self, capath: str | Path | None, verify: bool = True) -> Any:
        destination, source = self.configs(capath, verify)
        pair = yield Deferred.fromCoroutine(
            start_configured_pair(self, destination, source, self.opened.tunnel_id)
        )
        for _ in range(2):
            yield Deferred.fromCoroutine(echo_round_trip(self, pair.ports["SSH"], 300_000))
        return pair

    @inlineCallbacks
    def refused(self, capath: str | Path | None) -> Any:
        """
        A source that does not trust the test CA never gets through: every
        attempt fails on the certificate and is retried, up to
        C{connect_retry_count}; the last one ends the proxy with
        L{EXIT_GAVE_UP}.
        It never listened, the service never saw it, no stream started.
        """
        logs = LogRecorder(self)
        destination, source = self.configs(
            capath, connect_retry_count=2, retry_delay_ms=1
        )
        dst = yield Deferred.fromCoroutine(start_proxy(self, destination))
        src = yield Deferred.fromCoroutine(start_proxy(self, source, wait=False))
        status = yield src.whenDone()
        self.assertEqual(status, EXIT_GAVE_UP)
        # Three attempts: two retried, the last one ends it (no "retrying"
        # line for a retry that never comes).
        failures = logs.texts("Could not connect to the tunneling service")
        self.assertEqual(len(failures), 2, failures)
        given_up = logs.texts("Giving up")
        self.assertEqual(len(given_up), 1)
        for text in failures + given_up:
            self.assertIn("certificate verify failed", text)
        listeners = src.connector.listeners
        assert listeners is not None
        self.assertFalse(listeners.started)
        self.assertFalse(self.fixture.broker.describe(self.opened.tunnel_id).source.connected)
        self.assertEqual(dst.connector.flow.relays, set())
        self.assertEqual(self.app.accepted, [])
        self.assertNoResult(dst.whenDone())

    def test_refused_without_trust(self) -> Any:
        return self.refused(None)

    def test_refused_other_ca(self) -> Any:
        """A C{--capath} of another CA does not make the service trusted."""
        directory = Path(self.mktemp())
        directory.mkdir()
        return self.refused(make_test_pki(directory).ca_dir)

    def test_capath_hashed_directory(self) -> Any:
        return self.relay(self.pki.ca_dir)

    def test_capath_bundle_file(self) -> Any:
        return self.relay(self.pki.ca_cert_path)

    @inlineCallbacks
    def test_no_verify(self) -> Any:
        """C{-k}: the untrusted service is accepted, with a loud warning."""
        logs = LogRecorder(self)
        yield self.relay(None, verify=False)
        warnings = logs.texts("TLS verification of 127.0.0.1 is DISABLED")
        self.assertEqual(len(warnings), 1)

    @inlineCallbacks
    def test_tcp_nodelay(self) -> Any:
        """
        Nagle is off on the socket under each proxy's TLS WebSocket, and
        on the local sockets at both ends (client side and app side).
        """
        destination, source = self.configs(self.pki.ca_dir)
        pair = yield Deferred.fromCoroutine(
            start_configured_pair(self, destination, source, self.opened.tunnel_id)
        )
        client = yield Deferred.fromCoroutine(connect_client(self, pair.ports["SSH"]))
        client.transport.write(b"hello")
        yield client.received(5)
        for proxy in (pair.source, pair.destination):
            protocol = proxy.connector.protocol
            assert protocol is not None
            # The WebSocket runs over TLS: its transport is not the socket's.
            self.assertIsInstance(protocol.transport.getHandle(), SSL.Connection)
            self.assertTrue(no_delay(protocol.transport))
            [relay] = proxy.connector.flow.relays
            self.assertTrue(no_delay(relay.transport))

    @inlineCallbacks
    def test_host_name_and_sni(self) -> Any:
        """
        By host name: the certificate's DNS name is checked, and the
        service sees it as SNI.
        """
        destination, source = self.configs(self.pki.ca_cert_path)
        source = over_tls(source, self.fixture, self.pki.ca_cert_path, host="localhost")
        pair = yield Deferred.fromCoroutine(
            start_configured_pair(self, destination, source, self.opened.tunnel_id)
        )
        yield Deferred.fromCoroutine(echo_round_trip(self, pair.ports["SSH"]))
        protocol = pair.source.connector.protocol
        assert protocol is not None
        self.assertEqual(protocol.transport.getHandle().get_servername(), b"localhost")
        peer = self.fixture.server_side(self.opened.tunnel_id, "source")
        self.assertEqual(peer.transport.getHandle().get_servername(), b"localhost")

    @inlineCallbacks
    def test_cut_and_reconnect(self) -> Any:
        """
        The TCP connection under the source's TLS WebSocket is cut: the
        stream ends, the proxy reconnects over TLS and carries new data.
        """
        destination, source = self.configs(self.pki.ca_dir)
        pair = yield Deferred.fromCoroutine(
            start_configured_pair(self, destination, source, self.opened.tunnel_id)
        )
        client = yield Deferred.fromCoroutine(connect_client(self, pair.ports["SSH"]))
        client.transport.write(b"before")
        yield client.received(6)
        protocol = pair.source.connector.protocol
        assert protocol is not None
        protocol.transport.transport.abortConnection()
        yield client.closed
        yield pair.source.client.whenConnected()
        self.assertIsNot(pair.source.connector.protocol, protocol)
        yield Deferred.fromCoroutine(echo_round_trip(self, pair.ports["SSH"]))

    @inlineCallbacks
    def test_close_tunnel_exits_zero(self) -> Any:
        """CloseTunnel reaches both proxies through TLS: both end with 0."""
        destination, source = self.configs(self.pki.ca_dir)
        pair = yield Deferred.fromCoroutine(
            start_configured_pair(self, destination, source, self.opened.tunnel_id)
        )
        client = yield Deferred.fromCoroutine(connect_client(self, pair.ports["SSH"]))
        client.transport.write(b"ping")
        yield client.received(4)
        self.fixture.close_tunnel(self.opened.tunnel_id)
        statuses = yield gather(pair.source.whenDone(), pair.destination.whenDone())
        self.assertEqual(statuses, [0, 0])
        yield client.closed

    @inlineCallbacks
    def test_stop_with_bytes_unsent(self) -> Any:
        """
        Stopping a source while its WebSocket's socket holds bytes (the
        service not reading them, under TLS) queues no Close while they
        wait; once the service reads again, the Close follows them (the
        drained edge) and the close handshake ends with 1000.
        """
        logs = LogRecorder(self)
        pair = yield self.relay(self.pki.ca_dir)
        server_side = self.fixture.server_side(self.opened.tunnel_id, "source")
        server_side.transport.pauseProducing()
        client = yield Deferred.fromCoroutine(connect_client(self, pair.ports["SSH"]))
        Pusher(client.transport, 64 * 1024 * 1024).resumeProducing()
        protocol = pair.source.connector.protocol
        for _ in range(5000):
            if buffered(protocol.transport):
                break
            yield turns(1)
        self.assertGreater(buffered(protocol.transport), 0)
        stopped = pair.source.stopService()
        yield turns(20)
        self.assertNoResult(stopped)
        self.assertEqual(protocol.state, protocol.STATE_OPEN)  # no Close queued
        server_side.transport.resumeProducing()
        yield stopped
        yield logs.when("Peer disconnected: source")
        [line] = logs.texts("Peer disconnected: source")
        self.assertIn("(1000 local proxy stopping;", line)

    @inlineCallbacks
    def test_untrusted_retried_for_ever(self) -> Any:
        """
        With the default C{connect_retry_count} of -1 a certificate
        failure is retried without end; stopping the proxy then leaves
        nothing behind.
        """
        logs = LogRecorder(self)
        _, source = self.configs(None, retry_delay_ms=1)
        proxy = yield Deferred.fromCoroutine(start_proxy(self, source, wait=False))
        yield logs.when("Could not connect to the tunneling service", 5)
        self.assertNoResult(proxy.whenDone())
        yield proxy.stopService()
        self.assertFalse(proxy.client.running)
        self.assertEqual(logs.texts("Giving up"), [])

    @inlineCallbacks
    def test_destination_cut(self) -> Any:
        """
        The destination's TLS connection is cut: the service resets the
        source's stream (its client is closed), the destination
        reconnects, and the next client gets through.
        """
        destination, source = self.configs(self.pki.ca_dir)
        pair = yield Deferred.fromCoroutine(
            start_configured_pair(self, destination, source, self.opened.tunnel_id)
        )
        client = yield Deferred.fromCoroutine(connect_client(self, pair.ports["SSH"]))
        client.transport.write(b"before")
        yield client.received(6)
        [app_side] = self.app.accepted
        protocol = pair.destination.connector.protocol
        assert protocol is not None
        protocol.transport.transport.abortConnection()
        yield gather(client.closed, app_side.closed)
        yield pair.destination.client.whenConnected()
        self.assertIsNot(pair.destination.connector.protocol, protocol)
        # The source kept its WebSocket.
        self.assertIsNotNone(pair.source.connector.protocol)
        yield Deferred.fromCoroutine(echo_round_trip(self, pair.ports["SSH"]))


class SlowReaderTLSTests(TestCase):
    """
    Flow control holds under TLS, where each WebSocket sits on Twisted's
    TLS layer: pushing far more than any buffer into an application that
    reads slowly keeps what every proxy holds small.
    """

    timeout = 120

    @inlineCallbacks
    def test_memory_bounded(self) -> Any:
        total = 48 * 1024 * 1024
        worst = [0]
        reads = [0]
        done: Deferred[None] = Deferred()
        pair: Any = None

        def held(proxy: Any) -> int:
            size = sum(buffered(r.transport) + r.pending_size
                       for r in proxy.connector.flow.relays)
            protocol = proxy.connector.protocol
            if protocol is not None:
                size += buffered(protocol.transport)
                size += sum(len(b) for b in getattr(protocol.transport, "_appSendBuffer", []))
            return size

        class Slow(AppFactory):
            def on_data(self, protocol: AppProtocol, data: bytes) -> None:
                reads[0] += 1
                worst[0] = max(worst[0], held(pair.source), held(pair.destination))
                if protocol.received >= total:
                    if not done.called:
                        done.callback(None)
                    return
                transport: Any = protocol.transport
                transport.pauseProducing()
                turns(4).addCallback(lambda _: transport.resumeProducing())

        directory = Path(self.mktemp()).absolute()
        directory.mkdir()
        pki = make_test_pki(directory)
        fixture = yield start_tunnelservice(
            self, tls=pki
        )
        app_port, _ = yield Deferred.fromCoroutine(start_app(self, factory=Slow(echo=False)))
        opened = fixture.open_tunnel(["BULK"])
        destination = over_tls(
            make_config(fixture, opened.destination_token, "destination",
                        destination_apps={"BULK": tcp(app_port)}),
            fixture, pki.ca_dir,
        )
        source = over_tls(
            make_config(fixture, opened.source_token, "source", source_ports={"BULK": 0}),
            fixture, pki.ca_dir,
        )
        pair = yield Deferred.fromCoroutine(
            start_configured_pair(self, destination, source, opened.tunnel_id)
        )
        client = yield Deferred.fromCoroutine(connect_client(self, pair.ports["BULK"]))
        pusher = Pusher(client.transport, total)
        pusher.resumeProducing()
        yield done
        self.assertGreater(reads[0], 100)
        # Without flow control the destination would hold most of it.
        self.assertLess(worst[0], 2 * 1024 * 1024)
        self.assertEqual(pusher.sent, total)
