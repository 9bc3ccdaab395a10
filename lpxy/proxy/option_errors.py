# -*- test-case-name: tests.test_option_errors -*-
"""
How the local proxy refuses a command line: the reference proxy's words
first, so that scripts written for it keep finding them.

An L{OptionError} reads, line by line: the reference's reason (what the
reference prints for the same mistake, see C{messages.md} sections 1a and
1b), lpxy's own line naming the option and the fix when it says more, and
the reference's trailer L{TRY_HELP}. A mistake the reference does not
refuse, or refuses without a fixed text, has only lpxy's line and the
trailer.

The functions and constants below are the reference's texts, nothing
else; messages of lpxy's own are written where the mistake is found.
"""

from __future__ import annotations

from twisted.python.usage import UsageError

TRY_HELP = "Try 'localproxy --help' for a list of options."


class OptionError(UsageError):
    """
    A usage or validation error: the reference's C{reason} (or L{None}
    where it has none), then lpxy's C{detail} (or L{None} where the
    reason says it all), then L{TRY_HELP}.
    """

    def __init__(self, reason: str | None, detail: str | None = None) -> None:
        if reason is None and detail is None:
            raise ValueError("an OptionError needs a reason or a detail")
        lines = [line for line in (reason, detail) if line is not None]
        super().__init__("\n".join([*lines, TRY_HELP]))
        self.reason = reason
        self.detail = detail


def with_trailer(message: str) -> str:
    """
    C{message} (a usage error's text) ending with L{TRY_HELP}, once.
    """
    return message if message.endswith(TRY_HELP) else f"{message}\n{TRY_HELP}"


# --- usage errors (messages.md 1a) ------------------------------------------

ACCESS_TOKEN_MISSING = "the option '--access-token' is required but missing"
ENDPOINT_CHOICE = (
    "Must specify one and only one of --region/-r or --proxy-endpoint/-e options"
)
MAPPING_CHOICE = (
    "Must specify one and only one of --source-listen-port/-s or --destination-app/-d"
)
MAPPING_OR_MODE = (
    "Must specify one of --source-listen-port/-s or --destination-app/-d or --mode"
)
MODE_WRONG = "Mode value is wrong! Allowed values are: src, dst, source, destination"


def unrecognised(option: str) -> str:
    """An unknown option, as typed (C{--foo=bar}, C{-z}, a C{--config} key)."""
    return f"unrecognised option '{option}'"


def argument_missing(name: str) -> str:
    """An option given without its argument; C{name} is the long name."""
    return f"the required argument for option '--{name}' is missing"


def given_twice(name: str) -> str:
    """The same option given twice; C{name} is the long name."""
    return f"option '--{name}' cannot be specified more than once"


def argument_invalid(value: str, name: str) -> str:
    """A value of the wrong type (C{-v abc})."""
    return f"the argument ('{value}') for option '--{name}' is invalid"


def config_unreadable(path: str) -> str:
    """A C{--config} file that is missing or cannot be read."""
    return f"can not read options configuration file '{path}'"


def config_line_invalid(line: str) -> str:
    """A C{--config} line that is not C{key = value}."""
    return f"the options configuration file contains an invalid line '{line}'"


def mode_mismatch(mode: str) -> str:
    """
    C{-s} with C{-m dst}, or C{-d} with C{-m src}: C{mode} is the mode
    C{-m} set (the reference names C{-s} either way).
    """
    return f"-s and --mode have mismatched mode. Mode is set to {mode}!"


# --- validation errors (messages.md 1b; the reference logs these as fatal) ---

PORT_RANGE = "Port must be between 1 and 65535"
PORT_TOO_LARGE = "Port value is too large"
PORT_DIGITS = "Port must contain only digits"
PORT_EMPTY = "Port cannot be empty"
MAPPINGS_FORMAT = "Wrong format for the port mappings! Example: SSH1=5555,SSH2=6666."
SERVICE_ID_CHARACTERS = (
    "Service ID must contain only alphanumeric characters, hyphens, and underscores"
)
SERVICE_ID_LENGTH = "Service ID exceeds maximum allowed length"
BIND_ADDRESS_CHARACTERS = "Bind address contains invalid characters"
BIND_ADDRESS_LENGTH = "Bind address exceeds maximum allowed length"
REGION_FORMAT = "Region must contain only lowercase letters, numbers, and hyphens"
REGION_EMPTY = "Region cannot be empty"
REGION_LENGTH = "Region exceeds maximum allowed length"
ENDPOINT_CHARACTERS = "Proxy endpoint contains invalid characters"
ENDPOINT_EMPTY = "Proxy endpoint cannot be empty"
ENDPOINT_LENGTH = "Proxy endpoint exceeds maximum allowed length"
CLIENT_TOKEN_LENGTH = "Client token must be between 32 and 128 characters"
CLIENT_TOKEN_CONTROL = "Client token contains invalid control characters"
ACCESS_TOKEN_EMPTY = "Access token cannot be empty"
ACCESS_TOKEN_LENGTH = "Access token exceeds maximum allowed length"
ACCESS_TOKEN_CONTROL = "Access token contains invalid control characters"
PATH_EMPTY = "Path cannot be empty"


def mapping_item_format(item: str) -> str:
    """A mapping item with an empty id or endpoint (C{SSH1=}, C{=5555})."""
    return f"Wrong format for the port mappings: {item} .Example: SSH1=5555"


def endpoint_invalid(text: str) -> str:
    """A C{-e} of the right characters that is still no endpoint."""
    return f"Invalid endpoint specified: {text}"


def config_dir_invalid(path: str) -> str:
    """A C{--config-dir} that is missing, empty or a plain file."""
    return f"Invalid configuration directory: {path}"


def settings_unreadable(path: str) -> str:
    """A C{--settings-json} file that is missing or cannot be read."""
    return f"{path}: cannot open file"


def settings_malformed(path: str, line: int, reason: str) -> str:
    """A C{--settings-json} file that is not JSON, at C{line}."""
    return f"{path}({line}): {reason}"
