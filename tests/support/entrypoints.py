"""
Helpers for testing the local proxy's entry points (C{tap}, C{cli},
L{lpxy._process}): a stand-in for L{lpxy.proxy.service.LocalProxyService}
and the reference's exported settings file.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred

from lpxy.proxy.config import ProxyConfig


class FakeProxyService(Service):
    """
    Records its configuration and reactor, its start and stop; the test
    ends it with L{finish}.
    """

    def __init__(self, config: ProxyConfig, reactor: Any = None) -> None:
        self.config = config
        self.reactor = reactor
        self.starts = 0
        self.stops = 0
        self._done: Deferred[int] = Deferred()

    def startService(self) -> None:
        super().startService()
        self.starts += 1

    def stopService(self) -> None:
        super().stopService()
        self.stops += 1

    def whenDone(self) -> Deferred[int]:
        return self._done

    def finish(self, status: int) -> None:
        """End on its own with C{status}, as the real service does."""
        self._done.callback(status)

    def fail(self, reason: BaseException) -> None:
        """End with an unexpected error."""
        self._done.errback(reason)


# The reference file's bytes, kept here so the test does not depend on a
# file outside the repository.
REFERENCE_TEXT = """\
{
    "tunneling": {
        "proxy": {
            "default_bind_address": "localhost",
            "message": {
                "data_length_size": "2",
                "data_frame_max_size": "65538",
                "max_payload_size": "64512",
                "max_size": "65536"
            },
            "tcp": {
                "connection_retry_count": "5",
                "connection_retry_delay_ms": "2500",
                "read_buffer_size": "131076",
                "max_active_connections": "128"
            },
            "websocket": {
                "ping_period_ms": "20000",
                "retry_delay_ms": "2500",
                "connect_retry_count": "-1",
                "reconnect_on_data_error": "true",
                "subprotocol": "aws.iot.securetunneling-3.0",
                "max_frame_size": "131076",
                "write_buffer_size": "131076",
                "read_buffer_size": "131076"
            },
            "region_endpoint_overrides": {
                "cn-north-1": "data.tunneling.iot.cn-north-1.amazonaws.com.cn",
                "cn-northwest-1": "data.tunneling.iot.cn-northwest-1.amazonaws.com.cn"
            }
        }
    }
}
"""
