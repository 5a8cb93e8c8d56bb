"""`vlmtrace serve`: an NDIF-protocol server for the lab's own GPU box.

NDIF's server stack (Redis, object store, Ray, socket.io) is built for a public service. A lab
with one GPU server needs one process that speaks the same protocol to nnsight's
`RemoteBackend`, so a laptop runs `vt.patch(..., backend=vlmtrace.remote.backend(vlm, host=...))`
against it exactly as it would against NDIF:

    vlmtrace serve shapes-llava --port 8000       # loopback; writes a new key to a 0600 file
    vlmtrace serve llava-hf/llava-1.5-7b-hf --host 0.0.0.0 --public-url https://gpu-box.lab

The protocol (what nnsight 0.8.1's client expects):

- `GET /subscribe` (websocket): the first text frame is `{"session_id": ...}`; status frames of
  that session's requests follow (QUEUED, RUNNING, then COMPLETED or ERROR). A COMPLETED
  frame carries the result inline (a binary `ResponseModel.pickle()` frame) when it is small,
  else a URL to fetch it from. Requests still waiting when their session closes are dropped.
- `POST /request` (multipart: `data` = the RequestModel JSON, `blob` = the payload) answers
  RECEIVED with the request id, or 503 when `max_queue` requests are already admitted (bodies
  still arriving count: at most `max_queue` bodies are held in memory); the request
  then waits for its model (one at a time per model: QUEUED while another runs) and runs in
  the model's process (`vlmtrace.remote.worker`), stopped after `max_runtime` seconds.
- `GET /response/{id}`: the latest status, for clients that poll instead of subscribing
  (404 until the request is known, and again once it expired). A COMPLETED status carries a
  result URL, built from the server's configured address (`--public-url`), never from the
  request's Host header.
- `GET /result/{token}`: a result blob, served once and then deleted. The token is
  unguessable (a presigned URL, as NDIF's object store hands out), since nnsight downloads
  results without its key. Results nobody downloads are deleted `result_ttl` seconds after
  the request finished, by a timer.

Who may reach the server at all (Host, Origin, key, client header, body size) is decided by
`vlmtrace.remote.access` before a body is read; docs/remote.md has the threat model. The
access log is off: a result URL is a credential, and uvicorn's access log would print it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import secrets
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request, WebSocket
from fastapi.responses import JSONResponse, Response
from nnsight.schema.request import RequestModel
from nnsight.schema.response import ResponseModel, Status
from starlette.websockets import WebSocketDisconnect

from .access import (
    WILDCARDS,
    Access,
    Guard,
    KeyFile,
    allowed_hosts,
    default_key_file,
    is_loopback,
    new_key,
    redact_logs,
    write_key_file,
)
from .keys import served_name
from .worker import RequestFailed, Worker

logger = logging.getLogger("vlmtrace.serve")


def _import_anyio_with_save_unmounted() -> None:
    """Import the parts of anyio that Starlette loads lazily, with nnsight's `.save` lifted.

    nnsight mounts `save` on `object` (so `x.save()` works in traces, which this server must
    run). anyio refuses to define its typed attribute sets (`anyio.abc.SocketAttribute`) when a
    class has an attribute without an annotation, and the mount gives every class one: the
    first upload spooled to disk or middleware call would then fail with "Attribute 'save' is
    missing its type annotation". nnsight imports `anyio` before mounting for this reason, but
    anyio 4.x defines those classes lazily, later. Imported here with the mount lifted for the
    moment, they exist before any request arrives.
    """
    import nnsight
    from nnsight._c import mount, unmount

    mounted = unmount is not None and "save" in object.__dict__
    if mounted:
        unmount("save")
    try:
        import anyio._backends._asyncio  # noqa: F401
        import anyio.abc  # noqa: F401
        import anyio.streams.tls  # noqa: F401
    finally:
        if mounted:
            mount(nnsight.save, "save")


_import_anyio_with_save_unmounted()

INLINE_LIMIT = 8 * 2**20
"""Results up to this many bytes ride the COMPLETED websocket frame; larger ones go by URL."""


@dataclass(frozen=True)
class Limits:
    """What one client may cost the server."""

    max_runtime: float | None = 600.0
    """Seconds a request may run before its model process is killed and reloaded."""
    max_body: int = 256 * 2**20
    """Bytes a request body may have; counted while it is read."""
    max_queue: int = 16
    """Requests admitted and not finished (bodies arriving, waiting, running), all models together;
    more get a 503 busy reply before their body is read."""
    result_ttl: float = 600.0
    """Seconds a finished request's status and result stay fetchable (downloads delete sooner)."""
    inline_limit: int = INLINE_LIMIT

    def __post_init__(self) -> None:
        for name in ("max_body", "max_queue", "result_ttl", "inline_limit"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}.")
        if self.max_runtime is not None and not self.max_runtime > 0:
            raise ValueError(f"max_runtime must be positive seconds, got {self.max_runtime!r}.")


