"""Run serialized traces against a model held by a child process that can be stopped.

A request's payload is what nnsight's `RequestModel.serialize` made on the client: the trace
body as source, the values it references, and the tracer (forward arguments included).
Every envoy in it is pickled as a *persistent id* ("Interleaver", "Module:<path>"), which the
server resolves to its own live model, so the weights never travel:

    worker = Worker("shapes-llava", device="cuda")      # loads the model in a child process
    blob = worker.execute(payload, compress=True, max_runtime=600)
    # -> [zstd](torch.save({name: value})), or RequestFailed with the client's message

Why a child process: a trace is arbitrary code. A thread running `while True: pass` or
`time.sleep(10**9)` cannot be stopped from Python, so a server that ran traces in a thread
could only give up waiting and leave the model locked. The model lives in a process of its
own instead; a request that runs past its limit, or kills its process, is ended with SIGKILL
and the model is loaded again before the next request gets it. (GPU memory is freed with
the process, which no in-process timeout could promise.)

The model's envoy and interleaver are shared by every request, so `execute` must never run
twice at once on one worker; the server holds one lock per worker (`Worker.lock`).
"""

from __future__ import annotations

import asyncio
import io
import linecache
import multiprocessing
import os
import signal
import sys
import threading
import time
import traceback
from multiprocessing.connection import Connection
from typing import Any

POLL_SECONDS = 0.1
"""How often a waiting `execute` checks for its deadline and for the server stopping."""


class RequestFailed(Exception):
    """A request could not run; the message is what the client's `RemoteError` carries."""


class LoadFailed(RuntimeError):
    """The model process could not load the model (the message is its error)."""


def persistent_objects(envoy: Any) -> dict[str, Any]:
    """Persistent id -> live object, for a plain `NNsight` envoy.

    Equal to `Remotable._remoteable_persistent_objects`, which `NNsight` lacks (it is not
    Remotable): the interleaver and every module of the tree by its envoy path.
    """
    objects: dict[str, Any] = {"Interleaver": envoy.interleaver}
    for module_envoy in envoy.modules():
        objects[f"Module:{module_envoy.path}"] = module_envoy._module
    return objects


def run_request(persistent: dict[str, Any], payload: bytes, *, compress: bool) -> bytes:
    """Deserialize a request with nnsight, run it, and return its saved values as a blob.

    Runs in the model process. Raises `RequestFailed` with a message for the client (the
    trace's own traceback when the trace raised).
    """
    import torch
    from nnsight.schema.request import RequestModel

    # nnsight's per-thread trace depth and saved-value set. A request runs outside any `with`
    # block here, so the depth has to be entered by hand (as `Tracer.__exit__` does) for
    # `.save()` to work, and the saved set is how the values to return are told from the rest.
    from nnsight.tracing.tracer import _saves, dec, inc

    try:
        tracer = RequestModel.deserialize(payload, persistent, compress=compress)
    except Exception as error:
        raise RequestFailed(
            f"could not deserialize the request ({type(error).__name__}: {error}). The client "
            "and the server need the same nnsight, torch and transformers; a module the trace "
            "uses must be installed on the server or registered with nnsight.register()."
        ) from error
    filename = tracer.info.frame.f_code.co_filename
    own_source = linecache.cache.get(filename)  # deserialize put the client's block there
    inc()
    try:
        with torch.no_grad():
            tracer.execute(tracer.info.code)
        saved = _saves()
        values = {name: value for name, value in tracer.info.frame.f_locals.items() if id(value) in saved}
    except Exception as error:
        # a trace knows the client's lines its error came from; a session (several traces in
        # one request) does not, and its error carries the failing trace's intervention frames
        where = tracer.traceback(error) if hasattr(tracer, "traceback") else None
        where = where or getattr(error, "__intervention_tb__", None) or error.__traceback__
        lines = traceback.format_exception(type(error), error, where)
        raise RequestFailed("".join(lines).rstrip()) from None
    finally:
        dec()
        if own_source is not None:
            linecache.cache[filename] = own_source
        else:
            linecache.cache.pop(filename, None)
    return result_blob(values, compress=compress)


