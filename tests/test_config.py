"""
Tests for L{lpxy.proxy.config.resolve}: command line, C{--config} file,
environment, settings and C{--config-dir} into one L{ProxyConfig}.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from attrs import evolve
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from lpxy.proxy import cli
from lpxy.proxy.config import (
    ProxyConfig,
    TcpTarget,
    TunnelEndpoint,
    UnixTarget,
    WebProxy,
    resolve,
)
from lpxy.proxy.option_errors import TRY_HELP, OptionError
from lpxy.proxy.settings import ProxySettings, WebSocketSettings
from lpxy.proxy.statedir import STATE_DIRECTORY_ENV
from tests.support.permissions import permissions_enforced

TOKEN = "AQGAAXiK-source-token-Zm9vYmFy"
CLIENT = "0123456789abcdef-0123456789abcdef"
US_EAST = TunnelEndpoint("data.tunneling.iot.us-east-1.amazonaws.com")
ENDPOINT_CHOICE = (
    "Must specify one and only one of --region/-r or --proxy-endpoint/-e options"
)


class ResolveCase(SynchronousTestCase):
    """
    Helpers: a fresh working directory per test, files in it, and
    L{resolve} with the token never leaking into what went wrong.
    """

    def setUp(self) -> None:
        self.cwd = Path(self.mktemp()).resolve()
        self.cwd.mkdir()
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    def file(self, name: str, text: str) -> Path:
        path = self.cwd / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path

    def resolve(
        self, options: Mapping[str, object], environ: dict[str, str] | None = None
    ) -> ProxyConfig:
        """
        L{resolve} with C{STATE_DIRECTORY} set (unless C{environ} sets it);
        the state directory is checked here and left out of the result
        (C{state_dir} L{None}), so tests compare whole configurations.
        """
        state = str(self.cwd / "state")
        config = resolve(options, {STATE_DIRECTORY_ENV: state, **(environ or {})}, self.cwd)
        self.assertNotIn(TOKEN, repr(config))
        self.assertNotIn(CLIENT, repr(config))
        if "state-dir" not in options and not (environ or {}).get(STATE_DIRECTORY_ENV):
            self.assertEqual(config.state_dir, None if config.client_token else state)
            config = evolve(config, state_dir=None)
        return config

    def assertUsage(
        self,
        options: Mapping[str, object],
        message: str,
        environ: dict[str, str] | None = None,
        reason: str | None = None,
    ) -> None:
        """
        L{resolve} refuses C{options}: the reference's C{reason} (if any),
        then lpxy's one-line C{message}, then the reference's trailer.
        """
        e = self.assertRaises(OptionError, resolve, options, environ or {}, self.cwd)
        detail = (e.detail or "").replace(str(self.cwd), "CWD")
        self.assertEqual((e.reason, detail), (reason, message))
        self.assertNotIn("\n", detail)
        lines = [line for line in (reason, e.detail) if line is not None]
        self.assertEqual(str(e), "\n".join([*lines, TRY_HELP]))
        self.assertNotIn(TOKEN, str(e))
        self.assertNotIn(CLIENT, str(e))

    def warnings(self) -> list[str]:
        return [
            formatEvent(e) for e in self.events if e["log_level"] >= LogLevel.warn
        ]


class CommandLineTests(ResolveCase):
    """
    The command line alone, compared as whole configurations.
    """

    def test_minimalSource(self) -> None:
        """
        C{-t -r -s PORT}: source mode, one unnamed mapping, every default.
        """
        config = self.resolve(
            {"access-token": TOKEN, "region": "us-east-1", "source-listen-port": "5555"}
        )
        self.assertEqual(config, ProxyConfig(
            mode="source", access_token=TOKEN, endpoint=US_EAST,
            source_ports={"": 5555},
        ))
        self.assertEqual(config.listen_address, "localhost")

    def test_everything(self) -> None:
        """
        Every option of a source at once.
        """
        capath = self.cwd / "cas"
        capath.mkdir()
        settings = self.file("s.json", json.dumps(
            {"tunneling": {"proxy": {"websocket": {"ping_period_ms": 1000}}}}
        ))
        config = self.resolve({
            "access-token": TOKEN, "client-token": CLIENT,
            "proxy-endpoint": "tunnel.example.com:8443",
            "source-listen-port": "SSH1=5555,HTTP1=8080",
            "local-bind-address": "0.0.0.0", "capath": "cas",
            "no-ssl-host-verify": True, "settings-json": str(settings),
            "verbose": "6", "mode": "src", "destination-client-type": "V2",
        })
        self.assertEqual(config, ProxyConfig(
            mode="source", access_token=TOKEN, client_token=CLIENT,
            endpoint=TunnelEndpoint("tunnel.example.com", 8443),
            source_ports={"SSH1": 5555, "HTTP1": 8080},
            bind_address="0.0.0.0", capath=str(capath), verify_ssl=False,
            verbosity=6, destination_client_type="V2",
            settings=evolve(ProxySettings(), websocket=WebSocketSettings(ping_period_ms=1000)),
        ))
        self.assertEqual(config.listen_address, "0.0.0.0")

    def test_destination(self) -> None:
        """
        C{-d} means destination mode; C{-b} is the host of bare ports.
        """
        config = self.resolve({
            "access-token": TOKEN, "region": "cn-north-1",
            "destination-app": "SSH1=22,WEB=web:80,U=/run/app.sock",
            "local-bind-address": "192.168.1.5",
        })
        self.assertEqual(config, ProxyConfig(
            mode="destination", access_token=TOKEN,
            endpoint=TunnelEndpoint("data.tunneling.iot.cn-north-1.amazonaws.com.cn"),
            destination_apps={
                "SSH1": TcpTarget("192.168.1.5", 22), "WEB": TcpTarget("web", 80),
                "U": UnixTarget("/run/app.sock"),
            },
            bind_address="192.168.1.5",
        ))

    def test_destinationDefaultHost(self) -> None:
        """
        Without C{-b}, bare destination ports are on 127.0.0.1, as in the
        reference.
        """
        config = self.resolve(
            {"access-token": TOKEN, "region": "us-east-1", "destination-app": "22",
             "mode": "destination"}
        )
        self.assertEqual(config.destination_apps, {"": TcpTarget("127.0.0.1", 22)})

    def test_modeOnlySource(self) -> None:
        """
        C{-m src} alone: a source with no map, to listen on random ports.
        """
        config = self.resolve({"access-token": TOKEN, "region": "us-east-1", "mode": "source"})
        self.assertEqual(config, ProxyConfig(
            mode="source", access_token=TOKEN, endpoint=US_EAST,
            mappings_from_config_dir=True,
        ))

    def test_endpointForms(self) -> None:
        """
        C{-e} accepts URLs and bracketed IPv6 besides the reference's form.
        """
        for text, expected in {
            "ws://127.0.0.1:8080": TunnelEndpoint("127.0.0.1", 8080, False),
            "wss://[::1]:8443": TunnelEndpoint("::1", 8443, True),
            "[::1]:9000": TunnelEndpoint("::1", 9000, True),
            "Host.Example": TunnelEndpoint("host.example", 443, True),
        }.items():
            config = self.resolve(
                {"access-token": TOKEN, "proxy-endpoint": text, "source-listen-port": "1"}
            )
            self.assertEqual(config.endpoint, expected)

    def test_tokenWarning(self) -> None:
        """
        A token on the command line is accepted with a warning naming the
        environment variable, and without the token.
        """
        self.resolve({"access-token": TOKEN, "region": "us-east-1", "source-listen-port": "1"})
        [warning] = self.warnings()
        # The reference's warning (messages.md section 1b), then lpxy's why.
        self.assertTrue(
            warning.startswith(
                "Found access token supplied via CLI arg. Consider using environment"
                " variable AWSIOT_TUNNEL_ACCESS_TOKEN instead"
            ),
            warning,
        )
        self.assertIn("other users of this machine can see a command line", warning)
        self.assertNotIn(TOKEN, warning)

    def test_noWarningFromEnvironment(self) -> None:
        """
        A token from the environment draws no warning.
        """
        self.resolve(
            {"region": "us-east-1", "source-listen-port": "1"},
            {"AWSIOT_TUNNEL_ACCESS_TOKEN": TOKEN},
        )
        self.assertEqual(self.warnings(), [])


class PrecedenceTests(ResolveCase):
    """
    Command line > --config > environment > --settings-json.
    """

    def test_environmentOnly(self) -> None:
        """
        The four variables stand in for C{-t}, C{-i}, C{-e} and C{-r}.
        """
        config = self.resolve({"source-listen-port": "5555"}, {
            "AWSIOT_TUNNEL_ACCESS_TOKEN": TOKEN,
            "AWSIOT_TUNNEL_CLIENT_TOKEN": CLIENT,
            "AWSIOT_TUNNEL_ENDPOINT": "ws://localhost:8080",
        })
        self.assertEqual(config, ProxyConfig(
            mode="source", access_token=TOKEN, client_token=CLIENT,
            endpoint=TunnelEndpoint("localhost", 8080, False), source_ports={"": 5555},
        ))
        config = self.resolve(
            {"source-listen-port": "5555"},
            {"AWSIOT_TUNNEL_ACCESS_TOKEN": TOKEN, "AWSIOT_TUNNEL_REGION": "eu-west-1"},
        )
        self.assertEqual(
            config.endpoint, TunnelEndpoint("data.tunneling.iot.eu-west-1.amazonaws.com")
        )

    def test_emptyVariablesAreUnset(self) -> None:
        """
        An empty variable counts as unset.
        """
        config = self.resolve(
            {"access-token": TOKEN, "region": "us-east-1", "source-listen-port": "1"},
            {"AWSIOT_TUNNEL_ENDPOINT": "", "AWSIOT_TUNNEL_CLIENT_TOKEN": ""},
        )
        self.assertEqual(config.endpoint, US_EAST)
        self.assertIsNone(config.client_token)

    def test_configOverEnvironment(self) -> None:
        """
        The --config file beats the environment, value by value.
        """
        self.file("proxy.conf", f"client-token = {CLIENT}\nregion = ap-south-1\n")
        config = self.resolve({"config": "proxy.conf", "source-listen-port": "1"}, {
            "AWSIOT_TUNNEL_ACCESS_TOKEN": TOKEN,
            "AWSIOT_TUNNEL_CLIENT_TOKEN": "f" * 32,
            "AWSIOT_TUNNEL_ENDPOINT": "ws://localhost:1",
        })
        self.assertEqual(config, ProxyConfig(
            mode="source", access_token=TOKEN, client_token=CLIENT,
            endpoint=TunnelEndpoint("data.tunneling.iot.ap-south-1.amazonaws.com"),
            source_ports={"": 1},
        ))

    def test_commandLineOverConfig(self) -> None:
        """
        The command line beats the --config file, value by value, and its
        choice of endpoint and mapping wins as a whole.
        """
        self.file("proxy.conf", "\n".join([
            "# a comment", "", "access-token = other-token",
            "proxy-endpoint = ws://localhost:1", "destination-app = 22",
            "verbose = 2", "local-bind-address = ::1", "no-ssl-host-verify = yes",
        ]))
        config = self.resolve({
            "config": "proxy.conf", "access-token": TOKEN, "region": "us-east-1",
            "source-listen-port": "SSH=2222", "verbose": "5",
        })
        self.assertEqual(config, ProxyConfig(
            mode="source", access_token=TOKEN, endpoint=US_EAST,
            source_ports={"SSH": 2222}, verbosity=5, bind_address="::1",
            verify_ssl=False,
        ))

    def test_configAlone(self) -> None:
        """
        Every option can come from the --config file.
        """
        settings = self.file("s.json", '{"tunneling": {"proxy": {"default_bind_address": "::"}}}')
        self.file("proxy.conf", "\n".join([
            f"access-token = {TOKEN}", f"client-token={CLIENT}", "region = us-east-1",
            "mode = src", "source-listen-port = A=1,B=2", "verbose = 0",
            f"settings-json = {settings}", "destination-client-type = V1",
            "no-ssl-host-verify = false", "; another comment",
        ]))
        config = self.resolve({"config": "proxy.conf"})
        self.assertEqual(config, ProxyConfig(
            mode="source", access_token=TOKEN, client_token=CLIENT, endpoint=US_EAST,
            source_ports={"A": 1, "B": 2}, verbosity=0, destination_client_type="V1",
            settings=evolve(ProxySettings(), default_bind_address="::"),
        ))
        self.assertEqual(config.listen_address, "::")

    def test_settingsOverrideRegion(self) -> None:
        """
        --settings-json region overrides and format choose the endpoint,
        and -b beats its default_bind_address.
        """
        settings = self.file("s.json", json.dumps({"tunneling": {"proxy": {
            "endpoint_format": "t.%s.example.org",
            "region_endpoint_overrides": {"lab-1": "lab.example.org:9443"},
            "default_bind_address": "0.0.0.0",
        }}}))
        base = {"access-token": TOKEN, "settings-json": str(settings), "source-listen-port": "1"}
        config = self.resolve({**base, "region": "lab-1", "local-bind-address": "127.0.0.2"})
        self.assertEqual(config.endpoint, TunnelEndpoint("lab.example.org", 9443))
        self.assertEqual(config.listen_address, "127.0.0.2")
        config = self.resolve({**base, "region": "eu-north-1"})
        self.assertEqual(config.endpoint, TunnelEndpoint("t.eu-north-1.example.org"))
        self.assertEqual(config.listen_address, "0.0.0.0")
        config = self.resolve({**base, "region": "cn-northwest-1"})
        self.assertEqual(
            config.endpoint,
            TunnelEndpoint("data.tunneling.iot.cn-northwest-1.amazonaws.com.cn"),
        )

    def test_endpointChoiceByLayer(self) -> None:
        """
        -r on the command line beats AWSIOT_TUNNEL_ENDPOINT in the
        environment: the first source naming either decides.
        """
        config = self.resolve(
            {"access-token": TOKEN, "region": "us-east-1", "source-listen-port": "1"},
            {"AWSIOT_TUNNEL_ENDPOINT": "ws://localhost:1"},
        )
        self.assertEqual(config.endpoint, US_EAST)


class WebProxyTests(ResolveCase):
    """
    C{https_proxy}, C{HTTPS_PROXY} and C{NO_PROXY} from the environment.
    """

    base: ClassVar[Mapping[str, object]] = {
        "access-token": TOKEN, "region": "us-east-1", "source-listen-port": "1",
    }

    def test_lowerCaseWins(self) -> None:
        """
        C{https_proxy} beats C{HTTPS_PROXY}.
        """
        config = self.resolve(self.base, {
            "https_proxy": "http://u:p@proxy:8080", "HTTPS_PROXY": "https://other",
        })
        self.assertEqual(config.web_proxy, WebProxy("proxy", 8080, False, "u", "p"))
        config = self.resolve(self.base, {"HTTPS_PROXY": "https://other"})
        self.assertEqual(config.web_proxy, WebProxy("other", 3128, True))

    def test_noProxy(self) -> None:
        """
        An endpoint matching C{NO_PROXY} (or C{no_proxy}) goes direct.
        """
        config = self.resolve(self.base, {
            "https_proxy": "proxy", "NO_PROXY": "localhost,.amazonaws.com",
        })
        self.assertIsNone(config.web_proxy)
        self.assertEqual(config.no_proxy, ("localhost", ".amazonaws.com"))
        config = self.resolve(self.base, {"https_proxy": "proxy", "no_proxy": "example.com"})
        self.assertEqual(config.web_proxy, WebProxy("proxy"))
        self.assertEqual(config.no_proxy, ("example.com",))

    def test_bad(self) -> None:
        """
        A bad web proxy is a usage error naming the variable, never its
        value.
        """
        self.assertUsage(
            self.base,
            "HTTPS_PROXY: unsupported scheme 'socks5':"
            " expected [http|https]://[USER:PASSWORD@]HOST[:PORT]",
            {"HTTPS_PROXY": "socks5://u:sekrit@h"},
        )
        self.assertUsage(
            self.base,
            "https_proxy: expected [http|https]://[USER:PASSWORD@]HOST[:PORT]",
            {"https_proxy": "http://u:sekrit@h:0"},
        )


class ConfigDirTests(ResolveCase):
    """
    C{--config-dir}: mappings from C{id = endpoint} files when the command
    line gave none.
    """

    def test_defaultDirectory(self) -> None:
        """
        C{config} in the working directory is read recursively, in name
        order; the first file naming an id wins.
        """
        self.file("config/a.ini", "SSH1 = 5555\n# comment\nRDP = 3389\n")
        self.file("config/b/c.ini", "SSH1 = 6666\nHTTP = 8080\n")
        config = self.resolve({"access-token": TOKEN, "region": "us-east-1", "mode": "src"})
        self.assertEqual(config, ProxyConfig(
            mode="source", access_token=TOKEN, endpoint=US_EAST,
            source_ports={"SSH1": 5555, "RDP": 3389, "HTTP": 8080},
            config_dir=str(self.cwd / "config"), mappings_from_config_dir=True,
        ))

    def test_explicitDestination(self) -> None:
        """
        An explicit directory supplies a destination's apps.
        """
        self.file("maps/one", "SSH1 = 22\nWEB = web.local:80\nSOCK = /run/s.sock\n")
        config = self.resolve({
            "access-token": TOKEN, "region": "us-east-1", "mode": "dst",
            "config-dir": "maps", "local-bind-address": "10.0.0.9",
        })
        self.assertEqual(config, ProxyConfig(
            mode="destination", access_token=TOKEN, endpoint=US_EAST,
            destination_apps={
                "SSH1": TcpTarget("10.0.0.9", 22), "WEB": TcpTarget("web.local", 80),
                "SOCK": UnixTarget("/run/s.sock"),
            },
            bind_address="10.0.0.9",
            config_dir=str(self.cwd / "maps"), mappings_from_config_dir=True,
        ))

    def test_commandLineMapWins(self) -> None:
        """
        A map on the command line means the directory is not read.
        """
        self.file("config/a.ini", "this is not a mapping\n")
        config = self.resolve(
            {"access-token": TOKEN, "region": "us-east-1", "source-listen-port": "SSH1=1"}
        )
        self.assertEqual(config.source_ports, {"SSH1": 1})
        self.assertFalse(config.mappings_from_config_dir)
        self.assertIsNone(config.config_dir)

    def test_unreadableSkipped(self) -> None:
        """
        A file that cannot be read is skipped with a warning.
        """
        self.file("config/bad.bin", "").write_bytes(b"\xff\xfe\x00junk")
        self.file("config/good.ini", "SSH1 = 5555\n")
        config = self.resolve({"region": "us-east-1", "mode": "src"},
                              {"AWSIOT_TUNNEL_ACCESS_TOKEN": TOKEN})
        self.assertEqual(config.source_ports, {"SSH1": 5555})
        [warning] = self.warnings()
        self.assertIn("bad.bin", warning)

    def test_unreadableByPermission(self) -> None:
        """
        A file without read permission is skipped too (also under root,
        which reads it only through capabilities the test sets aside).
        """
        locked = self.file("config/locked.ini", "SSH1 = 1\n")
        locked.chmod(0)
        self.addCleanup(locked.chmod, 0o644)
        self.file("config/z.ini", "SSH1 = 2\n")
        with permissions_enforced():
            config = self.resolve({"region": "us-east-1", "mode": "src"},
                                  {"AWSIOT_TUNNEL_ACCESS_TOKEN": TOKEN})
        self.assertEqual(config.source_ports, {"SSH1": 2})

    def test_unlistableDirectorySkipped(self) -> None:
        """
        A directory below that cannot be listed is skipped with a warning.
        """
        self.file("config/a.ini", "SSH1 = 5555\n")
        walk = os.walk

        def failingWalk(top: object, onerror: Any = None) -> Any:
            onerror(PermissionError(13, "Permission denied", str(self.cwd / "config/locked")))
            return walk(top)

        self.patch(os, "walk", failingWalk)
        config = self.resolve({"region": "us-east-1", "mode": "src"},
                              {"AWSIOT_TUNNEL_ACCESS_TOKEN": TOKEN})
        self.assertEqual(config.source_ports, {"SSH1": 5555})
        [warning] = self.warnings()
        self.assertIn("config/locked: Permission denied", warning)

    def test_emptyDefaultIgnored(self) -> None:
        """
        An empty default C{config} directory is no error.
        """
        (self.cwd / "config").mkdir()
        config = self.resolve({"access-token": TOKEN, "region": "us-east-1", "mode": "src"})
        self.assertEqual(config.source_ports, {})
        self.assertIsNone(config.config_dir)

    def test_errors(self) -> None:
        """
        A missing, empty or non-directory explicit path, a malformed line,
        a bad value, and a destination with nothing to connect to.
        """
        base = {"access-token": TOKEN, "region": "us-east-1", "mode": "src"}
        form = "is not a non-empty directory of ID = ENDPOINT files"
        self.assertUsage(
            {**base, "config-dir": "nope"}, f"--config-dir: 'nope' {form}",
            reason="Invalid configuration directory: nope",
        )
        (self.cwd / "empty").mkdir()
        self.assertUsage(
            {**base, "config-dir": "empty"}, f"--config-dir: 'empty' {form}",
            reason="Invalid configuration directory: empty",
        )
        self.file("afile", "x")
        self.assertUsage(
            {**base, "config-dir": "afile"}, f"--config-dir: 'afile' {form}",
            reason="Invalid configuration directory: afile",
        )
        self.file("m1/a", "SSH1 5555\n")
        self.assertUsage(
            {**base, "config-dir": "m1"},
            "--config-dir file CWD/m1/a line 1: expected ID = ENDPOINT, e.g. SSH1 = 22",
        )
        self.file("m2/a", "\nSSH1 = 70000\n")
        self.assertUsage(
            {**base, "config-dir": "m2"},
            "--config-dir file CWD/m2/a line 2: port '70000' is not 1..65535",
        )
        self.file("m3/a", "SSH1 = 1\nSSH1 = 2\n")
        self.assertUsage(
            {**base, "config-dir": "m3"},
            "--config-dir file CWD/m3/a line 2: service id 'SSH1' given twice",
        )
        self.file("m4/a", "S.1 = 1\n")
        self.assertUsage(
            {**base, "config-dir": "m4"},
            "--config-dir file CWD/m4/a line 1: service id 'S.1' is not 1 to 128 of"
            " [a-zA-Z0-9_-]",
        )
        self.assertUsage(
            {**base, "mode": "dst"},
            "destination mode needs --destination-app/-d or ID = ENDPOINT files in"
            " --config-dir (default ./config)",
        )


class ConfigFileTests(ResolveCase):
    """
    The --config file's own errors.
    """

    def test_errors(self) -> None:
        """
        Missing file, malformed line, unknown, repeated or forbidden name,
        bad flag value.
        """
        self.assertUsage(
            {"config": "none.conf"},
            "--config: cannot read CWD/none.conf: No such file or directory",
            reason="can not read options configuration file 'none.conf'",
        )
        self.file("a.conf", "region us-east-1\n")
        self.assertUsage(
            {"config": "a.conf"},
            "--config CWD/a.conf line 1: expected long-name = value, e.g. region = us-east-1",
            reason="the options configuration file contains an invalid line 'region us-east-1'",
        )
        unknown = (
            "expected a long option name other than config, export-default-settings,"
            " help, version"
        )
        self.file("b.conf", "\nregion = x\ncolour = blue\n")
        self.assertUsage(
            {"config": "b.conf"}, f"--config CWD/b.conf line 3: unknown option 'colour'; {unknown}",
            reason="unrecognised option 'colour'",
        )
        self.file("c.conf", "config = other.conf\n")
        self.assertUsage(
            {"config": "c.conf"}, f"--config CWD/c.conf line 1: unknown option 'config'; {unknown}",
            reason="unrecognised option 'config'",
        )
        self.file("d.conf", "region = a\nregion = b\n")
        self.assertUsage(
            {"config": "d.conf"}, "--config CWD/d.conf line 2: region given twice",
            reason="option '--region' cannot be specified more than once",
        )
        self.file("e.conf", "no-ssl-host-verify = perhaps\n")
        self.assertUsage(
            {"config": "e.conf"},
            "no-ssl-host-verify (--config CWD/e.conf): expected true or false",
            reason="the argument ('perhaps') for option '--no-ssl-host-verify' is invalid",
        )
        self.file("f.conf", "region = US\n")
        self.assertUsage(
            {"config": "f.conf", "access-token": TOKEN, "source-listen-port": "1"},
            "region (--config CWD/f.conf): expected lower-case letters, digits and '-'"
            " (at most 64), e.g. us-east-1, got 'US'",
            reason="Region must contain only lowercase letters, numbers, and hyphens",
        )


class BadOptionTests(ResolveCase):
    """
    Every bad value or combination is one line naming the option and the
    valid form.
    """

    source: ClassVar[Mapping[str, object]] = {
        "access-token": TOKEN, "region": "us-east-1", "source-listen-port": "5555",
    }

    def test_endpointChoice(self) -> None:
        """
        Both -r and -e, or neither.
        """
        self.assertUsage(
            {**self.source, "proxy-endpoint": "h"},
            "--region/-r and --proxy-endpoint/-e are exclusive: give only one",
            reason=ENDPOINT_CHOICE,
        )
        self.assertUsage(
            {"access-token": TOKEN, "source-listen-port": "1"},
            "give one of --region/-r or --proxy-endpoint/-e"
            " (or AWSIOT_TUNNEL_REGION or AWSIOT_TUNNEL_ENDPOINT)",
            reason=ENDPOINT_CHOICE,
        )
        self.assertUsage(
            {"access-token": TOKEN, "source-listen-port": "1"},
            "AWSIOT_TUNNEL_REGION and AWSIOT_TUNNEL_ENDPOINT are exclusive: give only one",
            {"AWSIOT_TUNNEL_REGION": "us-east-1", "AWSIOT_TUNNEL_ENDPOINT": "h"},
            reason=ENDPOINT_CHOICE,
        )

    def test_badEndpointAndRegion(self) -> None:
        """
        A malformed endpoint or region.
        """
        self.assertUsage(
            {**self.source, "region": None, "proxy-endpoint": "host:99999"},
            "--proxy-endpoint/-e: expected HOST[:PORT], [IPV6]:PORT, wss://HOST[:PORT]"
            " or ws://HOST[:PORT], got 'host:99999'",
            reason="Invalid endpoint specified: host:99999",
        )
        self.assertUsage(
            {**self.source, "region": "us east"},
            "--region/-r: expected lower-case letters, digits and '-' (at most 64),"
            " e.g. us-east-1, got 'us east'",
            reason="Region must contain only lowercase letters, numbers, and hyphens",
        )
        self.assertUsage(
            {"access-token": TOKEN, "source-listen-port": "1"},
            "AWSIOT_TUNNEL_ENDPOINT: expected HOST[:PORT], [IPV6]:PORT, wss://HOST[:PORT]"
            " or ws://HOST[:PORT], got 'ftp://x'",
            {"AWSIOT_TUNNEL_ENDPOINT": "ftp://x"},
            reason="Proxy endpoint contains invalid characters",
        )

    def test_mappingChoice(self) -> None:
        """
        Both -s and -d; neither nor -m; a map that contradicts -m.
        """
        self.assertUsage(
            {**self.source, "destination-app": "22"},
            "--source-listen-port/-s and --destination-app/-d are exclusive: give only one",
            reason="Must specify one and only one of --source-listen-port/-s or"
            " --destination-app/-d",
        )
        self.assertUsage(
            {"access-token": TOKEN, "region": "us-east-1"},
            "give one of --source-listen-port/-s, --destination-app/-d or --mode/-m",
            reason="Must specify one of --source-listen-port/-s or --destination-app/-d"
            " or --mode",
        )
        self.assertUsage(
            {**self.source, "mode": "dst"},
            "--source-listen-port/-s means source mode, but --mode/-m is dst",
            reason="-s and --mode have mismatched mode. Mode is set to destination!",
        )
        self.assertUsage(
            {"access-token": TOKEN, "region": "us-east-1", "destination-app": "22",
             "mode": "source"},
            "--destination-app/-d means destination mode, but --mode/-m is source",
            reason="-s and --mode have mismatched mode. Mode is set to source!",
        )

    def test_badMaps(self) -> None:
        """
        Ports out of range, empty or duplicate maps.
        """
        self.assertUsage(
            {**self.source, "source-listen-port": "65536"},
            "--source-listen-port/-s: port '65536' is not 1..65535: expected PORT or"
            " ID=PORT[,ID=PORT...], e.g. 5555 or SSH1=5555,HTTP1=8080",
            reason="Port must be between 1 and 65535",
        )
        self.assertUsage(
            {**self.source, "source-listen-port": ","},
            "--source-listen-port/-s: empty mapping: expected PORT or ID=PORT[,ID=PORT...],"
            " e.g. 5555 or SSH1=5555,HTTP1=8080",
        )
        self.assertUsage(
            {"access-token": TOKEN, "region": "us-east-1", "destination-app": "A=22,A=23"},
            "--destination-app/-d: service id 'A' given twice: expected PORT, HOST:PORT,"
            " [IPV6]:PORT or a Unix socket path, or ID=that[,ID=that...],"
            " e.g. 22 or SSH1=22,HTTP1=host:80",
        )

    def test_badMode(self) -> None:
        """
        An unknown mode.
        """
        self.assertUsage(
            {**self.source, "mode": "both"},
            "--mode/-m: expected src, source, dst or destination, got 'both'",
            reason="Mode value is wrong! Allowed values are: src, dst, source, destination",
        )

    def test_badClientType(self) -> None:
        """
        An unknown destination client type, or one given to a destination.
        """
        self.assertUsage(
            {**self.source, "destination-client-type": "V3"},
            "--destination-client-type/-y: expected V1 or V2, got 'V3'",
        )
        self.assertUsage(
            {"access-token": TOKEN, "region": "us-east-1", "destination-app": "22",
             "destination-client-type": "V1"},
            "--destination-client-type/-y is for source mode only: a destination learns"
            " its peer's version",
        )

    def test_badVerbosity(self) -> None:
        """
        Verbosity is a 16-bit number, as the reference reads it: a negative
        one wraps.
        """
        for value in ("65536", "-65536", "loud", "", "1.5", "0x10"):
            self.assertUsage(
                {**self.source, "verbose": value},
                "--verbose/-v: expected 0..65535 (0 off, 1 critical, 2 error, 3 warning,"
                f" 4 info, 5 debug, 6+ trace), got {value!r}",
                reason=f"the argument ('{value}') for option '--verbose' is invalid",
            )
        for value, verbosity in (("0", 0), ("255", 255), ("65535", 65535), ("-1", 65535)):
            config = self.resolve({**self.source, "verbose": value})
            self.assertEqual(config.verbosity, verbosity)

    def test_tokens(self) -> None:
        """
        No token anywhere; an empty, huge or control-character token; a
        malformed client token. No message holds the token.
        """
        self.assertUsage(
            {"region": "us-east-1", "source-listen-port": "1"},
            "no access token: give --access-token/-t, access-token in the --config file,"
            " or AWSIOT_TUNNEL_ACCESS_TOKEN",
            reason="the option '--access-token' is required but missing",
        )
        for token, reason in (
            ("", "Access token cannot be empty"),
            ("x" * 4097, "Access token exceeds maximum allowed length"),
            (TOKEN + "\n", "Access token contains invalid control characters"),
            (TOKEN + "\x7f", "Access token contains invalid control characters"),
        ):
            self.assertUsage(
                {**self.source, "access-token": token},
                "--access-token/-t: expected 1 to 4096 characters without control characters",
                reason=reason,
            )
        self.assertUsage(
            {"region": "us-east-1", "source-listen-port": "1"},
            "AWSIOT_TUNNEL_ACCESS_TOKEN: expected 1 to 4096 characters without control"
            " characters",
            {"AWSIOT_TUNNEL_ACCESS_TOKEN": ""},
            reason="Access token cannot be empty",
        )
        self.resolve({**self.source, "access-token": "x" * 4096})
        length = "Client token must be between 32 and 128 characters"
        for client, reason in (
            ("short", length), (CLIENT + "!", None), ("a" * 129, length), ("", length),
            (CLIENT + " ", None), (CLIENT + "\t", "Client token contains invalid control"
                                  " characters"),
        ):
            self.assertUsage(
                {**self.source, "client-token": client},
                "--client-token/-i: expected 32 to 128 characters of [a-zA-Z0-9-]",
                reason=reason,
            )
        self.assertUsage(
            {"region": "us-east-1", "source-listen-port": "1"},
            "AWSIOT_TUNNEL_CLIENT_TOKEN: expected 32 to 128 characters of [a-zA-Z0-9-]",
            {"AWSIOT_TUNNEL_ACCESS_TOKEN": TOKEN, "AWSIOT_TUNNEL_CLIENT_TOKEN": "bad"},
            reason=length,
        )

    def test_badSettings(self) -> None:
        """
        A missing or malformed settings file, or a bad value in it.
        """
        self.assertUsage(
            {**self.source, "settings-json": "none.json"},
            "--settings-json: cannot read CWD/none.json: No such file or directory",
            reason="none.json: cannot open file",
        )
        self.file("bad.json", "{")
        self.assertUsage(
            {**self.source, "settings-json": "bad.json"},
            "--settings-json: CWD/bad.json is not valid JSON: Expecting property name"
            " enclosed in double quotes at line 1",
            reason="bad.json(1): expected key string",
        )
        self.file("typed.json", '{"tunneling": {"proxy": {"tcp": {"read_buffer_size": "big"}}}}')
        self.assertUsage(
            {**self.source, "settings-json": "typed.json"},
            '--settings-json: tunneling.proxy.tcp.read_buffer_size: expected an integer,'
            ' got "big"',
        )

    def test_emptyPaths(self) -> None:
        """
        An empty path (which joined to the working directory would name
        it) is refused, naming the option.
        """
        self.assertUsage(
            {**self.source, "capath": ""},
            "--capath/-c: an empty path is not a directory or file; expected a directory"
            " of hashed CA certificates or a PEM bundle file",
            reason="Path cannot be empty",
        )
        self.assertUsage(
            {**self.source, "settings-json": ""},
            "--settings-json: an empty path is not a file; expected a JSON file of settings",
            reason="Path cannot be empty",
        )
        self.assertUsage(
            {**self.source, "config": ""},
            "--config: an empty path is not a file; expected a file of 'long-name = value'"
            " lines",
            reason="Path cannot be empty",
        )
        self.assertUsage(
            {**self.source, "config-dir": ""},
            "--config-dir: an empty path is not a directory; expected a non-empty"
            " directory of ID = ENDPOINT files",
            reason="Path cannot be empty",
        )

    def test_badDefaultBindAddress(self) -> None:
        """
        The settings' C{default_bind_address} is checked as C{-b} is; a
        good one, brackets and all, is the listening address.
        """
        self.file("bind.json", '{"tunneling": {"proxy": {"default_bind_address": "bad host!"}}}')
        self.assertUsage(
            {**self.source, "settings-json": "bind.json"},
            '--settings-json: tunneling.proxy.default_bind_address: expected a host name'
            ' or IP address, got "bad host!"',
        )
        self.file("v6.json", '{"tunneling": {"proxy": {"default_bind_address": "[::1]"}}}')
        config = self.resolve({**self.source, "settings-json": "v6.json"})
        self.assertEqual(config.listen_address, "::1")

    def test_badBindAddressAndCapath(self) -> None:
        """
        A bind address with odd characters; a CA path that does not exist.
        """
        self.assertUsage(
            {**self.source, "local-bind-address": "a b"},
            "--local-bind-address/-b: expected a host name or IP address, got 'a b'",
            reason="Bind address contains invalid characters",
        )
        self.assertUsage(
            {**self.source, "capath": "nowhere"},
            "--capath/-c: no such directory or file 'nowhere'; expected a directory of"
            " hashed CA certificates or a PEM bundle file",
        )


class FileBoundsTests(ResolveCase):
    """
    Files larger than 1 MiB, endless, or JSON nested thousands deep are one
    clear error, never a hang or a traceback.
    """

    source: ClassVar[Mapping[str, object]] = {
        "access-token": TOKEN, "region": "us-east-1", "source-listen-port": "5555",
    }
    too_large = "is larger than 1 MiB (or endless); expected a small text file"

    def test_configFile(self) -> None:
        """
        A C{--config} file over 1 MiB, or C{/dev/zero}.
        """
        self.file("big.conf", "# padding\n" * 110_000)
        self.assertUsage({"config": "big.conf"}, f"--config: CWD/big.conf {self.too_large}")
        self.assertUsage({"config": "/dev/zero"}, f"--config: /dev/zero {self.too_large}")

    def test_settingsFile(self) -> None:
        """
        A C{--settings-json} file over 1 MiB, C{/dev/zero}, or nested
        thousands deep.
        """
        self.file("big.json", " " * (1024 * 1024 + 1))
        self.assertUsage(
            {**self.source, "settings-json": "big.json"},
            f"--settings-json: CWD/big.json {self.too_large}",
        )
        self.assertUsage(
            {**self.source, "settings-json": "/dev/zero"},
            f"--settings-json: /dev/zero {self.too_large}",
        )
        self.file("deep.json", "[" * 5000 + "]" * 5000)
        self.assertUsage(
            {**self.source, "settings-json": "deep.json"},
            "--settings-json: CWD/deep.json nests JSON more than 32 deep; expected a"
            " settings file, which needs 4",
        )

    def test_configDirFile(self) -> None:
        """
        A C{--config-dir} file over 1 MiB stops the proxy, as a malformed
        one does, rather than being skipped.
        """
        self.file("maps/a", "SSH1 = 22\n")
        self.file("maps/b", "# padding\n" * 110_000)
        self.assertUsage(
            {"access-token": TOKEN, "region": "us-east-1", "mode": "src",
             "config-dir": "maps"},
            f"--config-dir file CWD/maps/b {self.too_large}",
        )

    def test_exitStatus(self) -> None:
        """
        The console script exits 1 with the message and the reference's
        trailer.
        """
        stderr = io.StringIO()
        e = self.assertRaises(
            SystemExit, cli.parse, ["--config", "/dev/zero"], stderr, {}, self.cwd
        )
        self.assertEqual(e.code, 1)
        self.assertEqual(
            stderr.getvalue().splitlines(),
            [f"--config: /dev/zero {self.too_large}", TRY_HELP],
        )
