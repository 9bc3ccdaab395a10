# -*- test-case-name: tests.test_config -*-
"""
The local proxy's resolved configuration.

L{ProxyConfig} is what the command line, the C{--config} file, the
environment and the settings file amount to, once validated; everything
after option parsing reads only this.
"""

from __future__ import annotations

from typing import Literal, Mapping, Union

from attrs import field, frozen

from lpxy.proxy.settings import ProxySettings

Mode = Literal["source", "destination"]
ClientType = Literal["V1", "V2"]


@frozen
class TunnelEndpoint:
    """Where the tunneling service's data plane is."""

    host: str
    port: int = 443
    tls: bool = True

    def url(self, mode: Mode) -> str:
        """The WebSocket URL for C{mode}."""
        scheme = "wss" if self.tls else "ws"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}/tunnel?local-proxy-mode={mode}"


@frozen
class TcpTarget:
    """A local application reachable over TCP (destination side)."""

    host: str
    port: int


@frozen
class UnixTarget:
    """A local application listening on a Unix socket (destination side)."""

    path: str


LocalTarget = Union[TcpTarget, UnixTarget]


@frozen
class WebProxy:
    """An HTTP(S) web proxy to CONNECT through (C{https_proxy})."""

    host: str
    port: int = 3128
    tls: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)


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

    @property
    def listen_address(self) -> str:
        """The address a source listens on."""
        return self.bind_address or self.settings.default_bind_address
