"""`vlmtrace serve`: an NDIF-protocol server for the lab's own GPU box.

NDIF's server stack (Redis, object store, Ray, socket.io) is built for a public service. A lab
with one GPU server needs one process that speaks the same protocol to nnsight's
`RemoteBackend`, so a laptop runs `vt.patch(..., backend=vlmtrace.remote.backend(vlm, host=...))`
against it exactly as it would against NDIF:

    vlmtrace serve shapes-llava --port 8000                      # loopback only, no key
    vlmtrace serve llava-hf/llava-1.5-7b-hf --host 0.0.0.0 --api-key "$KEY"

The protocol (what nnsight 0.8.1's client expects):

- `GET /subscribe` (websocket): the first text frame is `{"session_id": ...}`; status frames of
  that session's requests follow (QUEUED, RUNNING, then COMPLETED or ERROR). A COMPLETED
  frame carries the result inline (a binary `ResponseModel.pickle()` frame) when it is small,
  else a URL to fetch it from.
- `POST /request` (multipart: `data` = the RequestModel JSON, `blob` = the payload) answers
  RECEIVED with the request id; the request then waits for its model (one at a time per
  model: QUEUED while another runs) and runs with nnsight's own `RequestModel.deserialize`.
- `GET /response/{id}`: the latest status, for clients that poll instead of subscribing
  (404 until the request is known). A COMPLETED status carries a result URL.
- `GET /result/{token}`: a result blob. The token is unguessable (a presigned URL, as NDIF's
  object store hands out), since nnsight downloads results without its key.

Security: this server runs whatever code a client sends. It binds 127.0.0.1 unless given an
API key, and with a key it checks the `ndif-api-key` header on every HTTP request and on the
websocket handshake alike. Keys are compared in constant time and never logged or echoed.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import secrets
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import version

from fastapi import FastAPI, File, Form, Header, HTTPException, Request, UploadFile, WebSocket
from fastapi.responses import JSONResponse, Response
from nnsight.schema.request import RequestModel
from nnsight.schema.response import ResponseModel, Status
from starlette.websockets import WebSocketDisconnect

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
KEEP_SECONDS = 3600.0
"""How long statuses and results stay fetchable after a request finished."""


class BindRefused(ValueError):
    """A non-loopback address was asked for without an API key."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost: it may resolve anywhere
        return False


def check_bind(host: str, api_key: str | None) -> None:
    """Refuse to expose the server beyond this machine without a key (it runs clients' code)."""
    if api_key or is_loopback(host):
        return
    raise BindRefused(
        f"refusing to listen on {host} without an API key: this server runs the code clients send, "
        "so anyone who can reach it could run anything as you. Pass --api-key (or set NDIF_API_KEY) "
        "and give the key to your clients, or keep the default --host 127.0.0.1 and tunnel to it "
        "(ssh -L 8000:127.0.0.1:8000 gpu-box)."
    )


@dataclass
class Job:
    """One request from the moment it is received until its result expires."""

    id: str
    worker: Worker
    session_id: str
    compress: bool
    base_url: str
    """Where this client reached the server, for result URLs it can fetch."""
    finished: float | None = None
    result_token: str | None = None


@dataclass
class State:
    """What the server keeps between requests."""

    workers: dict[str, Worker]
    api_key: str | None
    inline_limit: int = INLINE_LIMIT
    sessions: dict[str, WebSocket] = field(default_factory=dict)
    jobs: dict[str, Job] = field(default_factory=dict)
    latest: dict[str, ResponseModel] = field(default_factory=dict)
    """Request id -> its latest status, for `GET /response/{id}`."""
    results: dict[str, bytes] = field(default_factory=dict)
    """Result token -> blob, for `GET /result/{token}`."""
    tasks: set[asyncio.Task] = field(default_factory=set)
    """Running requests (the event loop holds tasks weakly)."""

    def refusal(self, provided: str | None) -> str | None:
        """Why a request's key is refused, or None to let it in. Never quotes a key."""
        if not self.api_key:
            return None
        if not provided:
            return (
                "this server requires an API key and the request carried none: set NDIF_API_KEY "
                "(or pass api_key=) to the key the server was started with."
            )
        if not hmac.compare_digest(provided.encode(), self.api_key.encode()):
            return "the API key was refused: it is not the key this server was started with."
        return None

    def worker_for(self, key: str) -> Worker:
        name = served_name(key)
        if name in self.workers:
            return self.workers[name]
        served = ", ".join(repr(n) for n in self.workers)
        raise HTTPException(
            status_code=404,
            detail=(
                f"this server does not serve {name!r}; it serves {served}. Load the model on the "
                "client under the same name, or pass model_key= with one of these names."
            ),
        )

    def forget_old(self) -> None:
        """Drop statuses and results of requests that finished more than KEEP_SECONDS ago."""
        cutoff = time.time() - KEEP_SECONDS
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
        socket = self.sessions.get(job.session_id)
        if socket is not None and blob is not None and len(blob) <= self.inline_limit:
            inline = ResponseModel(id=job.id, status=status, description=description, data=blob)
            if await self.send(job, socket, inline.pickle()):
                self.latest[job.id] = ResponseModel(id=job.id, status=status, description=description)
                return
        url = None
        if blob is not None:
            token = job.result_token = secrets.token_urlsafe(32)
            self.results[token] = blob
            url = f"{job.base_url}/result/{token}"
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
            self.sessions.pop(job.session_id, None)
            return False

    async def run(self, job: Job, payload: bytes) -> None:
        """Wait for the model, run the request on it, and report how it went."""
        worker = job.worker
        try:
            if worker.lock.locked():
                await self.publish(job, Status.QUEUED, f"waiting for {worker.vlm.name}")
            async with worker.lock:
                await self.publish(job, Status.RUNNING)
                started = time.perf_counter()
                try:
                    blob = await asyncio.to_thread(worker.execute, payload, compress=job.compress)
                except RequestFailed as error:
                    logger.info("request %s failed after %.2f s", job.id, time.perf_counter() - started)
                    await self.publish(job, Status.ERROR, str(error))
                    return
            logger.info("request %s ran in %.2f s", job.id, time.perf_counter() - started)
            await self.publish(job, Status.COMPLETED, blob=blob)
        except Exception as error:  # a bug here must still end the client's wait
            logger.exception("request %s broke the server", job.id)
            await self.publish(job, Status.ERROR, f"the server failed: {type(error).__name__}: {error}")
        finally:
            job.finished = time.time()