class BindRefused(ValueError):
    """The address asked for would expose the server in a way it refuses."""


def check_bind(host: str, *, insecure_no_key: bool = False, public_url: str | None = None) -> None:
    """Refuse an exposure before minutes of model loading, not after."""
    if insecure_no_key and not is_loopback(host):
        raise BindRefused(
            f"refusing to listen on {host} without an API key: this server runs the code clients send, "
            "so anyone who can reach it could run anything as you. Drop --insecure-no-key: the server "
            "then generates a key (or takes --api-key / NDIF_API_KEY) for your clients."
        )
    if host in WILDCARDS and not public_url:
        raise BindRefused(
            f"listening on every address ({host or 'all'}) needs --public-url, the address clients use "
            "(e.g. http://gpu-box:8000, or https://... behind a TLS proxy): it is the only Host the "
            "server answers to, and the base of the result URLs it hands out."
        )


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port), made before the model loads: a port in use, an address
    this machine does not have or a name that does not resolve fails in a second, and with
    port 0 the kernel's choice is known (`getsockname`) for the result URLs."""
    if not 0 <= port <= 65535:
        raise BindRefused(f"port {port} is out of range; choose a port from 1 to 65535 (0: any free one).")
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as error:
        raise BindRefused(f"cannot listen on {host!r}: the name does not resolve ({error}).") from None
    family, kind, proto, _, address = infos[0]
    listener = socket.socket(family, kind, proto)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        listener.bind(address)
    except OSError as error:
        listener.close()
        if error.errno == errno.EADDRINUSE:
            raise BindRefused(
                f"port {port} on {host} is in use (another `vlmtrace serve`?); choose another --port. The "
                "running server and its key file are untouched."
            ) from None
        if error.errno == errno.EADDRNOTAVAIL:
            raise BindRefused(
                f"cannot listen on {host}: this machine has no such address. Use 127.0.0.1 (this machine "
                "only), an address of one of its interfaces, or 0.0.0.0 with --public-url."
            ) from None
        raise BindRefused(f"cannot listen on {host}:{port}: {error.strerror or error}.") from None
    return listener


def base_url(host: str, port: int, public_url: str | None) -> str:
    """The server's address as clients should use it (result URLs start with it)."""
    if public_url:
        return public_url.rstrip("/")
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


@dataclass
class Job:
    """One request from the moment it is received until its status expires."""

    id: str
    worker: Worker
    session_id: str | None
    compress: bool
    payload: bytes | None
    """Held until the request runs, then dropped."""
    state: str = "queued"
    """queued -> running -> done."""
    finished: float | None = None
    result_token: str | None = None
    task: asyncio.Task | None = None


