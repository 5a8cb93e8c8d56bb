"""Run a sweep's traces on another machine: NDIF, or `vlmtrace serve` on the lab's GPU box.

    from vlmtrace.remote import backend
    ds = vt.patch(vlm, samples, corruption=vt.ImagePair(),
                  backend=backend(vlm, host="http://gpu-box:8000"))   # key: $NDIF_API_KEY

Every chunk of a sweep is one nnsight trace whose metric is computed inside the trace, so with
this backend each chunk is serialized, run on the server, and only its per-row floats come
back. The backend is nnsight's own `RemoteBackend` with three things added:

- **A model key.** vlmtrace wraps models it loaded itself (`NNsight(model)`), which nnsight
  cannot name; the key comes from `VLM.name` (`vlmtrace.remote.keys`).
- **vlmtrace travels with the trace.** The trace body calls vlmtrace's helpers (`_apply_patch`,
  `_noise`, the metric, the adapter's forward). nnsight pickles installed packages *by
  reference*, which NDIF cannot resolve: it does not have vlmtrace. While a chunk is
  serialized, the modules that code lives in (`ENGINE_MODULES`) are registered with
  cloudpickle to go *by value* (functions as source, classes rebuilt), so the request runs on
  any server with nnsight, torch and transformers.
- **Errors that say what happened.** A refused key, an unknown model and a server that went
  away each raise a `RemoteError` naming the cause and the fix (the first two a
  `RemoteRefusedError`, the last a `ServerUnavailableError`: user errors, which the command line
  prints as one paragraph); a trace that raised on the server raises `RemoteError` with the
  server's traceback, and an out-of-memory error there is also a RuntimeError, so the sweep
  halves the chunk and retries as it does locally.

How the client waits (`mode`):

- `"stream"` (default): one websocket per chunk, status frames until COMPLETED.
- `"poll"`: submit over HTTP and poll `GET /response/{id}` until done: no connection is held
  while a chunk waits, which suits long sweeps through proxies or flaky networks.
- `"submit"`: nnsight's non-blocking mode, for a single trace written by hand: the trace
  returns at once, `backend.job_id` names the job, `backend.wait()` (or `backend.poll()`)
  collects the saved values later. Sweeps need one of the waiting modes.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import Any, Literal

from nnsight.intervention.backends.display import StatusDisplay
from nnsight.intervention.backends.remote import RemoteBackend, RemoteError
from nnsight.schema.config import CONFIG
from nnsight.schema.response import Status

from ..errors import UserError
from ..models.load import VLM
from ..models.registry import FAMILY_MODULES
from .keys import model_key as key_for

Mode = Literal["stream", "poll", "submit"]


class ServerUnavailableError(RemoteError, UserError):
    """The server could not be reached, or went away while a chunk ran (the command line prints
    it as one paragraph: the fix is to start the server, or to name the right one)."""


class RemoteRefusedError(RemoteError, UserError):
    """The server refused the request for a reason the user fixes: the API key (missing or not the
    server's), the model key (a model it does not serve), the page or host it came from, its size.
    The command line prints it as one paragraph; the server's reason says what to change."""


class RemoteHostError(RemoteError, UserError):
    """A server address that is not an http(s) URL."""


REFUSALS = {400, 401, 403, 404, 413}
"""HTTP statuses of a request the server refused, stating why (a key, a model name, an nnsight or
Python version that differs from the server's, a size): `RemoteRefusedError`. Others (a busy
server's 503, a failure while running) are not the user's to fix by changing the request."""


class RemoteOutOfMemoryError(RemoteError, RuntimeError):
    """The server ran out of memory. A RuntimeError saying so, as a local OOM is, so that a
    sweep halves the chunk and retries it (`vlmtrace.engine.sweep.is_out_of_memory`)."""


ENGINE_MODULES = (
    "vlmtrace.errors",  # the engine's error classes derive from UserError
    "vlmtrace.engine.forward",
    "vlmtrace.engine.layouts",
    "vlmtrace.engine.metrics",
    "vlmtrace.models.adapter",
    *(module.__name__ for module in FAMILY_MODULES),
)
"""Modules whose code a sweep's trace runs on the server. Not the package `vlmtrace`: a module
registered by value is itself pickled by value wherever it is named, so a user's metric that
mentions `vt.Probability` would ship the whole package namespace (and fail to pickle)."""


@contextmanager
def shipped_by_value(*modules: ModuleType | str) -> Iterator[None]:
    """Pickle these modules' functions and classes by value (source) inside the block.

    Scoped to one serialization so that nothing else this process pickles changes; a module
    the user registered already keeps its registration.
    """
    import importlib

    import cloudpickle

    registered = set(cloudpickle.list_registry_pickle_by_value())
    added = []
    for module in modules:
        module = importlib.import_module(module) if isinstance(module, str) else module
        if module.__name__ not in registered:
            cloudpickle.register_pickle_by_value(module)
            added.append(module)
    try:
        yield
    finally:
        for module in added:
            cloudpickle.unregister_pickle_by_value(module)


class ServerBackend(RemoteBackend):
    """nnsight's `RemoteBackend` for vlmtrace traces (see the module docstring)."""

    def __init__(
        self,
        model_key: str,
        *,
        host: str | None = None,
        api_key: str | None = None,
        mode: Mode = "stream",
        poll_interval: float = 0.5,
        timeout: float | None = None,
        busy_wait: float = 300.0,
        request_seconds: float = 60.0,
        verbose: bool = False,
    ) -> None:
        if mode not in ("stream", "poll", "submit"):
            raise ValueError(f"mode must be 'stream', 'poll' or 'submit', not {mode!r}.")
        host = (host or os.environ.get("NDIF_HOST") or CONFIG.API.HOST).rstrip("/")
        if not host.startswith(("http://", "https://")):
            raise RemoteHostError(
                f"the server's address {host!r} is not a URL: give it as http://HOST:PORT or "
                "https://HOST (--host, or $NDIF_HOST), e.g. http://127.0.0.1:8000 for `vlmtrace serve` "
                "through an SSH tunnel."
            )
        super().__init__(
            model_key,
            host=host,
            api_key=api_key or os.environ.get("NDIF_API_KEY") or CONFIG.API.APIKEY,
            blocking=mode != "submit",
            verbose=verbose,
        )
        self.mode = mode
        self.poll_interval = poll_interval
        self.timeout = timeout
        """Seconds a polled job may take before `wait` gives up (None: no limit)."""
        self.busy_wait = busy_wait
        """Seconds to keep retrying a request that a busy server refused (503 + Retry-After)."""
        if not request_seconds > 0:
            raise ValueError(f"request_seconds must be positive, not {request_seconds!r}.")
        self.request_seconds = request_seconds
        """About how long one request may run on the server: a sweep groups its forwards into
        requests of about this length (`vlmtrace.engine.sweep.run_forwards`)."""
        # nnsight's live status line rewrites stdout once per chunk; the sweep's progress bar
        # already advances per chunk, so the line is shown only when asked for.
        self.display = StatusDisplay(enabled=verbose, verbose=verbose)

    def __repr__(self) -> str:  # never the key
        return f"ServerBackend({self.model_key!r}, host={self.host!r}, mode={self.mode!r})"

    def __call__(self, tracer: Any = None) -> Any:
        if self.mode != "poll":
            return super().__call__(tracer)
        self.job_id = None  # one backend serves every chunk of a sweep: a new job each time
        self.submit(tracer)
        result = self.wait()
        self._push(result, tracer)
        self.job_id = None
        return result

    def wait(self, timeout: float | None = None) -> dict[str, Any]:
        """Poll the submitted job until it completes; return its saved values by name."""
        if self.job_id is None:
            raise RuntimeError("no job to wait for: run a trace with this backend first.")
        limit = timeout if timeout is not None else self.timeout
        deadline = None if limit is None else time.monotonic() + limit
        while True:
            result = self.poll()
            if self.status == Status.COMPLETED:
                return result if result is not None else {}
            if deadline is not None and time.monotonic() > deadline:
                raise RemoteError(
                    f"job {self.job_id} on {self.host} is still {getattr(self.status, 'value', 'unknown')} "
                    f"after {limit:g} s; call wait() again to keep waiting, or raise timeout=."
                )
            time.sleep(self.poll_interval)

    def note(self, response: Any) -> bool:
        try:
            return super().note(response)
        except RemoteError as error:
            if "out of memory" in str(error).lower():
                raise RemoteOutOfMemoryError(str(error)) from None
            raise

    def check_reachable(self, timeout: float = 5.0) -> None:
        """Raise `ServerUnavailableError` unless something accepts connections at `host`."""
        import socket
        from urllib.parse import urlsplit

        parts = urlsplit(self.host if "://" in self.host else f"http://{self.host}")
        port = parts.port or (443 if parts.scheme in ("https", "wss") else 80)
        try:
            socket.create_connection((parts.hostname or "", port), timeout=timeout).close()
        except OSError as error:
            raise ServerUnavailableError(
                f"no server answers at {self.host} ({error.strerror or error}). Start it (`vlmtrace serve "
                "MODEL` on the GPU machine), or name the right one with --host or $NDIF_HOST."
            ) from None

    def _serialize(self, tracer: Any) -> bytes:
        with shipped_by_value(*ENGINE_MODULES):
            return super()._serialize(tracer)

    def request(self, request: Any, tracer: Any) -> Any:
        import httpx
        import websocket

        try:
            return super().request(request, tracer)
        except websocket.WebSocketBadStatusException as error:
            raise RemoteRefusedError(f"{self.host} refused the connection: {_detail(error)}") from None
        except (OSError, websocket.WebSocketException, httpx.TransportError) as error:
            raise self._unavailable(error) from None

    def _post(self, request: Any, blob: bytes) -> Any:
        """POST the request; a busy server (503) is asked again after its Retry-After."""
        import httpx

        deadline = time.monotonic() + self.busy_wait
        while True:
            try:
                return super()._post(request, blob)
            except RemoteError as error:
                cause = error.__cause__
                if isinstance(cause, httpx.TransportError):
                    raise self._unavailable(cause) from None
                status = cause.response.status_code if isinstance(cause, httpx.HTTPStatusError) else None
                if status in REFUSALS:
                    raise RemoteRefusedError(f"{self.host} refused the request: {_detail(cause)}") from None
                busy = status == 503
                left = deadline - time.monotonic()
                if not busy or left <= 0:
                    raise
                try:
                    pause = float(cause.response.headers.get("Retry-After", "1"))
                except ValueError:
                    pause = 1.0
                time.sleep(max(0.05, min(pause, left)))

    def poll(self, tracer: Any = None) -> Any:
        import httpx

        try:
            return super().poll(tracer)
        except httpx.TransportError as error:
            raise self._unavailable(error) from None
        except httpx.HTTPStatusError as error:
            refused = RemoteRefusedError if error.response.status_code in (401, 403) else RemoteError
            raise refused(f"{self.host} refused the poll: {_detail(error)}") from None

    def _unavailable(self, error: BaseException) -> ServerUnavailableError:
        return ServerUnavailableError(
            f"lost the server at {self.host} ({type(error).__name__}: {error}). Is it running? A sweep "
            "that writes a store (store=...) keeps every finished chunk: rerun the same call to "
            "resume once the server is back."
        )


def _detail(error: Any) -> str:
    """The server's explanation from a refused websocket handshake or HTTP response."""
    if hasattr(error, "resp_body"):  # websocket-client's WebSocketBadStatusException
        body, status = error.resp_body, error.status_code
    else:  # httpx.HTTPStatusError
        body, status = error.response.content, error.response.status_code
    try:
        return str(json.loads(body)["detail"])
    except (TypeError, ValueError, KeyError):
        return f"HTTP {status}"


def backend(
    vlm: VLM | str,
    *,
    host: str | None = None,
    api_key: str | None = None,
    model_key: str | None = None,
    mode: Mode = "stream",
    poll_interval: float = 0.5,
    timeout: float | None = None,
    busy_wait: float = 300.0,
    request_seconds: float = 60.0,
    verbose: bool = False,
) -> ServerBackend:
    """A backend that runs `vlm`'s traces on a server; pass it as `backend=` to a sweep.

    `host`: the server's URL (default: $NDIF_HOST, else nnsight's configured NDIF host).
    `api_key`: default $NDIF_API_KEY, else nnsight's configured key.
    `model_key`: what the server calls the model (default: from `vlm.name`, see
    `vlmtrace.remote.keys`); needed when the client loaded it under another name.
    `mode`, `poll_interval`, `timeout`: how the client waits (module docstring).
    `busy_wait`: seconds to keep re-sending a request that a busy server turned away.
    `request_seconds`: about how long one request may run on the server: a sweep sends its
    forwards in groups sized to it (`vlmtrace.engine.sweep.run_forwards`).
    `verbose`: show nnsight's live status line and payload sizes.
    """
    name = vlm if isinstance(vlm, str) else vlm.name
    return ServerBackend(
        model_key or key_for(name),
        host=host,
        api_key=api_key,
        mode=mode,
        poll_interval=poll_interval,
        timeout=timeout,
        busy_wait=busy_wait,
        request_seconds=request_seconds,
        verbose=verbose,
    )
