# -*- test-case-name: tests.test_api -*-
"""
The management API: AWS IoT Secure Tunneling's control plane over AWS JSON 1.1.

Every request is C{POST /} with C{X-Amz-Target: IoTSecuredTunneling.<Operation>}
and a JSON object body. Field names, limits, patterns and error types follow
botocore's C{iotsecuretunneling} service model (2018-10-05), so unmodified
boto3 and the AWS CLI work against it. Errors are a status and
C{{"__type": NAME, "message": TEXT}}.

Given a L{SignatureVerifier}, the API answers only requests signed (AWS
Signature Version 4) with a key the operator gave; without one it is open to
anyone who reaches its port.

A call that changes state is answered once the store has committed the
change (L{ITunnelStore.when_written}): a 2xx means the change survives the
service being killed; a change that could not be stored gets a 500.
"""

from __future__ import annotations

import json
import re
import unicodedata
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.web import server
from twisted.web.resource import Resource

from lpxy.tunnelservice.auth import AuthenticationFailed, SignatureVerifier
from lpxy.tunnelservice.broker import (
    ALL,
    Broker,
    InvalidRequest,
    LimitExceeded,
    ResourceNotFound,
    TooManyTags,
)
from lpxy.tunnelservice.store import DESTINATION, SOURCE, TunnelRecord
from lpxy.tunnelservice.throttle import Throttle
from lpxy.wire import SERVICE_ID_PATTERN

__all__ = ["DEFAULT_MAX_REQUEST_SIZE", "ManagementAPI", "SizeLimitedRequest"]

DEFAULT_MAX_REQUEST_SIZE = 65536
MAX_JSON_DEPTH = 8
"""Nesting of arrays and objects a request body may have (the API needs 3)."""
TARGET_PREFIX = "IoTSecuredTunneling."
CONTENT_TYPE = b"application/x-amz-json-1.1"

_TUNNEL_ID = re.compile(r"[a-zA-Z0-9_\-+=:]{1,128}")
_THING_NAME = re.compile(r"[a-zA-Z0-9:_-]{1,128}")
_NEXT_TOKEN = re.compile(r"[a-zA-Z0-9_=-]{1,4096}")
_TAG_EXTRA = set("_.:/=+-@")
_PLAIN_TAG_TEXT = re.compile(r"[A-Za-z0-9 _.:/=+\-@]*")
_CLIENT_MODES = {"SOURCE": SOURCE, "DESTINATION": DESTINATION, "ALL": ALL}
# Operations that change state: answered once the store has kept the change.
_CHANGING = frozenset({
    "OpenTunnel", "CloseTunnel", "RotateTunnelAccessToken", "TagResource", "UntagResource",
})


class ApiError(Exception):
    """An error answered as C{{"__type": kind, "message": message}}."""

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.message = message


def _invalid(message: str) -> ApiError:
    return ApiError(400, "ValidationException", message)


_log = Logger()
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
_BRACKET = re.compile(rb"[\[\]{}]")


def _nesting_depth(text: bytes) -> int:
    """How deeply JSON text nests arrays and objects (strings skipped)."""
    depth = deepest = 0
    for match in _BRACKET.finditer(_STRING.sub(b"", text)):
        if match.group() in b"[{":
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


class SizeLimitedRequest(server.Request):
    """
    A request that stops keeping its body past C{max_size} bytes, so a huge
    upload cannot fill memory; the API then refuses it.
    """

    max_size = DEFAULT_MAX_REQUEST_SIZE
    too_large = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._received = 0

    def handleContentChunk(self, data: bytes) -> None:
        self._received += len(data)
        if self._received > self.max_size:
            if not self.too_large:
                self.too_large = True
                assert self.content is not None
                self.content.seek(0)
                self.content.truncate()
            return
        super().handleContentChunk(data)

    def processingFailed(self, reason: Any) -> None:
        # Whatever failed, the client gets AWS's JSON error, never a page
        # with a traceback, and the log gets one line.
        _log.error("API request failed: {error}", error=reason.getErrorMessage())
        if self.finished or self.startedWriting:
            self.loseConnection()
            return
        body = json.dumps({"__type": "InternalFailure",
                           "message": "The request processing has failed"}).encode()
        self.setResponseCode(500)
        self.setHeader(b"content-type", CONTENT_TYPE)
        self.setHeader(b"content-length", str(len(body)).encode())
        self.write(body)
        self.finish()