def result_blob(values: dict[str, Any], *, compress: bool) -> bytes:
    """`torch.save` of the saved values, zstd-compressed when the request was (as NDIF does)."""
    import torch

    buffer = io.BytesIO()
    torch.save(values, buffer)
    blob = buffer.getvalue()
    if compress:
        import zstandard

        blob = zstandard.ZstdCompressor(level=6).compress(blob)
    return blob


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when the server dies (even by kill -9)."""
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass


def model_process(connection: Connection, name: str, device: str, dtype: str | None) -> None:
    """The child: load the model, then run requests from `connection` until it closes.

    Messages in: `(compress, payload)`. Out: `("ready", None)` once loaded, then per request
    `("ok", blob)` or `("failed", message)`; `("load_failed", message)` if loading failed.
    """
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server decides when this process ends
    try:
        import torch

        from ..models.load import load

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
        vlm = load(name, device=device, dtype=dtype)
        persistent = persistent_objects(vlm.envoy)
    except BaseException as error:  # any load failure is reported, then the process ends
        connection.send(("load_failed", f"{type(error).__name__}: {error}"))
        return
    connection.send(("ready", None))
    while True:
        try:
            compress, payload = connection.recv()
        except (EOFError, OSError):  # the server closed the pipe: stop
            return
        try:
            connection.send(("ok", run_request(persistent, payload, compress=compress)))
        except RequestFailed as error:
            connection.send(("failed", str(error)))
        except BaseException as error:  # a trace may raise anything, SystemExit included
            connection.send(("failed", f"{type(error).__name__}: {error}"))


def oom_kills() -> int | None:
    """How many processes the kernel's out-of-memory killer has ended: in this process's cgroup
    (v2 `memory.events`) where readable, else on the whole machine (`/proc/vmstat`); None if
    neither is."""
    try:
        for line in open("/proc/self/cgroup").read().splitlines():
            if line.startswith("0::"):
                events = f"/sys/fs/cgroup{line[3:].rstrip('/')}/memory.events"
                for entry in open(events).read().splitlines():
                    if entry.startswith("oom_kill "):
                        return int(entry.split()[1])
    except (OSError, ValueError):
        pass
    try:
        for entry in open("/proc/vmstat").read().splitlines():
            if entry.startswith("oom_kill "):
                return int(entry.split()[1])
    except (OSError, ValueError):
        pass
    return None


def killed_for_memory(code: int | None, before: int | None, after: int | None) -> bool:
    """True when a model process that died was ended by the out-of-memory killer: SIGKILL, while
    the kernel's count of such kills went up."""
    return code == -signal.SIGKILL and before is not None and after is not None and after > before


def death(code: int | None, out_of_memory: bool) -> str:
    """What the client is told of a model process that died running its request.

    Only a real out-of-memory kill says "out of memory": that phrase makes a sweep halve its
    chunk and retry (`vlmtrace.remote.client.RemoteOutOfMemoryError`), which any other death
    would only repeat.
    """
    if code is not None and code < 0:
        try:
            how = f"killed by {signal.Signals(-code).name}"
        except ValueError:
            how = f"killed by signal {-code}"
    else:
        how = f"exit code {code}"
    if out_of_memory:
        return (
            f"the model process ran out of memory while running this request ({how} by the kernel's "
            "out-of-memory killer); the model was reloaded. Send fewer rows per request (a smaller "
            "max_batch)."
        )
    return (
        f"the model process died while running this request ({how}); the model was reloaded. The "
        "trace ended or crashed it; rerunning the same request will do the same."
    )


