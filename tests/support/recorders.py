"""
In-memory stand-ins for the local proxy's layers that record what the code
under test asks of them: the session's actions (L{Recorder}), and the
WebSocket (L{FakeWebSocket}) and sink (L{Sink}) of the relays, and the
producer a send buffer tells of its full and drained edges (L{EdgeRecorder}).
"""

from __future__ import annotations

from collections.abc import Sequence

from twisted.internet.interfaces import IPushProducer

from lpxy.frames import Message
from lpxy.proxy.channel import Channel, ServiceBinding

__all__ = ["EdgeRecorder", "FakeWebSocket", "Recorder", "Sink"]


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


class FakeWebSocket:
    """Records what L{lpxy.proxy.relay.TunnelFlow} does to the WebSocket."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.producer: IPushProducer | None = None

    def pause_reading(self) -> None:
        self.calls.append("pause")

    def resume_reading(self) -> None:
        self.calls.append("resume")

    def register_write_producer(self, producer: IPushProducer) -> None:
        self.producer = producer


class Sink:
    """Records what a L{lpxy.proxy.relay.LocalRelay} hands its sink."""

    def __init__(self) -> None:
        self.data: list[tuple[Channel, bytes | memoryview]] = []
        self.closed: list[Channel] = []

    def send_data(self, channel: Channel, payload: bytes | memoryview) -> None:
        self.data.append((channel, payload))

    def local_closed(self, channel: Channel) -> None:
        self.closed.append(channel)


class EdgeRecorder:
    """A streaming producer recording the edges it is told of: pause, resume, stop."""

    def __init__(self) -> None:
        self.edges: list[str] = []

    def pauseProducing(self) -> None:
        self.edges.append("pause")

    def resumeProducing(self) -> None:
        self.edges.append("resume")

    def stopProducing(self) -> None:
        self.edges.append("stop")
