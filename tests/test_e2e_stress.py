"""
End to end under load: many V3 connections of one service at once, each
with its own megabyte of random data, written interleaved so that their
records share WebSocket messages; every byte arrives, in order, on the
right connection, at the application and back at the client.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from attrs import evolve
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.trial.unittest import TestCase

from lpxy.proxy.config import TunnelEndpoint
from tests.support.apps import AppFactory, AppProtocol, connect_client, start_app
from tests.support.certs import make_test_pki
from tests.support.proxies import make_config, start_configured_pair, tcp
from tests.support.tunnelservice import ServiceFixture, start_tunnelservice
from tests.support.waiting import gather

CONNECTIONS = 32
SIZE = 1024 * 1024
CHUNK = 48 * 1024


class RecordingApp(AppFactory):
    """An echo application that also keeps what each connection read."""

    def __init__(self) -> None:
        super().__init__(echo=True)
        self.data: dict[AppProtocol, bytearray] = {}

    def on_data(self, protocol: AppProtocol, data: bytes) -> None:
        self.data.setdefault(protocol, bytearray()).extend(data)


class ManyConnectionsTests(TestCase):
    timeout = 120

    @inlineCallbacks
    def many(self, fixture: ServiceFixture, tls: bool = False, capath: str | None = None) -> Any:
        app = RecordingApp()
        app_port, _ = yield Deferred.fromCoroutine(start_app(self, factory=app))
        opened = fixture.open_tunnel(["SSH"])
        endpoint = TunnelEndpoint("127.0.0.1", fixture.port, tls)
        configs = [
            evolve(make_config(fixture, opened.destination_token, "destination",
                               destination_apps={"SSH": tcp(app_port)}),
                   endpoint=endpoint, capath=capath),
            evolve(make_config(fixture, opened.source_token, "source",
                               source_ports={"SSH": 0}),
                   endpoint=endpoint, capath=capath),
        ]
        pair = yield Deferred.fromCoroutine(
            start_configured_pair(self, configs[0], configs[1], opened.tunnel_id)
        )
        clients = []
        for _ in range(CONNECTIONS):
            client = yield Deferred.fromCoroutine(connect_client(self, pair.ports["SSH"]))
            clients.append(client)
        payloads = [os.urandom(SIZE) for _ in clients]
        # Interleaved: a chunk for each connection in turn.
        for offset in range(0, SIZE, CHUNK):
            for client, payload in zip(clients, payloads, strict=True):
                client.transport.write(payload[offset:offset + CHUNK])
        got = yield gather(*(client.received(SIZE) for client in clients))
        for index, (back, payload) in enumerate(zip(got, payloads, strict=True)):
            self.assertTrue(back == payload, f"connection {index}: echo differs")
        # Each application connection read exactly one client's bytes.
        self.assertEqual(len(app.accepted), CONNECTIONS)
        at_app = sorted(bytes(data) for data in app.data.values())
        self.assertTrue(at_app == sorted(payloads), "data mixed between connections")
        self.assertEqual(len(pair.source.connector.flow.relays), CONNECTIONS)

    @inlineCallbacks
    def test_v3_32_connections_1mib_each(self) -> Any:
        fixture = yield start_tunnelservice(self)
        yield self.many(fixture)

    @inlineCallbacks
    def test_v3_32_connections_1mib_each_tls(self) -> Any:
        directory = Path(self.mktemp()).absolute()
        directory.mkdir()
        pki = make_test_pki(directory)
        fixture = yield start_tunnelservice(
            self, tls=pki
        )
        yield self.many(fixture, tls=True, capath=str(pki.ca_cert_path))

