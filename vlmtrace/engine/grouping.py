"""How many forwards one remote request carries.

Run here, a forward is one nnsight trace and costs nothing extra. Run on a server, each trace
was one request: a round trip (1-6 s on a loaded 2-core box running `vlmtrace serve`) and, on
NDIF, a place in the queue, so `multi_constraint --n-samples 4 --remote` sent 108 requests.
Several forwards now travel as one nnsight session (`forward.run_plans`): the traces run one
after another on the server, each with its own rows, so a request needs no more memory than
one forward, and only their per-row floats come back.

How many go together is measured, not guessed: the first request through a backend holds one
forward, and each later request as many as fit the backend's `request_seconds` (a server stops
longer requests: `vlmtrace serve --max-runtime`, 600 s by default) at the last request's
seconds per forward, at most `MAX_GROUP`, so a failed request loses little. The pace is kept
per backend, so a recipe's later sweeps start from it. After an out-of-memory error the next
request holds one forward again.
"""

from __future__ import annotations

import weakref
from typing import Any

REQUEST_SECONDS = 60.0
"""How long one remote request may run, by default (a backend's `request_seconds` overrides it)."""
MAX_GROUP = 64
"""Forwards per request at most, whatever their pace."""


PACE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""Backend -> seconds per forward of its last request: a recipe's later sweeps, through the
same backend, start at that pace instead of with a lone forward."""


class RequestPacer:
    """The number of forwards the next request should carry, from the pace of the last one."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        self.seconds = float(getattr(backend, "request_seconds", REQUEST_SECONDS))
        self.size = 1
        """Forwards the next request carries (always 1 when running here)."""
        if backend is not None and _pace(backend) is not None:
            self.size = self._fitting(_pace(backend))

    def ran(self, forwards: int, seconds: float) -> None:
        """A request of `forwards` forwards took `seconds` (round trip included)."""
        if self.backend is not None:
            per_forward = max(seconds / forwards, 1e-3)
            self.size = self._fitting(per_forward)
            try:
                PACE[self.backend] = per_forward
            except TypeError:  # a backend that cannot be weakly referenced: paced per sweep
                pass

    def _fitting(self, per_forward: float) -> int:
        return max(1, min(MAX_GROUP, int(self.seconds / per_forward)))

    def restart(self) -> None:
        """After a failed request (out of memory): one forward at a time until one succeeds."""
        self.size = 1


def _pace(backend: Any) -> float | None:
    try:
        return PACE.get(backend)
    except TypeError:
        return None
