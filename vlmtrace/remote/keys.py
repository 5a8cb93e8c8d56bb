"""Model keys: how a client names the model that a server should run its trace on.

A remote request never carries the model, only a key. NDIF keys a checkpoint by the nnsight
wrapper class that loads it and the Hub repo id, e.g.

    nnsight.modeling.transformers.TransformersModel:{"repo_id": "llava-hf/llava-1.5-7b-hf", "revision": null}

nnsight derives that key from a model it loaded by repo id. vlmtrace wraps a model it loaded
itself (`NNsight(model)`), which has no key, so the key is rebuilt from the name the model was
loaded under (`VLM.name`):

    model_key("llava-hf/llava-1.5-7b-hf")   # NDIF's key: works on NDIF and on `vlmtrace serve`
    model_key("shapes-llava")               # "shapes-llava": a shipped organism, `vlmtrace serve` only
    model_key("/models/my-llava")           # "/models/my-llava": a directory, `vlmtrace serve` only

and `served_name` turns any of these back into the name a `vlmtrace serve` process loaded.
"""

from __future__ import annotations

import json
from pathlib import Path

NDIF_WRAPPER = "nnsight.modeling.transformers.TransformersModel"
"""Import path of the wrapper NDIF names Hub checkpoints by (`Remotable.to_model_key`)."""


def is_local_name(name: str) -> bool:
    """True for a shipped organism or an existing directory: names the Hub does not know."""
    if Path(name).exists():
        return True
    try:
        from ..models.zoo import ORGANISMS
    except ImportError:  # the zoo is optional at import time (as in `models.load.resolve`)
        return False
    return name in ORGANISMS


def model_key(name: str, *, revision: str | None = None) -> str:
    """The key a server knows the model loaded as `name` by (see the module docstring).

    `revision` pins a Hub revision in an NDIF key; None asks for the deployed one, which is
    what nnsight's own wrappers send unless the user pinned one.
    """
    if is_local_name(name):
        return name
    return f"{NDIF_WRAPPER}:{json.dumps({'repo_id': name, 'revision': revision})}"


def served_name(key: str) -> str:
    """The model name a key asks for: the `repo_id` of an NDIF-style key, else the key itself."""
    wrapper, _, payload = key.partition(":")
    if payload.startswith("{") and "." in wrapper:
        try:
            return str(json.loads(payload)["repo_id"])
        except (ValueError, KeyError, TypeError):
            return key
    return key
