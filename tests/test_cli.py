"""
Tests for L{lpxy.proxy.cli}, the C{localproxy} console script.
"""

from __future__ import annotations

import gc
import io
import subprocess
import sys
from pathlib import Path
from typing import Any

from twisted.internet.task import react
from twisted.internet.testing import MemoryReactor
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from lpxy.proxy import cli, tap
from lpxy.proxy.config import ProxyConfig, TunnelEndpoint
from tests.support.entrypoints import FakeProxyService

TOKEN = "cli-test-token"
CONFIG = ProxyConfig(
    mode="source", access_token=TOKEN, endpoint=TunnelEndpoint("h"),
    source_ports={"": 1}, state_dir="/run/state/lpxy",
)


class ParseTests(SynchronousTestCase):
    """
    L{cli.parse}: one line and status 1 for a usage error.
    """

    def test_ok(self) -> None:
        """
        Good options give the configuration.
        """
        config = cli.parse(
            ["-e", "h", "-s", "1"], io.StringIO(),
            {"AWSIOT_TUNNEL_ACCESS_TOKEN": TOKEN, "STATE_DIRECTORY": "/run/state/lpxy"},
            Path(self.mktemp()),
        )
        self.assertEqual(config, CONFIG)

    def test_usageError(self) -> None:
        """
        A bad option goes to standard error as the reference writes it: its
        reason, lpxy's line naming the option and the fix where it says
        more, the reference's trailer; exit status 1.
        """
        for argv, lines in {
            ("-t", TOKEN, "-e", "h", "-s", "0"): [
                "Port must be between 1 and 65535",
                "--source-listen-port/-s: port '0' is not 1..65535: expected PORT or"
                " ID=PORT[,ID=PORT...], e.g. 5555 or SSH1=5555,HTTP1=8080",
            ],
            ("--nope",): ["unrecognised option '--nope'"],
            ("-t", TOKEN, "-e", "h", "-s", "1", "foo"): ["unexpected argument 'foo'"],
            ("-e", "h", "-s", "1"): [
                "the option '--access-token' is required but missing",
                "no access token: give --access-token/-t, access-token"
                " in the --config file, or AWSIOT_TUNNEL_ACCESS_TOKEN",
            ],
        }.items():
            stderr = io.StringIO()
            e = self.assertRaises(
                SystemExit, cli.parse, list(argv), stderr, {}, Path(self.mktemp())
            )
            self.assertEqual(e.code, 1)
            self.assertEqual(
                stderr.getvalue().splitlines(),
                [*lines, "Try 'localproxy --help' for a list of options."],
            )

    def test_plainUsageErrorGetsTrailer(self) -> None:
        """
        A L{usage.UsageError} that is not an L{OptionError} (one of
        Twisted's own) still ends with the reference's trailer, once.
        """
        class Failing(dict):  # type: ignore[type-arg]
            def __init__(self, **kw: Any) -> None:
                super().__init__()

            def parseOptions(self, argv: list[str]) -> None:
                raise usage.UsageError("Wrong number of arguments.")

        self.patch(tap, "Options", Failing)
        stderr = io.StringIO()
        e = self.assertRaises(SystemExit, cli.parse, [], stderr)
        self.assertEqual(e.code, 1)
        self.assertEqual(
            stderr.getvalue(),
            "Wrong number of arguments.\nTry 'localproxy --help' for a list of options.\n",
        )


class RunTests(SynchronousTestCase):
    """
    L{cli.run} starts the service and turns its end into the exit status.
    """

    def setUp(self) -> None:
        self.reactor = MemoryReactor()
        self.made: list[FakeProxyService] = []

    def factory(self, config: ProxyConfig, reactor: Any) -> FakeProxyService:
        service = FakeProxyService(config, reactor)
        self.made.append(service)
        return service

    def test_startAndStopOnShutdown(self) -> None:
        """
        The service starts at once and stops before the reactor shuts down.
        """
        d = cli.run(self.reactor, CONFIG, self.factory)
        [service] = self.made
        self.assertIs(service.config, CONFIG)
        self.assertEqual(service.starts, 1)
        self.assertEqual(
            self.reactor.triggers["before"]["shutdown"], [(service.stopService, (), {})]
        )
        self.assertNoResult(d)

    def test_zero(self) -> None:
        """
        Status 0 is a plain result.
        """
        d = cli.run(self.reactor, CONFIG, self.factory)
        self.made[0].finish(0)
        self.assertIsNone(self.successResultOf(d))

    def test_nonZero(self) -> None:
        """
        Another status is a L{SystemExit} carrying it.
        """
        d = cli.run(self.reactor, CONFIG, self.factory)
        self.made[0].finish(3)
        self.assertEqual(self.failureResultOf(d, SystemExit).value.code, 3)


