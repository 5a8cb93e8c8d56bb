"""Where a position looks: attention probabilities of one query over keys, per layer and head.

NOTICE explains what important heads do by drawing the attention of the answer position over
image patches (LLaVA self-attention over image tokens; BLIP cross-attention over the vision
encoder's patches). Patching says *which* heads matter; these patterns suggest *why*.

    att = attention_pattern(vlm, sample, kind="self", query="last")   # (layer, head, key)
    att.sel(layer=3, head=1).where(att["label"] == "image", drop=True)

Requires eager attention (the default of `vlmtrace.load`): fused kernels return no weights.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import xarray as xr

from ..data.sample import Sample
from ..models.load import VLM
from .corruptions import clean_side
from .forward import SEQUENCE_FIELDS, driver, envoy_at, stack_rows
from .inputs import scored_answer_ids


def attention_pattern(
    vlm: VLM,
    sample: Sample,
    *,
    kind: str = "self",
    query: str = "last",
    stack: str | None = None,
    backend: Any = None,
) -> xr.DataArray:
    """Attention of the `query` segment's positions (averaged) over all keys, per layer and head.

    `backend`: an nnsight backend (remote execution); only the averaged weights travel back.
    """
    stack_name = stack or vlm.adapter.default_stack
    the_stack = vlm.adapter.stacks[stack_name]
    if kind not in the_stack.patterns:
        raise ValueError(
            f"{vlm.name}'s {stack_name!r} stack has no {kind!r} attention; it has {list(the_stack.patterns)}."
        )
    hook = the_stack.patterns[kind]
    answer = scored_answer_ids(vlm, sample.prompt, sample.answer, whole=False)
    encoded = clean_side(vlm, sample, answer)
    segments = encoded.segments(the_stack.sequence)
    queries = segments.positions(query)
    widths = {s: len(encoded.inputs[ids]) for s, (ids, _) in SEQUENCE_FIELDS.items() if ids in encoded.inputs}
    batch = stack_rows(vlm, [encoded.inputs], widths)
    n_layers = vlm.shape.layers[stack_name]
    envoy = vlm.envoy
    layers = envoy_at(envoy, the_stack.layers)
    # Layers that have this attention (Mllama interleaves self- and cross-attention layers);
    # the others get NaN rows.
    paths = [".".join(p for p in (the_stack.layers, str(i), hook.path) if p) for i in range(n_layers)]
    present = [i for i, path in enumerate(paths) if _has_module(vlm.model, path)]
    with torch.no_grad(), envoy.trace(fn=driver(vlm), backend=backend, **batch):
        rows = []
        for index in present:
            value = envoy_at(layers[index], hook.path).output[hook.index]
            if value is None:
                raise ValueError(
                    "attention weights are None: load the model with attn_implementation='eager'."
                )
            rows.append(value[0, :, queries].float().mean(1).cpu())
        found = torch.stack(rows).save()
    found = found.numpy()
    weights = np.full((n_layers, *found.shape[1:]), np.nan, dtype=found.dtype)
    weights[present] = found
    keys = np.arange(weights.shape[-1])
    coords = {"layer": np.arange(n_layers), "head": np.arange(weights.shape[1]), "key": keys}
    if kind == "self":
        coords["token"] = ("key", np.array(segments.tokens, dtype=str))
        coords["label"] = ("key", np.array(segments.labels, dtype=str))
    return xr.DataArray(weights, dims=("layer", "head", "key"), coords=coords, name=f"{kind}_attention")


def _has_module(model: torch.nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return True


def attention_over_image(vlm: VLM, samples: list[Sample], *, backend: Any = None) -> xr.DataArray:
    """Attention of the answer position over the image's tokens, per (sample, layer, head, patch).

    Early fusion: self-attention of the last prompt position over the image tokens (in prompt
    order). Cross-attention (BLIP): over the vision encoder's patches, its first token (CLS) left
    out. NOTICE draws these maps; `vlmtrace.engine.head_functions` labels heads by them.
    """
    kind = "self" if vlm.adapter.image_in_sequence else "cross"
    weights = []
    for sample in samples:
        pattern = attention_pattern(vlm, sample, kind=kind, backend=backend)
        if kind == "self":
            pattern = pattern.where(pattern["label"] == "image", drop=True)
        else:
            pattern = pattern.isel(key=slice(1, None))  # the vision encoder's first token is CLS
        weights.append(pattern.values)
    return xr.DataArray(
        np.stack(weights),
        dims=("sample", "layer", "head", "patch"),
        coords={"sample": [s.id for s in samples]},
    )
