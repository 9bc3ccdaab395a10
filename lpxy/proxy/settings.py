# -*- test-case-name: tests.test_settings -*-
"""
The fine-grained settings tree of the local proxy (protocol.md section 7).

Exactly the reference proxy's keys and defaults, all under
C{tunneling.proxy.}. L{ProxySettings} is the parsed, typed form the rest of
the proxy reads.
"""

from __future__ import annotations

from typing import Mapping

from attrs import Factory, field, frozen


@frozen
class MessageSettings:
    """Record and payload sizes (C{tunneling.proxy.message.*})."""

    data_length_size: int = 2
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
    """Tunnel connection behaviour (C{tunneling.proxy.websocket.*})."""

    ping_period_ms: int = 20000
    retry_delay_ms: int = 2500
    connect_retry_count: int = -1
    reconnect_on_data_error: bool = True
    subprotocol: str = "aws.iot.securetunneling-3.0"
    max_frame_size: int = 131076
    write_buffer_size: int = 131076
    read_buffer_size: int = 131076


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