class CollectionPauseTests(SynchronousTestCase):
    """
    The console script runs its start without garbage collection; once the
    service has started, what the start built is frozen and collection
    resumes.
    """

    def setUp(self) -> None:
        self.reactor = MemoryReactor()
        self.enabled_at_start: list[bool] = []
        # Whatever happens, this process collects as before the test.
        self.addCleanup(gc.enable)
        self.addCleanup(gc.unfreeze)
        self.addCleanup(setattr, cli, "_collection_paused", False)

    def factory(self, config: ProxyConfig, reactor: Any) -> FakeProxyService:
        enabled = self.enabled_at_start

        class Recording(FakeProxyService):
            def startService(self) -> None:
                enabled.append(gc.isenabled())
                super().startService()

        return Recording(config, reactor)

    def test_paused_until_started(self) -> None:
        """
        Paused, the collector stays off until the service has started,
        then the objects built so far are frozen and it runs again.
        """
        gc.unfreeze()
        cli._pause_collection()
        self.assertFalse(gc.isenabled())
        cli.run(self.reactor, CONFIG, self.factory)
        self.assertEqual(self.enabled_at_start, [False])
        self.assertTrue(gc.isenabled())
        self.assertGreater(gc.get_freeze_count(), 0)

    def test_disabled_by_others(self) -> None:
        """
        A collector someone else turned off stays off.
        """
        gc.disable()
        cli._pause_collection()
        cli.run(self.reactor, CONFIG, self.factory)
        self.assertFalse(gc.isenabled())

    def test_not_paused_without_pause(self) -> None:
        """
        L{cli.run} alone (as under a test's stand-in reactor) neither
        pauses nor freezes anything.
        """
        gc.unfreeze()
        cli.run(self.reactor, CONFIG, self.factory)
        self.assertEqual(self.enabled_at_start, [True])
        self.assertEqual(gc.get_freeze_count(), 0)

    def test_main_with_stand_in_reactor(self) -> None:
        """
        L{cli.main} under a test's stand-in C{react} leaves the test
        process's collector alone.
        """
        self.patch(tap, "Options", _FixedOptions)
        reactor = MemoryReactor()

        class DoneAtOnce(FakeProxyService):
            def startService(self) -> None:
                super().startService()
                self.finish(0)

        def stand_in(main: Any, argv: Any) -> None:
            self.enabled_at_start.append(gc.isenabled())
            react(main, argv, _reactor=reactor)

        self.assertRaises(
            SystemExit, cli.main, [], _react=stand_in, _service_factory=DoneAtOnce,
            _start_logging=lambda *args, **kwargs: None,
        )
        self.assertEqual(self.enabled_at_start, [True])


