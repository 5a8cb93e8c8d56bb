"""Remote execution: sweeps whose traces run on NDIF or on `vlmtrace serve`.

A 7B VLM does not fit a laptop, and a lab's GPU box is shared. nnsight already ships a trace
to a server and brings its saved values back; vlmtrace computes each chunk's metric inside
the trace, so remotely only per-row floats travel back. This package supplies what nnsight's
`RemoteBackend` lacks for vlmtrace's traces (a model key, vlmtrace's code shipped by value,
clear errors) and a server speaking the same protocol for a machine you own:

    # on the GPU box (loopback only without a key; see docs/remote.md for the security notes)
    vlmtrace serve llava-hf/llava-1.5-7b-hf --host 0.0.0.0 --api-key "$KEY"

    # on the laptop (NDIF_API_KEY=$KEY in the environment)
    from vlmtrace.remote import backend, skeleton
    vlm = skeleton("llava-hf/llava-1.5-7b-hf")           # no weights needed here
    ds = vt.patch(vlm, samples, corruption=vt.ImagePair(),
                  backend=backend(vlm, host="http://gpu-box:8000"), store="trace.zarr")
"""

from __future__ import annotations

from nnsight.intervention.backends.remote import RemoteError

from .client import RemoteRefusedError, ServerBackend, ServerUnavailableError, backend
from .keys import model_key
from .skeleton import skeleton

__all__ = [
    "RemoteError",
    "RemoteRefusedError",
    "ServerBackend",
    "ServerUnavailableError",
    "backend",
    "model_key",
    "skeleton",
]
