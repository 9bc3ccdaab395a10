"""
Tests for L{lpxy.tunnelservice.tap}: C{twistd tunnelservice} options.
"""

import io
import os
import sys
from typing import Any

from twisted.application.service import IServiceCollection
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock, StringTransport
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase

from lpxy._process import ProcessService, TwistdLog
from lpxy.tunnelservice.admission import (
    DEFAULT_MAX_CONNECTIONS_PER_ADDRESS,
    default_max_connections,
)
from lpxy.tunnelservice.ratelog import RateLimitedLog
from lpxy.tunnelservice.service import TunnelService
from lpxy.tunnelservice.sqlstore import SQLTunnelStore
from lpxy.tunnelservice.tap import Options, makeService
from tests.support.logs import SyslogCapture


def parse(*argv: str) -> Options:
    options = Options()
    options.parseOptions(list(argv))
    return options


class OptionsTests(SynchronousTestCase):
    """C{twistd tunnelservice} options: defaults, values, errors naming the option, help."""

    def test_defaults(self) -> None:
        self.assertEqual(dict(parse()), {
            "port": ["tcp:8080:interface=127.0.0.1"],
            "max-services": 3,
            "max-open-tunnels": 10000,
            "max-request-size": 65536,
            "ping-interval": 30,
            "idle-timeout": 90,
            "db": "tunnelservice.sqlite3",
            "credentials": None,
            "keys": None,
            "insecure-open-api": 0,
            "api-port": [],
            "data-port": [],
            "api-rate": 20.0,
            "closed-limit": 10000,
            "closed-retention": 10800,
            "tunnel-rate": None,
            "log-level": LogLevel.info,
            "max-connections": None,
            "max-connections-per-address": 256,
            "node-name": None,
            "metrics": None,
            "log-format": "text",
        })

    def test_everything(self) -> None:
        options = parse(
            "--port", "tcp:9000", r"--port=tcp:9001:interface=\:\:1",
            "--max-services", "5", "--max-open-tunnels", "7", "--max-request-size", "2048",
            "--ping-interval", "5", "--idle-timeout", "12", "--db", "/var/lib/t.db",
            "--tunnel-rate", "819200", "--max-connections", "900",
            "--max-connections-per-address", "9", "--node-name", "n1",
            "--metrics", "tcp:9100:interface=127.0.0.1",
        )
        self.assertEqual(dict(options), {
            "port": ["tcp:9000", r"tcp:9001:interface=\:\:1"],
            "max-services": 5,
            "max-open-tunnels": 7,
            "max-request-size": 2048,
            "ping-interval": 5,
            "idle-timeout": 12,
            "db": "/var/lib/t.db",
            "credentials": None,
            "keys": None,
            "insecure-open-api": 0,
            "api-port": [],
            "data-port": [],
            "api-rate": 20.0,
            "closed-limit": 10000,
            "closed-retention": 10800,
            "tunnel-rate": 819200,
            "log-level": LogLevel.info,
            "max-connections": 900,
            "max-connections-per-address": 9,
            "node-name": "n1",
            "metrics": "tcp:9100:interface=127.0.0.1",
            "log-format": "text",
        })

    def test_credentials(self) -> None:
        path = FilePath(self.mktemp())
        path.setContent(b"[a]\naws_access_key_id = AKIDA\naws_secret_access_key = sa\n"
                        b"[b]\naws_access_key_id = AKIDB\naws_secret_access_key = sb\n")
        options = parse("--credentials", path.path, "--insecure-open-api")
        self.assertEqual(options["keys"], {"AKIDA": "sa", "AKIDB": "sb"})
        self.assertEqual(options["insecure-open-api"], 1)
        self.assertNotIn("sa", repr(options["keys"]))

    def test_bad_credentials(self) -> None:
        path = FilePath(self.mktemp())
        path.setContent(b"[a]\naws_access_key_id = AKIDA\n")
        e = self.assertRaises(UsageError, parse, "--credentials", path.path)
        self.assertTrue(str(e).startswith(f"--credentials {path.path}: profile [a] needs"))

    def test_node_name(self) -> None:
        """--node-name names this node among several; a bad one is refused."""
        self.assertEqual(parse("--node-name", "node-1.a_b")["node-name"], "node-1.a_b")
        for bad in ("", "a b", "x" * 65, "n\u00e9"):
            e = self.assertRaises(UsageError, parse, "--node-name", bad)
            self.assertIn("--node-name", str(e))
            self.assertIn("1 to 64 letters", str(e))
        service = only_child(makeService(
            parse("--db", ":memory:", "--node-name", "n7"), reactor=MemoryReactorClock()
        ))
        self.assertEqual(service.broker.node, "n7")
        service = only_child(makeService(parse("--db", ":memory:"), reactor=MemoryReactorClock()))
        self.assertTrue(service.broker.node.endswith(f"-{os.getpid()}"))

    def test_bad_numbers(self) -> None:
        for name in ("max-services", "max-open-tunnels", "max-request-size", "tunnel-rate",
                     "ping-interval", "idle-timeout"):
            for value in ("0", "-1", "many"):
                e = self.assertRaises(UsageError, parse, f"--{name}", value)
                self.assertIn(f"--{name} must be a positive integer", str(e))

    def test_idle_timeout_after_ping_interval(self) -> None:
        for argv in (["--idle-timeout", "30"], ["--ping-interval", "100"]):
            e = self.assertRaises(UsageError, parse, *argv)
            self.assertIn("--idle-timeout", str(e))
            self.assertIn("must be more than --ping-interval", str(e))

    def test_bounds(self) -> None:
        options = parse("--api-rate", "2.5", "--closed-retention", "60")
        self.assertEqual((options["api-rate"], options["closed-retention"]), (2.5, 60))
        for value in ("0", "-1", "nan", "inf", "x"):
            e = self.assertRaises(UsageError, parse, "--api-rate", value)
            self.assertIn("--api-rate must be a positive number", str(e))
        for value in ("0", "-1", "x"):
            e = self.assertRaises(UsageError, parse, "--closed-limit", value)
            self.assertIn("--closed-limit must be a positive integer", str(e))
        service = only_child(makeService(
            parse("--closed-retention", "60", "--closed-limit", "7", "--db", ":memory:"),
            reactor=MemoryReactorClock(),
        ))
        self.assertEqual(service.broker.limits.closed_retention_seconds, 60)
        self.assertEqual(service.broker.limits.max_closed_tunnels, 7)

    def test_connection_limits(self) -> None:
        service = only_child(makeService(
            parse("--max-connections", "100", "--max-connections-per-address", "5",
                  "--db", ":memory:"),
            reactor=MemoryReactorClock(),
        ))
        self.assertEqual(
            (service.admission.max_connections, service.admission.max_per_address), (100, 5)
        )
        default = only_child(makeService(parse("--db", ":memory:"), reactor=MemoryReactorClock()))
        self.assertEqual(default.admission.max_connections, default_max_connections())
        self.assertEqual(default.admission.max_per_address, DEFAULT_MAX_CONNECTIONS_PER_ADDRESS)
        for name in ("--max-connections", "--max-connections-per-address"):
            e = self.assertRaises(UsageError, parse, name, "0")
            self.assertIn(f"{name} must be a positive integer", str(e))

    def test_split_ports(self) -> None:
        options = parse("--api-port", "tcp:9001:interface=127.0.0.1", "--data-port", "tcp:9002",
                        "--data-port", "tcp:9003")
        self.assertEqual(
            (options["port"], options["api-port"], options["data-port"]),
            ([], ["tcp:9001:interface=127.0.0.1"], ["tcp:9002", "tcp:9003"]),
        )
        options = parse("--port", "tcp:9000", "--data-port", "tcp:9002")
        self.assertEqual((options["port"], options["data-port"]), (["tcp:9000"], ["tcp:9002"]))

    def test_split_ports_need_both_planes(self) -> None:
        e = self.assertRaises(UsageError, parse, "--api-port", "tcp:9001")
        self.assertIn("--api-port needs a --data-port (or a --port)", str(e))
        e = self.assertRaises(UsageError, parse, "--data-port", "tcp:9002")
        self.assertIn("--data-port needs an --api-port (or a --port)", str(e))

    def test_bad_endpoint(self) -> None:
        for name in ("api-port", "data-port"):
            e = self.assertRaises(UsageError, parse, "--port", "tcp:9000",
                                  f"--{name}", "carrier-pigeon:1")
            self.assertIn(f"--{name} 'carrier-pigeon:1'", str(e))
        e = self.assertRaises(UsageError, parse, "--port", "carrier-pigeon:1")
        self.assertIn("--port 'carrier-pigeon:1'", str(e))
        e = self.assertRaises(UsageError, parse, "--port", "tcp:notaport")
        self.assertIn("--port 'tcp:notaport'", str(e))

    def test_missing_tls_files(self) -> None:
        e = self.assertRaises(
            UsageError, parse, "--port", "ssl:8443:privateKey=/nonexistent.pem"
        )
        self.assertIn("--port", str(e))

    def test_help(self) -> None:
        text = str(Options())
        self.assertIn("--port", text)
        self.assertIn("--max-open-tunnels", text)
        self.assertIn("--db", text)
        self.assertIn("--credentials", text)
        self.assertIn("--insecure-open-api", text)
        self.assertIn("--log-level", text)


