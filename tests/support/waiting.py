"""
Waiting in the test's reactor without a wall clock: for a number of reactor
turns, or for several Deferreds at once.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults

__all__ = ["gather", "turns"]


def turns(n: int) -> Deferred[None]:
    """Fires after C{n} turns of the reactor (no wall-clock wait)."""
    d: Deferred[None] = Deferred()

    def step(left: int) -> None:
        if left:
            reactor.callLater(0, step, left - 1)  # type: ignore[attr-defined]
        else:
            d.callback(None)

    step(n)
    return d


def gather(*ds: Deferred[Any]) -> Deferred[list[Any]]:
    """All of C{ds}, failing on the first failure."""
    return gatherResults(list(ds), consumeErrors=True)
