"""One batched forward with many interventions, scored inside one nnsight trace.

This is the engine's hot path. A causal trace needs thousands of patched runs that differ
only in which (row, layer, position, head) receives which activation. Opening one trace per
patch costs ~1 ms of tracing each and leaves the GPU idle; one invoke per patch is still
slow (`../shared/NOTES.md`: 63 vs 2,612 runs/s). Here every patched run is a *row* of one
pre-batched input, and every edit at one hook is a single indexed assignment:

    h[dst_row, dst_pos] = h[src_row, src_pos]        # all restorations at this layer

Source rows are the clean and corrupted baseline rows of the same batch, which no edit ever
writes, so reading and writing one tensor in place is safe. The metric is computed in the
trace and only one float per row is saved: nothing else has to leave the model (remote).

Hooks are touched in the order the model runs them (embeddings, then per layer: attention
mask, heads, attention, cross-attention, MLP, block), as nnsight requires.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from .metrics import Metric
from .models.adapter import Hook, Stack
from .models.load import VLM

SEQUENCE_FIELDS = {
    "prompt": ("input_ids", "attention_mask"),
    "decoder": ("decoder_input_ids", "decoder_attention_mask"),
}
POSITION_FIELD = {"prompt": "position_ids", "decoder": "decoder_position_ids"}


@dataclass
class PatchIndex:
    """All copies at one (layer, site): `x[dst] = x[src]`, flattened over rows."""

    dst_row: list[int] = field(default_factory=list)
    dst_pos: list[int] = field(default_factory=list)
    src_row: list[int] = field(default_factory=list)
    src_pos: list[int] = field(default_factory=list)
    head: list[int] = field(default_factory=list)
    """Per entry, for head sites; empty for whole-module sites."""

    def add(self, dst_row: int, dst_pos: int, src_row: int, src_pos: int, head: int | None) -> None:
        self.dst_row.append(dst_row)
        self.dst_pos.append(dst_pos)
        self.src_row.append(src_row)
        self.src_pos.append(src_pos)
        if head is not None:
            self.head.append(head)


@dataclass
class KnockIndex:
    """Blocked attention entries at one layer: (row, query position, key position)."""

    row: list[int] = field(default_factory=list)
    query: list[int] = field(default_factory=list)
    key: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class NoisePlan:
    """Seeded Gaussian noise for the rows that see the corrupted input."""

    hook: Hook
    rows: tuple[int, ...]
    draws: tuple[int, ...]
    """Noise draw of each row in `rows` (rows with the same draw get identical noise)."""
    positions: tuple[int, ...] | None
    """Padded positions to noise; None noises every position of the hook's output."""
    scale: float
    seed: int
    samples: int


@dataclass
class Edits:
    """Everything one forward changes, grouped by where it happens."""

    patches: dict[tuple[int, str], PatchIndex] = field(default_factory=dict)
    knockouts: dict[int, KnockIndex] = field(default_factory=dict)
    noise: NoisePlan | None = None

    def patch(self, layer: int, site: str) -> PatchIndex:
        return self.patches.setdefault((layer, site), PatchIndex())

    def knock(self, layer: int) -> KnockIndex:
        return self.knockouts.setdefault(layer, KnockIndex())


def stack_rows(vlm: VLM, rows: list[Mapping[str, torch.Tensor]], widths: Mapping[str, int]) -> dict:
    """Left-pad each row's sequences to `widths` and stack rows into one batch.

    Left padding puts every row's last prompt token at the same index, so answer logits are
    `logits[:, -n]` for all rows. Position ids are computed from the attention mask so a
    padded row computes exactly what it computes alone.
    """
    pad_id = vlm.tokenizer.pad_token_id or 0
    batch: dict[str, torch.Tensor] = {}
    for name in rows[0]:
        sequence = next((s for s, names in SEQUENCE_FIELDS.items() if name in names), None)
        if sequence is None:
            batch[name] = torch.stack([row[name] for row in rows])
            continue
        width = widths[sequence]
        fill = pad_id if name.endswith("input_ids") else 0
        padded = torch.full((len(rows), width), fill, dtype=rows[0][name].dtype)
        for i, row in enumerate(rows):
            values = row[name]
            padded[i, width - len(values) :] = values
        batch[name] = padded
    for sequence, (_, mask_name) in SEQUENCE_FIELDS.items():
        if mask_name in batch:
            mask = batch[mask_name]
            batch[POSITION_FIELD[sequence]] = (mask.cumsum(-1) - 1).clamp(min=0)
    return batch


# nnsight serves `.input`/`.output` on every envoy, so a *submodule* with one of those names
# (BLIP's `attention.output`) is reached as `E_output`.
RESERVED = {"input", "output", "inputs", "source"}