def describe_debug_line() -> dict[str, Any]:
    """The management API's per-call line, as it logs a DescribeTunnel."""
    return {"log_format": "API {operation}: OK", "operation": "DescribeTunnel",
            "log_level": LogLevel.debug, "log_namespace": "lpxy.tunnelservice.api"}


def line(level: LogLevel, text: str) -> dict[str, Any]:
    return {"log_format": text, "log_level": level, "log_namespace": "x", "log_time": 0}


class LogLevelTests(SynchronousTestCase):
    """
    C{--log-level} filters what twistd's own observer shows (through a
    L{TwistdLog} of the test's, not the process's).
    """

    def test_names(self) -> None:
        for name, level in [("critical", LogLevel.critical), ("error", LogLevel.error),
                            ("warn", LogLevel.warn), ("info", LogLevel.info),
                            ("DEBUG", LogLevel.debug)]:
            self.assertEqual(parse("--log-level", name)["log-level"], level)
        self.assertEqual(parse("--log-level=warn")["log-level"], LogLevel.warn)

    def test_bad_name(self) -> None:
        for value in ("loud", "warning", "", "5"):
            e = self.assertRaises(UsageError, parse, "--log-level", value)
            self.assertIn(
                "--log-level must be one of critical, error, warn, info, debug", str(e)
            )

    def shown(self, *argv: str, syslog: int = 0) -> tuple[dict[str, Any], list[str]]:
        """What twistd's observer writes (with -n, to standard output) of some events."""
        stdout = io.StringIO()
        self.patch(sys, "stdout", stdout)
        twistd_log = TwistdLog("tests.test_tunnelservice_tap.SOME_LOG")
        server_options = {"logger": None, "logfile": None, "nodaemon": 1, "syslog": syslog}
        options = Options(twistd_log)
        options.parent = server_options
        options.parseOptions(list(argv))
        observer = twistd_log.observer()
        for event in [describe_debug_line(), line(LogLevel.info, "Refused tunnel handshake"),
                      line(LogLevel.warn, "Dropping"), line(LogLevel.error, "API failed")]:
            observer(event)
        return server_options, stdout.getvalue().splitlines()

    def test_default_hides_debug(self) -> None:
        """
        By default twistd's observer shows info and above: not the
        per-call DescribeTunnel line.
        """
        server_options, lines = self.shown()
        self.assertEqual(server_options["logger"], "tests.test_tunnelservice_tap.SOME_LOG.observer")
        self.assertEqual(len(lines), 3, lines)
        self.assertNotIn("DescribeTunnel", "\n".join(lines))
        self.assertIn("Refused tunnel handshake", lines[0])

    def test_debug_shows_api_calls(self) -> None:
        _, lines = self.shown("--log-level", "debug")
        self.assertEqual(len(lines), 4, lines)
        self.assertIn("API DescribeTunnel: OK", lines[0])

    def test_error(self) -> None:
        _, lines = self.shown("--log-level", "error")
        self.assertEqual(len(lines), 1, lines)
        self.assertIn("API failed", lines[0])

    def test_failed_accepts_folded(self) -> None:
        """
        Twisted's line per accept failed for want of descriptors reaches
        twistd's observer as one line per interval, with the count.
        """
        stdout = io.StringIO()
        self.patch(sys, "stdout", stdout)
        twistd_log = TwistdLog("tests.test_tunnelservice_tap.SOME_LOG")
        clock = Clock()
        options = Options(twistd_log, clock=clock)
        options.parent = {"logger": None, "logfile": None, "nodaemon": 1, "syslog": 0}
        options.parseOptions([])
        observer = twistd_log.observer()
        for _ in range(5):
            observer({"log_format": "Could not accept new connection ({acceptError})",
                      "acceptError": "EMFILE", "log_level": LogLevel.info,
                      "log_namespace": "twisted.internet.tcp.Port", "log_time": 0})
        observer(line(LogLevel.info, "Refused tunnel handshake"))
        clock.advance(10)
        lines = stdout.getvalue().splitlines()
        self.assertEqual(len(lines), 3, lines)
        self.assertIn("Could not accept 1 connection(s) in the last 10 s: too many open files",
                      lines[0])
        self.assertIn("Refused tunnel handshake", lines[1])
        self.assertIn("Could not accept 4 connection(s) in the last 10 s", lines[2])

    def test_every_route(self) -> None:
        """
        Standard output, C{--logfile} and C{--syslog} alike show the
        C{--log-level}'s events, failed accepts folded.
        """
        routes: dict[str, Any] = {
            "stdout": {"logfile": None, "nodaemon": 1, "syslog": 0},
            "logfile": {"logfile": self.mktemp(), "nodaemon": 0, "syslog": 0},
            "syslog": {"logfile": None, "nodaemon": 0, "syslog": 1, "prefix": "lpxy"},
        }
        for route, server_options in routes.items():
            stdout = io.StringIO()
            self.patch(sys, "stdout", stdout)
            syslog = SyslogCapture(self)
            twistd_log = TwistdLog("tests.test_tunnelservice_tap.SOME_LOG")
            clock = Clock()
            options = Options(twistd_log, clock=clock)
            options.parent = {"logger": None, **server_options}
            options.parseOptions(["--log-level", "warn"])
            observer = twistd_log.observer()
            for _ in range(5):
                observer(failed_accept())
            observer(line(LogLevel.info, "Refused tunnel handshake"))
            observer(line(LogLevel.warn, "Dropping"))
            clock.advance(10)
            if route == "syslog":
                lines = syslog.texts()
            elif route == "logfile":
                with open(server_options["logfile"]) as f:
                    lines = f.read().splitlines()
            else:
                lines = stdout.getvalue().splitlines()
            self.assertEqual(len(lines), 3, (route, lines))
            self.assertIn("Could not accept 1 connection(s) in the last 10 s", lines[0], route)
            self.assertIn("Dropping", lines[1], route)
            self.assertIn("Could not accept 4 connection(s) in the last 10 s", lines[2], route)

    def test_folding_stops_with_the_service(self) -> None:
        """
        Stopping the service writes the last folded count and leaves no
        timer; failed accepts after that are shown as Twisted logs them.
        """
        stdout = io.StringIO()
        self.patch(sys, "stdout", stdout)
        reactor = MemoryReactorClock()
        twistd_log = TwistdLog("tests.test_tunnelservice_tap.SOME_LOG")
        options = Options(twistd_log, clock=reactor)
        options.parent = {"logger": None, "logfile": None, "nodaemon": 1, "syslog": 0}
        options.parseOptions(["--db", ":memory:", "--insecure-open-api"])
        root = makeService(options, reactor=reactor)
        observer = twistd_log.observer()
        root.privilegedStartService()
        root.startService()
        for _ in range(3):
            observer(failed_accept())
        self.assertEqual(len(stdout.getvalue().splitlines()), 1)
        self.successResultOf(root.stopService())
        lines = stdout.getvalue().splitlines()
        self.assertEqual(len(lines), 2, lines)
        self.assertIn("Could not accept 2 connection(s) in the last 10 s", lines[1])
        self.assertEqual([call for call in reactor.getDelayedCalls()
                          if isinstance(getattr(call.func, "__self__", None), RateLimitedLog)], [])
        observer(failed_accept())
        self.assertIn("Could not accept new connection (EMFILE)", stdout.getvalue().splitlines()[2])