# Field checks, after botocore's shapes.


def _get(body: dict[str, Any], name: str, kind: type | tuple[type, ...],
         required: bool = False) -> Any:
    value = body.get(name)
    if value is None:
        if required:
            raise _invalid(f"Missing required field {name}")
        return None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise _invalid(f"Field {name} has the wrong type")
    return value


def _matching(pattern: re.Pattern[str], name: str, value: str) -> str:
    if not pattern.fullmatch(value):
        raise _invalid(f"Value for {name} must match {pattern.pattern}")
    return value


def _integer(name: str, value: int | None, low: int, high: int) -> int | None:
    if value is not None and not low <= value <= high:
        raise _invalid(f"Value for {name} must be between {low} and {high}")
    return value


def _length(name: str, value: str, low: int, high: int) -> str:
    if not low <= len(value) <= high:
        raise _invalid(f"Length of {name} must be between {low} and {high}")
    return value


def _description(value: str | None) -> str | None:
    if value is not None:
        _length("description", value, 1, 2048)
        if any(unicodedata.category(c).startswith("C") for c in value):
            raise _invalid("description must not contain control characters")
    return value


def _tag_text(name: str, value: str, low: int, high: int) -> str:
    _length(name, value, low, high)
    if _PLAIN_TAG_TEXT.fullmatch(value):
        # the common case, without a lookup per character (50 tags of 384)
        return value
    for c in value:
        if c not in _TAG_EXTRA and unicodedata.category(c)[0] not in "LZN":
            raise _invalid(
                f"Value for {name} must contain only letters, numbers, spaces and _.:/=+-@"
            )
    return value


def _tags(body: dict[str, Any], required: bool) -> list[tuple[str, str]] | None:
    tags = _get(body, "tags", list, required)
    if tags is None:
        return None
    if not 1 <= len(tags) <= 200:
        raise _invalid("tags must hold between 1 and 200 tags")
    result = []
    for tag in tags:
        if not isinstance(tag, dict):
            raise _invalid("Each tag must be an object")
        key = _tag_text("key", _get(tag, "key", str, True), 1, 128)
        value = _tag_text("value", _get(tag, "value", str, True), 0, 256)
        result.append((key, value))
    return result


def _tunnel_id(body: dict[str, Any]) -> str:
    return _matching(_TUNNEL_ID, "tunnelId", _get(body, "tunnelId", str, True))


def _arn(body: dict[str, Any]) -> str:
    return _length("resourceArn", _get(body, "resourceArn", str, True), 1, 1011)


def _destination_config(body: dict[str, Any]) -> tuple[str | None, list[str]] | None:
    config = _get(body, "destinationConfig", dict)
    if config is None:
        return None
    thing_name = _get(config, "thingName", str)
    if thing_name is not None:
        _matching(_THING_NAME, "thingName", thing_name)
    services = _get(config, "services", list, True)
    if not services:
        raise _invalid("destinationConfig.services must hold at least one service")
    for service in services:
        if not isinstance(service, str):
            raise _invalid("Each service must be a string")
        _matching(SERVICE_ID_PATTERN, "services", service)
    return thing_name, services


def _timestamp(seconds: float) -> float:
    return round(seconds, 3)


def _tag_list(tags: dict[str, str]) -> list[dict[str, str]]:
    return [{"key": k, "value": v} for k, v in tags.items()]


def _connection_state(record: TunnelRecord, mode: str) -> dict[str, Any]:
    end = record.end(mode)
    return {
        "status": "CONNECTED" if end.connected else "DISCONNECTED",
        "lastUpdatedAt": _timestamp(end.last_updated_at),
    }


