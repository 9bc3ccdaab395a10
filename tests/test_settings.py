"""
Tests for L{lpxy.proxy.settings}: export, load and merge of the fine-grained
settings.
"""

from __future__ import annotations

import json
from pathlib import Path

from attrs import evolve
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from lpxy.frames import Message, encode
from lpxy.proxy.settings import (
    ProxySettings,
    SettingsError,
    TcpSettings,
    WebSocketSettings,
    default_settings_tree,
    export_default_settings,
    json_depth,
    load_settings,
    merge_settings,
    unused_settings,
)
from tests.support.entrypoints import REFERENCE_TEXT

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference"
REFERENCE_FILE = REFERENCE / "default-settings.json"



def proxyTree(**proxy: object) -> dict[str, object]:
    return {"tunneling": {"proxy": proxy}}


class ExportTests(SynchronousTestCase):
    """
    L{export_default_settings} writes what the reference writes.
    """

    def test_bytes(self) -> None:
        """
        The exported file is the reference's file byte for byte, final
        newline included.
        """
        path = Path(self.mktemp())
        export_default_settings(path)
        self.assertEqual(path.read_bytes(), REFERENCE_TEXT.encode("ascii"))

    def test_sharedReference(self) -> None:
        """
        The copy in this test matches the shared reference file, when the
        checkout has it.
        """
        if not REFERENCE_FILE.exists():
            raise self.skipTest("no shared reference file beside the checkout")
        self.assertEqual(REFERENCE_FILE.read_text(), REFERENCE_TEXT)

    def test_roundTrip(self) -> None:
        """
        Loading the exported file gives the defaults back.
        """
        path = Path(self.mktemp())
        export_default_settings(path)
        self.assertEqual(load_settings(path), ProxySettings())

    def test_unwritable(self) -> None:
        """
        A path that cannot be written raises L{OSError}.
        """
        path = Path(self.mktemp()) / "missing" / "settings.json"
        self.assertRaises(OSError, export_default_settings, path)

    def test_treeIsStrings(self) -> None:
        """
        Every leaf of the exported tree is a string.
        """
        def leaves(tree: object) -> list[object]:
            if isinstance(tree, dict):
                return [leaf for value in tree.values() for leaf in leaves(value)]
            return [tree]

        self.assertEqual(
            {type(leaf) for leaf in leaves(default_settings_tree())}, {str}
        )