class Worker:
    """One served model, loaded in a child process; requests run on it one at a time."""

    def __init__(self, name: str, *, device: str = "cpu", dtype: str | None = None) -> None:
        self.name = name
        self.device = device
        self.dtype = dtype
        self.lock = asyncio.Lock()
        """Held while a request runs: queued requests wait here, in arrival order."""
        self.pending = 0
        """Requests received and not finished (running or waiting for the lock)."""
        self.restarts = 0
        """How many times the model process was replaced (a request overran or killed it)."""
        self.stopping = False
        self._context = multiprocessing.get_context("spawn")  # CUDA cannot be forked
        self._process: Any = None
        self._connection: Connection | None = None
        self._ending = threading.Lock()
        """Held while `_kill` ends the process: a request thread and the shutdown may both end it."""
        self._start()

    def _start(self) -> None:
        """Start the model process and wait until it has loaded the model."""
        ours, theirs = self._context.Pipe()
        process = self._context.Process(
            target=model_process,
            args=(theirs, self.name, self.device, self.dtype),
            name=f"vlmtrace-model:{self.name}",
            daemon=True,
        )
        process.start()
        theirs.close()
        self._process, self._connection = process, ours
        while not ours.poll(POLL_SECONDS):
            if self.stopping:
                return
            if not process.is_alive():
                raise LoadFailed(f"the process loading {self.name!r} died (exit code {process.exitcode}).")
        kind, message = ours.recv()
        if kind != "ready":
            process.join(timeout=10)
            raise LoadFailed(f"could not load {self.name!r}: {message}")

    def _kill(self) -> None:
        """End the model process at once (SIGKILL: a trace cannot ignore it).

        Two threads can get here at once: a request that sees the server stopping, and the
        shutdown's `stop`. The first takes the process and its pipe and ends them; the second
        waits for it and finds nothing left (closing the pipe twice failed the shutdown, which
        then left the key file behind).
        """
        with self._ending:
            process, connection = self._process, self._connection
            self._process, self._connection = None, None
            if process is not None:
                if process.is_alive():
                    process.kill()
                process.join(timeout=30)
            if connection is not None:
                connection.close()

    def _replace(self) -> None:
        """Kill the model process and load the model again (unless the server is stopping)."""
        self._kill()
        self.restarts += 1
        if not self.stopping:
            self._start()

    def execute(self, payload: bytes, *, compress: bool, max_runtime: float | None) -> bytes:
        """Run one request in the model process; blocks (call it from a thread).

        A request still running after `max_runtime` seconds is stopped by killing the model
        process, which is then restarted; so is one that ended the process itself.
        """
        # this request's process and pipe: the shutdown may end them (and set the fields to None)
        process, connection = self._process, self._connection
        if connection is None:
            raise RequestFailed(
                f"the model process of {self.name!r} is not running (the server is stopping)."
            )
        started = time.monotonic()
        kills_before = oom_kills()
        try:
            connection.send((compress, payload))
        except (BrokenPipeError, OSError):
            self._replace()
            raise RequestFailed(
                f"the model process of {self.name!r} had died; it was restarted: send the request again."
            ) from None
        while True:
            try:
                ready = connection.poll(POLL_SECONDS)
            except (EOFError, OSError):  # also a pipe the shutdown closed
                ready = False
            if ready:
                try:
                    kind, value = connection.recv()
                except (EOFError, OSError):
                    kind, value = "died", None
                if kind == "ok":
                    return value
                if kind == "failed":
                    raise RequestFailed(value)
            elif self.stopping:
                self._kill()
                raise RequestFailed("the server is shutting down; the request was stopped.")
            elif max_runtime is not None and time.monotonic() - started > max_runtime:
                self._replace()
                raise RequestFailed(
                    f"the request ran past this server's limit of {max_runtime:g} s (--max-runtime) and "
                    "was stopped; the model was reloaded for the next request. Send less work per "
                    "request (a smaller max_batch), or ask the server's owner to raise --max-runtime."
                )
            elif process.is_alive():
                continue
            else:
                kind = "died"
            if self.stopping:  # the shutdown ended the process, not the request
                raise RequestFailed("the server is shutting down; the request was stopped.")
            process.join(timeout=5)  # its pipe can close a moment before it has exited
            code = process.exitcode
            self._replace()
            raise RequestFailed(death(code, killed_for_memory(code, kills_before, oom_kills())))

    def stop(self) -> None:
        """Stop the model process; a request running on it is ended."""
        self.stopping = True
        self._kill()
