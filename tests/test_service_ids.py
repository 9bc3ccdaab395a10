"""
Tests for L{lpxy.proxy.service_ids}: which of a tunnel's service ids the
proxy serves, on which entry of its local map. (Through a whole session:
tests.test_session.ServiceIdsTests.)
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from lpxy.proxy.channel import ServiceBinding, ServiceMismatch
from lpxy.proxy.service_ids import ServiceMap


def service_map(keys: tuple[str, ...], *, mode: str = "source", format: int = 3,
                from_config_dir: bool = False, max_services: int = 9) -> ServiceMap:
    return ServiceMap(mode, keys, format, from_config_dir, max_services)  # type: ignore[arg-type]


class ServedIdsTests(SynchronousTestCase):
    def test_once_in_order_valid_and_bounded(self) -> None:
        """
        Each valid id once, in the order announced, at most
        C{max_services}.
        """
        served = service_map((), max_services=2).served_ids(["B", "a b", "A", "B", "C"])
        self.assertEqual(served, ["B", "A"])


class BindingsTests(SynchronousTestCase):
    def test_format_1_sends_no_service_id(self) -> None:
        """In V1 no service id goes on the wire, whatever the map's key."""
        self.assertEqual(
            service_map(("SSH",), format=1).bindings(["SSH"]), [ServiceBinding("SSH", "")]
        )

    def test_named_map_must_match(self) -> None:
        self.assertRaises(ServiceMismatch, service_map(("SSH",)).bindings, ["SSH", "WEB"])

    def test_config_dir(self) -> None:
        """
        From C{--config-dir}: a source listens on a random port for an id
        found nowhere (key L{None}); a destination cannot serve it.
        """
        self.assertEqual(
            service_map(("SSH",), from_config_dir=True).bindings(["SSH", "WEB"]),
            [ServiceBinding("SSH", "SSH"), ServiceBinding(None, "WEB")],
        )
        self.assertRaises(
            ServiceMismatch,
            service_map(("SSH",), mode="destination", from_config_dir=True).bindings,
            ["SSH", "WEB"],
        )
