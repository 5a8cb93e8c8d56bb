"""Prefix reuse: start each chunk where it first differs from the baseline rows.

Rows of a chunk compute exactly what their baseline row (clean, or corrupted draw d) computed
below the chunk's first patched layer and, in a causal decoder, before its first patched
position. `vlmtrace.engine.sweep.plan_chunk` skips those layers (nnsight `skip`, from the states
`forward.baseline_prefix` kept) and runs only the suffix on cached keys and values.

    if resumes_keys_values(vlm, stack):      # a causal decoder whose positions the engine makes
        start = resumable_start(prepared, edits, prefix)
"""

from __future__ import annotations

from typing import Any

from ..models.adapter import Stack
from ..models.load import VLM
from .forward import (
    POSITION_FIELD,
    SEQUENCE_FIELDS,
    Edits,
    Prefix,
    baseline_prefix,
    cache_keyword,
    stack_rows,
)
from .planning import Prepared, baseline_edits


def resumes_keys_values(vlm: VLM, stack: Stack) -> bool:
    """Whether the model can run a suffix on cached keys/values: a causal decoder-only stack
    whose positions the engine makes (a model that computes its own, such as M-RoPE, would
    number the suffix from 0), with no cross-attention (its cached keys are another sequence's,
    which a cut at a prompt position would truncate), and a forward that resumes from a cache.
    Otherwise prefix reuse skips layers only."""
    return (
        stack.causal
        and stack.sequence == "prompt"
        and vlm.adapter.answer_sequence == "prompt"
        and vlm.adapter.positions == "engine"
        and vlm.adapter.resumes_from_cache
        and "cross_attn" not in stack.sites
    )


def prefix_of(vlm: VLM, stack: Stack, prepared: Prepared) -> Prefix:
    """The baseline rows' layer outputs (and keys/values), computed once per sample."""
    k = prepared.pair.samples
    inputs = ["clean"] + ["corrupt"] * k
    edits = baseline_edits(vlm, prepared, inputs, [0] + list(range(k)))
    batch = stack_rows(vlm, prepared.rows(inputs), prepared.widths)
    return baseline_prefix(vlm, stack, batch, edits, keys_values=resumes_keys_values(vlm, stack))


def resumable_start(prepared: Prepared, edits: Edits, prefix: Prefix) -> int:
    """The first position the chunk must compute: its first patched one, 0 if it cannot resume.

    Everything before it equals the baseline rows' computation. With the baseline rows' merged
    input embeddings (`Prefix.embeddings`: image features placed, noise added) a suffix may
    start anywhere, inside the image block included. Without them, a suffix must hold no image
    token (the model places image features only from `pixel_values`) and no noised embedding.
    """
    if prefix.keys_values is None:
        return 0
    start = min(min(index.dst_pos + index.src_pos) for index in edits.patches.values())
    if prefix.embeddings is not None:
        return start
    if any(plan.positions is not None for plan in edits.noise):
        return 0
    for side, encoded in (("clean", prepared.pair.clean), ("corrupt", prepared.pair.corrupt)):
        segments = encoded.segments("prompt")
        if "image" in segments.names:
            last_image = max(segments.positions("image")) + prepared.pad(side, "prompt")
            if start <= last_image:
                return 0
    return start


def suffix_batch(vlm: VLM, batch: dict, stack: Stack, cache: Any, start: int, embeddings: Any = None) -> dict:
    """The inputs of positions >= `start` only, on top of `cache` (the earlier positions).

    Per-token inputs of the stack's sequence are cut at `start`, except the attention mask,
    which covers cached and new positions; per-row and flat inputs (the image) are dropped.
    With `embeddings` (each row's baseline merged input embeddings), the suffix is given as
    `inputs_embeds` instead of token ids: image features and noise are already in them.
    """
    mask = SEQUENCE_FIELDS[stack.sequence][1]
    suffix: dict[str, Any] = {cache_keyword(vlm.model): cache, mask: batch[mask]}
    if embeddings is not None:
        return {
            **suffix,
            "inputs_embeds": embeddings[:, start:],
            POSITION_FIELD[stack.sequence]: batch[POSITION_FIELD[stack.sequence]][:, start:],
        }
    for name, value in batch.items():
        spec = vlm.adapter.inputs.get(name)
        if name == POSITION_FIELD[stack.sequence] or (
            spec is not None and spec.kind == "token" and spec.sequence == stack.sequence and name != mask
        ):
            suffix[name] = value[:, start:]
    return suffix


def shifted(edits: Edits, start: int) -> Edits:
    """The same edits with positions counted from `start`, the suffix's first position.

    Image noise is dropped: the noised image embeddings are in the cached part.
    """
    moved = Edits(knockouts=edits.knockouts)
    for (layer, site), index in edits.patches.items():
        target = moved.patch(layer, site)
        target.dst_row, target.src_row, target.head = index.dst_row, index.src_row, index.head
        target.dst_pos = [p - start for p in index.dst_pos]
        target.src_pos = [p - start for p in index.src_pos]
    return moved


def check_prefix_reuse(vlm: VLM, stack: Stack, backend: Any) -> None:
    """Refuse prefix reuse where it is not implemented, saying what to do instead."""
    if backend is not None:
        raise ValueError(
            "reuse_prefix runs locally only (the cached states would have to travel); "
            "drop reuse_prefix for a remote sweep."
        )
    block = stack.sites.get("block")
    if block is None or block.path or block.index is not None:
        raise ValueError(
            f"reuse_prefix needs layers that return their hidden states as one tensor; "
            f"{vlm.name}'s {stack.layers} do not. Drop reuse_prefix for this model."
        )