def failed_accept() -> dict[str, Any]:
    """Twisted's event for an accept failed for want of descriptors."""
    return {"log_format": "Could not accept new connection ({acceptError})",
            "acceptError": "EMFILE", "log_level": LogLevel.info,
            "log_namespace": "twisted.internet.tcp.Port", "log_time": 0}


def only_child(root: Any) -> TunnelService:
    """The L{TunnelService} inside the L{ProcessService} C{makeService} made."""
    assert isinstance(root, ProcessService)
    [service] = list(root)
    assert isinstance(service, TunnelService)
    return service


class MakeServiceTests(SynchronousTestCase):
    """
    L{makeService} builds a L{TunnelService} from the options, inside a
    L{ProcessService}.
    """

    def test_service(self) -> None:
        reactor = MemoryReactorClock()
        root = makeService(
            parse("--port", "tcp:9000", "--port", "tcp:9001", "--max-services", "4",
                  "--ping-interval", "7", "--idle-timeout", "20", "--db", ":memory:",
                  "--insecure-open-api", "--tunnel-rate", "1000"),
            reactor=reactor,
        )
        self.assertIsInstance(root, ProcessService)
        [service] = list(root)
        self.assertIsInstance(service, TunnelService)
        self.assertTrue(IServiceCollection.providedBy(service))
        assert isinstance(service, TunnelService)
        self.assertEqual(service.broker.limits.max_services, 4)
        factory = service.websocket_factory
        self.assertEqual((factory.ping_interval, factory.idle_timeout), (7, 20))
        self.assertIs(factory.clock, reactor)
        assert factory.tunnel_rates is not None
        self.assertEqual(factory.tunnel_rates.rate, 1000)
        root.privilegedStartService()
        root.startService()
        self.assertEqual([p[0] for p in reactor.tcpServers], [9000, 9001])
        self.successResultOf(root.stopService())

    def test_split_ports(self) -> None:
        """--port, --api-port and --data-port each listen with their own site."""
        reactor = MemoryReactorClock()
        service = makeService(
            parse("--port", "tcp:9000:interface=127.0.0.1",
                  "--api-port", "tcp:9001:interface=127.0.0.1", "--data-port", "tcp:9002",
                  # a memory reactor's ports say 0.0.0.0 whatever the interface
                  "--db", ":memory:", "--insecure-open-api"),
            reactor=reactor,
        )
        service.privilegedStartService()
        service.startService()
        self.assertEqual([p[0] for p in reactor.tcpServers], [9000, 9001, 9002])
        self.assertEqual(len({id(p[1]) for p in reactor.tcpServers}), 3)
        self.successResultOf(service.stopService())

    def test_sqlite_store(self) -> None:
        """C{--db PATH}: the broker keeps its tunnels in that SQLite file."""
        path = self.mktemp()
        service = only_child(makeService(parse("--db", path), reactor=MemoryReactorClock()))
        self.assertIsInstance(service.store, SQLTunnelStore)
        self.assertIs(service.broker.store, service.store)
        self.assertTrue(os.path.exists(path))
        self.successResultOf(service.store.close())

    def test_memory_store(self) -> None:
        service = only_child(makeService(parse("--db", ":memory:"), reactor=MemoryReactorClock()))
        self.assertNotIsInstance(service.store, SQLTunnelStore)

    def test_unusable_db(self) -> None:
        """An unusable C{--db}: one line naming the option, exit status 1."""
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(b"no database here" * 100)
        e = self.assertRaises(SystemExit, makeService, parse("--db", path),
                              reactor=MemoryReactorClock())
        self.assertTrue(str(e).startswith("tunnelservice: --db: "), str(e))
        self.assertIn(repr(os.path.abspath(path)), str(e))
    def test_credentials_verify(self) -> None:
        """With --credentials the API answers an unsigned request with AWS's error."""
        path = FilePath(self.mktemp())
        path.setContent(b"[a]\naws_access_key_id = AKIDA\naws_secret_access_key = sa\n")
        reactor = MemoryReactorClock()
        service = makeService(parse("--port", "tcp:9000", "--credentials", path.path,
                                    "--db", ":memory:"),
                              reactor=reactor)
        service.privilegedStartService()
        service.startService()
        factory = reactor.tcpServers[0][1]
        protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
            b"X-Amz-Target: IoTSecuredTunneling.ListTunnels\r\n\r\n{}"
        )
        self.assertIn(b"MissingAuthenticationTokenException", transport.value())
        protocol.connectionLost(Failure(ConnectionDone()))
        self.successResultOf(service.stopService())


class ReachabilityWarningTests(SynchronousTestCase):
    """
    With --insecure-open-api, a port that other machines can reach logs a
    warning at start, since the API is open; a Unix socket does not.
    """

    def warnings_for(self, *ports: str) -> list[str]:
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        service = makeService(
            parse("--db", ":memory:", *ports, "--insecure-open-api"),
            reactor=MemoryReactorClock(),
        )
        service.privilegedStartService()
        service.startService()
        self.successResultOf(service.stopService())
        return [
            f"{e['host']}:{e['port']}" for e in events
            if e["log_level"] == LogLevel.warn and "reachable beyond" in e["log_format"]
        ]

    def test_everywhere(self) -> None:
        self.assertEqual(self.warnings_for("--port", "tcp:9000"), ["0.0.0.0:9000"])

    def test_unix_socket(self) -> None:
        self.assertEqual(self.warnings_for("--port", "unix:/tmp/lpxy-test.sock"), [])