class LoadTests(SynchronousTestCase):
    """
    L{load_settings} merges a partial file over the defaults.
    """

    def write(self, content: object) -> Path:
        path = Path(self.mktemp())
        text = content if isinstance(content, str) else json.dumps(content)
        path.write_text(text)
        return path

    def test_partialNumbers(self) -> None:
        """
        JSON numbers and booleans are accepted; untouched keys keep their
        defaults.
        """
        path = self.write(proxyTree(
            websocket={"ping_period_ms": 5000, "reconnect_on_data_error": False},
            tcp={"max_active_connections": 4},
        ))
        expected = evolve(
            ProxySettings(),
            websocket=WebSocketSettings(ping_period_ms=5000, reconnect_on_data_error=False),
            tcp=TcpSettings(max_active_connections=4),
        )
        self.assertEqual(load_settings(path), expected)

    def test_strings(self) -> None:
        """
        The strings the export writes are accepted as well.
        """
        path = self.write(proxyTree(
            websocket={
                "connect_retry_count": "3", "reconnect_on_data_error": "false",
                "subprotocol": "aws.iot.securetunneling-2.0",
            },
            default_bind_address="0.0.0.0",
        ))
        expected = evolve(
            ProxySettings(),
            default_bind_address="0.0.0.0",
            websocket=WebSocketSettings(
                connect_retry_count=3, reconnect_on_data_error=False,
                subprotocol="aws.iot.securetunneling-2.0",
            ),
        )
        self.assertEqual(load_settings(path), expected)

    def test_notExported(self) -> None:
        """
        C{endpoint_format} and C{tcp.write_buffer_size} are honoured though
        the export leaves them out.
        """
        path = self.write(proxyTree(
            endpoint_format="tunnel.%s.example.com",
            tcp={"write_buffer_size": "4096"},
        ))
        expected = evolve(
            ProxySettings(),
            endpoint_format="tunnel.%s.example.com",
            tcp=TcpSettings(write_buffer_size=4096),
        )
        self.assertEqual(load_settings(path), expected)

    def test_maxServices(self) -> None:
        """
        lpxy's own C{websocket.max_services} (not exported) defaults to three
        times AWS's limit of services per tunnel; it takes a positive
        integer.
        """
        self.assertEqual(ProxySettings().websocket.max_services, 9)
        self.assertNotIn("max_services", json.dumps(default_settings_tree()))
        path = self.write(proxyTree(websocket={"max_services": "2"}))
        self.assertEqual(load_settings(path).websocket.max_services, 2)
        self.assertSettingsError(
            proxyTree(websocket={"max_services": 0}),
            "tunneling.proxy.websocket.max_services: expected an integer >= 1, got 0",
        )

    def test_overridesMerge(self) -> None:
        """
        A region override is added to the China defaults, or replaces one.
        """
        path = self.write(proxyTree(region_endpoint_overrides={
            "us-gov-west-1": "tunnel.example.gov",
            "cn-north-1": "cn.example.com",
        }))
        self.assertEqual(load_settings(path).region_endpoint_overrides, {
            "cn-north-1": "cn.example.com",
            "cn-northwest-1": "data.tunneling.iot.cn-northwest-1.amazonaws.com.cn",
            "us-gov-west-1": "tunnel.example.gov",
        })

    def test_emptyObject(self) -> None:
        """
        An empty object means the defaults.
        """
        self.assertEqual(load_settings(self.write({})), ProxySettings())

    def test_unknownKeysWarn(self) -> None:
        """
        Unknown keys anywhere are logged at warning with their dotted name,
        and otherwise ignored.
        """
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        path = self.write({
            "other": 1,
            "tunneling": {"proxy": {
                "websocket": {"ping_period": 1, "ping_period_ms": 7},
                "colour": "blue",
            }},
        })
        settings = load_settings(path)
        self.assertEqual(settings.websocket.ping_period_ms, 7)
        warned = sorted(
            e["key"] for e in events if e["log_level"] == LogLevel.warn
        )
        self.assertEqual(warned, [
            "other",
            "tunneling.proxy.colour",
            "tunneling.proxy.websocket.ping_period",
        ])

    def assertSettingsError(self, content: object, message: str) -> None:
        path = self.write(content)
        e = self.assertRaises(SettingsError, load_settings, path)
        self.assertEqual(str(e).replace(str(path), "FILE"), message)

    def test_badInteger(self) -> None:
        """
        A value that is not an integer names its dotted key and the type.
        """
        self.assertSettingsError(
            proxyTree(websocket={"ping_period_ms": "soon"}),
            'tunneling.proxy.websocket.ping_period_ms: expected an integer, got "soon"',
        )
        self.assertSettingsError(
            proxyTree(websocket={"ping_period_ms": 1.5}),
            "tunneling.proxy.websocket.ping_period_ms: expected an integer, got 1.5",
        )
        self.assertSettingsError(
            proxyTree(tcp={"max_active_connections": True}),
            "tunneling.proxy.tcp.max_active_connections: expected an integer, got true",
        )

    def test_outOfRange(self) -> None:
        """
        Counts accept -1 (for ever) but nothing lower; sizes must be
        positive.
        """
        self.assertSettingsError(
            proxyTree(websocket={"connect_retry_count": -2}),
            "tunneling.proxy.websocket.connect_retry_count: expected an integer >= -1, got -2",
        )
        self.assertSettingsError(
            proxyTree(message={"max_payload_size": "0"}),
            "tunneling.proxy.message.max_payload_size: expected an integer >= 1, got 0",
        )

    def test_payloadMustFitARecord(self) -> None:
        """
        The largest payload setting still fits the largest DATA record in a
        2-byte length; one more byte is refused, naming the key.
        """
        largest = load_settings(self.write(proxyTree(message={"max_payload_size": 65384})))
        record = Message(
            type=Message.DATA, streamId=2**31 - 1, ignorable=True, serviceId="x" * 128,
            connectionId=2**32 - 1, payload=b"x" * largest.message.max_payload_size,
        )
        self.assertEqual(len(encode(record)), 2 + 65535)
        self.assertSettingsError(
            proxyTree(message={"max_payload_size": 65385}),
            "tunneling.proxy.message.max_payload_size: expected an integer <= 65384, got 65385",
        )

    def test_dataLengthSizeIsTwo(self) -> None:
        """
        C{message.data_length_size} is the 2-byte record prefix of the
        wire: 2 (as a number or a string) loads, anything else is refused.
        """
        for value in (2, "2"):
            loaded = load_settings(self.write(proxyTree(message={"data_length_size": value})))
            self.assertEqual(loaded, ProxySettings())
        self.assertSettingsError(
            proxyTree(message={"data_length_size": "4"}),
            "tunneling.proxy.message.data_length_size: expected 2 (records have a"
            " 2-byte length prefix), got 4",
        )

    def test_badBoolean(self) -> None:
        """
        A boolean must be true or false.
        """
        self.assertSettingsError(
            proxyTree(websocket={"reconnect_on_data_error": "maybe"}),
            "tunneling.proxy.websocket.reconnect_on_data_error:"
            ' expected a boolean (true or false), got "maybe"',
        )

    def test_badStrings(self) -> None:
        """
        Strings must be non-empty strings; the subprotocol and the endpoint
        format have their own forms.
        """
        self.assertSettingsError(
            proxyTree(default_bind_address=3),
            "tunneling.proxy.default_bind_address: expected a non-empty string, got 3",
        )
        self.assertSettingsError(
            proxyTree(websocket={"subprotocol": "mqtt"}),
            "tunneling.proxy.websocket.subprotocol: expected one of"
            " aws.iot.securetunneling-1.0, aws.iot.securetunneling-2.0,"
            ' aws.iot.securetunneling-3.0, got "mqtt"',
        )
        self.assertSettingsError(
            proxyTree(endpoint_format="example.com"),
            "tunneling.proxy.endpoint_format: expected a host name holding one %s"
            ' for the region, got "example.com"',
        )
        self.assertSettingsError(
            proxyTree(region_endpoint_overrides={"eu-west-1": ""}),
            "tunneling.proxy.region_endpoint_overrides.eu-west-1:"
            ' expected a non-empty string, got ""',
        )

    def test_notObjects(self) -> None:
        """
        Where an object is expected, anything else is an error naming the
        key.
        """
        self.assertSettingsError([], "the top level: expected a JSON object")
        self.assertSettingsError(
            {"tunneling": {"proxy": 3}}, "tunneling.proxy: expected a JSON object"
        )
        self.assertSettingsError(
            proxyTree(tcp=[]), "tunneling.proxy.tcp: expected a JSON object"
        )
        self.assertSettingsError(
            proxyTree(region_endpoint_overrides="x"),
            "tunneling.proxy.region_endpoint_overrides:"
            " expected a JSON object of region: host",
        )

    def test_malformed(self) -> None:
        """
        A file that is not JSON names the file and the line.
        """
        self.assertSettingsError(
            '{\n  "tunneling": \n}',
            "FILE is not valid JSON: Expecting value at line 3",
        )

    def test_missing(self) -> None:
        """
        A missing file names the file and the reason.
        """
        path = self.mktemp()
        e = self.assertRaises(SettingsError, load_settings, path)
        self.assertEqual(str(e), f"cannot read {path}: No such file or directory")

    def test_reasons(self) -> None:
        """
        A missing or malformed file carries the reference's reason, naming
        the path as the user gave it.
        """
        e = self.assertRaises(SettingsError, load_settings, self.mktemp(), "n.json")
        self.assertEqual(e.reason, "n.json: cannot open file")
        path = self.write('{"tunneling":\n {bad}}')
        e = self.assertRaises(SettingsError, load_settings, path, "bad.json")
        self.assertEqual(e.reason, "bad.json(2): expected key string")
        path = self.write('{"tunneling": }')
        e = self.assertRaises(SettingsError, load_settings, path, "v.json")
        self.assertEqual(e.reason, "v.json(1): Expecting value")
        path = self.write(proxyTree(tcp={"connection_retry_count": "x"}))
        e = self.assertRaises(SettingsError, load_settings, path, "t.json")
        self.assertIsNone(e.reason)

    def test_tooLarge(self) -> None:
        """
        A file larger than 1 MiB is refused before it is parsed, and so is
        an endless one.
        """
        path = self.write(" " * (1024 * 1024) + "{}")
        e = self.assertRaises(SettingsError, load_settings, path)
        self.assertEqual(
            str(e), f"{path} is larger than 1 MiB (or endless); expected a small text file"
        )
        e = self.assertRaises(SettingsError, load_settings, "/dev/zero")
        self.assertEqual(
            str(e), "/dev/zero is larger than 1 MiB (or endless); expected a small text file"
        )

    def test_tooDeep(self) -> None:
        """
        JSON nested thousands deep is refused without parsing it (Python's
        parser would recurse once per level); 32 levels are read.
        """
        for text in ("[" * 100_000, '{"a":' * 5000 + "1" + "}" * 5000, "[" * 33 + "]" * 33):
            path = self.write(text)
            e = self.assertRaises(SettingsError, load_settings, path)
            self.assertEqual(
                str(e),
                f"{path} nests JSON more than 32 deep; expected a settings file,"
                " which needs 4",
            )
        # Three levels for tunneling.proxy, 29 below: 32 in all.
        path = self.write(proxyTree(deep=json.loads("[" * 29 + "]" * 29)))
        self.assertEqual(load_settings(path), ProxySettings())

    def test_depth(self) -> None:
        """
        L{json_depth} counts arrays and objects, not brackets in strings,
        and stops just past a limit.
        """
        self.assertEqual(json_depth("1"), 0)
        self.assertEqual(json_depth('{"a": [1, {"b": []}]}'), 4)
        self.assertEqual(json_depth('{"a": "[[[{{{\\"[["}'), 1)
        self.assertEqual(json_depth("[" * 1000, limit=32), 33)

    def test_mergeOverBase(self) -> None:
        """
        L{merge_settings} merges over any base, not only the defaults.
        """
        base = evolve(ProxySettings(), default_bind_address="::1")
        merged = merge_settings(base, proxyTree(tcp={"connection_retry_count": -1}))
        self.assertEqual(merged, evolve(base, tcp=TcpSettings(connection_retry_count=-1)))


class UnusedSettingsTests(SynchronousTestCase):
    """
    L{unused_settings} names the settings without effect in lpxy that were
    given a value other than the default.
    """

    def test_defaults(self) -> None:
        self.assertEqual(unused_settings(ProxySettings()), [])

    def test_changed(self) -> None:
        settings = merge_settings(ProxySettings(), proxyTree(
            message={"data_frame_max_size": 1000, "max_size": 2000,
                     "max_payload_size": 100},
            tcp={"read_buffer_size": 3000, "write_buffer_size": 5},
            websocket={"read_buffer_size": 4000, "write_buffer_size": 5000,
                       "ping_period_ms": 7},
        ))
        self.assertEqual(
            [(key, value) for key, value, _ in unused_settings(settings)],
            [
                ("tunneling.proxy.message.data_frame_max_size", 1000),
                ("tunneling.proxy.message.max_size", 2000),
                ("tunneling.proxy.tcp.read_buffer_size", 3000),
                ("tunneling.proxy.websocket.read_buffer_size", 4000),
                ("tunneling.proxy.websocket.write_buffer_size", 5000),
            ],
        )
        for _, _, why in unused_settings(settings):
            self.assertNotIn("\n", why)
