# -*- test-case-name: tests.test_tunnelservice_tap -*-
"""
C{twistd tunnelservice}: options and service construction.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

from twisted.application.service import MultiService
from twisted.python import usage

from lpxy._process import TWISTD_LOG, ProcessService, TwistdLog
from lpxy.loglevels import LEVEL_NAMES, LevelFilter, filtered, parse_level
from lpxy.tunnelservice.acceptlog import AcceptLogService
from lpxy.tunnelservice.admission import (
    DEFAULT_MAX_CONNECTIONS_PER_ADDRESS,
    DESCRIPTOR_RESERVE,
    default_max_connections,
)
from lpxy.tunnelservice.api import DEFAULT_MAX_REQUEST_SIZE
from lpxy.tunnelservice.auth import CredentialsError, load_credentials
from lpxy.tunnelservice.bandwidth import AWS_TUNNEL_RATE
from lpxy.tunnelservice.broker import Limits
from lpxy.tunnelservice.dataplane import DEFAULT_IDLE_TIMEOUT, DEFAULT_PING_INTERVAL
from lpxy.tunnelservice.sqlstore import DEFAULT_DB, StoreError, open_store
from lpxy.tunnelservice.throttle import DEFAULT_API_RATE

__all__ = ["DEFAULT_LOG_LEVEL", "DEFAULT_PORT", "Options", "makeService"]

DEFAULT_PORT = "tcp:8080:interface=127.0.0.1"
DEFAULT_LOG_LEVEL = "info"


def _log_level(value: str) -> Any:
    return parse_level(value, "--log-level")


_log_level.coerceDoc = "One of " + ", ".join(LEVEL_NAMES) + "."  # type: ignore[attr-defined]


def _node_name(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", value):
        raise ValueError(
            f"--node-name must be 1 to 64 letters, digits, '.', '_' or '-' (e.g. node1), "
            f"not {value!r}"
        )
    return value


def _log_format(value: str) -> str:
    wanted = value.strip().lower()
    if wanted not in LOG_FORMATS:
        raise ValueError(f"--log-format must be text or json, not {value!r}")
    return wanted


_log_format.coerceDoc = "text or json."  # type: ignore[attr-defined]
LOG_FORMATS = ("text", "json")


def _positive(name: str) -> Any:
    def coerce(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            number = 0
        if number < 1:
            raise ValueError(f"--{name} must be a positive integer, not {value!r}")
        return number

    coerce.coerceDoc = "A positive integer."  # type: ignore[attr-defined]
    return coerce


def _positive_number(name: str) -> Any:
    def coerce(value: str) -> float:
        try:
            number = float(value)
        except ValueError:
            number = 0
        if not number > 0 or number == float("inf"):
            raise ValueError(f"--{name} must be a positive number, not {value!r}")
        return number

    coerce.coerceDoc = "A positive number."  # type: ignore[attr-defined]
    return coerce


class Options(usage.Options):
    """Command-line options of C{twistd tunnelservice}."""

    synopsis = (
        "[--port ENDPOINT]... [--api-port ENDPOINT]... [--data-port ENDPOINT]... [options]"
    )
    longdesc = (
        "A self-hosted AWS IoT Secure Tunneling service. Each --port serves the "
        "management API (AWS JSON 1.1 on POST /, for boto3 and the AWS CLI with "
        "--endpoint-url) and the WebSocket data plane (GET /tunnel) for local "
        "proxies; --api-port and --data-port serve only one of them, so that the "
        "API can stay on loopback while devices reach the data plane. With "
        "--credentials, API requests must be signed (AWS Signature Version 4) with "
        "one of the file's keys; without, the API is open and only allowed on "
        "loopback unless --insecure-open-api is given."
    )
    optFlags: ClassVar[list[list[Any]]] = [
        ["insecure-open-api", None,
         "Serve the API without --credentials on ports reachable beyond this machine "
         "(anyone who reaches them can open and close tunnels)."],
    ]
    optParameters: ClassVar[list[list[Any]]] = [
        ["api-rate", None, DEFAULT_API_RATE,
         "API requests a second each access key (or, with an open API, each "
         "client address) may make on average, twice that at once; more get "
         "ThrottlingException.", _positive_number("api-rate")],
        ["closed-limit", None, Limits().max_closed_tunnels,
         "Closed tunnels kept at most; beyond, the longest closed are forgotten "
         "before their --closed-retention ends.", _positive("closed-limit")],
        ["closed-retention", None, int(Limits().closed_retention_seconds),
         "Seconds a closed tunnel can still be described and listed.",
         _positive("closed-retention")],
        ["credentials", None, None,
         "A file in the AWS shared-credentials format ([profile] sections with "
         "aws_access_key_id and aws_secret_access_key); API requests must be "
         "signed with one of its keys."],
        ["max-connections", None, None,
         "Connections open at once on all ports; more are closed at once. "
         f"Default: the descriptor limit less {DESCRIPTOR_RESERVE} "
         f"(here {default_max_connections()}); keep it below the descriptor "
         "limit, so that an API call and a handshake always find one.",
         _positive("max-connections")],
        ["max-connections-per-address", None, DEFAULT_MAX_CONNECTIONS_PER_ADDRESS,
         "Connections open at once from one client address; more are closed at once.",
         _positive("max-connections-per-address")],
        ["max-services", None, Limits().max_services, "Services per tunnel.",
         _positive("max-services")],
        ["max-open-tunnels", None, Limits().max_open_tunnels, "Tunnels open at once.",
         _positive("max-open-tunnels")],
        ["max-request-size", None, DEFAULT_MAX_REQUEST_SIZE,
         "Largest API request body, in bytes.", _positive("max-request-size")],
        ["ping-interval", None, int(DEFAULT_PING_INTERVAL),
         "Ping a tunnel peer after this many seconds of silence.",
         _positive("ping-interval")],
        ["idle-timeout", None, int(DEFAULT_IDLE_TIMEOUT),
         "Drop a tunnel peer after this many seconds without anything from it "
         "(a dead connection); more than --ping-interval.",
         _positive("idle-timeout")],
        ["tunnel-rate", None, None,
         "Bytes a second each tunnel may carry, all streams and both directions "
         f"together (AWS allows about {AWS_TUNNEL_RATE}); no limit unless given.",
         _positive("tunnel-rate")],
        ["log-level", None, DEFAULT_LOG_LEVEL,
         "The least severe log events shown (debug adds a line per API call).",
         _log_level],
        ["node-name", None, None,
         "This node's name among several sharing one --db (letters, digits, '.', '_', "
         "'-'; at most 64); the host name and process id unless given.",
         _node_name],
        ["db", None, DEFAULT_DB,
         "The SQLite file keeping tunnels across restarts (created if missing), "
         "or a postgresql:// URL for a database several nodes share; "
         ":memory: to keep nothing."],
        ["metrics", None, None,
         "Serve Prometheus metrics at /metrics on this server endpoint, e.g. "
         "tcp:9100:interface=127.0.0.1."],
        ["log-format", None, "text",
         "text (twistd's log lines) or json (one object a line on standard "
         "output: time, level, namespace, message, fields; as twistd "
         "--logger=lpxy.jsonlog.observer).", _log_format],
    ]

    def __init__(self, twistd_log: TwistdLog = TWISTD_LOG, clock: Any = None) -> None:
        super().__init__()
        self._twistd_log = twistd_log
        self._clock = clock
        #: folds failed accepts in twistd's log; made once twistd's options are known
        self.accept_log: AcceptLogService | None = None
        self["port"] = []
        self["api-port"] = []
        self["data-port"] = []

    def opt_port(self, endpoint: str) -> None:
        """
        A server endpoint to listen on, e.g. tcp:8080:interface=127.0.0.1 or
        ssl:8443:privateKey=key.pem:certKey=cert.pem (repeatable; default
        tcp:8080:interface=127.0.0.1).
        """
        self["port"].append(endpoint)

    opt_p = opt_port

    def opt_api_port(self, endpoint: str) -> None:
        """
        A server endpoint serving the management API only, e.g.
        tcp:8081:interface=127.0.0.1 (repeatable; needs --data-port or --port).
        """
        self["api-port"].append(endpoint)

    def opt_data_port(self, endpoint: str) -> None:
        """
        A server endpoint serving the tunnels' data plane only, e.g.
        ssl:8443:privateKey=key.pem:certKey=cert.pem (repeatable; needs
        --api-port or --port).
        """
        self["data-port"].append(endpoint)

    def postOptions(self) -> None:
        if self["idle-timeout"] <= self["ping-interval"]:
            raise usage.UsageError(
                f"--idle-timeout ({self['idle-timeout']}) must be more than "
                f"--ping-interval ({self['ping-interval']})"
            )
        if not (self["port"] or self["api-port"] or self["data-port"]):
            self["port"] = [DEFAULT_PORT]
        elif not self["port"] and not self["data-port"]:
            raise usage.UsageError(
                "--api-port needs a --data-port (or a --port) for the tunnels' data plane"
            )
        elif not self["port"] and not self["api-port"]:
            raise usage.UsageError(
                "--data-port needs an --api-port (or a --port) for the management API"
            )
        self["keys"] = None
        if self["credentials"] is not None:
            try:
                self["keys"] = load_credentials(self["credentials"])
            except CredentialsError as e:
                raise usage.UsageError(f"--credentials {e}") from None
        from twisted.internet import reactor
        from twisted.internet.endpoints import serverFromString

        for name in ("port", "api-port", "data-port"):
            for endpoint in self[name]:
                try:
                    serverFromString(reactor, endpoint)
                except Exception as e:
                    raise usage.UsageError(f"--{name} {endpoint!r}: {e}") from None
        if self["metrics"] is not None:
            from lpxy.metrics import check_endpoint

            try:
                check_endpoint(self["metrics"])
            except ValueError as e:
                raise usage.UsageError(str(e)) from None
        level = self["log-level"]
        if isinstance(level, str):  # the default, not coerced
            level = self["log-level"] = parse_level(level)
        parent = getattr(self, "parent", None)
        if parent is not None and self["log-format"] == "json":
            from lpxy.jsonlog import log_json_under_twistd

            try:
                log_json_under_twistd(parent, "--log-format")
            except ValueError as e:
                raise usage.UsageError(str(e)) from None
        if parent is not None:
            # twistd's observer shows the --log-level's events, Twisted's
            # failed accepts folded into a line per interval (by a service
            # that makeService puts under the root, to stop it at the end).
            predicate = LevelFilter(level)
            accept_log = AcceptLogService(reactor if self._clock is None else self._clock)
            self.accept_log = accept_log
            self._twistd_log.wrap(
                parent, lambda observer: accept_log.wrap(filtered(observer, predicate)),
            )


def makeService(options: Options, reactor: Any = None) -> MultiService:
    """
    Build the tunnel service from parsed L{Options}, inside a
    L{ProcessService} that makes SIGTERM and SIGINT end the process with
    status 0.
    """
    if reactor is None:
        from twisted.internet import reactor
    from lpxy.tunnelservice.auth import SignatureVerifier
    from lpxy.tunnelservice.cluster import NodeLease, SQLNodeRegistry, default_node_name
    from lpxy.tunnelservice.pgstore import is_postgres_url
    from lpxy.tunnelservice.service import TunnelService

    try:
        store = open_store(options["db"], reactor)
    except StoreError as e:
        # twistd prints this one line and exits 1.
        raise SystemExit(f"tunnelservice: --db: {e}") from None
    keys = options.get("keys")
    node = options["node-name"] or default_node_name()
    service = TunnelService(
        reactor,
        options["port"],
        api_endpoints=options["api-port"],
        data_endpoints=options["data-port"],
        api_rate=options["api-rate"],
        limits=Limits(
            max_services=options["max-services"],
            max_open_tunnels=options["max-open-tunnels"],
            closed_retention_seconds=options["closed-retention"],
            max_closed_tunnels=options["closed-limit"],
        ),
        max_request_size=options["max-request-size"],
        ping_interval=options["ping-interval"],
        idle_timeout=options["idle-timeout"],
        tunnel_rate=options["tunnel-rate"],
        max_connections=options["max-connections"],
        max_connections_per_address=options["max-connections-per-address"],
        store=store,
        verifier=None if keys is None else SignatureVerifier(keys, reactor),
        insecure_open_api=bool(options["insecure-open-api"]),
        node=node,
        metrics=options["metrics"],
    )
    if is_postgres_url(options["db"]):
        # Several nodes share the database: this one keeps a lease there.
        NodeLease(node, SQLNodeRegistry(store), store, reactor).setServiceParent(service)
    root = ProcessService(service, reactor, name="The tunnel service")
    accept_log = getattr(options, "accept_log", None)
    if accept_log is not None:
        accept_log.setServiceParent(root)
    return root
