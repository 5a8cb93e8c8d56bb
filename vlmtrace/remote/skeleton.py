"""A VLM without weights, for planning sweeps whose forwards all run on a server.

A sweep's client never runs the model when every trace goes remote: it needs the processor
(to encode samples), the config (layer and head counts, checked by the adapter) and the
module tree (to name hooks), all of which exist without weights. So a laptop can drive a
sweep of a model that does not fit in its memory:

    vlm = skeleton("llava-hf/llava-1.5-7b-hf")          # config + processor, meta tensors
    vt.patch(vlm, samples, ..., backend=vlmtrace.remote.backend(vlm))

Anything that runs the model locally (e.g. reading attention patterns) fails on a skeleton.
"""

from __future__ import annotations

import torch

from ..models.load import VLM, describe, wrap


def skeleton(
    name: str,
    *,
    revision: str | None = None,
    dtype: str | torch.dtype | None = None,
    attn_implementation: str = "eager",
) -> VLM:
    """`vlmtrace.load(name)` without the weights: parameters live on the meta device.

    `dtype` defaults to the checkpoint's, as `load` does; pass the dtype the server runs.
    """
    _, config, processor, model_class = describe(name, revision=revision)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    dtype = dtype or getattr(config, "dtype", None) or torch.float32
    with torch.device("meta"):
        model = model_class._from_config(config, attn_implementation=attn_implementation, dtype=dtype)
    return wrap(model, processor, name=name, revision=revision or getattr(config, "_commit_hash", None))
