"""Run one serialized trace against a model this process loaded, the way NDIF does.

A request's payload is what nnsight's `RequestModel.serialize` made on the client: the trace
body as source, the values it references, and the tracer (forward arguments included).
Every envoy in it is pickled as a *persistent id* ("Interleaver", "Module:<path>"), which the
server resolves to its own live model, so the weights never travel:

    worker = Worker(vt.load("shapes-llava"))
    blob = worker.execute(payload, compress=True)     # -> [zstd](torch.save({name: value}))

The model's envoy and interleaver are shared by every request, so `execute` must never run
twice at once on one worker; the server holds one lock per worker (`Worker.lock`).
"""

from __future__ import annotations

import asyncio
import io
import linecache
import traceback
from typing import Any

import torch
from nnsight.schema.request import RequestModel

# nnsight's per-thread trace depth and saved-value set. A request runs outside any `with`
# block here, so the depth has to be entered by hand (as `Tracer.__exit__` does) for
# `.save()` to work, and the saved set is how the values to return are told from the rest.
from nnsight.tracing.tracer import _saves, dec, inc

from ..models.load import VLM


def persistent_objects(envoy: Any) -> dict[str, Any]:
    """Persistent id -> live object, for a plain `NNsight` envoy.

    Equal to `Remotable._remoteable_persistent_objects`, which `NNsight` lacks (it is not
    Remotable): the interleaver and every module of the tree by its envoy path.
    """
    objects: dict[str, Any] = {"Interleaver": envoy.interleaver}
    for module_envoy in envoy.modules():
        objects[f"Module:{module_envoy.path}"] = module_envoy._module
    return objects


class RequestFailed(Exception):
    """A request could not run; the message is what the client's `RemoteError` carries."""


class Worker:
    """One loaded model that requests run against, one at a time."""

    def __init__(self, vlm: VLM) -> None:
        self.vlm = vlm
        self.persistent = persistent_objects(vlm.envoy)
        self.lock = asyncio.Lock()
        """Held while a request runs: queued requests wait here, in arrival order."""

    def execute(self, payload: bytes, *, compress: bool) -> bytes:
        """Deserialize a request with nnsight, run it, and return its saved values as a blob.

        Raises `RequestFailed` with a message for the client (the trace's own traceback when
        the trace raised).
        """
        try:
            tracer = RequestModel.deserialize(payload, self.persistent, compress=compress)
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
            lines = traceback.format_exception(type(error), error, tracer.traceback(error))
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
    buffer = io.BytesIO()
    torch.save(values, buffer)
    blob = buffer.getvalue()
    if compress:
        import zstandard

        blob = zstandard.ZstdCompressor(level=6).compress(blob)
    return blob
