"""
Tests for L{lpxy.wire}: the wire rules both products obey.
"""

from twisted.trial.unittest import SynchronousTestCase

from lpxy.frames import Message
from lpxy.wire import (
    AWS_MAX_SERVICES,
    DEFAULT_MAX_SERVICES,
    KNOWN_TYPES,
    MAX_CONNECTION_ID,
    MAX_STREAM_ID,
    NEWEST_SUBPROTOCOL,
    SERVICE_ONLY_TYPES,
    SOURCE_ONLY_TYPES,
    STREAM_TYPES,
    SUBPROTOCOLS,
    choose_subprotocol,
    is_valid_client_token,
    is_valid_connection_id,
    is_valid_service_id,
    is_valid_stream_id,
    subprotocol_version,
)

V1 = "aws.iot.securetunneling-1.0"
V2 = "aws.iot.securetunneling-2.0"
V3 = "aws.iot.securetunneling-3.0"


class SubprotocolTests(SynchronousTestCase):
    def test_names_oldest_first(self) -> None:
        self.assertEqual(SUBPROTOCOLS, (V1, V2, V3))
        self.assertEqual(NEWEST_SUBPROTOCOL, V3)

    def test_subprotocols(self) -> None:
        """Each name means its version; a name it does not know, the newest."""
        self.assertEqual(
            [subprotocol_version(s) for s in (V1, V2, V3, "other")], [1, 2, 3, 3]
        )

    def test_choose_newest_offered(self) -> None:
        self.assertEqual(choose_subprotocol([V1, V3, V2]), V3)
        self.assertEqual(choose_subprotocol([V1, "mqtt", V2]), V2)
        self.assertEqual(choose_subprotocol(iter([V1])), V1)

    def test_choose_none(self) -> None:
        self.assertIsNone(choose_subprotocol([]))
        self.assertIsNone(choose_subprotocol(["aws.iot.securetunneling-4.0", "mqtt"]))


class ClientTokenTests(SynchronousTestCase):
    def test_valid(self) -> None:
        for token in ("a" * 32, "Z9-" * 42 + "xy", "0123456789abcdef-0123456789ABCDEF"):
            self.assertTrue(is_valid_client_token(token), token)

    def test_invalid(self) -> None:
        for token in ("", "a" * 31, "a" * 129, "a" * 31 + "_", "a" * 31 + " ",
                      "a" * 32 + "\n", "\u00e9" * 32, "a" * 31 + "\u0660"):
            self.assertFalse(is_valid_client_token(token), repr(token))


class ServiceIdTests(SynchronousTestCase):
    def test_valid(self) -> None:
        """AWS's rule for OpenTunnel's services: 1 to 128 of [a-zA-Z0-9:_-]."""
        for service_id in ("S", "SSH1", "ssh_22-b", "a:b", "x" * 128):
            self.assertTrue(is_valid_service_id(service_id), service_id)

    def test_invalid(self) -> None:
        for service_id in ("", "x" * 129, "x" * 65000, "S.1", "S H", "SSH\n", "\u00e9",
                           "S=1", "S,1", "S\x00"):
            self.assertFalse(is_valid_service_id(service_id), repr(service_id))

    def test_max_services(self) -> None:
        """The default limit is a small multiple of AWS's 3."""
        self.assertEqual(AWS_MAX_SERVICES, 3)
        self.assertEqual(DEFAULT_MAX_SERVICES % AWS_MAX_SERVICES, 0)
        self.assertLess(AWS_MAX_SERVICES, DEFAULT_MAX_SERVICES)
        self.assertLessEqual(DEFAULT_MAX_SERVICES, 4 * AWS_MAX_SERVICES)


class IdTests(SynchronousTestCase):
    def test_stream_ids(self) -> None:
        """Stream ids are int32 on the wire, and 1 or more."""
        for stream_id in (1, 65535, 65536, 70000, MAX_STREAM_ID):
            self.assertTrue(is_valid_stream_id(stream_id), stream_id)
        for stream_id in (0, -1, -(2**31), MAX_STREAM_ID + 1):
            self.assertFalse(is_valid_stream_id(stream_id), stream_id)
        self.assertEqual(MAX_STREAM_ID, 2**31 - 1)

    def test_connection_ids(self) -> None:
        """Connection ids are uint32 on the wire; 0 names no connection."""
        for connection_id in (1, 65536, MAX_CONNECTION_ID):
            self.assertTrue(is_valid_connection_id(connection_id), connection_id)
        for connection_id in (0, -1, MAX_CONNECTION_ID + 1):
            self.assertFalse(is_valid_connection_id(connection_id), connection_id)
        self.assertEqual(MAX_CONNECTION_ID, 2**32 - 1)


class RecordTypeTests(SynchronousTestCase):
    def test_known(self) -> None:
        self.assertNotIn(Message.UNKNOWN, KNOWN_TYPES)
        self.assertEqual(KNOWN_TYPES, STREAM_TYPES | SERVICE_ONLY_TYPES)
        self.assertNotIn(8, KNOWN_TYPES)

    def test_stream_types(self) -> None:
        self.assertEqual(
            STREAM_TYPES,
            {Message.DATA, Message.STREAM_START, Message.STREAM_RESET,
             Message.CONNECTION_START, Message.CONNECTION_RESET},
        )

    def test_who_sends(self) -> None:
        self.assertEqual(SERVICE_ONLY_TYPES, {Message.SESSION_RESET, Message.SERVICE_IDS})
        self.assertEqual(SOURCE_ONLY_TYPES, {Message.STREAM_START, Message.CONNECTION_START})
        self.assertLessEqual(SOURCE_ONLY_TYPES, STREAM_TYPES)
        self.assertFalse(SERVICE_ONLY_TYPES & STREAM_TYPES)
