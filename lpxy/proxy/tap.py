# -*- test-case-name: tests.test_proxy_tap -*-
"""
C{twistd localproxy}: the options (the reference proxy's, flag for flag,
each described in the reference's words first) and L{makeService}.

Mistakes in the command line's form (an unknown option, a missing
argument, an option given twice, a C{-v} that is no number) are found
before any option acts, as the reference finds them, and reported in the
reference's words (L{lpxy.proxy.option_errors}).
"""

from __future__ import annotations

import getopt
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

from twisted.application.service import MultiService
from twisted.python import usage
from twisted.python.reflect import namedAny

from lpxy._process import TWISTD_LOG, ProcessService, TwistdLog
from lpxy.proxy import VERSION_LINE
from lpxy.proxy import option_errors as reference
from lpxy.proxy.config import ProxyConfig, resolve, verbosity_from
from lpxy.proxy.option_errors import OptionError
from lpxy.proxy.option_sources import OPTIONS
from lpxy.proxy.settings import export_default_settings
from lpxy.proxy.verbosity import filter_twistd_logging
from lpxy.wire import CLIENT_TOKEN_CHARACTERS, CLIENT_TOKEN_MAX_LENGTH, CLIENT_TOKEN_MIN_LENGTH

#: lpxy's options that the reference lacks, as the help spells and orders them.
LPXY_OWN_OPTIONS = ("--log-format=", "--metrics=", "--state-dir=", "--stdio=")

#: Options whose values never show in a repr.
_SECRET_OPTIONS = frozenset({"access-token", "client-token"})


