"""
A recording L{lpxy.proxy.session.SessionActions}, for session tests.
"""

from __future__ import annotations

from collections.abc import Sequence

from lpxy.frames import Message
from lpxy.proxy.session import Channel, ServiceBinding


class Recorder:
    """A L{SessionActions} that records what the session asks for."""

    def __init__(self) -> None:
        self.sent: list[Message] = []
        self.delivered: list[tuple[Channel, bytes]] = []
        self.opened: list[Channel] = []
        self.closed: list[Channel] = []
        self.ready: list[Sequence[ServiceBinding]] = []

    def send(self, message: Message) -> None:
        self.sent.append(message)

    def deliver(self, channel: Channel, data: bytes) -> None:
        self.delivered.append((channel, data))

    def open_local(self, channel: Channel) -> None:
        self.opened.append(channel)

    def close_local(self, channel: Channel) -> None:
        self.closed.append(channel)

    def services_ready(self, bindings: Sequence[ServiceBinding]) -> None:
        self.ready.append(bindings)

    def kinds(self) -> list[tuple[str, int, str, int]]:
        return [
            (Message.Type.Name(m.type), m.streamId, m.serviceId, m.connectionId)
            for m in self.sent
        ]
