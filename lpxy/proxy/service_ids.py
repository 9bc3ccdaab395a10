# -*- test-case-name: tests.test_service_ids,tests.test_session -*-
"""
Which of a tunnel's service ids the local proxy serves, and on which entry
of its local map (protocol.md section 4): L{ServiceMap} turns the ids of a
SERVICE_IDS record into L{ServiceBinding}s, or raises L{ServiceMismatch}
when they cannot fit the map.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal

from attrs import frozen
from twisted.logger import Logger

from lpxy.proxy.channel import ServiceBinding, ServiceMismatch, shown_id
from lpxy.wire import SERVICE_ID_CHARACTERS, SERVICE_ID_MAX_LENGTH, is_valid_service_id

__all__ = ["ServiceMap"]


@frozen
class ServiceMap:
    """
    The local map's keys, and how a tunnel's services are served on them.

    @ivar mode: C{"source"} or C{"destination"}.
    @ivar keys: the keys of the local map (C{""} alone for an unnamed
        single mapping).
    @ivar format: the wire format the proxy speaks; in 1, no service id is
        sent.
    @ivar from_config_dir: the map came from C{--config-dir} files.
    @ivar max_services: the most services served (the first ones).
    @ivar stdio: C{--stdio}'s service id: the one service served, wherever
        the tunnel lists it.
    """

    _log = Logger()

    mode: Literal["source", "destination"]
    keys: Sequence[str]
    format: int
    from_config_dir: bool
    max_services: int
    stdio: str | None = None

    def served_ids(self, received: Iterable[str]) -> list[str]:
        """
        The services of a SERVICE_IDS the proxy serves: each valid id once,
        in order, at most C{max_services}; one warning for the invalid ids
        and one for those over the limit. With C{stdio}, that one id.

        @raise ServiceMismatch: C{stdio} is not among the ids.
        """
        ids = list(dict.fromkeys(received))
        if self.stdio is not None:
            if self.stdio not in ids:
                shown = ", ".join(map(shown_id, ids[:10])) or "none"
                raise ServiceMismatch(
                    f"--stdio {self.stdio}: the tunnel has no service {self.stdio!r}"
                    f" (its services: {shown}); give one of them"
                )
            return [self.stdio]
        bad = [sid for sid in ids if not is_valid_service_id(sid)]
        if bad:
            self._log.warn(
                "Ignoring {count} service id(s) of the tunnel that are not 1 to "
                "{length} of [{characters}]: {ids}",
                count=len(bad),
                length=SERVICE_ID_MAX_LENGTH,
                characters=SERVICE_ID_CHARACTERS,
                ids=", ".join(map(shown_id, bad[:3])) + (", ..." if len(bad) > 3 else ""),
            )
            ids = [sid for sid in ids if is_valid_service_id(sid)]
        if len(ids) > self.max_services:
            self._log.warn(
                "The tunnel announced {count} services, more than the "
                "{limit} served (tunneling.proxy.websocket.max_services): "
                "ignoring all but the first {limit}",
                count=len(ids),
                limit=self.max_services,
            )
            ids = ids[: self.max_services]
        return ids

    def bindings(self, ids: list[str]) -> list[ServiceBinding]:
        """
        The bindings of the served C{ids}.

        @raise ServiceMismatch: the ids do not fit the local map.
        """
        keys = list(self.keys)
        wire = (lambda sid: "") if self.format == 1 else (lambda sid: sid)
        if keys == [""]:
            return [ServiceBinding("", wire(ids[0]) if len(ids) == 1 else "")]
        if not self.from_config_dir and keys:
            if sorted(keys) != sorted(ids):
                raise ServiceMismatch(
                    f"the tunnel's services {sorted(ids)} do not match the "
                    f"mapped services {sorted(keys)}; map exactly the tunnel's services"
                )
            return [ServiceBinding(k, wire(k)) for k in keys]
        bindings = []
        for sid in ids:
            if sid in keys:
                bindings.append(ServiceBinding(sid, wire(sid)))
            elif self.mode == "destination":
                raise ServiceMismatch(
                    f"service {sid!r} of the tunnel is found in no --config-dir file"
                )
            else:
                self._log.info(
                    "Service {service_id} is found in no config file: "
                    "listening on a random port",
                    service_id=shown_id(sid),
                )
                bindings.append(ServiceBinding(None, wire(sid)))
        return bindings
