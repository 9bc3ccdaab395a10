"""
End to end with configurations made by the real option parsing
(L{lpxy.proxy.tap.Options}): a C{--config} file, C{--config-dir} mappings
(the default C{./config} and an explicit directory), the access token from
C{AWSIOT_TUNNEL_ACCESS_TOKEN}, and C{--settings-json} changing
C{max_payload_size}, which shows in the DATA records on the wire.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.trial.unittest import TestCase

from lpxy.proxy.config import ProxyConfig, TcpTarget, TunnelEndpoint
from lpxy.proxy.service import EXIT_CONFIG
from lpxy.proxy.tap import Options
from tests.support.apps import connect_client, echo_round_trip, start_app
from tests.support.logs import LogRecorder
from tests.support.proxies import RecordTap, make_config, start_configured_pair, start_proxy, tcp
from tests.support.sockets import unused_port
from tests.support.tunnelservice import start_tunnelservice

SOURCE_PAYLOAD = 700
DESTINATION_PAYLOAD = 1000


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def settings_json(max_payload_size: int) -> str:
    """A partial settings file, with a string value as the export writes."""
    return json.dumps(
        {"tunneling": {"proxy": {"message": {"max_payload_size": str(max_payload_size)}}}}
    )


def parse(arguments: list[str], environ: dict[str, str], cwd: Path) -> ProxyConfig:
    """The configuration C{localproxy ARGUMENTS} resolves to."""
    # Any client token kept goes below the test's directory.
    options = Options(environ={"STATE_DIRECTORY": str(cwd / "state"), **environ}, cwd=cwd)
    options.parseOptions(arguments)
    config: ProxyConfig = options["proxy-config"]
    return config


class ConfigurationTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def test_config_file_dir_environment_settings(self) -> Any:
        logs = LogRecorder(self)
        fixture = yield start_tunnelservice(self)
        ssh_port, ssh_app = yield Deferred.fromCoroutine(start_app(self))
        web_port, web_app = yield Deferred.fromCoroutine(start_app(self))
        opened = fixture.open_tunnel(["SSH", "WEB"])
        endpoint = f"ws://127.0.0.1:{fixture.port}"
        closed_port = unused_port()

        # The destination: everything in its --config file, which beats the
        # (wrong) environment; mappings from the default ./config, read
        # recursively.
        dst_cwd = Path(self.mktemp()).absolute()
        write(dst_cwd / "destination.conf", "\n".join([
            "# the destination's options",
            f"access-token = {opened.destination_token}",
            f"proxy-endpoint = {endpoint}",
            "mode = dst",
            "settings-json = settings.json",
            "",
        ]))
        write(dst_cwd / "settings.json", settings_json(DESTINATION_PAYLOAD))
        write(dst_cwd / "config" / "ssh", f"SSH = {ssh_port}\n")
        write(dst_cwd / "config" / "more" / "web.conf", f"WEB = 127.0.0.1:{web_port}\n")
        destination = parse(
            ["--config", "destination.conf"],
            {"AWSIOT_TUNNEL_ACCESS_TOKEN": "wrong", "AWSIOT_TUNNEL_REGION": "us-east-1"},
            dst_cwd,
        )
        self.assertEqual(destination.access_token, opened.destination_token)
        self.assertEqual(destination.endpoint, TunnelEndpoint("127.0.0.1", fixture.port, False))
        self.assertEqual(destination.destination_apps, {
            "SSH": TcpTarget("127.0.0.1", ssh_port), "WEB": TcpTarget("127.0.0.1", web_port),
        })
        self.assertEqual(destination.settings.message.max_payload_size, DESTINATION_PAYLOAD)

        # The source: the token from the environment; its --config file names
        # a dead endpoint, which the command line overrides; --config-dir maps
        # SSH to a fixed port and says nothing of WEB.
        src_cwd = Path(self.mktemp()).absolute()
        ssh_listen = unused_port()
        write(src_cwd / "source.conf", "\n".join([
            f"proxy-endpoint = ws://127.0.0.1:{closed_port}",
            "mode = source",
            "local-bind-address = 127.0.0.1",
            "settings-json = source-settings.json",
            "",
        ]))
        write(src_cwd / "source-settings.json", settings_json(SOURCE_PAYLOAD))
        write(src_cwd / "maps" / "services", f"SSH = {ssh_listen}\n")
        source = parse(
            ["--config", "source.conf", "--config-dir", "maps", "-e", endpoint],
            {"AWSIOT_TUNNEL_ACCESS_TOKEN": opened.source_token},
            src_cwd,
        )
        self.assertEqual(source.access_token, opened.source_token)
        self.assertEqual(source.endpoint, TunnelEndpoint("127.0.0.1", fixture.port, False))
        self.assertEqual(source.source_ports, {"SSH": ssh_listen})
        self.assertTrue(source.mappings_from_config_dir)
        self.assertEqual(source.settings.message.max_payload_size, SOURCE_PAYLOAD)

        pair = yield Deferred.fromCoroutine(
            start_configured_pair(self, destination, source, opened.tunnel_id)
        )
        self.assertEqual(pair.ports["SSH"], ssh_listen)
        self.assertNotIn(pair.ports["WEB"], (0, ssh_listen))
        self.assertEqual(len(logs.texts("Service 'WEB' is found in no config file")), 1)

        to_destination = RecordTap(pair.destination)
        to_source = RecordTap(pair.source)
        size = 100_000
        for name, app in (("SSH", ssh_app), ("WEB", web_app)):
            client = yield Deferred.fromCoroutine(connect_client(self, pair.ports[name]))
            payload = os.urandom(size)
            client.transport.write(payload)
            got = yield client.received(size)
            self.assertEqual(got, payload)
            self.assertEqual(len(app.accepted), 1)
            self.assertEqual(app.accepted[0].received, size)

        # Each proxy cut what it read from its local socket at its own
        # max_payload_size.
        for tap, limit in ((to_destination, SOURCE_PAYLOAD), (to_source, DESTINATION_PAYLOAD)):
            sizes = tap.data_sizes()
            self.assertEqual(sum(sizes), 2 * size)
            self.assertEqual(max(sizes), limit)
            self.assertGreaterEqual(len(sizes), 2 * math.ceil(size / limit))
        for token in (opened.source_token, opened.destination_token):
            self.assertEqual(logs.mentioning(token), [])


class FrameSizeSettingTests(TestCase):
    """
    C{websocket.max_frame_size} does not limit WebSocket messages: the
    peer and the service send messages of up to 131076 bytes whatever it
    says (the reference uses it only for socket buffer sizes).
    """

    timeout = 60

    @inlineCallbacks
    def relay_bulk(self, max_frame_size: int) -> Any:
        logs = LogRecorder(self)
        fixture = yield start_tunnelservice(self)
        app_port, _ = yield Deferred.fromCoroutine(start_app(self))
        opened = fixture.open_tunnel(["BULK"])
        cwd = Path(self.mktemp()).absolute()
        write(cwd / "settings.json", json.dumps(
            {"tunneling": {"proxy": {"websocket": {"max_frame_size": max_frame_size}}}}
        ))
        source = parse(
            ["-e", f"ws://127.0.0.1:{fixture.port}", "-m", "src", "-b", "127.0.0.1",
             "--settings-json", "settings.json"],
            {"AWSIOT_TUNNEL_ACCESS_TOKEN": opened.source_token},
            cwd,
        )
        self.assertEqual(source.settings.websocket.max_frame_size, max_frame_size)
        destination = make_config(fixture, opened.destination_token, "destination",
                                  destination_apps={"BULK": tcp(app_port)})
        pair = yield Deferred.fromCoroutine(
            start_configured_pair(self, destination, source, opened.tunnel_id)
        )
        connected = pair.source.connector.protocol
        assert connected is not None
        sender = pair.destination.connector.protocol
        assert sender is not None
        # What the destination writes: each write is one frame of one message.
        sizes: list[int] = []
        send_data = sender.sendData

        def measured(data: bytes, *args: Any, **kwargs: Any) -> None:
            sizes.append(len(data))
            send_data(data, *args, **kwargs)

        sender.sendData = measured  # type: ignore[method-assign]
        # Several bulk connections at once: both proxies pack records into
        # messages of up to 131076 bytes.
        yield gatherResults([
            Deferred.fromCoroutine(echo_round_trip(self, pair.ports["BULK"], 1_000_000))
            for _ in range(8)
        ], consumeErrors=True)
        self.assertIs(pair.source.connector.protocol, connected)
        # The destination did send messages bigger than a small setting.
        self.assertGreater(max(sizes), min(max_frame_size, 70_000))
        self.assertEqual(logs.texts("Lost the tunnel connection"), [])
        unused = logs.texts(f"websocket.max_frame_size {max_frame_size} is not used")
        self.assertEqual(len(unused), 1)

    def test_below_one_record(self) -> Any:
        return self.relay_bulk(8192)

    def test_below_the_wire_limit(self) -> Any:
        return self.relay_bulk(70_000)

    def test_above_the_wire_limit(self) -> Any:
        """Messages bigger than the service accepts are never sent."""
        return self.relay_bulk(1_000_000)


class BusyPortTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def test_mapped_port_in_use(self) -> Any:
        """
        A C{--config-dir} mapping to a port something else holds: the
        source says it cannot listen and ends with status 1, without
        retrying; the destination carries on.
        """
        logs = LogRecorder(self)
        fixture = yield start_tunnelservice(self)
        busy_port, _ = yield Deferred.fromCoroutine(start_app(self))
        app_port, _ = yield Deferred.fromCoroutine(start_app(self))
        opened = fixture.open_tunnel(["SSH"])
        destination = yield Deferred.fromCoroutine(start_proxy(self, make_config(
            fixture, opened.destination_token, "destination",
            destination_apps={"SSH": tcp(app_port)},
        )))
        cwd = Path(self.mktemp()).absolute()
        write(cwd / "config" / "ssh", f"SSH = {busy_port}\n")
        source = parse(
            ["-e", f"ws://127.0.0.1:{fixture.port}", "-m", "src", "-b", "127.0.0.1"],
            {"AWSIOT_TUNNEL_ACCESS_TOKEN": opened.source_token},
            cwd,
        )
        self.assertEqual(source.source_ports, {"SSH": busy_port})
        proxy = yield Deferred.fromCoroutine(start_proxy(self, source, wait=False))
        status = yield proxy.whenDone()
        self.assertEqual(status, EXIT_CONFIG)
        cannot = logs.texts("Could not bind to address: ")
        self.assertEqual(len(cannot), 1)
        self.assertIn(str(busy_port), cannot[0])
        self.assertEqual(logs.texts("Could not connect"), [])
        self.assertEqual(len(logs.texts("Successfully established websocket connection")), 2)
        self.assertNoResult(destination.whenDone())
