"""
A smoke test of C{bench/startup.py}: C{--quick} (one run) brings up the
tunnel service and lpxy sources under the probe, and prints the timeline
from spawn to a usable tunnel, import time by layer and memory by layer.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase, TestCase

from bench.startup_layers import LAYERS, OTHER, STDLIB, layer_of
from tests.support.processes import run_bench

#: The probe's marks that every start passes, in the order they happen.
STEPS = (
    "interpreter up",
    "options parsed and resolved",
    "lpxy.proxy.service imported",
    "reactor running, service starts",
    "listening (listen() returned)",
    "TCP connect starts",
    "TLS handshake done",
    "WebSocket open (upgrade answered)",
    "tunnel ready (ports serve the tunnel)",
)


class StartupQuickTests(TestCase):
    timeout = 240

    def test_breakdowns(self) -> Deferred[None]:
        d = run_bench("startup", "--quick")

        def check(result: tuple[bytes, bytes, int]) -> None:
            out, err, status = result
            text = out.decode()
            self.assertEqual(status, 0, err.decode()[-2000:])
            self.assertIn("start to listening, lpxy source", text)
            timeline = text.split("step (the probe's marks)")[1].split("import time by layer")[0]
            found = [next((i for i, line in enumerate(timeline.splitlines())
                           if line.startswith(step)), None) for step in STEPS]
            self.assertNotIn(None, found, f"a step is missing from:\n{timeline}")
            self.assertEqual(found, sorted(found), f"steps out of order in:\n{timeline}")
            imports = text.split("import time by layer")[1].split("idle memory")[0]
            self.assertIn("Twisted reactor, TCP and TLS transports", imports)
            self.assertIn("lpxy ", imports)
            memory = text.split("memory by layer")[1]
            for layer in ("interpreter (python -c)", "pyOpenSSL, cryptography, service_identity",
                          "lpxy", "total"):
                self.assertIn(f"\n{layer} ", memory)
            idle = text.split("idle memory")[1].split("memory by layer")[0]
            self.assertIn("\nsource ", idle)
            self.assertIn("\ndestination ", idle)

        return d.addCallback(check)


class LayerTests(SynchronousTestCase):
    def test_longest_prefix_wins(self) -> None:
        """A module belongs to the layer of its longest matching prefix."""
        self.assertEqual(layer_of("twisted.internet.defer"), "Twisted core (python, logger, defer)")
        self.assertEqual(layer_of("twisted.internet.tcp"),
                         "Twisted reactor, TCP and TLS transports")
        self.assertEqual(layer_of("autobahn.websocket.protocol"), "txaio, autobahn WebSocket")
        self.assertEqual(layer_of("autobahn.wamp.types"),
                         "autobahn.twisted package (WAMP, serializers)")
        self.assertEqual(layer_of("_nvx_xormasker"),
                         "NVX (cffi, pycparser: autobahn's accelerators)")
        self.assertEqual(layer_of("lpxy.proxy.tap"), "lpxy")

    def test_unlisted_modules(self) -> None:
        """The standard library and anything unknown have layers of their own."""
        self.assertEqual(layer_of("json.decoder"), STDLIB)
        self.assertEqual(layer_of("somethingelse.mod"), OTHER)
        self.assertNotIn(STDLIB, [name for name, _ in LAYERS])