def _describe(reference_text: str, addition: str) -> str:
    """An option's help: the reference's description, then lpxy's."""
    end = "" if reference_text.endswith(".") else "."
    return f"{reference_text}{end} {addition}"


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
        ["no-ssl-host-verify", "k", _describe(
            "[INSECURE - DEV/TEST ONLY] Turn off SSL host verification. WARNING: This"
            " disables critical security checks and should NEVER be used in production.",
            "lpxy: the service's certificate and host name go unchecked.",
        )],
    ]

    optParameters: ClassVar[list[list[Any]]] = [
        ["access-token", "t", None, _describe(
            "Client access token",
            "lpxy: from OpenTunnel. Prefer AWSIOT_TUNNEL_ACCESS_TOKEN: a command"
            " line is visible to other users.",
        )],
        ["client-token", "i", None, _describe(
            "Optional Client Token",
            f"lpxy: {CLIENT_TOKEN_MIN_LENGTH} to {CLIENT_TOKEN_MAX_LENGTH} of"
            f" [{CLIENT_TOKEN_CHARACTERS}], sent on every connection so that"
            " reconnecting works (default: one made up and kept in --state-dir).",
        )],
        ["proxy-endpoint", "e", None, _describe(
            "Endpoint of proxy server with port (if not default 443). Example:"
            " data.tunneling.iot.us-east-1.amazonaws.com:443",
            "lpxy: HOST[:PORT] (TLS), [IPV6]:PORT, wss://HOST[:PORT] or"
            " ws://HOST[:PORT] (plain text). Not with --region.",
        )],
        ["region", "r", None, _describe(
            "Endpoint region where tunnel exists. Mutually exclusive flag with"
            " --proxy-endpoint",
            "lpxy: e.g. us-east-1; picks the endpoint.",
        )],
        ["source-listen-port", "s", None, _describe(
            "Sets the mappings between source listening ports and service identifier."
            " Example: SSH1=5555 or 5555",
            "lpxy: source mode; PORT or ID=PORT[,ID=PORT...], e.g."
            " SSH1=5555,HTTP1=8080.",
        )],
        ["destination-app", "d", None, _describe(
            "Sets the mappings between the endpoint(address:port/port) and service"
            " identifier. Example: SSH1=127.0.0.1:22 or 22",
            "lpxy: destination mode; PORT, HOST:PORT, [IPV6]:PORT or a Unix socket"
            " path, or ID=that[,ID=that...], e.g. SSH1=22,HTTP1=web:80.",
        )],
        ["local-bind-address", "b", None, _describe(
            "Assigns a specific local address to bind to for listening in source mode"
            " or a local socket address for destination mode.",
            "lpxy: source default from the settings (localhost); in destination"
            " mode, the host of applications given by port alone (default"
            " 127.0.0.1).",
        )],
        ["capath", "c", None, _describe(
            "Adds the directory containing certificate authority files to be used for"
            " performing verification",
            "lpxy: a directory of hashed certificates or a PEM bundle file.",
        )],
        ["settings-json", None, None, _describe(
            "Use the input JSON file to apply fine grained settings.",
            "lpxy: merged over the defaults (see --export-default-settings); at"
            " most 1 MiB.",
        )],
        ["config", None, None, _describe(
            "Use the supplied configuration file to apply CLI args. Actual CLI args"
            " override the contents of this file",
            "lpxy: 'long-name = value' lines; at most 1 MiB.",
        )],
        ["verbose", "v", None, _describe(
            "Logging level to standard out. [0, 255] (0=off, 1=fatal, 2=error,"
            " 3=warning, 4=info, 5=debug, >=6=trace)",
            "lpxy: default 4; logs go to standard error (localproxy) or twistd's"
            " log.",
        )],
        ["mode", "m", None, _describe(
            "The mode local proxy will run: src(source) or dst(destination)",
            "lpxy: needed only without -s and -d.",
        )],
        ["destination-client-type", "y", None, _describe(
            "Specify the value V1 or V2 to run the localproxy in compatibility mode"
            " with older clients. This should only be used when running localproxy in"
            " source mode.",
            "lpxy: anything else is refused.",
        )],
        ["config-dir", None, None, _describe(
            "Set the configuration directory where service identifier mappings are"
            " stored. If not specified, will read mappings from default directory"
            " ./config (same directory where local proxy binary is running)",
            "lpxy: 'ID = PORT-or-ENDPOINT' files, used when the command line gives"
            " no -s or -d; the default is ./config in the working directory.",
        )],
        ["state-dir", None, None,
         "lpxy: where the client token made up without -i is kept (a file"
         " named by a hash of the access token, mode 0600), so that a"
         " restarted proxy rejoins its tunnel. Default: $STATE_DIRECTORY"
         " (systemd), else $XDG_STATE_HOME/lpxy, else /var/lib/lpxy for root"
         " and ~/.local/state/lpxy for others."],
        ["stdio", None, None,
         "lpxy: a source that carries one connection of the tunnel's service"
         " SERVICE_ID over standard input and output, then exits, e.g. ssh -o"
         " ProxyCommand='localproxy -r us-east-1 --stdio SSH1' user@device."
         " Logs go to standard error. The localproxy console script only."],
        ["metrics", None, None,
         "lpxy: serve Prometheus metrics at /metrics on this Twisted server"
         " endpoint, e.g. tcp:9100:interface=127.0.0.1."],
        ["log-format", None, None,
         "lpxy: reference (the default: the console script writes the"
         " reference's lines, twistd its own) or json (one object a line:"
         " time, level, namespace, message, fields; under twistd on standard"
         " output, as twistd --logger=lpxy.jsonlog.observer)."],
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

    def getUsage(self, width: int | None = None) -> str:
        # Twisted sorts the options by name; lpxy's own come after the
        # reference's.
        return _own_options_last(super().getUsage(width), LPXY_OWN_OPTIONS)

    def parseOptions(self, options: Sequence[str] | None = None) -> None:
        argv = list(sys.argv[1:] if options is None else options)
        if not (len(argv) > 1 and argv[-2] == "--_shell-completion"):
            # (usage.Options answers a shell's completion request itself)
            _check_form(argv, self.shortOpt, self.longOpt)
        super().parseOptions(argv)

    def opt_export_default_settings(self, path: str) -> None:
        try:
            export_default_settings(self._path(path))
        except OSError as e:
            raise OptionError(
                None, f"--export-default-settings: cannot write {path}: {e.strerror or e}"
            ) from None
        sys.exit(0)

    # The help of these three is their docstring, in the reference's words.
    opt_export_default_settings.__doc__ = _describe(
        "Exports the default settings for the TCP adapter to the given file as json"
        " and exit program",
        "lpxy: exactly the reference's file.",
    )

    def opt_help(self) -> None:
        """Show help message"""
        usage.Options.opt_help(self)

    def opt_version(self) -> None:
        """Show current version of Local Proxy and exit"""
        out = sys.stdout if self._stdout is None else self._stdout
        out.write(VERSION_LINE + "\n")
        out.flush()
        sys.exit(0)

    opt_V = opt_version
    opt_h = opt_help

    def parseArgs(self, *args: str) -> None:
        if args:
            raise OptionError(None, f"unexpected argument {args[0]!r}")

    def _path(self, path: str) -> Path:
        return Path(path) if self._cwd is None else self._cwd / path

    def postOptions(self) -> None:
        cwd = Path.cwd() if self._cwd is None else self._cwd
        config = resolve(self, self._environ, cwd)
        _checkBundle(config)
        self["proxy-config"] = config
        parent = getattr(self, "parent", None)
        if parent is not None and config.stdio_service is not None:
            raise OptionError(
                None,
                "--stdio is for the localproxy console script: under twistd standard"
                " output is the log; run localproxy --stdio SERVICE_ID instead",
            )
        if parent is not None:
            if config.log_format == "json":
                from lpxy.jsonlog import log_json_under_twistd

                try:
                    log_json_under_twistd(parent, "--log-format")
                except ValueError as e:
                    raise OptionError(None, str(e)) from None
            filter_twistd_logging(parent, config.verbosity, self._twistd_log)


def _own_options_last(usage_text: str, own: Sequence[str]) -> str:
    """
    Move the entries of options C{own} (spelled as in the table, e.g.
    C{--state-dir=}) to the end of C{usage_text}'s option table.
    """
    lines = usage_text.split("\n")
    table_end = next(
        (i for i, line in enumerate(lines) if i and not line.startswith("  ")), len(lines)
    )
    moved: list[str] = []
    kept: list[str] = []
    in_own = False
    for line in lines[1:table_end]:
        if not line.startswith(" " * 20) or not line.strip():
            in_own = line.strip().split("  ")[0].split(", ")[-1] in own
        (moved if in_own else kept).append(line)
    return "\n".join([lines[0], *kept, *moved, *lines[table_end:]])


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
        raise OptionError(None, str(e)) from None


# Every option of the reference, long name -> short letter (or None).
_REFERENCE_OPTIONS: Mapping[str, str | None] = {
    **OPTIONS, "help": "h", "version": "V", "export-default-settings": None, "config": None,
}
_LONG_NAMES = {short: name for name, short in _REFERENCE_OPTIONS.items() if short}


def _check_form(argv: list[str], short_options: str, long_options: list[str]) -> None:
    """
    Check the form of the command line before any option acts (so before
    C{--help} and C{--version}), as the reference does: every option known
    and given its argument, none given twice, C{-v} a 16-bit number.

    @raise OptionError: in the reference's words.
    """
    try:
        given, _ = getopt.getopt(argv, short_options, long_options)
    except getopt.GetoptError as e:
        raise _form_error(e, argv) from None
    seen: set[str] = set()
    for option, value in given:
        name = option[2:] if option.startswith("--") else _LONG_NAMES.get(option[1:], "")
        if name in seen:
            raise OptionError(reference.given_twice(name))
        seen.add(name)
        if name == "verbose" and verbosity_from(value) is None:
            raise OptionError(
                reference.argument_invalid(value, name),
                f"{option}: expected 0..65535 (0 off, 1 critical, 2 error, 3 warning,"
                f" 4 info, 5 debug, 6+ trace)",
            )


def _form_error(e: getopt.GetoptError, argv: list[str]) -> OptionError:
    """What the reference says for what L{getopt} found wrong."""
    if e.msg.endswith("not recognized"):
        return OptionError(reference.unrecognised(_as_typed(e.opt, argv)))
    if e.msg.endswith("requires argument"):
        name = e.opt if len(e.opt) > 1 else _LONG_NAMES.get(e.opt, e.opt)
        return OptionError(reference.argument_missing(name))
    if e.msg.endswith("must not have an argument"):
        return OptionError(None, f"--{e.opt} is a flag: give it without a value")
    if e.msg.endswith("not a unique prefix"):
        return OptionError(
            None, f"--{e.opt} is the start of several options: give the whole name"
        )
    return OptionError(None, e.msg)


def _as_typed(option: str, argv: list[str]) -> str:
    """An unknown option as the command line spelled it (C{--foo=bar}, C{-z})."""
    if len(option) > 1:
        for arg in argv:
            if arg == f"--{option}" or arg.startswith(f"--{option}="):
                return arg
        return f"--{option}"
    return f"-{option}"


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