class MainTests(SynchronousTestCase):
    """
    L{cli.main} parses, starts logging and runs the service under
    L{react}.
    """

    def setUp(self) -> None:
        self.logging: list[tuple[int, str]] = []
        self.patch(tap, "Options", _FixedOptions)

    def start_logging(self, verbosity: int, log_format: str = "reference") -> None:
        self.logging.append((verbosity, log_format))

    def test_reactAndExit(self) -> None:
        """
        With a reactor that stops at once and a service that is done with
        status 2 as soon as it starts, the process exits 2.
        """
        class DoneAtOnce(FakeProxyService):
            def startService(self) -> None:
                super().startService()
                self.finish(2)

        reactor = MemoryReactor()
        e = self.assertRaises(
            SystemExit, cli.main, ["-v", "5"],
            _react=lambda main, argv: react(main, argv, _reactor=reactor),
            _service_factory=DoneAtOnce,
            _start_logging=self.start_logging,
        )
        self.assertEqual(e.code, 2)
        self.assertEqual(self.logging, [(5, "reference")])

    def test_closedOnShutdown(self) -> None:
        """
        When the reactor stops before the service is done (a signal), the
        exit status is 0.
        """
        reactor = MemoryReactor()
        e = self.assertRaises(
            SystemExit, cli.main, [],
            _react=lambda main, argv: react(main, argv, _reactor=reactor),
            _service_factory=FakeProxyService,
            _start_logging=self.start_logging,
        )
        self.assertEqual(e.code, 0)
        self.assertEqual(self.logging, [(4, "reference")])


class _FixedOptions(dict):  # type: ignore[type-arg]
    """Stands in for L{cli.Options}: parses C{-v N} only."""

    def __init__(self, **kw: Any) -> None:
        super().__init__()

    def parseOptions(self, argv: list[str]) -> None:
        verbosity = int(argv[1]) if argv[:1] == ["-v"] else 4
        self["proxy-config"] = ProxyConfig(
            mode="source", access_token=TOKEN, endpoint=TunnelEndpoint("h"),
            verbosity=verbosity,
        )


def run_probe(probe: str) -> subprocess.CompletedProcess[str]:
    """
    Run the Python program C{probe} in a fresh interpreter from the source
    tree (what a fresh process imports is the point), its output as text.
    """
    return subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60,
        cwd=str(Path(__file__).parent.parent),
    )


class VersionTests(SynchronousTestCase):
    """
    C{localproxy -V} answers without importing Twisted (it is the first
    thing scripts run, and Twisted's import alone costs more than the whole
    answer may).
    """

    def test_version_line(self) -> None:
        out = io.StringIO()
        for argv in (["-V"], ["--version"]):
            e = self.assertRaises(SystemExit, cli.main, argv, _stdout=out)
            self.assertEqual(e.code, 0)
        self.assertEqual(out.getvalue(), (tap.VERSION_LINE + "\n") * 2)

    def test_nothing_heavy_imported(self) -> None:
        probe = (
            "import sys\n"
            "from lpxy.proxy.cli import main\n"
            "try:\n"
            "    main(['-V'])\n"
            "except SystemExit as e:\n"
            "    heavy = sorted(m for m in ('twisted', 'autobahn', 'google.protobuf', 'asyncio')"
            " if m in sys.modules)\n"
            "    print(e.code, heavy)\n"
        )
        done = run_probe(probe)
        self.assertEqual(done.stdout.splitlines()[-1], "0 []", done.stderr)
        self.assertEqual(done.stdout.splitlines()[0], tap.VERSION_LINE)


class LazyImportTests(SynchronousTestCase):
    """
    A proxy started without C{--metrics} never imports what only the
    metrics endpoint needs (twisted.web, prometheus_client): they cost
    every proxy start time and memory (bench/startup.py).
    """

    def test_metrics_modules_only_with_metrics(self) -> None:
        probe = (
            "import sys, tempfile\n"
            "from twisted.internet.testing import MemoryReactorClock\n"
            "from lpxy.proxy import cli\n"
            "from lpxy.proxy.tap import default_service_factory\n"
            "def start(*extra):\n"
            "    argv = ['-t', 'token', '-e', 'localhost:1', '-s', '5555',\n"
            "            '--state-dir', tempfile.mkdtemp(), *extra]\n"
            "    config = cli.parse(argv, sys.stderr)\n"
            "    default_service_factory()(config, MemoryReactorClock()).startService()\n"
            "    heavy = ('twisted.web', 'prometheus_client')\n"
            "    print(sorted(m for m in heavy if m in sys.modules))\n"
            "start()\n"
            "start('--metrics', 'tcp:0:interface=127.0.0.1')\n"
        )
        done = run_probe(probe)
        self.assertEqual(
            done.stdout.splitlines(), ["[]", "['prometheus_client', 'twisted.web']"], done.stderr
        )

