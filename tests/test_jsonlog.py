"""
JSON log lines: the line itself, then every route that writes them, as
processes from the installed copy: C{localproxy --log-format json},
C{twistd --logger=lpxy.jsonlog.observer localproxy}, C{twistd localproxy
--log-format json} and C{lpxy-tunnelservice --log-format json}.
"""

from __future__ import annotations

import io
import json
from typing import Any

from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from lpxy.jsonlog import OBSERVER_NAME, json_line, json_observer, log_json_under_twistd
from tests.support.installed import console_script, localproxy_argv, twistd_argv
from tests.support.processes import spawn
from tests.support.tunnelservice import start_tunnelservice


class JsonLineTests(SynchronousTestCase):
    def test_line(self) -> None:
        """One object a line: time (UTC), level, namespace, message, fields."""
        event = {
            "log_format": "Connected as {mode} after {tries} tries",
            "log_level": LogLevel.warn,
            "log_namespace": "lpxy.test",
            "log_time": 1796000000.25,
            "log_source": object(),
            "mode": "source",
            "tries": 3,
            "extra": {"ids": ("SSH1", b"RDP"), "rate": float("inf"), "thing": object},
        }
        line = json_line(event)
        self.assertTrue(line.endswith("\n"))
        self.assertEqual(line.count("\n"), 1)
        self.assertEqual(json.loads(line), {
            "time": "2026-11-30T00:53:20.250000+00:00",
            "level": "warn",
            "namespace": "lpxy.test",
            "message": "Connected as source after 3 tries",
            "fields": {
                "mode": "source",
                "tries": 3,
                "extra": {"ids": ["SSH1", "RDP"], "rate": "inf", "thing": str(object)},
            },
        })

    def test_failure(self) -> None:
        """A failure's traceback comes as its own key."""
        stream = io.StringIO()
        log = Logger(namespace="lpxy.test", observer=json_observer(stream))
        try:
            1 / 0  # noqa: B018
        except ZeroDivisionError:
            log.failure("Went wrong with {what}", Failure(), what="division")
        record = json.loads(stream.getvalue())
        self.assertEqual(record["level"], "critical")
        self.assertEqual(record["message"], "Went wrong with division")
        self.assertEqual(record["fields"], {"what": "division"})
        self.assertIn("ZeroDivisionError", record["traceback"])

    def test_legacy(self) -> None:
        """Twisted's legacy keys stay out of the fields."""
        from twisted.python import log as legacy

        stream = io.StringIO()
        observer = json_observer(stream)
        from twisted.logger import globalLogPublisher

        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        legacy.msg("old style", system="sys")
        [record] = [json.loads(line) for line in stream.getvalue().splitlines()]
        self.assertEqual(record["message"], "old style")
        self.assertEqual(record["fields"], {"system": "sys"})

    def test_under_twistd(self) -> None:
        """C{--log-format json} under twistd sets its --logger; other routes are refused."""
        options: dict[str, Any] = {"logger": None, "logfile": None, "syslog": 0}
        log_json_under_twistd(options, "--log-format")
        self.assertEqual(options["logger"], OBSERVER_NAME)
        for given in ({"logfile": "x.log"}, {"syslog": 1}, {"logger": "my.observer"}):
            options = {"logger": None, "logfile": None, "syslog": 0, **given}
            with self.assertRaises(ValueError) as caught:
                log_json_under_twistd(options, "--log-format")
            self.assertIn("--log-format json", str(caught.exception))
            self.assertIn(next(iter(given)), str(caught.exception))


def json_records(case: TestCase, text: bytes) -> list[dict[str, Any]]:
    """Every line of C{text} as JSON, each with the keys the format promises."""
    records = []
    for line in text.decode("utf-8").splitlines():
        record = json.loads(line)
        case.assertLessEqual(
            {"time", "level", "namespace", "message", "fields"}, set(record), line
        )
        records.append(record)
    case.assertTrue(records)
    return records


class ProxyRouteTests(TestCase):
    """The local proxy's JSON log, each route, up to a CloseTunnel."""

    timeout = 120

    async def run_proxy(self, argv: list[str], stream: str) -> list[dict[str, Any]]:
        fixture = await start_tunnelservice(self)
        opened = fixture.open_tunnel()
        token = opened.destination_token
        child = spawn(
            self, [*argv, "-e", f"ws://127.0.0.1:{fixture.port}", "-d", "1"],
            {"AWSIOT_TUNNEL_ACCESS_TOKEN": token},
        )
        await child.wait_for("Successfully established websocket connection")
        fixture.close_tunnel(opened.tunnel_id)
        self.assertEqual(await child.ended, 0, child.output)
        self.assertNotIn(token, child.output)
        records = json_records(self, bytes(child.stdout if stream == "stdout" else child.stderr))
        [connected] = [r for r in records if r["message"].startswith("Successfully established")]
        self.assertEqual(connected["level"], "info")
        self.assertEqual(connected["namespace"], "lpxy.proxy.connector.ProxyConnector")
        self.assertEqual(connected["fields"], {"endpoint": f"ws://127.0.0.1:{fixture.port}"})
        return records

    async def test_console(self) -> None:
        """C{localproxy --log-format json} writes JSON lines to standard error only."""
        await self.run_proxy(localproxy_argv("--log-format", "json"), "stderr")

    async def test_twistd_logger(self) -> None:
        """C{twistd -n --logger=lpxy.jsonlog.observer localproxy} writes them to standard output."""
        records = await self.run_proxy(
            twistd_argv("-n", "--pidfile=", "--logger=lpxy.jsonlog.observer", "localproxy"),
            "stdout",
        )
        # -v still applies in front of the observer: no debug lines.
        self.assertNotIn("debug", {record["level"] for record in records})

    async def test_twistd_option(self) -> None:
        """C{twistd -n localproxy --log-format json} does the same."""
        await self.run_proxy(
            twistd_argv("-n", "--pidfile=", "localproxy", "--log-format", "json"), "stdout"
        )


class TunnelServiceRouteTests(TestCase):
    timeout = 120

    async def test_console(self) -> None:
        """C{lpxy-tunnelservice --log-format json} writes JSON lines on standard output."""
        child = spawn(self, [
            console_script("lpxy-tunnelservice"), "--port", "tcp:0:interface=127.0.0.1",
            "--db", ":memory:", "--log-format", "json",
        ])
        await child.wait_for("Tunnel service ready")
        child.signal("TERM")
        self.assertEqual(await child.ended, 0, child.output)
        records = json_records(self, bytes(child.stdout))
        [listening] = [r for r in records if r["message"].startswith("Tunnel service listening")]
        self.assertEqual(listening["fields"]["host"], "127.0.0.1")
        self.assertIsInstance(listening["fields"]["port"], int)
