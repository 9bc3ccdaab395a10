"""
Tests for L{lpxy.proxy.tap}: the options of C{twistd localproxy} and
L{makeService}.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path
from typing import Any

from twisted.internet.testing import MemoryReactor
from twisted.logger import LogLevel
from twisted.trial.unittest import SynchronousTestCase

from lpxy import __version__
from lpxy._process import ProcessService, TwistdLog
from lpxy.proxy.config import ProxyConfig, TcpTarget, TunnelEndpoint
from lpxy.proxy.option_errors import OptionError
from lpxy.proxy.settings import ProxySettings
from lpxy.proxy.tap import Options, makeService
from tests.support.certs import make_test_pki
from tests.support.entrypoints import REFERENCE_TEXT, FakeProxyService

TOKEN = "tap-test-token"
CLIENT = "c" * 40


class OptionsTests(SynchronousTestCase):
    """
    Every flag, short and long, lands in the resolved configuration.
    """

    def setUp(self) -> None:
        self.cwd = Path(self.mktemp()).resolve()
        self.cwd.mkdir()
        (self.cwd / "cas").mkdir()
        (self.cwd / "s.json").write_text("{}")
        (self.cwd / "maps").mkdir()
        (self.cwd / "maps" / "m").write_text("SSH1 = 22\n")

    def parse(self, argv: list[str], environ: dict[str, str] | None = None) -> Options:
        options = Options(environ=environ or {}, cwd=self.cwd)
        options.parseOptions(argv)
        return options

    def test_longAndShort(self) -> None:
        """
        The short and the long spelling of each option give the same
        configuration, and it is the expected one.
        """
        long = self.parse([
            "--access-token", TOKEN, "--client-token", CLIENT,
            "--proxy-endpoint", "tunnel.example.com:8443",
            "--source-listen-port", "SSH1=5555", "--local-bind-address", "127.0.0.1",
            "--capath", "cas", "--no-ssl-host-verify", "--settings-json", "s.json",
            "--verbose", "5", "--mode", "source", "--destination-client-type", "V1",
        ])
        short = self.parse([
            "-t", TOKEN, "-i", CLIENT, "-e", "tunnel.example.com:8443", "-s", "SSH1=5555",
            "-b", "127.0.0.1", "-c", "cas", "-k", "--settings-json=s.json", "-v5",
            "-m", "source", "-y", "V1",
        ])
        expected = ProxyConfig(
            mode="source", access_token=TOKEN, client_token=CLIENT,
            endpoint=TunnelEndpoint("tunnel.example.com", 8443),
            source_ports={"SSH1": 5555}, bind_address="127.0.0.1",
            capath=str(self.cwd / "cas"), verify_ssl=False, verbosity=5,
            destination_client_type="V1", settings=ProxySettings(),
        )
        self.assertEqual(long["proxy-config"], expected)
        self.assertEqual(short["proxy-config"], expected)

    def test_destinationAndConfigDir(self) -> None:
        """
        C{-r}, C{-d}, C{--config-dir}, C{--config} and C{--state-dir}.
        """
        (self.cwd / "c.conf").write_text("region = eu-west-1\n")
        options = self.parse(
            ["--config", "c.conf", "-m", "dst", "--config-dir", "maps", "--state-dir", "st"],
            {"AWSIOT_TUNNEL_ACCESS_TOKEN": TOKEN},
        )
        self.assertEqual(options["proxy-config"], ProxyConfig(
            mode="destination", access_token=TOKEN,
            endpoint=TunnelEndpoint("data.tunneling.iot.eu-west-1.amazonaws.com"),
            destination_apps={"SSH1": TcpTarget("127.0.0.1", 22)},
            config_dir=str(self.cwd / "maps"), mappings_from_config_dir=True,
            state_dir=str(self.cwd / "st"),
        ))
        options = self.parse(["-r", "us-east-1", "-d", "web:80", "-t", TOKEN])
        self.assertEqual(
            options["proxy-config"].destination_apps, {"": TcpTarget("web", 80)}
        )

    def test_usageErrors(self) -> None:
        """
        Bad values, unknown options and missing arguments are
        L{OptionError}s: the reference's reason where it has one, lpxy's line
        where it says more.
        """
        cases = {
            ("-t", TOKEN, "-r", "us-east-1", "-e", "h", "-s", "1"): (
                "Must specify one and only one of --region/-r or --proxy-endpoint/-e"
                " options",
                "--region/-r and --proxy-endpoint/-e are exclusive: give only one",
            ),
            ("-t", TOKEN, "-r", "us-east-1", "-s", "1", "--colour"):
                ("unrecognised option '--colour'", None),
            ("-t",): ("the required argument for option '--access-token' is missing", None),
            ("-t", TOKEN, "-r", "us-east-1", "-s", "1", "extra"):
                (None, "unexpected argument 'extra'"),
            ("-t", TOKEN, "-r", "us-east-1", "foo", "bar", "-s", "1"):
                (None, "unexpected argument 'foo'"),
        }
        for argv, expected in cases.items():
            e = self.assertRaises(OptionError, self.parse, list(argv))
            self.assertEqual((e.reason, e.detail), expected)

    def test_badBundle(self) -> None:
        """
        A C{--capath} file that holds no PEM certificate is a usage error
        at once; a good bundle is accepted.
        """
        (self.cwd / "bad.pem").write_text("not a certificate\n")
        e = self.assertRaises(
            OptionError, self.parse, ["-t", TOKEN, "-r", "us-east-1", "-s", "1", "-c", "bad.pem"]
        )
        self.assertIsNone(e.reason)
        assert e.detail is not None
        self.assertTrue(
            e.detail.startswith(f"--capath {self.cwd / 'bad.pem'}: not a PEM file"), e.detail
        )
        self.assertNotIn("\n", e.detail)
        ca = str(make_test_pki(self.cwd).ca_cert_path)
        options = self.parse(["-t", TOKEN, "-r", "us-east-1", "-s", "1", "-c", ca])
        self.assertEqual(options["proxy-config"].capath, ca)

    def test_version(self) -> None:
        """
        C{-V} and C{--version} print the version and exit 0 at once, whatever
        the other options say.
        """
        for flag in ("-V", "--version"):
            out = io.StringIO()
            options = Options(environ={}, cwd=self.cwd, stdout=out)
            e = self.assertRaises(
                SystemExit, options.parseOptions, [flag, "-v", "999", "-r", "x", "-e", "y"]
            )
            self.assertEqual(e.code, 0)
            self.assertEqual(out.getvalue(), f"localproxy (lpxy) {__version__}\n")

    def test_help(self) -> None:
        """
        C{-h} and C{--help} print every option and exit 0.
        """
        for flag in ("-h", "--help"):
            out = io.StringIO()
            self.patch(sys, "stdout", out)
            e = self.assertRaises(SystemExit, self.parse, [flag])
            self.assertEqual(e.code, 0)
            text = out.getvalue()
            self.assertTrue(text.startswith("Usage: localproxy [options]\n"), text)
            for name in [
                "-t, --access-token=", "-i, --client-token=", "-e, --proxy-endpoint=",
                "-r, --region=", "-s, --source-listen-port=", "-d, --destination-app=",
                "-b, --local-bind-address=", "-c, --capath=", "-k, --no-ssl-host-verify",
                "--export-default-settings=", "--settings-json=", "--config=",
                "-v, --verbose=", "-m, --mode=", "-y, --destination-client-type=",
                "--config-dir=", "-V, --version", "-h, --help",
            ]:
                self.assertIn(name, text)

    def test_exportDefaultSettings(self) -> None:
        """
        C{--export-default-settings FILE} writes the reference's file and
        exits 0 at once.
        """
        e = self.assertRaises(
            SystemExit, self.parse, ["--export-default-settings", "out.json", "-v", "999"]
        )
        self.assertEqual(e.code, 0)
        self.assertEqual((self.cwd / "out.json").read_text(), REFERENCE_TEXT)

    def test_exportUnwritable(self) -> None:
        """
        A file that cannot be written is a usage error.
        """
        e = self.assertRaises(
            OptionError, self.parse, ["--export-default-settings", "no/such/dir.json"]
        )
        self.assertEqual(
            (e.reason, e.detail),
            (None, "--export-default-settings: cannot write no/such/dir.json:"
             " No such file or directory"),
        )

    def test_underTwistd(self) -> None:
        """
        As a twistd subcommand, the options point twistd's C{--logger} at
        the filtered observer with the chosen verbosity.
        """
        stdout = io.StringIO()
        self.patch(sys, "stdout", stdout)
        parent = {"logger": None, "logfile": None, "nodaemon": 1, "syslog": 0}
        twistd_log = TwistdLog("tests.test_proxy_tap.SOME_LOG")
        options = Options(environ={}, cwd=self.cwd, twistd_log=twistd_log)
        options.parent = parent  # what twistd's ServerOptions does
        options.parseOptions(["-t", TOKEN, "-r", "us-east-1", "-s", "1", "-v", "2"])
        self.assertEqual(parent["logger"], "tests.test_proxy_tap.SOME_LOG.observer")
        observer = twistd_log.observer()
        for level in (LogLevel.warn, LogLevel.error):
            observer({"log_format": "at {level}", "level": level.name, "log_level": level,
                      "log_namespace": "x"})
        self.assertEqual(stdout.getvalue().count("at "), 1, stdout.getvalue())
        self.assertIn("at error", stdout.getvalue())
        self.assertEqual(
            options.getSynopsis(), "Usage: twistd [twistd options] localproxy [options]"
        )

    def test_tokenNotInRepr(self) -> None:
        """
        The resolved configuration never shows the tokens.
        """
        options = self.parse(["-t", TOKEN, "-i", CLIENT, "-r", "us-east-1", "-s", "1"])
        self.assertNotIn(TOKEN, repr(options["proxy-config"]))
        self.assertNotIn(CLIENT, repr(options["proxy-config"]))

    def test_tokensHiddenInOptionsRepr(self) -> None:
        """
        The parsed options (a dict) show neither token nor the web proxy's
        password in their repr; other values still show.
        """
        environ = {"https_proxy": "http://user:s3cret-pass@webproxy:3128"}
        options = Options(environ=environ, cwd=self.cwd)
        options.parseOptions(["-t", TOKEN, "-i", CLIENT, "-r", "us-east-1", "-s", "1"])
        shown = repr(options)
        for secret in (TOKEN, CLIENT, "s3cret-pass"):
            self.assertNotIn(secret, shown)
        self.assertIn("'access-token': '<hidden>'", shown)
        self.assertIn("'client-token': '<hidden>'", shown)
        self.assertIn("'region': 'us-east-1'", shown)
        self.assertIn("webproxy", shown)
        self.assertEqual(options["access-token"], TOKEN)

    def test_absentTokenReprNone(self) -> None:
        """
        An option not given shows as L{None}, not as hidden.
        """
        options = self.parse(["-r", "us-east-1", "-s", "1"],
                             environ={"AWSIOT_TUNNEL_ACCESS_TOKEN": TOKEN})
        self.assertIn("'access-token': None", repr(options))
        self.assertNotIn(TOKEN, repr(options))


class MakeServiceTests(SynchronousTestCase):
    """
    L{makeService} builds the proxy service inside a L{ProcessService}.
    """

    def test_service(self) -> None:
        """
        The service factory gets the configuration and the reactor; the
        root service runs it.
        """
        options = Options(environ={"AWSIOT_TUNNEL_ACCESS_TOKEN": TOKEN})
        options.parseOptions(["-r", "us-east-1", "-s", "5555"])
        reactor = MemoryReactor()
        made: list[FakeProxyService] = []

        def factory(config: ProxyConfig, reactor: Any) -> FakeProxyService:
            made.append(FakeProxyService(config, reactor))
            return made[0]

        root = makeService(options, reactor, factory)
        self.assertIsInstance(root, ProcessService)
        [proxy] = made
        self.assertIs(proxy.config, options["proxy-config"])
        self.assertIs(proxy.reactor, reactor)
        self.assertEqual(list(root), [proxy])
