# -*- test-case-name: tests.test_proxy_tap -*-
"""
C{twistd localproxy}: the options (the reference proxy's, flag for flag)
and L{makeService}.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

from twisted.application.service import MultiService
from twisted.python import usage
from twisted.python.reflect import namedAny

from lpxy import __version__
from lpxy._process import TWISTD_LOG, ProcessService, TwistdLog
from lpxy.proxy.config import ProxyConfig, resolve
from lpxy.proxy.settings import export_default_settings
from lpxy.proxy.verbosity import filter_twistd_logging
from lpxy.wire import CLIENT_TOKEN_CHARACTERS, CLIENT_TOKEN_MAX_LENGTH, CLIENT_TOKEN_MIN_LENGTH

VERSION_LINE = f"localproxy (lpxy) {__version__}"

#: Options whose values never show in a repr.
_SECRET_OPTIONS = frozenset({"access-token", "client-token"})


class Options(usage.Options):
    """
    The local proxy's command line, shared by C{twistd localproxy} and the
    C{localproxy} console script. After parsing, C{self["proxy-config"]}
    holds the resolved L{ProxyConfig}.
    """

    longdesc = (
        "Carries TCP connections through an AWS IoT Secure Tunnel. A source"
        " listens on local ports and forwards each connection into the tunnel;"
        " a destination connects each stream it receives to a local"
        " application. Options may also come from a --config file and from"
        " AWSIOT_TUNNEL_ACCESS_TOKEN, AWSIOT_TUNNEL_CLIENT_TOKEN,"
        " AWSIOT_TUNNEL_ENDPOINT and AWSIOT_TUNNEL_REGION; the command line"
        " wins, then the --config file, then the environment. A web proxy is"
        " taken from https_proxy or HTTPS_PROXY (and NO_PROXY)."
    )

    optFlags: ClassVar[list[list[Any]]] = [
        ["no-ssl-host-verify", "k",
         "Do not verify the service's certificate or host name (INSECURE: tests only)."],
    ]

    optParameters: ClassVar[list[list[Any]]] = [
        ["access-token", "t", None,
         "Access token from OpenTunnel. Prefer AWSIOT_TUNNEL_ACCESS_TOKEN: a command"
         " line is visible to other users."],
        ["client-token", "i", None,
         f"Client token, {CLIENT_TOKEN_MIN_LENGTH} to {CLIENT_TOKEN_MAX_LENGTH} of"
         f" [{CLIENT_TOKEN_CHARACTERS}], sent on every connection so that"
         " reconnecting works (default: one made up for this process)."],
        ["proxy-endpoint", "e", None,
         "Tunnel endpoint as HOST[:PORT] (TLS, port 443 by default), [IPV6]:PORT,"
         " wss://HOST[:PORT] or ws://HOST[:PORT]. Not with --region."],
        ["region", "r", None,
         "AWS region of the tunnel, e.g. us-east-1; picks the endpoint. Not with"
         " --proxy-endpoint."],
        ["source-listen-port", "s", None,
         "Source mode: the local ports to listen on, PORT or ID=PORT[,ID=PORT...],"
         " e.g. 5555 or SSH1=5555,HTTP1=8080."],
        ["destination-app", "d", None,
         "Destination mode: the applications to connect to, PORT, HOST:PORT,"
         " [IPV6]:PORT or a Unix socket path, or ID=that[,ID=that...],"
         " e.g. 22 or SSH1=22,HTTP1=web:80."],
        ["local-bind-address", "b", None,
         "Source: the address to listen on (default from the settings: localhost)."
         " Destination: the host of applications given by port alone (default"
         " 127.0.0.1)."],
        ["capath", "c", None,
         "More trusted CA certificates: a directory of hashed certificates or a PEM"
         " bundle file."],
        ["settings-json", None, None,
         "A JSON file of fine-grained settings merged over the defaults (see"
         " --export-default-settings)."],
        ["config", None, None,
         "A file of options as 'long-name = value' lines; the command line wins over it."],
        ["verbose", "v", None,
         "Log level 0..255: 0 off, 1 critical, 2 error, 3 warning, 4 info (default),"
         " 5 debug, 6 and more trace."],
        ["mode", "m", None,
         "src (source) or dst (destination); needed only without -s and -d."],
        ["destination-client-type", "y", None,
         "Source only: V1 or V2, to talk to a destination proxy of that older protocol."],
        ["config-dir", None, None,
         "A directory of 'ID = PORT-or-ENDPOINT' mapping files, used when the command"
         " line gives no -s or -d (default: ./config when it exists)."],
    ]

    def __init__(
        self,
        environ: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        stdout: Any = None,
        twistd_log: TwistdLog = TWISTD_LOG,
    ) -> None:
        super().__init__()
        self._environ = os.environ if environ is None else environ
        self._cwd = cwd
        self._stdout = stdout
        self._twistd_log = twistd_log

    def __repr__(self) -> str:
        # A dict's repr would show the tokens as given; the resolved
        # ProxyConfig (and the web proxy in it) hides its own secrets.
        shown = {
            key: "<hidden>" if key in _SECRET_OPTIONS and value is not None else value
            for key, value in self.items()
        }
        return f"<{type(self).__module__}.{type(self).__name__} {shown!r}>"

    def getSynopsis(self) -> str:
        if getattr(self, "parent", None) is not None:
            return "Usage: twistd [twistd options] localproxy [options]"
        return "Usage: localproxy [options]"

    def opt_export_default_settings(self, path: str) -> None:
        """
        Write the default fine-grained settings to this JSON file and exit.
        """
        try:
            export_default_settings(self._path(path))
        except OSError as e:
            raise usage.UsageError(
                f"--export-default-settings: cannot write {path}: {e.strerror or e}"
            ) from None
        sys.exit(0)

    def opt_version(self) -> None:
        """
        Print the version and exit.
        """
        out = sys.stdout if self._stdout is None else self._stdout
        out.write(VERSION_LINE + "\n")
        out.flush()
        sys.exit(0)

    opt_V = opt_version
    opt_h = usage.Options.opt_help

    def parseArgs(self, *args: str) -> None:
        if args:
            raise usage.UsageError(f"unexpected argument {args[0]!r}")

    def _path(self, path: str) -> Path:
        return Path(path) if self._cwd is None else self._cwd / path

    def postOptions(self) -> None:
        cwd = Path.cwd() if self._cwd is None else self._cwd
        config = resolve(self, self._environ, cwd)
        _checkBundle(config)
        self["proxy-config"] = config
        parent = getattr(self, "parent", None)
        if parent is not None:
            filter_twistd_logging(parent, config.verbosity, self._twistd_log)


def _checkBundle(config: ProxyConfig) -> None:
    """
    Load a C{--capath} PEM bundle now, so that a bad one is a usage error
    rather than a failure when the service starts. (A directory is read
    only while verifying.)
    """
    if config.capath is None or not config.verify_ssl or not os.path.isfile(config.capath):
        return
    from lpxy.proxy.tls import CAPathError, PlatformTrustWith

    try:
        PlatformTrustWith(config.capath)
    except CAPathError as e:
        raise usage.UsageError(str(e)) from None


ServiceFactory = Callable[[ProxyConfig, Any], Any]


def default_service_factory() -> ServiceFactory:
    """
    L{lpxy.proxy.service.LocalProxyService}, imported only when called:
    twistd imports this module for C{--help} too.
    """
    factory: ServiceFactory = namedAny("lpxy.proxy.service.LocalProxyService")
    return factory


def makeService(
    options: Options,
    reactor: Any = None,
    service_factory: ServiceFactory | None = None,
) -> MultiService:
    """
    The proxy service (by default
    L{lpxy.proxy.service.LocalProxyService}), inside a L{ProcessService} that ends the twistd
    process with the proxy's exit status.
    """
    if reactor is None:
        from twisted.internet import reactor
    if service_factory is None:
        service_factory = default_service_factory()
    proxy = service_factory(options["proxy-config"], reactor)
    return ProcessService(proxy, reactor, done=proxy.whenDone, name="The local proxy")