@dataclass
class State:
    """What the server keeps between requests."""

    workers: dict[str, Worker]
    limits: Limits
    base_url: str
    sessions: dict[str, WebSocket] = field(default_factory=dict)
    jobs: dict[str, Job] = field(default_factory=dict)
    latest: dict[str, ResponseModel] = field(default_factory=dict)
    """Request id -> its latest status, for `GET /response/{id}`."""
    results: dict[str, bytes] = field(default_factory=dict)
    """Result token -> blob, for `GET /result/{token}` (deleted on download)."""
    uploading: int = 0
    """Requests admitted whose bodies are still being read: they count against `max_queue`, so
    at most `max_queue` bodies are ever held (queued or arriving)."""

    def pending(self) -> int:
        """Requests admitted and not finished: arriving, waiting or running."""
        return self.uploading + sum(1 for job in self.jobs.values() if job.state != "done")

    def worker_for(self, key: str) -> Worker:
        name = served_name(key)
        if name in self.workers:
            return self.workers[name]
        served = ", ".join(repr(n) for n in self.workers)
        raise HTTPException(
            status_code=404,
            detail=(
                f"this server does not serve {name!r}; it serves {served}. Name one of these (--model on "
                "the command line; in Python, load the model under the same name or pass model_key=)."
            ),
        )

    def forget_old(self, now: float | None = None) -> None:
        """Drop statuses and results of requests that finished more than `result_ttl` ago."""
        cutoff = (now if now is not None else time.time()) - self.limits.result_ttl
        for job_id in [j for j, job in self.jobs.items() if job.finished and job.finished < cutoff]:
            token = self.jobs.pop(job_id).result_token
            self.latest.pop(job_id, None)
            self.results.pop(token or "", None)

    async def publish(
        self, job: Job, status: Status, description: str = "", blob: bytes | None = None
    ) -> None:
        """Push a status to the request's websocket, if any, and record it for polling.

        A result small enough rides the websocket frame itself; otherwise (or for a client
        that polls, or one whose websocket is gone) it is kept for `GET /result/{token}` and
        the status carries that URL.
        """
        socket = self.sessions.get(job.session_id or "")
        if socket is not None and blob is not None and len(blob) <= self.limits.inline_limit:
            inline = ResponseModel(id=job.id, status=status, description=description, data=blob)
            if await self.send(job, socket, inline.pickle()):
                self.latest[job.id] = ResponseModel(id=job.id, status=status, description=description)
                return
        url = None
        if blob is not None:
            token = job.result_token = secrets.token_urlsafe(32)
            self.results[token] = blob
            url = f"{self.base_url}/result/{token}"
        self.latest[job.id] = ResponseModel(id=job.id, status=status, description=description, data=url)
        if socket is not None:
            await self.send(job, socket, self.latest[job.id].model_dump_json())

    async def send(self, job: Job, socket: WebSocket, message: str | bytes) -> bool:
        """Send one frame; False (and forget the session) if the client went away."""
        try:
            if isinstance(message, bytes):
                await socket.send_bytes(message)
            else:
                await socket.send_text(message)
            return True
        except Exception:  # a closed socket: the status stays fetchable by polling
            self.sessions.pop(job.session_id or "", None)
            return False

    async def run(self, job: Job) -> None:
        """Wait for the model, run the request on it, and report how it went."""
        worker = job.worker
        try:
            if worker.lock.locked():
                await self.publish(job, Status.QUEUED, f"waiting for {worker.name}")
            async with worker.lock:
                job.state = "running"  # from here on the request is never cancelled
                payload, job.payload = job.payload, None
                await self.publish(job, Status.RUNNING)
                started = time.perf_counter()
                try:
                    blob = await asyncio.to_thread(
                        worker.execute, payload, compress=job.compress, max_runtime=self.limits.max_runtime
                    )
                except RequestFailed as error:
                    logger.info("request %s failed after %.2f s", job.id, time.perf_counter() - started)
                    await self.publish(job, Status.ERROR, str(error))
                    return
            logger.info("request %s ran in %.2f s", job.id, time.perf_counter() - started)
            await self.publish(job, Status.COMPLETED, blob=blob)
        except asyncio.CancelledError:  # its client left while it waited: nobody wants it
            logger.info("request %s dropped: its client disconnected while it waited", job.id)
            self.latest[job.id] = ResponseModel(
                id=job.id, status=Status.ERROR, description="dropped: the client disconnected before it ran"
            )
        except Exception as error:  # a bug here must still end the client's wait
            logger.exception("request %s broke the server", job.id)
            await self.publish(job, Status.ERROR, f"the server failed: {type(error).__name__}: {error}")
        finally:
            job.payload = None
            job.state = "done"
            job.finished = time.time()

    def drop_waiting(self, session_id: str) -> None:
        """Cancel the requests of a closed session that have not started."""
        for job in self.jobs.values():
            if job.session_id == session_id and job.state == "queued" and job.task is not None:
                job.task.cancel()

    async def purge_forever(self) -> None:
        """The TTL timer: expire old statuses and results even when no request arrives."""
        period = min(max(self.limits.result_ttl / 4, 0.2), 30.0)
        while True:
            await asyncio.sleep(period)
            self.forget_old()