def _summary(record: TunnelRecord) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "tunnelId": record.tunnel_id,
        "tunnelArn": record.arn,
        "status": record.status,
        "createdAt": _timestamp(record.created_at),
        "lastUpdatedAt": _timestamp(record.last_updated_at),
    }
    if record.description is not None:
        summary["description"] = record.description
    return summary


def _describe(record: TunnelRecord) -> dict[str, Any]:
    tunnel = _summary(record)
    tunnel["sourceConnectionState"] = _connection_state(record, SOURCE)
    tunnel["destinationConnectionState"] = _connection_state(record, DESTINATION)
    tunnel["timeoutConfig"] = {"maxLifetimeTimeoutMinutes": record.lifetime_minutes}
    if record.services or record.thing_name is not None:
        config: dict[str, Any] = {"services": list(record.services)}
        if record.thing_name is not None:
            config["thingName"] = record.thing_name
        tunnel["destinationConfig"] = config
    if record.tags:
        tunnel["tags"] = _tag_list(record.tags)
    return tunnel


class ManagementAPI(Resource):
    """
    The management API as a leaf resource answering C{POST}.

    @param broker: carries out every operation.
    @param verifier: checks each request's signature; L{None} leaves the
        API open.
    @param throttle: limits each caller's request rate (by access key, or
        by client address when the API is open); L{None} for no limit.
    @ivar calls: requests answered, by operation (C{unknown} for a missing
        or unknown one) and result (C{OK} or the error's type).
    """

    isLeaf = True
    _log = Logger()

    def __init__(
        self,
        broker: Broker,
        verifier: SignatureVerifier | None = None,
        throttle: Throttle | None = None,
    ) -> None:
        super().__init__()
        self._broker = broker
        self._verifier = verifier
        self._throttle = throttle
        self._operations: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
            "OpenTunnel": self._open_tunnel,
            "CloseTunnel": self._close_tunnel,
            "DescribeTunnel": self._describe_tunnel,
            "ListTunnels": self._list_tunnels,
            "RotateTunnelAccessToken": self._rotate,
            "TagResource": self._tag_resource,
            "UntagResource": self._untag_resource,
            "ListTagsForResource": self._list_tags,
        }
        self.calls: Counter[tuple[str, str]] = Counter()

    def render_POST(self, request: server.Request) -> Any:
        request.setHeader(b"content-type", CONTENT_TYPE)
        request.setHeader(b"x-amzn-requestid", str(uuid.uuid4()).encode())
        operation = "?"
        try:
            if getattr(request, "too_large", False):
                raise _invalid("Request body is too large")
            assert request.content is not None
            content = request.content.read()
            caller = self._authenticate(request, content)
            if self._throttle is not None:
                if caller is None:
                    caller = "address " + str(getattr(request.getClientAddress(), "host", ""))
                if not self._throttle.allow(caller):
                    raise ApiError(400, "ThrottlingException", "Rate exceeded")
            target = (request.getHeader(b"x-amz-target") or b"").decode("latin-1")
            if not target.startswith(TARGET_PREFIX):
                raise ApiError(400, "UnknownOperationException", "Missing or unknown X-Amz-Target")
            operation = target[len(TARGET_PREFIX):]
            handler = self._operations.get(operation)
            if handler is None:
                raise ApiError(400, "UnknownOperationException",
                               f"Unknown operation {operation}")
            if _nesting_depth(content) > MAX_JSON_DEPTH:
                raise ApiError(400, "SerializationException",
                               f"Body nests deeper than {MAX_JSON_DEPTH} levels")
            try:
                body = json.loads(content or b"{}")
            except ValueError:
                raise ApiError(400, "SerializationException", "Body is not JSON") from None
            if not isinstance(body, dict):
                raise ApiError(400, "SerializationException", "Body is not a JSON object")
            refreshed = self._refresh(body)
        except ApiError as e:
            return self._error(request, operation, e)
        except AuthenticationFailed as e:
            return self._error(request, operation, ApiError(e.status, e.kind, e.message))
        if refreshed.called:  # the store knows at once (no other node writes)
            return self._run(request, operation, handler, body)
        # Another node may have just changed the tunnel named: the store
        # reads it first.
        gone: list[object] = []
        request.notifyFinish().addErrback(gone.append)

        def run(_: object) -> None:
            if gone:
                return
            answer = self._run(request, operation, handler, body)
            if answer is not server.NOT_DONE_YET:
                request.setHeader(b"content-length", str(len(answer)).encode())
                request.write(answer)
                request.finish()

        refreshed.addCallback(run)
        return server.NOT_DONE_YET

    def _refresh(self, body: dict[str, Any]) -> defer.Deferred[None]:
        """Bring the store's view of the tunnel a call names up to date."""
        if "tunnelId" in body and isinstance(body["tunnelId"], str):
            return self._broker.refresh_tunnel(body["tunnelId"])
        if "resourceArn" in body and isinstance(body["resourceArn"], str):
            return self._broker.refresh_tunnel(arn=body["resourceArn"])
        return defer.succeed(None)

    def _run(
        self, request: server.Request, operation: str, handler: Any, body: dict[str, Any]
    ) -> Any:
        """Run an operation and answer it (at once, or once its change is kept)."""
        try:
            result = handler(body)
        except ApiError as e:
            return self._error(request, operation, e)
        except AuthenticationFailed as e:
            return self._error(request, operation, ApiError(e.status, e.kind, e.message))
        except ResourceNotFound as e:
            return self._error(request, operation,
                               ApiError(404, "ResourceNotFoundException", str(e)))
        except TooManyTags as e:
            return self._error(request, operation,
                               ApiError(400, "TooManyTagsException", str(e)))
        except LimitExceeded as e:
            return self._error(request, operation,
                               ApiError(400, "LimitExceededException", str(e)))
        except InvalidRequest as e:
            return self._error(request, operation, _invalid(str(e)))
        except Exception as e:
            self._log.error("API {operation} failed: {error!r}", operation=operation, error=e)
            return self._error(request, operation, ApiError(
                500, "InternalFailure", "The request processing has failed"
            ))
        answer = json.dumps(result).encode()
        if operation not in _CHANGING:
            self._log.debug("API {operation}: OK", operation=operation)
            self.calls[(operation, "OK")] += 1
            return answer
        return self._when_kept(request, operation, answer)

    def _when_kept(self, request: server.Request, operation: str, answer: bytes) -> Any:
        """
        Answer a call that changed state once the store has committed the
        change: a 2xx means it survives the service being killed; a write
        that failed gets a 500.
        """
        gone: list[object] = []
        request.notifyFinish().addErrback(gone.append)

        def send(body: bytes) -> None:
            if gone:
                return
            request.setHeader(b"content-length", str(len(body)).encode())
            request.write(body)
            request.finish()

        def kept(_: object) -> None:
            self._log.debug("API {operation}: OK", operation=operation)
            self.calls[(operation, "OK")] += 1
            send(answer)

        def lost(_: object) -> None:
            send(self._error(request, operation, ApiError(
                500, "InternalFailure", "The change could not be stored; try again"
            )))

        self._broker.store.when_written().addCallbacks(kept, lost)
        return server.NOT_DONE_YET

    def _authenticate(self, request: server.Request, content: bytes) -> str | None:
        """The access key that signed C{request}; L{None} when the API is open."""
        if self._verifier is None:
            return None
        method = (request.method or b"").decode("latin-1")
        return self._verifier.verify(
            method,
            request.uri,
            [(name, value) for name, values in request.requestHeaders.getAllRawHeaders()
             for value in values],
            content,
        )

    def _error(self, request: server.Request, operation: str, error: ApiError) -> bytes:
        # A name from the request is counted only if it is an operation.
        known = operation if operation in self._operations else "unknown"
        self.calls[(known, error.kind)] += 1
        self._log.info(
            "API {operation}: {status} {kind}: {message}",
            operation=operation, status=error.status, kind=error.kind, message=error.message,
        )
        request.setResponseCode(error.status)
        return json.dumps({"__type": error.kind, "message": error.message}).encode()

    def _open_tunnel(self, body: dict[str, Any]) -> dict[str, Any]:
        description = _description(_get(body, "description", str))
        tags = _tags(body, required=False) or []
        config = _destination_config(body)
        thing_name, services = config if config is not None else (None, [])
        timeout = _get(body, "timeoutConfig", dict) or {}
        lifetime = _integer(
            "maxLifetimeTimeoutMinutes",
            _get(timeout, "maxLifetimeTimeoutMinutes", int), 1, 720,
        )
        opened = self._broker.open_tunnel(
            services=services,
            thing_name=thing_name,
            description=description,
            lifetime_minutes=720 if lifetime is None else lifetime,
            tags=tags,
        )
        return {
            "tunnelId": opened.tunnel_id,
            "tunnelArn": opened.tunnel_arn,
            "sourceAccessToken": opened.source_token,
            "destinationAccessToken": opened.destination_token,
        }

    def _close_tunnel(self, body: dict[str, Any]) -> dict[str, Any]:
        tunnel_id = _tunnel_id(body)
        delete = _get(body, "delete", bool)
        self._broker.close_tunnel(tunnel_id, delete=bool(delete))
        return {}

    def _describe_tunnel(self, body: dict[str, Any]) -> dict[str, Any]:
        return {"tunnel": _describe(self._broker.describe(_tunnel_id(body)))}

    def _list_tunnels(self, body: dict[str, Any]) -> dict[str, Any]:
        thing_name = _get(body, "thingName", str)
        if thing_name is not None:
            _matching(_THING_NAME, "thingName", thing_name)
        max_results = _integer("maxResults", _get(body, "maxResults", int), 1, 100)
        next_token = _get(body, "nextToken", str)
        if next_token is not None:
            _matching(_NEXT_TOKEN, "nextToken", next_token)
        page, following = self._broker.list_tunnels(
            thing_name=thing_name,
            max_results=100 if max_results is None else max_results,
            next_token=next_token,
        )
        result: dict[str, Any] = {"tunnelSummaries": [_summary(r) for r in page]}
        if following is not None:
            result["nextToken"] = following
        return result

    def _rotate(self, body: dict[str, Any]) -> dict[str, Any]:
        tunnel_id = _tunnel_id(body)
        mode = _CLIENT_MODES.get(_get(body, "clientMode", str, True))
        if mode is None:
            raise _invalid("clientMode must be one of SOURCE, DESTINATION, ALL")
        config = _destination_config(body)
        rotated = self._broker.rotate(
            tunnel_id,
            mode,
            services=None if config is None else config[1],
            thing_name=None if config is None else config[0],
        )
        result = {"tunnelArn": rotated.tunnel_arn}
        if rotated.source_token is not None:
            result["sourceAccessToken"] = rotated.source_token
        if rotated.destination_token is not None:
            result["destinationAccessToken"] = rotated.destination_token
        return result

    def _tag_resource(self, body: dict[str, Any]) -> dict[str, Any]:
        arn = _arn(body)
        tags = _tags(body, required=True)
        assert tags is not None
        self._broker.tag(arn, tags)
        return {}

    def _untag_resource(self, body: dict[str, Any]) -> dict[str, Any]:
        arn = _arn(body)
        keys = _get(body, "tagKeys", list, True)
        if len(keys) > 200:
            raise _invalid("tagKeys must hold at most 200 keys")
        for key in keys:
            if not isinstance(key, str):
                raise _invalid("Each tag key must be a string")
            _tag_text("tagKeys", key, 1, 128)
        self._broker.untag(arn, keys)
        return {}

    def _list_tags(self, body: dict[str, Any]) -> dict[str, Any]:
        return {"tags": _tag_list(self._broker.tags(_arn(body)))}