def envoy_at(envoy, path: str):
    """The envoy at a dotted module path (HF names), translating nnsight's reserved names."""
    for part in path.split(".") if path else ():
        envoy = getattr(envoy, f"E_{part}" if part in RESERVED else part)
    return envoy


def _activation(envoy, hook: Hook):
    """The live tensor at a hook, inside a trace (touching it in execution order)."""
    module = envoy_at(envoy, hook.path)
    value = module.input if hook.side == "input" else module.output
    return value[hook.index] if hook.index is not None else value


def _apply_patch(x: torch.Tensor, index: PatchIndex, n_heads: int) -> None:
    dst_row, dst_pos = torch.tensor(index.dst_row), torch.tensor(index.dst_pos)
    src_row, src_pos = torch.tensor(index.src_row), torch.tensor(index.src_pos)
    if index.head:
        head = torch.tensor(index.head)
        view = x.view(*x.shape[:-1], n_heads, x.shape[-1] // n_heads)
        view[dst_row, dst_pos, head] = view[src_row, src_pos, head]
    else:
        x[dst_row, dst_pos] = x[src_row, src_pos]


def _knocked_mask(mask: torch.Tensor | None, index: KnockIndex, shape, causal: bool, dtype, device):
    """A copy of the layer's attention mask with the knocked-out entries blocked.

    The mask object is shared by every layer of the model, so it is cloned, never edited.
    """
    batch, width = shape
    if mask is None:  # no mask means "attend everywhere allowed": build it explicitly
        mask = torch.zeros(batch, 1, width, width, dtype=dtype, device=device)
        if causal:
            future = torch.ones(width, width, dtype=torch.bool, device=device).triu(1)
            mask = mask.masked_fill(future, torch.finfo(dtype).min)
    mask = mask.expand(batch, mask.shape[1], width, mask.shape[-1]).clone()
    blocked = torch.finfo(mask.dtype).min if mask.dtype.is_floating_point else False
    row, query, key = torch.tensor(index.row), torch.tensor(index.query), torch.tensor(index.key)
    mask[row, :, query, key] = blocked
    return mask


def _noise(plan: NoisePlan, x: torch.Tensor) -> None:
    """Add `scale * std(clean embeddings)` Gaussian noise to the corrupted rows in place."""
    target = x[0] if plan.positions is None else x[0, list(plan.positions)]
    sigma = plan.scale * target.float().std()
    generator = torch.Generator().manual_seed(plan.seed)
    draws = torch.randn(plan.samples, *target.shape, generator=generator)
    noise = (sigma * draws[list(plan.draws)]).to(x.dtype).to(x.device)
    rows = torch.tensor(plan.rows)
    if plan.positions is None:
        x[rows] += noise
    else:
        positions = torch.tensor(plan.positions)
        x[rows[:, None], positions[None, :]] += noise


def driver(vlm: VLM) -> Callable:
    """The callable the trace runs: the adapter's forward bound to the model."""
    return partial(vlm.adapter.forward, vlm.model)


def run(
    vlm: VLM,
    stack: Stack,
    batch: dict,
    edits: Edits,
    *,
    metric: Metric,
    answer: torch.Tensor,
    foil: torch.Tensor | None,
    answer_slice: slice,
    backend: Any = None,
    prefix: tuple[int, torch.Tensor] | None = None,
    image: Any = None,
) -> torch.Tensor:
    """Run one batched forward with `edits`; return the metric of every row (CPU floats).

    `backend` is an nnsight backend (None: run here); a remote one runs the same trace on a
    server, and only the per-row floats come back. `prefix=(first, states)` skips the stack's
    layers below `first`, every row starting from `states`, the [row, position, hidden]
    output of layer `first - 1` (prefix reuse: nothing is edited below `first`, so each row
    computes there exactly what its baseline row computed once already). `image` replaces
    the image encoder's output (`Prefix.image_rows`): it runs once per distinct image.
    """
    envoy = vlm.envoy
    layers = envoy_at(envoy, stack.layers)
    n_heads = vlm.shape.heads[_stack_name(vlm, stack)]
    width = batch[SEQUENCE_FIELDS[stack.sequence][0]].shape
    touched = sorted({layer for layer, _ in edits.patches} | set(edits.knockouts))
    # Read before the trace: a remote trace ships every object its body names, and the VLM
    # (processor included) has no business on the server.
    dtype = vlm.model.dtype
    if vlm.adapter.keeps_last_logits and vlm.adapter.answer_sequence == "prompt":
        batch = {**batch, "logits_to_keep": len(answer)}  # logits of the answer positions only
    first, states = prefix if prefix is not None else (0, None)
    image_encoder = vlm.adapter.image_encoder
    with torch.no_grad(), envoy.trace(fn=driver(vlm), backend=backend, **batch) as tracer:
        if image is not None:
            envoy_at(envoy, image_encoder).skip(image)
        if edits.noise is not None:  # also when skipping: BLIP's layers read the image again
            _noise(edits.noise, _activation(envoy, edits.noise.hook))
        for skipped in range(first):  # only the last skipped layer's output is ever read
            layers[skipped].skip(states)
        for layer_index in touched:
            layer = layers[layer_index]
            if layer_index in edits.knockouts:
                attention = envoy_at(layer, stack.attention)
                args, kwargs = attention.inputs
                kwargs = dict(kwargs)
                kwargs["attention_mask"] = _knocked_mask(
                    kwargs.get("attention_mask"),
                    edits.knockouts[layer_index],
                    width,
                    stack.causal,
                    dtype,
                    (args[0] if args else kwargs["hidden_states"]).device,  # this layer's device
                )
                attention.inputs = (args, kwargs)
            for site, hook in stack.sites.items():
                index = edits.patches.get((layer_index, site))
                if index is not None:
                    _apply_patch(_activation(layer, hook), index, n_heads)
        logits = tracer.result[:, answer_slice]
        values = metric(logits, answer.to(logits.device), None if foil is None else foil.to(logits.device))
        values = values.cpu().save()
    return values


@dataclass
class Prefix:
    """What a sample's baseline rows (clean, corrupted draws) computed, for prefix reuse.

    `states[l]` is the [row, position, hidden] output of layer l (every layer but the last);
    `keys_values[l]` the (keys, values) of layer l's self-attention, [row, head, position,
    dim], or None where the stack's model cannot resume from them (not a causal decoder);
    `image` the image encoder's output (one row per baseline row), or None.
    """

    states: torch.Tensor
    keys_values: list[tuple[torch.Tensor, torch.Tensor]] | None
    image: Any = None

    def image_rows(self, rows: list[int]) -> Any:
        """The image encoder's output for rows that see baseline row `rows[r]`'s image."""

        def take(value: Any) -> Any:
            if isinstance(value, torch.Tensor):
                return value[rows]
            if isinstance(value, tuple):
                return tuple(take(v) for v in value)
            return value

        return type(self.image)(**{name: take(value) for name, value in self.image.items()})


def _forward_keeping_cache(model: torch.nn.Module, **batch: torch.Tensor) -> Any:
    return model(**batch, use_cache=True).past_key_values


def baseline_prefix(vlm: VLM, stack: Stack, batch: dict, edits: Edits, *, keys_values: bool) -> Prefix:
    """Run the baseline rows once and keep every layer's output (and keys/values).

    Every later chunk of the sample starts from these instead of recomputing them: rows agree
    with their baseline row below the first patched layer, and (in a causal decoder) before
    the first patched position.
    """
    envoy = vlm.envoy
    layers = envoy_at(envoy, stack.layers)
    n_layers = vlm.shape.layers[_stack_name(vlm, stack)]
    fn = partial(_forward_keeping_cache, vlm.model) if keys_values else driver(vlm)
    cache = image = None  # only values saved in a trace come out of it: defaults outside
    encoder = vlm.adapter.image_encoder if "pixel_values" in batch else None
    with torch.no_grad(), envoy.trace(fn=fn, **batch) as tracer:
        if encoder is not None:
            image = envoy_at(envoy, encoder).output.save()
        if edits.noise is not None:
            _noise(edits.noise, _activation(envoy, edits.noise.hook))
        outputs = [layers[i].output.clone() for i in range(n_layers - 1)]
        states = torch.stack(outputs).save() if outputs else torch.empty(0).save()
        if keys_values:
            cache = tracer.result.save()
    rows = len(batch["pixel_values"]) if encoder is not None else 0
    if image is not None and not _one_row_per_image(image, rows):
        image = None  # e.g. LLaVA-NeXT encodes several tiles per image: not reusable by row
    keys_values = None if cache is None else [(layer.keys, layer.values) for layer in cache.layers]
    return Prefix(states, keys_values, image)


def _one_row_per_image(output: Any, rows: int) -> bool:
    tensors = [v for v in output.values() if isinstance(v, torch.Tensor)]
    return hasattr(output, "items") and bool(tensors) and all(len(t) == rows for t in tensors)


def resume_cache(prefix: Prefix, rows: list[int], start: int) -> Any:
    """A fresh KV cache of positions < `start`, row r taken from baseline row `rows[r]`."""
    from transformers import DynamicCache

    cache = DynamicCache()
    for i, (keys, values) in enumerate(prefix.keys_values or ()):
        cache.update(keys[rows, :, :start].clone(), values[rows, :, :start].clone(), i)
    return cache


def _stack_name(vlm: VLM, stack: Stack) -> str:
    return next(name for name, s in vlm.adapter.stacks.items() if s is stack)