async def read_request(http: Request, state: State) -> tuple[RequestModel, Worker, bytes]:
    """The envelope, the worker it names and the payload of a `POST /request`."""
    async with http.form(max_files=1, max_fields=1) as form:
        data, blob = form.get("data"), form.get("blob")
        if not isinstance(data, str) or blob is None or isinstance(blob, str):
            raise HTTPException(
                status_code=400,
                detail="a request is multipart with a 'data' field (the RequestModel JSON) and a 'blob' "
                "file.",
            )
        try:
            envelope = RequestModel.model_validate_json(data)
        except ValueError as error:
            raise HTTPException(status_code=400, detail=f"malformed request envelope: {error}") from None
        if envelope.env:
            raise HTTPException(
                status_code=400,
                detail=f"this server applies no per-request environment (the request sent {envelope.env}).",
            )
        worker = state.worker_for(envelope.model_key)
        payload = await blob.read()
    return envelope, worker, payload


def create_app(
    workers: dict[str, Worker],
    *,
    access: Access,
    limits: Limits = Limits(),
    base: str,
    on_shutdown: Callable[[], None] | None = None,
) -> Guard:
    """The ASGI app serving `workers` (served name -> worker), behind its guard."""
    state = State(workers=workers, limits=limits, base_url=base)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        timer = asyncio.create_task(state.purge_forever())
        try:
            yield
        finally:
            timer.cancel()
            for worker in workers.values():  # ends running requests, so their threads return
                worker.stopping = True
            try:
                await asyncio.gather(*(asyncio.to_thread(w.stop) for w in workers.values()))
            finally:
                if on_shutdown is not None:
                    on_shutdown()

    app = FastAPI(title="vlmtrace serve", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.vlmtrace = state
    server_nnsight = version("nnsight")
    server_python = ".".join(map(str, sys.version_info[:2]))

    @app.get("/ping")
    async def ping() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/models")
    async def models() -> dict[str, list[str]]:
        return {"models": list(state.workers)}

    @app.websocket("/subscribe")
    async def subscribe(socket: WebSocket) -> None:
        await socket.accept()
        session_id = uuid.uuid4().hex
        state.sessions[session_id] = socket
        await socket.send_text(json.dumps({"session_id": session_id}))
        try:
            while True:  # the client only listens; this notices when it leaves
                await socket.receive_text()
        except WebSocketDisconnect:
            pass
        finally:
            state.sessions.pop(session_id, None)
            state.drop_waiting(session_id)

    def check_versions(http: Request) -> None:
        nnsight_version = http.headers.get("nnsight-version")
        if nnsight_version and nnsight_version != server_nnsight:
            raise HTTPException(
                status_code=400,
                detail=(
                    f"the client runs nnsight {nnsight_version} and this server {server_nnsight}; the "
                    f"remote protocol is tied to the version: install nnsight=={server_nnsight}."
                ),
            )
        python_version = http.headers.get("python-version") or ""
        client_python = ".".join(python_version.split()[0].split(".")[:2]) if python_version.strip() else ""
        if client_python and client_python != server_python:
            raise HTTPException(
                status_code=400,
                detail=(
                    f"the client runs Python {client_python} and this server {server_python}; a trace "
                    "ships some code as bytecode, which only loads on the same Python minor version."
                ),
            )

    @app.post("/request")
    async def request(http: Request) -> JSONResponse:
        check_versions(http)  # all from headers: nothing of the body is read yet
        if state.pending() >= limits.max_queue:
            return JSONResponse(
                {
                    "detail": (
                        f"the server is busy: {limits.max_queue} requests are already arriving, waiting "
                        "or running (its --max-queue). Retry in a few seconds; vlmtrace's client retries "
                        "by itself."
                    )
                },
                status_code=503,
                headers={"Retry-After": "2"},
            )
        state.uploading += 1  # admitted now, before its body is read (no await since the check)
        try:
            envelope, worker, payload = await read_request(http, state)
        finally:
            state.uploading -= 1
        job = Job(
            id=uuid.uuid4().hex,
            worker=worker,
            session_id=envelope.session_id,
            compress=envelope.compress,
            payload=payload,
        )
        state.jobs[job.id] = job
        logger.info("request %s for %s: %d bytes", job.id, worker.name, len(payload))
        received = ResponseModel(id=job.id, status=Status.RECEIVED, description=f"for {worker.name}")
        state.latest[job.id] = received
        job.task = asyncio.create_task(state.run(job))
        return JSONResponse(json.loads(received.model_dump_json()))

    @app.get("/response/{job_id}")
    async def response(job_id: str) -> Response:
        if job_id not in state.latest:
            raise HTTPException(status_code=404, detail=f"no request {job_id!r} (or it expired).")
        return Response(state.latest[job_id].model_dump_json(), media_type="application/json")

    @app.get("/result/{token}")
    async def result(token: str) -> Response:
        blob = state.results.pop(token, None)  # served once: a second download finds nothing
        if blob is None:
            raise HTTPException(
                status_code=404, detail="no such result (it was downloaded already, or expired)."
            )
        return Response(blob, media_type="application/octet-stream")

    return Guard(app, access, max_body=limits.max_body)


def exit_on_terminate(signum: int, frame: object) -> None:
    """SIGTERM as `SystemExit` (status 128 + 15, as a shell reports it), so `finally` blocks run."""
    raise SystemExit(128 + signum)


def serve(
    models: list[str],
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    key_file: Path | None = None,
    insecure_no_key: bool = False,
    public_url: str | None = None,
    allow_hosts: Iterable[str] = (),
    limits: Limits = Limits(),
    device: str | None = None,
    dtype: str | None = None,
    announce: Callable[[str], None] = logger.warning,
    check_model: Callable[[str], None] | None = None,
) -> None:
    """Load `models` and serve them until SIGINT or SIGTERM (what `vlmtrace serve` runs).

    `check_model(name)` runs on each model once the port is bound and before the key file is written
    or any model loads (the CLI passes its hub check, so a model that is not there is named at once).

    Without `api_key`, a new key is generated and written to `key_file` (0600; default
    `default_key_file(port)`), deleted again when the server stops; `insecure_no_key=True`
    (loopback only) serves without any key. `announce` receives what is served where and
    where the key is, never the key itself (the CLI prints it).
    """
    import torch
    import uvicorn

    check_bind(host, insecure_no_key=insecure_no_key, public_url=public_url)
    listener = listen(host, port)  # before the key file and the model: a taken port costs nothing
    port = listener.getsockname()[1]  # the real one, also when port 0 let the kernel choose
    if not logger.handlers:  # one line per request, beside uvicorn's own lines (never a URL)
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    if not models:
        listener.close()
        raise ValueError("name at least one model to serve (HF repo id, directory or organism name).")
    if insecure_no_key and api_key:
        listener.close()
        raise ValueError("--insecure-no-key and an API key contradict each other: choose one.")
    generated: KeyFile | None = None
    workers: dict[str, Worker] = {}
    try:
        for name in models if check_model is not None else ():
            check_model(name)
        if not insecure_no_key and not api_key:
            api_key = new_key()
            generated = write_key_file(Path(key_file) if key_file else default_key_file(port), api_key)
        redact_logs(api_key, ("uvicorn", "uvicorn.error", "uvicorn.access", logger.name))
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        for name in models:
            workers[name] = Worker(name, device=device, dtype=dtype)
    except BaseException:
        for worker in workers.values():
            worker.stop()
        if generated is not None:
            generated.remove()
        listener.close()
        raise
    access = Access(api_key=api_key, hosts=allowed_hosts(host, public_url=public_url, extra=allow_hosts))
    base = base_url(host, port, public_url)
    app = create_app(
        workers,
        access=access,
        limits=limits,
        base=base,
        on_shutdown=generated.remove if generated is not None else None,
    )
    if generated is not None:
        access_line = (
            f"the key written to {generated.path} (mode 0600); clients: "
            f'export NDIF_API_KEY="$(cat {generated.path})"'
        )
    elif insecure_no_key:
        access_line = (
            "NO KEY (--insecure-no-key): any program of any user on this machine can run code as you "
            "through it"
        )
    else:
        access_line = "the API key it was given"
    announce(f"vlmtrace serve: {', '.join(models)} on {device} at {base}, requiring {access_line}")
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="info",
        access_log=False,  # a result URL is a credential; the access log would print it
        timeout_graceful_shutdown=5,
        lifespan="on",
    )
    redact_logs(api_key, ("uvicorn", "uvicorn.error", "uvicorn.access"))  # again: Config set logging up
    if threading.current_thread() is threading.main_thread():
        # uvicorn shuts down on SIGTERM, then raises it again under the handler it found; the
        # default one would end the process before `finally` below, key file and all
        signal.signal(signal.SIGTERM, exit_on_terminate)
    try:
        uvicorn.Server(config).run(sockets=[listener])
    finally:  # also when a stuck request outlasts the graceful shutdown and lifespan cannot finish
        for worker in workers.values():
            worker.stop()
        if generated is not None:
            generated.remove()
        listener.close()
