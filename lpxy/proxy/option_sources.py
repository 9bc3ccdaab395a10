# -*- test-case-name: tests.test_option_sources,tests.test_config -*-
"""
Where the local proxy's options come from, before any is validated: the
command line, the C{--config} file it names and the environment, searched
in that order (L{sources}). Each value keeps a label naming where it was
given, for messages; a token's value never appears in a repr.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

from attrs import field, frozen

from lpxy.proxy import option_errors as reference
from lpxy.proxy.option_errors import OptionError
from lpxy.proxy.textfiles import FileTooLarge, error_reason, read_text

ACCESS_TOKEN_ENV = "AWSIOT_TUNNEL_ACCESS_TOKEN"
CLIENT_TOKEN_ENV = "AWSIOT_TUNNEL_CLIENT_TOKEN"
ENDPOINT_ENV = "AWSIOT_TUNNEL_ENDPOINT"
REGION_ENV = "AWSIOT_TUNNEL_REGION"

# Long option name -> short letter (or None), for messages and --config.
OPTIONS: Mapping[str, str | None] = {
    "access-token": "t",
    "client-token": "i",
    "proxy-endpoint": "e",
    "region": "r",
    "source-listen-port": "s",
    "destination-app": "d",
    "local-bind-address": "b",
    "capath": "c",
    "no-ssl-host-verify": "k",
    "settings-json": None,
    "verbose": "v",
    "mode": "m",
    "destination-client-type": "y",
    "config-dir": None,
    "state-dir": None,
    "stdio": None,
    "metrics": None,
    "log-format": None,
}
FLAGS = frozenset({"no-ssl-host-verify"})
_ENVIRONMENT = {
    "access-token": ACCESS_TOKEN_ENV,
    "client-token": CLIENT_TOKEN_ENV,
    "proxy-endpoint": ENDPOINT_ENV,
    "region": REGION_ENV,
}


def option_label(name: str) -> str:
    """How messages name a command-line option: C{--region/-r}."""
    short = OPTIONS.get(name)
    return f"--{name}/-{short}" if short else f"--{name}"


# --- values and where they came from -------------------------------------

@frozen
class Given:
    """An option's value as given, and a label naming where it was given."""

    value: str = field(repr=False)
    label: str


class Layers:
    """
    The command line, the --config file and the environment, searched in
    that order.
    """

    def __init__(self, layers: list[dict[str, Given]]) -> None:
        self._layers = layers

    def get(self, name: str) -> Given | None:
        for layer in self._layers:
            if name in layer:
                return layer[name]
        return None

    def choose(self, first: str, second: str, reason: str) -> tuple[str, Given] | None:
        """
        The name and value of C{first} or C{second} from the first layer
        naming either; both in one layer is an error, with the reference's
        C{reason}.
        """
        for layer in self._layers:
            a, b = layer.get(first), layer.get(second)
            if a is not None and b is not None:
                raise OptionError(
                    reason, f"{a.label} and {b.label} are exclusive: give only one"
                )
            if a is not None:
                return first, a
            if b is not None:
                return second, b
        return None


def _command_line(options: Mapping[str, object]) -> dict[str, Given]:
    given = {}
    for name in OPTIONS:
        value = options.get(name)
        if name in FLAGS:
            if value:
                given[name] = Given("true", option_label(name))
        elif value is not None:
            given[name] = Given(str(value), option_label(name))
    return given


def _environment(environ: Mapping[str, str]) -> dict[str, Given]:
    return {
        name: Given(environ[variable], variable)
        for name, variable in _ENVIRONMENT.items()
        if environ.get(variable)
    }


def not_empty(given: Given, what: str, expected: str) -> None:
    """Refuse an empty path, which is not C{what}: C{expected} one."""
    # Joined to the working directory, an empty path would name the
    # directory itself.
    if not given.value:
        raise OptionError(
            reference.PATH_EMPTY,
            f"{given.label}: an empty path is not {what}; expected {expected}",
        )


# --- the --config file -------------------------------------------------------

_NOT_IN_CONFIG = frozenset({"config", "help", "version", "export-default-settings"})


def read_config_file(path: str, shown: str | None = None) -> dict[str, str]:
    """
    Read a C{--config} file: C{long-name = value} lines, blank lines and
    C{#} comments.

    @param shown: the path as the user gave it, for the reference's
        reasons (default: C{path}).

    @raise OptionError: the file is unreadable or larger than 1 MiB, a
        line is malformed, or names an unknown or repeated option.
    """
    shown = path if shown is None else shown
    try:
        text = read_text(path)
    except FileTooLarge as e:
        raise OptionError(None, f"--config: {path} is {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise OptionError(
            reference.config_unreadable(shown),
            f"--config: cannot read {path}: {error_reason(e)}",
        ) from None
    values: dict[str, str] = {}
    for number, line in config_lines(text):
        where = f"--config {path} line {number}"
        name, equals, value = line.partition("=")
        name = name.strip()
        if not equals or not name:
            raise OptionError(
                reference.config_line_invalid(line),
                f"{where}: expected long-name = value, e.g. region = us-east-1",
            )
        if name not in OPTIONS:
            raise OptionError(
                reference.unrecognised(name),
                f"{where}: unknown option {name!r}; expected a long option name"
                f" other than {', '.join(sorted(_NOT_IN_CONFIG))}",
            )
        if name in values:
            raise OptionError(reference.given_twice(name), f"{where}: {name} given twice")
        values[name] = value.strip()
    return values


def config_lines(text: str) -> Iterator[tuple[int, str]]:
    """The numbered lines of a file, without blank lines and comments."""
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if line and not line.startswith(("#", ";")):
            yield number, line


def _config_layer(path: str, shown: str) -> dict[str, Given]:
    given = {}
    for name, value in read_config_file(path, shown).items():
        label = f"{name} (--config {path})"
        if name in FLAGS:
            lowered = value.lower()
            if lowered in ("true", "yes", "on", "1"):
                given[name] = Given("true", label)
            elif lowered not in ("false", "no", "off", "0"):
                raise OptionError(
                    reference.argument_invalid(value, name), f"{label}: expected true or false"
                )
        else:
            given[name] = Given(value, label)
    return given


def sources(
    options: Mapping[str, object], environ: Mapping[str, str], cwd: Path
) -> Layers:
    """The command line, the C{--config} file it names, and the environment."""
    layers = [_command_line(options)]
    config = options.get("config")
    if config is not None:
        not_empty(
            Given(str(config), option_label("config")),
            "a file", "a file of 'long-name = value' lines",
        )
        layers.append(_config_layer(str(cwd / str(config)), str(config)))
    layers.append(_environment(environ))
    return Layers(layers)