def create_app(
    workers: dict[str, Worker], *, api_key: str | None = None, inline_limit: int = INLINE_LIMIT
) -> FastAPI:
    """The ASGI app serving `workers` (served name -> worker)."""
    state = State(workers=workers, api_key=api_key, inline_limit=inline_limit)
    app = FastAPI(title="vlmtrace serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.vlmtrace = state

    @app.middleware("http")
    async def require_key(http: Request, call_next: Callable) -> Response:
        """Every HTTP route but the health check and result downloads (whose unguessable URL is
        the credential, as NDIF's presigned URLs are) needs the key, checked before the body
        is read."""
        public = http.url.path == "/ping" or http.url.path.startswith("/result/")
        reason = None if public else state.refusal(http.headers.get("ndif-api-key"))
        if reason is not None:
            return JSONResponse({"detail": reason}, status_code=401)
        return await call_next(http)

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
        reason = state.refusal(socket.headers.get("ndif-api-key"))
        if reason is not None:
            if "websocket.http.response" in socket.scope.get("extensions", {}):
                await socket.send_denial_response(JSONResponse({"detail": reason}, status_code=401))
            else:
                await socket.close(code=1008, reason=reason)
            return
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

    @app.post("/request")
    async def request(
        http: Request,
        data: str = Form(...),
        blob: UploadFile = File(...),
        nnsight_version: str | None = Header(None, alias="nnsight-version"),
        python_version: str | None = Header(None, alias="python-version"),
    ) -> JSONResponse:
        if nnsight_version and nnsight_version != server_nnsight:
            raise HTTPException(
                status_code=400,
                detail=(
                    f"the client runs nnsight {nnsight_version} and this server {server_nnsight}; the "
                    f"remote protocol is tied to the version: install nnsight=={server_nnsight}."
                ),
            )
        client_python = ".".join((python_version or "").split()[0].split(".")[:2]) if python_version else ""
        if client_python and client_python != server_python:
            raise HTTPException(
                status_code=400,
                detail=(
                    f"the client runs Python {client_python} and this server {server_python}; a trace "
                    "ships some code as bytecode, which only loads on the same Python minor version."
                ),
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
        state.forget_old()
        job = Job(
            id=uuid.uuid4().hex,
            worker=worker,
            session_id=envelope.session_id,
            compress=envelope.compress,
            base_url=str(http.base_url).rstrip("/"),
        )
        state.jobs[job.id] = job
        payload = await blob.read()
        received = ResponseModel(id=job.id, status=Status.RECEIVED, description=f"for {worker.vlm.name}")
        state.latest[job.id] = received
        task = asyncio.create_task(state.run(job, payload))
        state.tasks.add(task)
        task.add_done_callback(state.tasks.discard)
        return JSONResponse(json.loads(received.model_dump_json()))

    @app.get("/response/{job_id}")
    async def response(job_id: str) -> Response:
        if job_id not in state.latest:
            raise HTTPException(status_code=404, detail=f"no request {job_id!r} (or it expired).")
        return Response(state.latest[job_id].model_dump_json(), media_type="application/json")

    @app.get("/result/{token}")
    async def result(token: str) -> Response:
        if token not in state.results:
            raise HTTPException(status_code=404, detail="no such result (or it expired).")
        return Response(state.results[token], media_type="application/octet-stream")

    return app


def serve(
    models: list[str],
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    announce: Callable[[str], None] = logger.warning,
) -> None:
    """Load `models` and serve them until interrupted (what `vlmtrace serve` runs).

    `announce` receives one line saying what is served where (the CLI prints it).
    """
    import torch
    import uvicorn

    from ..models.load import load

    check_bind(host, api_key)  # before minutes of loading, not after
    if not models:
        raise ValueError("name at least one model to serve (HF repo id, directory or organism name).")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    workers = {name: Worker(load(name, device=device, dtype=dtype)) for name in models}
    app = create_app(workers, api_key=api_key)
    access = "an API key" if api_key else "no key (loopback only)"
    announce(f"vlmtrace serve: {', '.join(models)} on {device} at http://{host}:{port}, requiring {access}")
    uvicorn.run(app, host=host, port=port, log_level="info")
