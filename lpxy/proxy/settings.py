# -*- test-case-name: tests.test_settings -*-
"""
The fine-grained settings tree of the local proxy (protocol.md section 7).

The reference proxy's keys and defaults, all under C{tunneling.proxy.},
plus lpxy's own C{websocket.max_services}. L{ProxySettings} is the parsed, typed form the rest of
the proxy reads; L{export_default_settings} writes the defaults as the
reference does (every value a string) and L{load_settings} merges a partial
JSON file over them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from attrs import Factory, evolve, field, fields, frozen
from twisted.logger import Logger

from lpxy.frames import LENGTH_PREFIX_SIZE
from lpxy.proxy import option_errors as reference
from lpxy.proxy.textfiles import FileTooLarge, error_reason, read_text
from lpxy.wire import DEFAULT_MAX_SERVICES, NEWEST_SUBPROTOCOL, SUBPROTOCOLS

_log = Logger()

ROOT = ("tunneling", "proxy")

class SettingsError(ValueError):
    """
    A settings file could not be used. The message is one line naming the
    file or the dotted key and what is expected; C{reason} is the reference
    proxy's text for the same mistake, L{None} where it has none.
    """

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason


#: How deep a settings file may nest JSON objects and arrays: the settings
#: tree is four deep; anything far deeper is a mistake or an attack.
MAX_DEPTH = 32


@frozen
class MessageSettings:
    """Record and payload sizes (C{tunneling.proxy.message.*})."""

    data_length_size: int = LENGTH_PREFIX_SIZE
    data_frame_max_size: int = 65538
    max_payload_size: int = 64512
    max_size: int = 65536


@frozen
class TcpSettings:
    """Local TCP behaviour (C{tunneling.proxy.tcp.*})."""

    connection_retry_count: int = 5
    connection_retry_delay_ms: int = 2500
    read_buffer_size: int = 131076
    max_active_connections: int = 128
    write_buffer_size: int = 131076


@frozen
class WebSocketSettings:
    """
    Tunnel connection behaviour (C{tunneling.proxy.websocket.*}).

    C{max_services} is lpxy's own: the most services of the tunnel's
    SERVICE_IDS the proxy serves (a source listens for, a destination
    accepts starts of); the rest are ignored.
    """

    ping_period_ms: int = 20000
    retry_delay_ms: int = 2500
    connect_retry_count: int = -1
    reconnect_on_data_error: bool = True
    subprotocol: str = NEWEST_SUBPROTOCOL
    max_frame_size: int = 131076
    write_buffer_size: int = 131076
    read_buffer_size: int = 131076
    max_services: int = DEFAULT_MAX_SERVICES


def _default_overrides() -> Mapping[str, str]:
    return {
        "cn-north-1": "data.tunneling.iot.cn-north-1.amazonaws.com.cn",
        "cn-northwest-1": "data.tunneling.iot.cn-northwest-1.amazonaws.com.cn",
    }


@frozen
class ProxySettings:
    """
    Every fine-grained setting, typed, with the reference's defaults.
    """

    default_bind_address: str = "localhost"
    endpoint_format: str = "data.tunneling.iot.%s.amazonaws.com"
    region_endpoint_overrides: Mapping[str, str] = field(
        default=Factory(_default_overrides)
    )
    message: MessageSettings = MessageSettings()
    tcp: TcpSettings = TcpSettings()
    websocket: WebSocketSettings = WebSocketSettings()


# What the reference writes, in its order; endpoint_format and
# tcp.write_buffer_size are honoured but never exported, as there, and
# lpxy's own websocket.max_services is not exported either.
_EXPORTED: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("default_bind_address", ()),
    ("message", (
        "data_length_size", "data_frame_max_size", "max_payload_size",
        "max_size",
    )),
    ("tcp", (
        "connection_retry_count", "connection_retry_delay_ms",
        "read_buffer_size", "max_active_connections",
    )),
    ("websocket", (
        "ping_period_ms", "retry_delay_ms", "connect_retry_count",
        "reconnect_on_data_error", "subprotocol", "max_frame_size",
        "write_buffer_size", "read_buffer_size",
    )),
    ("region_endpoint_overrides", ()),
)

# The smallest value each integer setting accepts; -1 means "for ever".
_MINIMUM = {
    "connection_retry_count": -1,
    "connect_retry_count": -1,
    "connection_retry_delay_ms": 0,
    "retry_delay_ms": 0,
}

# The largest value an integer setting accepts, where the wire sets one: a
# DATA record with the largest stream id, connection id and a 128-character
# service id must still fit a 2-byte record length (65535).
_MAXIMUM = {
    "max_payload_size": 65384,
}


# The reference's settings that mean nothing in lpxy, and why: each is
# accepted (a reference settings file loads unchanged), and a non-default
# value is reported once by the proxy service (L{unused_settings}).
_UNUSED: tuple[tuple[str, str, str], ...] = (
    ("message", "data_frame_max_size",
     "a record is limited by its 2-byte length prefix (65535 bytes)"),
    ("message", "max_size",
     "a record is limited by its 2-byte length prefix (65535 bytes)"),
    ("tcp", "read_buffer_size",
     "local sockets are read in whole DATA records, up to tcp.write_buffer_size,"
     " and the system sizes socket buffers"),
    ("websocket", "read_buffer_size",
     "the WebSocket is read as Twisted and the flow control allow,"
     " and the system sizes socket buffers"),
    ("websocket", "write_buffer_size",
     "the WebSocket's unsent data is bounded by the flow control,"
     " and the system sizes socket buffers"),
)

def unused_settings(settings: ProxySettings) -> list[tuple[str, int, str]]:
    """
    The settings given a value other than the default that have no effect
    in lpxy, as C{(dotted key, value, why)}.
    """
    defaults = ProxySettings()
    unused = []
    for group, name, why in _UNUSED:
        value = getattr(getattr(settings, group), name)
        if value != getattr(getattr(defaults, group), name):
            unused.append((_dotted(group, name), value, why))
    return unused


def _text(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def default_settings_tree() -> dict[str, Any]:
    """
    The default settings as the nested, all-string tree the reference
    exports.
    """
    defaults = ProxySettings()
    proxy: dict[str, Any] = {}
    for name, children in _EXPORTED:
        value = getattr(defaults, name)
        if name == "region_endpoint_overrides":
            proxy[name] = dict(value)
        elif children:
            proxy[name] = {child: _text(getattr(value, child)) for child in children}
        else:
            proxy[name] = _text(value)
    return {ROOT[0]: {ROOT[1]: proxy}}


def export_default_settings(path: str | Path) -> None:
    """
    Write the default settings to C{path} exactly as the reference proxy
    does: 4-space indentation, values as strings, a final newline.

    @raise OSError: when the file cannot be written.
    """
    text = json.dumps(default_settings_tree(), indent=4) + "\n"
    Path(path).write_text(text, encoding="utf-8")


def load_settings(path: str | Path, shown: str | None = None) -> ProxySettings:
    """
    Read a settings JSON file and merge it over the defaults.

    Values may be JSON numbers and booleans or the strings the export
    writes. Unknown keys are logged and ignored.

    @param shown: the path as the user gave it, for the reference's
        reasons (default: C{path}).

    @raise SettingsError: when the file is missing, unreadable, larger than
        1 MiB, not JSON or nested more than L{MAX_DEPTH} deep, or a value
        has the wrong type or range; the message names the file or the
        dotted key.
    """
    shown = str(path) if shown is None else shown
    try:
        text = read_text(path)
    except FileTooLarge as e:
        raise SettingsError(f"{path} is {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SettingsError(
            f"cannot read {path}: {error_reason(e)}", reference.settings_unreadable(shown)
        ) from None
    if json_depth(text, MAX_DEPTH) > MAX_DEPTH:
        raise SettingsError(
            f"{path} nests JSON more than {MAX_DEPTH} deep; expected a settings file,"
            " which needs 4"
        )
    try:
        tree = json.loads(text)
    except json.JSONDecodeError as e:
        raise SettingsError(
            f"{path} is not valid JSON: {e.msg} at line {e.lineno}",
            reference.settings_malformed(shown, e.lineno, _boost_reason(e.msg)),
        ) from None
    return merge_settings(ProxySettings(), tree)


# Python's words for a JSON mistake -> the reference's (Boost's), where the
# reference sheet records them; otherwise Python's words are kept.
_BOOST_REASONS = {
    "Expecting property name enclosed in double quotes": "expected key string",
}


def _boost_reason(message: str) -> str:
    return _BOOST_REASONS.get(message, message)


_JSON_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"?|[\[{]|[\]}]')


def json_depth(text: str, limit: int | None = None) -> int:
    """
    How deep C{text} nests JSON arrays and objects (brackets inside
    strings do not count), without parsing it: Python's parser recurses
    once per level. With a C{limit}, counting stops just past it.
    """
    depth = deepest = 0
    for match in _JSON_TOKEN.finditer(text):
        token = match.group()
        if token == "[" or token == "{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if limit is not None and deepest > limit:
                    break
        elif token == "]" or token == "}":
            depth -= 1
    return deepest


def merge_settings(base: ProxySettings, tree: object) -> ProxySettings:
    """
    Merge a parsed settings tree (the JSON object) over C{base}.

    @raise SettingsError: for a value of the wrong type or range.
    """
    proxy = _descend(tree, ROOT)
    if proxy is None:
        return base
    changes: dict[str, Any] = {}
    for name, value in proxy.items():
        key = _dotted(name)
        if name in ("message", "tcp", "websocket"):
            changes[name] = _merge_group(getattr(base, name), value, key)
        elif name == "region_endpoint_overrides":
            changes[name] = _merge_overrides(base.region_endpoint_overrides, value)
        elif name == "default_bind_address":
            changes[name] = _default_bind_address(value, key)
        elif name == "endpoint_format":
            changes[name] = _endpoint_format(value, key)
        else:
            _unknown(key)
    return evolve(base, **changes)


def _descend(tree: object, path: tuple[str, ...]) -> Mapping[str, Any] | None:
    walked: list[str] = []
    for name in path:
        if not isinstance(tree, Mapping):
            where = ".".join(walked) or "the top level"
            raise SettingsError(f"{where}: expected a JSON object")
        for other in tree:
            if other != name:
                _unknown(".".join([*walked, other]))
        walked.append(name)
        if name not in tree:
            return None
        tree = tree[name]
    if not isinstance(tree, Mapping):
        raise SettingsError(f"{'.'.join(walked)}: expected a JSON object")
    return tree


def _dotted(*names: str) -> str:
    return ".".join([*ROOT, *names])


def _unknown(key: str) -> None:
    _log.warn("Ignoring unknown setting {key}", key=key)


def _merge_group(group: Any, value: object, key: str) -> Any:
    if not isinstance(value, Mapping):
        raise SettingsError(f"{key}: expected a JSON object")
    known = {a.name: a for a in fields(type(group))}
    changes: dict[str, Any] = {}
    for name, item in value.items():
        item_key = f"{key}.{name}"
        attribute = known.get(name)
        if attribute is None:
            _unknown(item_key)
        elif attribute.type in (bool, "bool"):
            changes[name] = _boolean(item, item_key)
        elif attribute.type in (int, "int"):
            changes[name] = _integer(
                item, item_key, _MINIMUM.get(name, 1), _MAXIMUM.get(name)
            )
        elif name == "subprotocol":
            changes[name] = _subprotocol(item, item_key)
        else:
            changes[name] = _string(item, item_key)
    # The record length prefix is the wire format's, not a choice.
    if changes.get("data_length_size", LENGTH_PREFIX_SIZE) != LENGTH_PREFIX_SIZE:
        raise SettingsError(
            f"{key}.data_length_size: expected {LENGTH_PREFIX_SIZE} (records have a"
            f" {LENGTH_PREFIX_SIZE}-byte length prefix), got {changes['data_length_size']}"
        )
    return evolve(group, **changes)


def _merge_overrides(base: Mapping[str, str], value: object) -> Mapping[str, str]:
    key = _dotted("region_endpoint_overrides")
    if not isinstance(value, Mapping):
        raise SettingsError(f"{key}: expected a JSON object of region: host")
    merged = dict(base)
    for region, host in value.items():
        merged[region] = _string(host, f"{key}.{region}")
    return merged


_INTEGER = re.compile(r"-?[0-9]+\Z")


def _integer(value: object, key: str, minimum: int, maximum: int | None = None) -> int:
    if isinstance(value, bool):
        number = None
    elif isinstance(value, int):
        number = value
    elif isinstance(value, str) and _INTEGER.match(value.strip()):
        number = int(value.strip())
    else:
        number = None
    if number is None:
        raise SettingsError(f"{key}: expected an integer, got {_shown(value)}")
    if number < minimum:
        raise SettingsError(f"{key}: expected an integer >= {minimum}, got {number}")
    if maximum is not None and number > maximum:
        raise SettingsError(f"{key}: expected an integer <= {maximum}, got {number}")
    return number


def _boolean(value: object, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise SettingsError(
        f"{key}: expected a boolean (true or false), got {_shown(value)}"
    )


def _string(value: object, key: str) -> str:
    if isinstance(value, str) and value:
        return value
    raise SettingsError(f"{key}: expected a non-empty string, got {_shown(value)}")


_BIND_ADDRESS = re.compile(r"[a-zA-Z0-9.:\[\]-]{1,253}\Z")


def bind_address(text: str) -> str | None:
    """
    A bind address as C{-b} and C{default_bind_address} accept it (the
    reference's characters, at most 253), without IPv6 brackets; L{None}
    when it is not one.
    """
    if not _BIND_ADDRESS.match(text):
        return None
    return text.strip("[]") if text.startswith("[") else text


def _default_bind_address(value: object, key: str) -> str:
    address = bind_address(_string(value, key))
    if address is None:
        raise SettingsError(
            f"{key}: expected a host name or IP address, got {_shown(value)}"
        )
    return address


def _subprotocol(value: object, key: str) -> str:
    text = _string(value, key)
    if text not in SUBPROTOCOLS:
        raise SettingsError(
            f"{key}: expected one of {', '.join(SUBPROTOCOLS)}, got {_shown(value)}"
        )
    return text


def _endpoint_format(value: object, key: str) -> str:
    text = _string(value, key)
    if text.count("%s") != 1 or "%" in text.replace("%s", ""):
        raise SettingsError(
            f"{key}: expected a host name holding one %s for the region,"
            f" got {_shown(value)}"
        )
    return text


def _shown(value: object) -> str:
    return json.dumps(value)[:80]
