# -*- test-case-name: tests.test_config -*-
"""
The local proxy's resolved configuration.

L{ProxyConfig} is what the command line, the C{--config} file, the
environment and the settings file amount to, once validated; everything
after option parsing reads only this. L{resolve} builds it (protocol.md
section 7): every bad value or combination raises an L{OptionError}: the
reference proxy's reason for it where it has one, then lpxy's line naming
the option and the valid form. Checks run in the reference's order, so the
first mistake it would report is the one reported. Tokens never appear in
a message or a repr.

Precedence is command line, then C{--config} file, then environment, then
C{--settings-json} (which only feeds the fine-grained settings). The choice
of endpoint (C{-r} or C{-e}) and of mapping (C{-s} or C{-d}) is made by the
first of those sources that names either; naming both in one source is an
error.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from attrs import field, frozen
from twisted.logger import Logger

from lpxy.proxy import option_errors as reference
from lpxy.proxy.addresses import (
    LocalTarget,
    Mode,
    TcpTarget,
    TunnelEndpoint,
    UnixTarget,
    WebProxy,
    destination_target,
    no_proxy_matches,
    parse_destination_map,
    parse_endpoint,
    parse_no_proxy,
    parse_source_map,
    parse_web_proxy,
    reason_of,
    region_endpoint,
    source_port,
)
from lpxy.proxy.config_dir import config_directory, read_config_dir
from lpxy.proxy.option_errors import OptionError
from lpxy.proxy.option_sources import (
    ACCESS_TOKEN_ENV,
    ENDPOINT_ENV,
    REGION_ENV,
    Given,
    Layers,
    not_empty,
    sources,
)
from lpxy.proxy.settings import (
    ProxySettings,
    SettingsError,
    bind_address,
    load_settings,
)
from lpxy.proxy.statedir import default_state_directory
from lpxy.wire import (
    CLIENT_TOKEN_CHARACTERS,
    CLIENT_TOKEN_MAX_LENGTH,
    CLIENT_TOKEN_MIN_LENGTH,
    SERVICE_ID_CHARACTERS,
    SERVICE_ID_MAX_LENGTH,
    is_valid_client_token,
    is_valid_service_id,
)

__all__ = [
    "ClientType",
    "LocalTarget",
    "Mode",
    "ProxyConfig",
    "TcpTarget",
    "TunnelEndpoint",
    "UnixTarget",
    "WebProxy",
    "resolve",
]

_log = Logger()

ClientType = Literal["V1", "V2"]
LogFormat = Literal["reference", "json"]
LOG_FORMATS: tuple[LogFormat, ...] = ("reference", "json")

# The destination's host for a bare port when -b is not given, as the
# reference.
DEFAULT_DESTINATION_HOST = "127.0.0.1"
MAX_TOKEN = 4096


@frozen
class ProxyConfig:
    """
    The validated configuration of one local proxy process.

    Service id C{""} names the single unnamed mapping (C{-s 5555},
    C{-d 22}); it takes the one id the service announces, if any. When the
    command line gave no map, C{source_ports}/C{destination_apps} hold what
    the C{--config-dir} files say and C{mappings_from_config_dir} is true
    (protocol.md section 4: a source then listens on a random port for an
    announced id found nowhere; a destination fails).

    C{client_token} is L{None} when none was given: the runtime then keeps
    one in C{state_dir} (L{lpxy.proxy.statedir}), or makes one for the life
    of the process when C{state_dir} is L{None} or unusable. C{web_proxy} is already L{None} when
    C{no_proxy} matches the endpoint; C{no_proxy} is kept for the log.
    C{verbosity} is C{-v} as given (0..65535, as the reference's 16 bits);
    6 and more mean per-record trace logging. C{stdio_service} is
    C{--stdio}'s service id: a source that carries one connection over its
    standard input and output instead of listening. C{metrics} is the server
    endpoint serving Prometheus metrics, if any; C{log_format} how the
    console script writes its log.
    """

    mode: Mode
    access_token: str = field(repr=False)
    endpoint: TunnelEndpoint
    client_token: str | None = field(default=None, repr=False)
    source_ports: Mapping[str, int] = field(factory=dict)
    destination_apps: Mapping[str, LocalTarget] = field(factory=dict)
    bind_address: str | None = None
    capath: str | None = None
    verify_ssl: bool = True
    verbosity: int = 4
    destination_client_type: ClientType | None = None
    config_dir: str | None = None
    mappings_from_config_dir: bool = False
    settings: ProxySettings = ProxySettings()
    web_proxy: WebProxy | None = None
    no_proxy: tuple[str, ...] = ()
    state_dir: str | None = None
    stdio_service: str | None = None
    metrics: str | None = None
    log_format: LogFormat = "reference"

    @property
    def listen_address(self) -> str:
        """The address a source listens on."""
        return self.bind_address or self.settings.default_bind_address


def _web_proxy(environ: Mapping[str, str]) -> tuple[WebProxy | None, tuple[str, ...]]:
    for variable in ("https_proxy", "HTTPS_PROXY"):
        if environ.get(variable):
            try:
                proxy = parse_web_proxy(environ[variable])
            except ValueError as e:
                raise OptionError(None, f"{variable}: {e}") from None
            break
    else:
        proxy = None
    no_proxy: tuple[str, ...] = ()
    for variable in ("no_proxy", "NO_PROXY"):
        if variable in environ:
            no_proxy = parse_no_proxy(environ[variable])
            break
    return proxy, no_proxy


# --- tokens --------------------------------------------------------------------

def _access_token(given: Given) -> str:
    token = given.value
    if not token:
        reason = reference.ACCESS_TOKEN_EMPTY
    elif len(token) > MAX_TOKEN:
        reason = reference.ACCESS_TOKEN_LENGTH
    elif _has_control_characters(token):
        reason = reference.ACCESS_TOKEN_CONTROL
    else:
        return token
    raise OptionError(
        reason,
        f"{given.label}: expected 1 to {MAX_TOKEN} characters without control characters",
    )


def _has_control_characters(text: str) -> bool:
    return any(ord(c) < 0x20 or ord(c) == 0x7F for c in text)


def _client_token(given: Given) -> str:
    token = given.value
    if is_valid_client_token(token):
        return token
    if not CLIENT_TOKEN_MIN_LENGTH <= len(token) <= CLIENT_TOKEN_MAX_LENGTH:
        reason: str | None = reference.CLIENT_TOKEN_LENGTH
    elif _has_control_characters(token):
        reason = reference.CLIENT_TOKEN_CONTROL
    else:
        reason = None
    raise OptionError(
        reason,
        f"{given.label}: expected {CLIENT_TOKEN_MIN_LENGTH} to {CLIENT_TOKEN_MAX_LENGTH}"
        f" characters of [{CLIENT_TOKEN_CHARACTERS}]",
    )


# --- putting it together ---------------------------------------------------------

_MODES: Mapping[str, Mode] = {
    "src": "source", "source": "source", "dst": "destination", "destination": "destination",
}


def resolve(
    options: Mapping[str, object],
    environ: Mapping[str, str],
    cwd: Path,
    euid: int | None = None,
) -> ProxyConfig:
    """
    Turn the command line (C{options}, long option names to values, L{None}
    or false for absent), the C{--config} file it may name, C{environ} and
    the C{--settings-json} file into a validated L{ProxyConfig}.

    @param cwd: the working directory, for relative paths and the default
        C{--config-dir}.
    @param euid: the effective user id, for the default state directory
        (the process's by default).

    @raise OptionError: the reference's reason, if it has one, and a line
        naming the option and the valid form.
    """
    found = sources(options, environ, cwd)
    verbosity = _verbosity(found.get("verbose"))
    settings = _settings(found.get("settings-json"), cwd)
    token = _required_token(found, environ)
    endpoint_given = _endpoint_choice(found)
    access_token, client_token = _access_token(token), _optional_client_token(found)
    endpoint = _endpoint(endpoint_given, settings)
    mode = _mode(found)
    mapping = found.choose("source-listen-port", "destination-app", reference.MAPPING_CHOICE)
    stdio = _stdio(found, mapping, mode)
    mode = "source" if stdio else _mode_with_mapping(mode, mapping, found.get("mode"))
    bind_given = found.get("local-bind-address")
    maps = (
        _Mappings({}, {}, False, None) if stdio
        else _mappings(mode, mapping, found.get("config-dir"), bind_given, cwd)
    )
    bind = _local_bind_address(bind_given)
    client_type = _client_type(found.get("destination-client-type"), mode)
    capath = _capath(found.get("capath"), cwd)
    web_proxy, no_proxy = _web_proxy_for(endpoint, environ)
    state_dir = _state_dir(
        found.get("state-dir"), client_token, environ,
        os.geteuid() if euid is None else euid, cwd,
    )
    metrics = _metrics(found.get("metrics"))
    log_format = _log_format(found.get("log-format"))
    if options.get("access-token") is not None:
        _warn_token_on_command_line()
    return ProxyConfig(
        mode=mode,
        access_token=access_token,
        endpoint=endpoint,
        client_token=client_token,
        source_ports=maps.source_ports,
        destination_apps=maps.destination_apps,
        bind_address=bind,
        capath=capath,
        verify_ssl=found.get("no-ssl-host-verify") is None,
        verbosity=verbosity,
        destination_client_type=client_type,
        config_dir=maps.config_dir,
        mappings_from_config_dir=maps.from_config_dir,
        settings=settings,
        web_proxy=web_proxy,
        no_proxy=no_proxy,
        state_dir=state_dir,
        stdio_service=stdio,
        metrics=metrics,
        log_format=log_format,
    )


def verbosity_from(text: str) -> int | None:
    """
    C{-v} as the reference reads it, a 16-bit unsigned number (a negative
    one wraps, so C{-1} is 65535); L{None} when it is not one.
    """
    text = text.strip()
    digits = text[1:] if text[:1] in ("+", "-") else text
    if not digits.isascii() or not digits.isdigit() or len(digits) > 5:
        return None
    number = int(digits)
    if number > 0xFFFF:
        return None
    return (0x10000 - number) % 0x10000 if text.startswith("-") else number


def _verbosity(given: Given | None) -> int:
    if given is None:
        return 4
    verbosity = verbosity_from(given.value)
    if verbosity is None:
        raise OptionError(
            reference.argument_invalid(given.value, "verbose"),
            f"{given.label}: expected 0..65535 (0 off, 1 critical, 2 error, 3 warning,"
            f" 4 info, 5 debug, 6+ trace), got {given.value!r}",
        )
    return verbosity


def _settings(given: Given | None, cwd: Path) -> ProxySettings:
    if given is None:
        return ProxySettings()
    not_empty(given, "a file", "a JSON file of settings")
    try:
        return load_settings(cwd / given.value, given.value)
    except SettingsError as e:
        raise OptionError(e.reason, f"{given.label}: {e}") from None


def _required_token(found: Layers, environ: Mapping[str, str]) -> Given:
    token = found.get("access-token")
    if token is not None:
        return token
    if ACCESS_TOKEN_ENV in environ:
        # Set but empty: the reference reads it as an empty token.
        return Given("", ACCESS_TOKEN_ENV)
    raise OptionError(
        reference.ACCESS_TOKEN_MISSING,
        "no access token: give --access-token/-t, access-token in the --config file,"
        f" or {ACCESS_TOKEN_ENV}",
    )


def _optional_client_token(found: Layers) -> str | None:
    given = found.get("client-token")
    return None if given is None else _client_token(given)


def _endpoint_choice(found: Layers) -> tuple[str, Given]:
    chosen = found.choose("region", "proxy-endpoint", reference.ENDPOINT_CHOICE)
    if chosen is None:
        raise OptionError(
            reference.ENDPOINT_CHOICE,
            "give one of --region/-r or --proxy-endpoint/-e"
            f" (or {REGION_ENV} or {ENDPOINT_ENV})",
        )
    return chosen


def _endpoint(chosen: tuple[str, Given], settings: ProxySettings) -> TunnelEndpoint:
    name, given = chosen
    try:
        if name == "region":
            return region_endpoint(given.value, settings)
        return parse_endpoint(given.value)
    except ValueError as e:
        raise OptionError(reason_of(e), f"{given.label}: {e}") from None


def _local_bind_address(given: Given | None) -> str | None:
    if given is None:
        return None
    address = bind_address(given.value)
    if address is None:
        if len(given.value) > 253:
            reason: str | None = reference.BIND_ADDRESS_LENGTH
        elif given.value:
            reason = reference.BIND_ADDRESS_CHARACTERS
        else:
            reason = None
        raise OptionError(
            reason,
            f"{given.label}: expected a host name or IP address, got {given.value!r}",
        )
    return address


def _mode(found: Layers) -> Mode | None:
    """C{-m}, if given."""
    given = found.get("mode")
    if given is None:
        return None
    mode = _MODES.get(given.value.strip().lower())
    if mode is None:
        raise OptionError(
            reference.MODE_WRONG,
            f"{given.label}: expected src, source, dst or destination, got {given.value!r}",
        )
    return mode


def _mode_with_mapping(
    mode: Mode | None, mapping: tuple[str, Given] | None, mode_given: Given | None
) -> Mode:
    """The mode C{-m} and the choice of C{-s} or C{-d} agree on."""
    if mapping is None:
        if mode is None:
            raise OptionError(
                reference.MAPPING_OR_MODE,
                "give one of --source-listen-port/-s, --destination-app/-d or --mode/-m",
            )
        return mode
    name, value = mapping
    implied: Mode = "destination" if name == "destination-app" else "source"
    if mode is not None and mode_given is not None and implied != mode:
        raise OptionError(
            reference.mode_mismatch(mode),
            f"{value.label} means {implied} mode, but {mode_given.label} is {mode_given.value}",
        )
    return implied


@frozen
class _Mappings:
    """The service mappings and where they came from."""

    source_ports: Mapping[str, int]
    destination_apps: Mapping[str, LocalTarget]
    from_config_dir: bool
    config_dir: str | None


def _mappings(
    mode: Mode,
    mapping: tuple[str, Given] | None,
    directory_given: Given | None,
    bind_given: Given | None,
    cwd: Path,
) -> _Mappings:
    """
    The command line's map for C{mode}; without one, the C{--config-dir}
    files' (the directory is checked either way). A bad C{-b} is reported
    after these, as the reference does.
    """
    bind = None if bind_given is None else bind_address(bind_given.value)
    default_host = bind or DEFAULT_DESTINATION_HOST
    source_ports: dict[str, int] = {}
    destination_apps: dict[str, LocalTarget] = {}
    if mapping is not None:
        given = mapping[1]
        try:
            if mode == "source":
                source_ports = parse_source_map(given.value)
            else:
                destination_apps = parse_destination_map(given.value, default_host)
        except ValueError as e:
            raise OptionError(reason_of(e), f"{given.label}: {e}") from None
    directory = config_directory(directory_given, cwd)
    from_directory = mapping is None
    if from_directory and directory is not None:
        if mode == "source":
            source_ports = read_config_dir(directory, source_port)
        else:
            destination_apps = read_config_dir(
                directory, lambda text: destination_target(text, default_host)
            )
    if mode == "destination" and not destination_apps:
        raise OptionError(
            None,
            "destination mode needs --destination-app/-d or ID = ENDPOINT files"
            " in --config-dir (default ./config)",
        )
    return _Mappings(
        source_ports=source_ports,
        destination_apps=destination_apps,
        from_config_dir=from_directory,
        config_dir=str(directory) if directory is not None and from_directory else None,
    )


def _stdio(
    found: Layers, mapping: tuple[str, Given] | None, mode: Mode | None
) -> str | None:
    """
    C{--stdio}'s service id: a source of one connection, so not with a map,
    a destination mode, a listening address or C{--config-dir}.
    """
    given = found.get("stdio")
    if given is None:
        return None
    if not is_valid_service_id(given.value):
        raise OptionError(
            None,
            f"{given.label}: expected the tunnel's service id to carry, 1 to"
            f" {SERVICE_ID_MAX_LENGTH} of [{SERVICE_ID_CHARACTERS}], got {given.value!r}",
        )
    if mapping is not None:
        name, other = mapping
        why = (
            "a destination connects to applications" if name == "destination-app"
            else "one connection comes over standard input and output, no port listens"
        )
        raise OptionError(
            None, f"{given.label} and {other.label} are exclusive ({why}): give only one"
        )
    for name in ("local-bind-address", "config-dir"):
        other_given = found.get(name)
        if other_given is not None:
            raise OptionError(
                None,
                f"{other_given.label} is not used with {given.label}, which"
                " listens nowhere and names its one service: leave it out",
            )
    mode_given = found.get("mode")
    if mode == "destination" and mode_given is not None:
        raise OptionError(
            None,
            f"{given.label} is a source, but {mode_given.label} is {mode_given.value}:"
            " leave out the mode",
        )
    return given.value


def _client_type(given: Given | None, mode: Mode) -> ClientType | None:
    if given is None:
        return None
    value = given.value.strip().upper()
    if value not in ("V1", "V2"):
        raise OptionError(None, f"{given.label}: expected V1 or V2, got {given.value!r}")
    if mode != "source":
        raise OptionError(
            None,
            f"{given.label} is for source mode only: a destination learns its"
            " peer's version",
        )
    return "V1" if value == "V1" else "V2"


def _capath(given: Given | None, cwd: Path) -> str | None:
    if given is None:
        return None
    expected = "a directory of hashed CA certificates or a PEM bundle file"
    not_empty(given, "a directory or file", expected)
    path = cwd / given.value
    if not path.exists():
        raise OptionError(
            None,
            f"{given.label}: no such directory or file {given.value!r}; expected {expected}",
        )
    return str(path)


def _web_proxy_for(
    endpoint: TunnelEndpoint, environ: Mapping[str, str]
) -> tuple[WebProxy | None, tuple[str, ...]]:
    """The web proxy to reach C{endpoint} through, if any, and C{NO_PROXY}."""
    web_proxy, no_proxy = _web_proxy(environ)
    if web_proxy is not None and no_proxy_matches(endpoint.host, endpoint.port, no_proxy):
        _log.info(
            "Not using the web proxy for {host}: it matches NO_PROXY", host=endpoint.host
        )
        web_proxy = None
    return web_proxy, no_proxy


def _state_dir(
    given: Given | None,
    client_token: str | None,
    environ: Mapping[str, str],
    euid: int,
    cwd: Path,
) -> str | None:
    """
    Where a made-up client token is kept: C{--state-dir}, else the default
    (L{default_state_directory}); none is needed with C{-i}.
    """
    if given is not None:
        not_empty(given, "a directory", "a directory the proxy may write")
        return str(cwd / given.value)
    if client_token is not None:
        return None
    default = default_state_directory(environ, euid)
    if default is None:
        _log.warn(
            "No state directory (no STATE_DIRECTORY, XDG_STATE_HOME or HOME):"
            " the client token lasts only as long as this process, so a"
            " restarted proxy cannot rejoin the tunnel; give --state-dir DIR"
            " or --client-token/-i"
        )
        return None
    return str(default)


def _metrics(given: Given | None) -> str | None:
    if given is None:
        return None
    from lpxy.metrics import check_endpoint

    try:
        return check_endpoint(given.value, given.label)
    except ValueError as e:
        raise OptionError(None, str(e)) from None


def _log_format(given: Given | None) -> LogFormat:
    if given is None:
        return "reference"
    for name in LOG_FORMATS:
        if given.value.strip().lower() == name:
            return name
    raise OptionError(
        None, f"{given.label}: expected {' or '.join(LOG_FORMATS)}, got {given.value!r}"
    )


def _warn_token_on_command_line() -> None:
    # The reference's words first: scripts may look for them.
    _log.warn(
        "Found access token supplied via CLI arg. Consider using environment variable"
        " {variable} instead: other users of this machine can see a command line",
        variable=ACCESS_TOKEN_ENV,
    )
