"""The model's own answer, computed with no vlmtrace code: what every sweep is checked against.

An engine that batches, pads, numbers positions and indexes tensors through declared layouts
can be wrong in ways that leave it consistent with itself: an adapter that declares the
engine makes Qwen2-VL's positions (M-RoPE) passes every invariant that compares vlmtrace with
vlmtrace, while its clean P(answer) is 0.103 against the model's true 0.0195. The only witness
outside the engine is the model itself, run as its authors run it: the processor's output for
one prompt and image, handed to `generate` for one token (which every family implements,
BLIP's answer decoder included), and the logits of that token read back.

    reference = native_log_probs(vlm, prompt, image)     # [vocab] log-probabilities, float32
    reference[answer_id]                                 # what the model itself says

Each distinct (model, weights, prompt, image) is computed once per process and kept (a few of
them, least recently used first out), so a sweep repeated on the same samples pays nothing more.
The weights enter the key through their in-place version counters: an edit applied with
`with edit:` (or any `copy_` into a parameter) makes every kept answer stale, never reused.
With a remote backend the same call runs on the server, as a trace with no intervention.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from functools import partial
from typing import Any
from weakref import WeakKeyDictionary

import torch

from ..models.load import VLM
from .weights import weights_version

KEPT = 16
"""Native answers kept per model (each is one vocabulary-sized float vector)."""

_kept: WeakKeyDictionary[torch.nn.Module, OrderedDict[tuple, torch.Tensor]] = WeakKeyDictionary()


def image_digest(image: Any) -> str:
    """A content hash of an image (PIL), or of None."""
    if image is None:
        return "none"
    return hashlib.sha256(image.tobytes() + repr((image.size, image.mode)).encode()).hexdigest()


def native_log_probs(vlm: VLM, prompt: str, image: Any, backend: Any = None) -> torch.Tensor:
    """log P(token) of the model's own next-token prediction after `prompt` with `image`.

    Runs `vlm.processor(text=[prompt], images=[image])` and `model.generate(max_new_tokens=1)`
    and nothing of vlmtrace: no adapter, padding, positions or layouts.
    """
    key = (prompt, image_digest(image), str(vlm.model.dtype), weights_version(vlm.model))
    kept = _kept.setdefault(vlm.model, OrderedDict())
    if key in kept:
        kept.move_to_end(key)
        return kept[key]
    inputs = dict(vlm.processor(text=[prompt], images=[image], return_tensors="pt"))
    answer = partial(
        vlm.model.generate,
        max_new_tokens=1,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )
    with torch.no_grad():
        if backend is None:
            logits = answer(**{k: _to(v, vlm) for k, v in inputs.items()}).logits[0][0]
        else:  # the same call on the server: a trace that intervenes nowhere
            with vlm.envoy.trace(fn=answer, backend=backend, **inputs) as tracer:
                logits = tracer.result.logits[0][0].save()
    log_probs = torch.log_softmax(logits.float().cpu(), dim=-1)
    kept[key] = log_probs
    while len(kept) > KEPT:
        kept.popitem(last=False)
    return log_probs


def forget(vlm: VLM) -> None:
    """Drop the kept answers of `vlm`'s model (benchmarks measure a fresh process's cost)."""
    _kept.pop(vlm.model, None)


def _to(value: Any, vlm: VLM) -> Any:
    """A processor output on the model's device (floating tensors keep their dtype: the model's
    own forward casts pixels where it needs to)."""
    return value.to(vlm.device) if isinstance(value, torch.Tensor) else value
