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

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from ..models.adapter import AdapterMismatchError, Hook, Stack
from ..models.load import VLM
from .layouts import add_noise, image_blocks, patch_through_layout, rows_view
from .metrics import Metric

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
    """Padded positions to noise; None noises the whole image embedding of each row."""
    scale: float
    seed: int
    samples: int
    units: tuple[int, ...] = ()
    """Image tiles or tokens of every batch row, for `image_tiles` / `image_tokens` hooks."""
    span: tuple[int, int] | None = None
    """(first row, row count) of the one sample this plan noises, in a forward that packs
    several samples' rows (`vlmtrace.engine.packing`); its first row is that sample's clean
    row, which gives sigma. None: the whole batch is one sample's, row 0 its clean row."""


@dataclass
class Edits:
    """Everything one forward changes, grouped by where it happens."""

    patches: dict[tuple[int, str], PatchIndex] = field(default_factory=dict)
    knockouts: dict[int, KnockIndex] = field(default_factory=dict)
    """Self-attention knockouts by layer."""
    cross_knockouts: dict[int, KnockIndex] = field(default_factory=dict)
    """Cross-attention knockouts by layer (keys are positions of the cross-attended sequence)."""
    noise: list[NoisePlan] = field(default_factory=list)
    """One plan per noised sample of the forward, all at the same hook (one corruption per
    sweep). In a forward that packs several samples' rows each noises only its `span` of rows,
    with its own sigma."""

    def patch(self, layer: int, site: str) -> PatchIndex:
        return self.patches.setdefault((layer, site), PatchIndex())

    def knock(self, layer: int, *, cross: bool = False) -> KnockIndex:
        table = self.cross_knockouts if cross else self.knockouts
        return table.setdefault(layer, KnockIndex())

    def layers(self) -> list[int]:
        """Every layer an edit touches, in execution order."""
        return sorted({layer for layer, _ in self.patches} | set(self.knockouts) | set(self.cross_knockouts))


@dataclass(frozen=True)
class Scoring:
    """Rows `start:stop` of a forward, one sample's, and the answer they are scored by.

    A forward that packs several samples' rows scores each sample's rows with its own answer,
    foil and answer positions; the first of them is the sample's clean row, the row 0 of a
    metric that scores against the clean run (KL).
    """

    start: int
    stop: int
    answer: torch.Tensor
    foil: torch.Tensor | None
    answer_slice: slice
    probes: torch.Tensor | None = None
    """Token ids whose log-probabilities at the first answer position are read back for the
    group's first `probe_rows` rows (its baseline rows): the self-check compares them with the
    model's own forward and across chunks (`vlmtrace.engine.self_check`)."""
    probe_rows: int = 0


@dataclass(frozen=True)
class ImageRows:
    """Which distinct image each row of a forward shows, where rows repeat images.

    A sweep's rows show two images (clean and corrupted) over and over, and an image encoder
    that encodes each row's image on its own (`Adapter.image_encoder`, `row_position`) would
    compute the same encoding once per row: on BLIP the vision transformer is most of a patched
    row's work. Such a forward passes the encoder one row per distinct image (`first`) and
    gives every row its image's encoding (`of_row`) before anything downstream reads it.
    """

    first: tuple[int, ...]
    """A row showing each distinct image, in first-seen order."""
    of_row: tuple[int, ...]
    """Per row, its image's index in `first`."""


def shared_images(
    vlm: VLM, rows: list[Mapping[str, torch.Tensor]], stack: Stack, edits: Edits
) -> ImageRows | None:
    """How `rows` share images, or None where every row's image is its own, the adapter's
    encoder does not encode one row per image, or the forward edits inside the encoder (a
    stack or noise there: rows that show one image differ inside it).

    Rows show the same image when they hold the same input tensors (the same encoded side of
    a sample, as `Prepared.rows` gives them), so sharing is found by identity, not by value.
    """
    adapter = vlm.adapter
    encoder = adapter.image_encoder
    names = [name for name in adapter.image_encoder_inputs if name in rows[0]]
    if encoder is None or encoder.layout != "row_position" or not names:
        return None
    if _inside_encoder(encoder, stack, edits):
        return None
    index: dict[tuple[int, ...], int] = {}
    first, of_row = [], []
    for r, row in enumerate(rows):
        key = tuple(id(row[name]) for name in names)
        if key not in index:
            index[key] = len(first)
            first.append(r)
        of_row.append(index[key])
    return None if len(first) == len(rows) else ImageRows(tuple(first), tuple(of_row))


def _inside_encoder(encoder: Hook, stack: Stack, edits: Edits) -> str | None:
    """The stack or noise hook of a forward that lies inside the image encoder, if any."""
    paths = [stack.layers, *(noise.hook.path for noise in edits.noise)]
    return next((path for path in paths if path.startswith(f"{encoder.path}.")), None)


def stack_rows(
    vlm: VLM,
    rows: list[Mapping[str, torch.Tensor]],
    widths: Mapping[str, int],
    images: ImageRows | None = None,
) -> dict:
    """Batch rows of inputs as the adapter declares each input (`Adapter.inputs`).

    Per-token inputs are left-padded to `widths[sequence]`: left padding puts every row's last
    prompt token at the same index, so answer logits are `logits[:, -n]` for all rows. Flat
    inputs are concatenated, per-row inputs stacked. With `positions="engine"`, position ids
    are counted from the attention mask, so a padded row computes exactly what it computes
    alone; with `positions="model"` the model computes its own and none are passed.

    With `images` (`shared_images`), the image encoder's inputs hold one row per distinct
    image; the forward must then be planned with the same `images` (`forward_plan`).
    """
    adapter = vlm.adapter
    pad_id = vlm.tokenizer.pad_token_id or 0
    batch: dict[str, torch.Tensor] = {}
    for name in rows[0]:
        spec = adapter.inputs.get(name)
        if spec is None:
            raise AdapterMismatchError(
                f"the {adapter.family} processor returned the input {name!r} "
                f"{tuple(rows[0][name].shape)}, which the adapter does not declare: add it to "
                "Adapter.inputs as token(...) (padded with its sequence), FLAT (concatenated) or "
                "ROW (stacked). The engine never guesses how an input batches."
            )
        values = [row[name] for row in rows]
        if images is not None and name in adapter.image_encoder_inputs:
            if spec.kind != "row":
                raise AdapterMismatchError(
                    f"{name!r} is named in the {adapter.family} adapter's image_encoder_inputs but "
                    f"declared {spec.kind!r}: an input the encoder reads one row per image is ROW."
                )
            values = [values[r] for r in images.first]
        if spec.kind == "token":
            batch[name] = _left_pad(
                name,
                values,
                rows,
                spec.sequence,
                widths[spec.sequence],
                pad_id if spec.pad == "pad_token" else spec.pad,
            )
        elif spec.kind == "flat":
            batch[name] = torch.cat(values)
        else:
            batch[name] = _stack(name, values, spec.pad_to_largest)
    if adapter.positions == "engine":
        for sequence, (_, mask_name) in SEQUENCE_FIELDS.items():
            if mask_name in batch:
                mask = batch[mask_name]
                batch[POSITION_FIELD[sequence]] = (mask.cumsum(-1) - 1).clamp(min=0)
    return batch


def _left_pad(
    name: str, values: list[torch.Tensor], rows, sequence: str, width: int, fill: int
) -> torch.Tensor:
    """Left-pad per-token values (positions on dim 0) to `width`; each must match its row's ids.

    A forward repeats a few inputs (clean, corrupted) over many rows, as the same tensors: each
    distinct one is checked and padded once, and the rows gather them in one indexing.
    """
    ids = SEQUENCE_FIELDS[sequence][0]
    distinct: dict[tuple[int, int], int] = {}  # (value, its row's ids) by identity -> index
    order, firsts = [], []
    for row, value in zip(rows, values, strict=True):
        key = (id(value), id(row[ids]))
        if key not in distinct:
            distinct[key] = len(firsts)
            firsts.append((row, value))
        order.append(distinct[key])
    padded = torch.full((len(firsts), width, *values[0].shape[1:]), fill, dtype=values[0].dtype)
    for i, (row, value) in enumerate(firsts):
        if len(value) != len(row[ids]):
            raise AdapterMismatchError(
                f"input {name!r} is declared per-token of the {sequence!r} sequence but has "
                f"{len(value)} entries for {len(row[ids])} tokens; declare it FLAT or ROW instead."
            )
        padded[i, width - len(value) :] = value
    return padded if len(firsts) == len(values) else padded[torch.tensor(order)]


def _stack(name: str, values: list[torch.Tensor], pad_to_largest: bool) -> torch.Tensor:
    """Stack per-row values; zero-pad each dimension at its end to the largest row, when declared."""
    shapes = {tuple(v.shape) for v in values}
    if len(shapes) == 1:
        return torch.stack(values)
    if not pad_to_largest or len({len(s) for s in shapes}) != 1:
        raise AdapterMismatchError(
            f"per-row input {name!r} has rows of shapes {sorted(shapes)}, which do not stack; "
            "declare it Input('row', pad_to_largest=True) if the family pads them, or FLAT."
        )
    largest = [max(sizes) for sizes in zip(*shapes, strict=True)]
    out = values[0].new_zeros((len(values), *largest))
    for i, value in enumerate(values):
        out[(i, *(slice(0, n) for n in value.shape))] = value
    return out


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


def _apply_patch(x: torch.Tensor, index: PatchIndex, hook: Hook, rows: int, width: int, n_heads: int) -> None:
    patch_through_layout(
        x,
        hook.layout,
        rows=rows,
        width=width,
        hook=hook.path or "<layer>",
        dst_row=index.dst_row,
        dst_pos=index.dst_pos,
        src_row=index.src_row,
        src_pos=index.src_pos,
        head=index.head,
        n_heads=n_heads,
    )


def _knocked_mask(mask, index: KnockIndex, rows: int, queries: int, keys: int, causal: bool, dtype, device):
    """A copy of an attention mask [row, 1, query, key] with the knocked-out entries blocked.

    The mask object is shared by every layer of the model, so it is cloned, never edited.
    """
    if mask is None:  # no mask means "attend everywhere allowed": build it explicitly
        mask = torch.zeros(rows, 1, queries, keys, dtype=dtype, device=device)
        if causal:
            future = torch.ones(queries, keys, dtype=torch.bool, device=device).triu(1)
            mask = mask.masked_fill(future, torch.finfo(dtype).min)
    if mask.dim() != 4 or mask.shape[-1] != keys or mask.shape[0] not in (1, rows):
        raise AdapterMismatchError(
            f"the attention mask to knock out is {tuple(mask.shape)}, not [rows={rows}, heads, "
            f"queries={queries}, keys={keys}]: load the model with attn_implementation='eager' "
            "(the default of vlmtrace.load) so it receives a 4-D additive mask."
        )
    mask = mask.expand(rows, mask.shape[1], queries, keys).clone()
    blocked = torch.finfo(mask.dtype).min if mask.dtype.is_floating_point else False
    row, query, key = torch.tensor(index.row), torch.tensor(index.query), torch.tensor(index.key)
    every = key < 0  # key -1: every key position (all image patches)
    mask[row[~every], :, query[~every], key[~every]] = blocked
    if every.any():
        mask[row[every], :, query[every]] = blocked
    return mask


def _noise(plan: NoisePlan, x: torch.Tensor, rows: int, width: int) -> None:
    """Seeded Gaussian noise on the corrupted rows' embeddings, through the hook's layout.

    A plan with a `span` sees only its sample's part of `x` (a view, so the noise lands in
    `x`), in which its clean row is row 0: sigma comes from that sample, as when it runs alone.
    """
    layout, units, noised_rows = plan.hook.layout, plan.units, plan.rows
    if plan.span is not None:
        first, count = plan.span
        if plan.positions is None:
            blocks = image_blocks(x, layout, rows=rows, units=units, hook=plan.hook.path)
            x = x[blocks[first].start : blocks[first + count - 1].stop]
            units = units[first : first + count]
        else:
            x = rows_view(x, layout, rows=rows, width=width, hook=plan.hook.path)[first : first + count]
            layout = "row_position"
        rows, noised_rows = count, tuple(r - first for r in noised_rows)
    add_noise(
        x,
        layout,
        rows=rows,
        units=units,
        hook=plan.hook.path,
        noised_rows=noised_rows,
        draws=plan.draws,
        positions=plan.positions,
        scale=plan.scale,
        seed=plan.seed,
        samples=plan.samples,
        width=width,
    )


def _knock(
    attention,
    index: KnockIndex,
    keyword: str,
    rows: int,
    queries: int,
    causal: bool,
    dtype,
    states_keyword: str | None = None,
) -> None:
    """Replace the `keyword` mask of an attention module's call with a knocked-out copy.

    The mask's key width is the count of the states the module attends to: its own input for
    self-attention, the states under `states_keyword` for cross-attention (declared per stack:
    BLIP's `encoder_hidden_states`, Mllama's `cross_attention_states`, T5's `key_value_states`).
    """
    args, kwargs = attention.inputs
    kwargs = dict(kwargs)
    if keyword not in kwargs and len(args) > 1:
        raise AdapterMismatchError(
            f"the attention module receives its mask positionally, not as {keyword!r}; "
            "point Stack.attention (or cross_attention) at a module that takes it by keyword."
        )
    states = args[0] if args else kwargs["hidden_states"]
    keys_from = states
    if states_keyword is not None:
        keys_from = kwargs.get(states_keyword)
        if keys_from is None:
            raise AdapterMismatchError(
                f"the cross-attention module receives no {states_keyword!r} keyword to count its keys "
                f"from (it got {sorted(kwargs)}): set Stack.cross_states_keyword to the name it uses."
            )
    keys = keys_from.shape[-2]
    if states_keyword is not None:  # keys per row: Mllama hands them over as [row x tiles, patches, dim]
        count = keys_from[..., 0].numel()
        if count % rows:
            raise AdapterMismatchError(
                f"the cross-attention states under {states_keyword!r} are {tuple(keys_from.shape)}, which "
                f"do not split into {rows} rows of keys: check Stack.cross_states_keyword."
            )
        keys = count // rows  # the mask's key width is checked against it in _knocked_mask
    kwargs[keyword] = _knocked_mask(
        kwargs.get(keyword), index, rows, queries, keys, causal, dtype, states.device
    )
    attention.inputs = (args, kwargs)


def batch_geometry(batch: Mapping[str, Any], sequence: str) -> tuple[int, int]:
    """(rows, positions) of a batch's `sequence`: from its token ids, or from `inputs_embeds`
    where a resumed prompt is given as embeddings."""
    ids = SEQUENCE_FIELDS[sequence][0]
    if ids in batch:
        return tuple(batch[ids].shape[:2])
    return tuple(batch["inputs_embeds"].shape[:2])


def driver(vlm: VLM) -> Callable:
    """The callable the trace runs: the adapter's forward bound to the model."""
    return partial(vlm.adapter.forward, vlm.model)


def run(vlm: VLM, stack: Stack, batch: dict, edits: Edits, **options: Any) -> torch.Tensor:
    """Run one batched forward with `edits`; return the metric of every row (CPU floats).
    The options are `run_probed`'s."""
    return run_probed(vlm, stack, batch, edits, **options)[0]


def run_probed(
    vlm: VLM, stack: Stack, batch: dict, edits: Edits, *, backend: Any = None, **options: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run one batched forward with `edits`; return the metric of every row and the probes.

    The probes are the log-probabilities of each scoring group's `probes` token ids at its
    first answer position, for its `probe_rows` first rows, flattened in group and row order
    (empty where no group asks for any): a few floats that check the forward for free.
    `backend` is an nnsight backend (None: run here); a remote one runs the same trace on a
    server, and only the per-row floats come back. The options are `forward_plan`'s.
    """
    return run_plan(vlm, forward_plan(vlm, stack, batch, edits, **options), backend)


def run_plan(vlm: VLM, plan: ForwardPlan, backend: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run one planned forward (`forward_plan`): its metric per row and its probes."""
    envoy = vlm.envoy
    with torch.no_grad(), envoy.trace(fn=plan.fn, backend=backend, **plan.batch) as tracer:
        values, probes = _intervene(envoy, plan, tracer)
    return values, probes


def run_plans(
    vlm: VLM, plans: list[ForwardPlan], backend: Any = None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Run planned forwards; return each one's (values, probes), in order.

    One forward is one trace. Several are one nnsight session holding their traces: with a
    remote `backend`, one request instead of one per forward (`vlmtrace.engine.grouping`).
    The traces run one after another, each with its own rows, so memory is one forward's.
    """
    if len(plans) == 1:
        return [run_plan(vlm, plans[0], backend)]
    import nnsight

    envoy = vlm.envoy
    with torch.no_grad(), envoy.session(backend=backend):
        results = nnsight.save([])
        for plan in plans:
            with envoy.trace(fn=plan.fn, **plan.batch) as tracer:
                results.append(_intervene(envoy, plan, tracer))
    return list(results)


@dataclass
class ForwardPlan:
    """What one forward's trace needs, read from the VLM beforehand: a remote trace ships every
    object its body names, and the VLM (processor included) has no business on the server."""

    fn: Callable
    batch: dict
    edits: Edits
    metric: Metric
    scoring: list[Scoring]
    rows: int
    width: int
    prompt_width: int
    n_heads: int
    dtype: torch.dtype
    layers: str
    sites: dict[str, Hook]
    attention: str | None
    cross_attention: str | None
    cross_keyword: str | None
    cross_states_keyword: str | None
    causal: bool
    encoder: str | None
    first: int
    states: torch.Tensor | None
    image: Any
    image_rows: torch.Tensor | None = None
    """Per row, which row of the image encoder's output it reads (`ImageRows.of_row`), where
    the encoder ran once per distinct image; None where it ran on every row."""
    images_before_noise: bool = True
    """The image encoder runs before the hook the noise is added at (the model's order)."""


def forward_plan(
    vlm: VLM,
    stack: Stack,
    batch: dict,
    edits: Edits,
    *,
    metric: Metric,
    answer: torch.Tensor | None = None,
    foil: torch.Tensor | None = None,
    answer_slice: slice | None = None,
    scoring: list[Scoring] | None = None,
    prefix: tuple[int, torch.Tensor] | None = None,
    image: Any = None,
    images: ImageRows | None = None,
) -> ForwardPlan:
    """One forward's trace, planned.

    Every row is scored by `answer` / `foil` at `answer_slice`, or, for a forward that packs
    several samples' rows, each sample's rows by their own (`scoring`, in row order, covering
    every row). `prefix=(first, states)` skips the stack's layers below `first`, every row
    starting from `states`, the [row, position, hidden] output of layer `first - 1` (prefix
    reuse: nothing is edited below `first`, so each row computes there exactly what its
    baseline row computed once already). `image` replaces the image encoder's output
    (`Prefix.image_rows`): it runs once per distinct image. `images` says which rows share the
    images of a `batch` stacked with the same `images` (`stack_rows`): the encoder runs on one row
    per image and every row reads its image's encoding.
    """
    rows, width = batch_geometry(batch, stack.sequence)
    encoder = vlm.adapter.image_encoder
    if images is not None:
        if image is not None:
            raise ValueError("a forward either skips the image encoder or runs it once per image, not both")
        inside = _inside_encoder(encoder, stack, edits)
        if inside:
            raise ValueError(
                f"{inside!r} lies inside the image encoder {encoder.path!r}, where rows that share an "
                "image differ: plan this forward without `images` (`shared_images` says so)."
            )
    if scoring is None:
        scoring = [Scoring(0, rows, answer, foil, answer_slice)]
    if vlm.adapter.keeps_last_logits and vlm.adapter.answer_sequence == "prompt":
        # logits of the answer positions only (each sample's are the last len(answer))
        batch = {**batch, "logits_to_keep": max(len(group.answer) for group in scoring)}
    for layer_index in edits.cross_knockouts:
        if any(layer == layer_index for layer, _ in edits.patches):
            raise ValueError("cross-attention knockout and patching at the same layer in one forward")
    first, states = prefix if prefix is not None else (0, None)
    return ForwardPlan(
        fn=driver(vlm),
        batch=batch,
        edits=edits,
        metric=metric,
        scoring=scoring,
        rows=rows,
        width=width,
        prompt_width=batch_geometry(batch, "prompt")[1],
        n_heads=vlm.shape.heads[_stack_name(vlm, stack)],
        dtype=vlm.model.dtype,
        layers=stack.layers,
        sites=dict(stack.sites),
        attention=stack.attention,
        cross_attention=stack.cross_attention,
        cross_keyword=stack.cross_mask_keyword,
        cross_states_keyword=stack.cross_states_keyword,
        causal=stack.causal,
        encoder=None if encoder is None else encoder.path,
        first=first,
        states=states,
        image=image,
        image_rows=None if images is None else torch.tensor(images.of_row),
        images_before_noise=encoder_runs_before(vlm, [noise.hook for noise in edits.noise]),
    )


def _intervene(envoy, plan: ForwardPlan, tracer) -> tuple[torch.Tensor, torch.Tensor]:
    """The body of one forward's trace: every edit in the order the model runs, then the scores."""
    layers = envoy_at(envoy, plan.layers)
    edits, rows, width = plan.edits, plan.rows, plan.width
    if plan.image is not None:
        envoy_at(envoy, plan.encoder).skip(plan.image)
    if plan.image_rows is not None and plan.images_before_noise:
        encode_images_once(envoy, plan.encoder, plan.image_rows)
    if edits.noise:  # also when skipping: BLIP's layers read the image again
        embedded = _activation(envoy, edits.noise[0].hook)
        for noise_plan in edits.noise:
            _noise(noise_plan, embedded, rows, plan.prompt_width)
    if plan.image_rows is not None and not plan.images_before_noise:  # tokens embedded first
        encode_images_once(envoy, plan.encoder, plan.image_rows)
    for skipped in range(plan.first):  # only the last skipped layer's output is ever read
        layers[skipped].skip(plan.states)
    for layer_index in edits.layers():
        layer = layers[layer_index]
        if layer_index in edits.knockouts:
            attention = envoy_at(layer, plan.attention)
            _knock(
                attention,
                edits.knockouts[layer_index],
                "attention_mask",
                rows,
                width,
                plan.causal,
                plan.dtype,
            )
        if layer_index in edits.cross_knockouts:
            attention = envoy_at(layer, plan.cross_attention)
            _knock(
                attention,
                edits.cross_knockouts[layer_index],
                plan.cross_keyword,
                rows,
                width,
                False,
                plan.dtype,
                states_keyword=plan.cross_states_keyword,
            )
        for site, hook in plan.sites.items():
            index = edits.patches.get((layer_index, site))
            if index is not None:
                _apply_patch(_activation(layer, hook), index, hook, rows, width, plan.n_heads)
    values = _scored(tracer.result, plan.metric, plan.scoring).cpu().save()
    probes = _probed(tracer.result, plan.scoring).cpu().save()
    return values, probes


def _scored(logits: torch.Tensor, metric: Metric, scoring: list[Scoring]) -> torch.Tensor:
    """The metric of every row, each sample's rows against its own answer (inside the trace)."""
    scores = []
    for group in scoring:
        answer_logits = logits[group.start : group.stop, group.answer_slice]
        foil = None if group.foil is None else group.foil.to(logits.device)
        scores.append(metric(answer_logits, group.answer.to(logits.device), foil))
    return torch.cat(scores)


def _probed(logits: torch.Tensor, scoring: list[Scoring]) -> torch.Tensor:
    """Log-probabilities of each group's probe tokens at its first answer position, for its
    probe rows (inside the trace)."""
    probed = [logits.new_zeros(0, dtype=torch.float32)]
    for group in scoring:
        if group.probes is None or group.probe_rows == 0:
            continue
        rows = logits[group.start : group.start + group.probe_rows, group.answer_slice][:, 0]
        log_probs = torch.log_softmax(rows.float(), dim=-1)
        probed.append(log_probs[:, group.probes.to(logits.device)].flatten())
    return torch.cat(probed)


@dataclass
class Prefix:
    """What a sample's baseline rows (clean, corrupted draws) computed, for prefix reuse.

    `states[l]` is the [row, position, hidden] output of layer l (every layer but the last);
    `keys_values[l]` the (keys, values) of layer l's self-attention, [row, head, position,
    dim], or None where the stack's model cannot resume from them (not a causal decoder);
    `image` the image encoder's output (one row per baseline row), or None; `embeddings` the
    language model's merged input embeddings [row, position, hidden] (image features placed,
    noise added), or None where the adapter names no `language_model`.
    """

    states: torch.Tensor
    keys_values: list[tuple[torch.Tensor, torch.Tensor]] | None
    image: Any = None
    embeddings: torch.Tensor | None = None

    def image_rows(self, rows: list[int]) -> Any:
        """The image encoder's output for rows that see baseline row `rows[r]`'s image."""
        return rows_of(self.image, rows)


def encoder_runs_before(vlm: VLM, hooks: Sequence[Hook]) -> bool:
    """Whether the image encoder runs before every one of these embedding hooks: the model encodes
    the image first (`Adapter.image_encoder_runs_first`), or none of them is the token embedding.
    A trace must touch modules in the order the model runs them, so this says whether rows are
    given their images' encodings before or after the embedding edits."""
    tokens = vlm.adapter.embeddings.get("tokens")
    return vlm.adapter.image_encoder_runs_first or all(hook != tokens for hook in hooks)


def encode_images_once(envoy, encoder: str, image_rows: torch.Tensor) -> None:
    """Give every row its image's encoding, from an encoder that ran on one row per image
    (`ImageRows.of_row` as `image_rows`; inside a trace)."""
    module = envoy_at(envoy, encoder)
    module.output = encodings_of_rows(module.output, image_rows, encoder)


def rows_of(output: Any, rows: Any) -> Any:
    """An image encoder's output (a ModelOutput of [row, ...] tensors and tuples of them) with
    row r taken from its row `rows[r]`: copies, so an edit of one row reaches no other."""

    def take(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value[rows]
        if isinstance(value, tuple):
            return tuple(take(v) for v in value)
        return value

    return type(output)(**{name: take(value) for name, value in output.items()})


def encodings_of_rows(output: Any, image_rows: torch.Tensor, encoder: str) -> Any:
    """Every row's encoding, from an encoder that ran once per distinct image (inside a trace).

    Checked on the live output: one entry per image, or the adapter misdescribes its encoder.
    """
    images = int(image_rows.max()) + 1
    if not _one_row_per_image(output, images):
        raise AdapterMismatchError(
            f"the image encoder {encoder!r}, given {images} images, did not return one entry per "
            "image; it is not row_position: fix Adapter.image_encoder's layout."
        )
    device = next(v for v in output.values() if isinstance(v, torch.Tensor)).device
    return rows_of(output, image_rows.to(device))


def _forward_keeping_cache(model: torch.nn.Module, **batch: torch.Tensor) -> Any:
    """The forward, returning a full KV cache of every position.

    An explicit `DynamicCache` keeps every key: the cache a model makes for itself may keep
    only a sliding window's last keys (Gemma 3), which a resume by position would misread.
    """
    from transformers import DynamicCache

    keyword = cache_keyword(model)
    output = model(**batch, use_cache=True, **{keyword: DynamicCache()})
    # read the cache under the name the model returns it by: the old name warns where renamed
    return output[keyword] if keyword in output else output.past_key_values


def cache_keyword(model: torch.nn.Module) -> str:
    """The forward's keyword for a KV cache: `cache` (transformers >= 5.2x) or `past_key_values`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


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
    encoder = vlm.adapter.image_encoder
    reads = vlm.adapter.image_encoder_inputs
    if encoder is not None and (encoder.layout != "row_position" or not any(name in batch for name in reads)):
        encoder = None  # tiles or flat tokens (not one entry per row, not reusable by row), or no image
    if encoder is not None and any(noise.hook.path == encoder.path for noise in edits.noise):
        encoder = None  # noise is added to its output in place (BLIP): kept, a chunk would add it twice
    rows, prompt_width = batch["input_ids"].shape
    language_model = vlm.adapter.language_model if keys_values else None
    embeddings = None
    with torch.no_grad(), envoy.trace(fn=fn, **batch) as tracer:
        if encoder is not None:
            image = envoy_at(envoy, encoder.path).output.save()
        if edits.noise:
            embedded = _activation(envoy, edits.noise[0].hook)
            for noise_plan in edits.noise:
                _noise(noise_plan, embedded, rows, prompt_width)
        if language_model is not None:
            embeddings = envoy_at(envoy, language_model).inputs[1]["inputs_embeds"].clone().save()
        outputs = [layers[i].output.clone() for i in range(n_layers - 1)]
        states = torch.stack(outputs).save() if outputs else torch.empty(0).save()
        if keys_values:
            cache = tracer.result.save()
    if image is not None and not _one_row_per_image(image, rows):
        raise AdapterMismatchError(
            f"the image encoder {encoder.path!r} is declared row_position but its output does not "
            f"hold one entry per row ({rows} rows); fix Adapter.image_encoder's layout."
        )
    keys_values = None if cache is None else [(layer.keys, layer.values) for layer in cache.layers]
    if embeddings is not None and tuple(embeddings.shape[:2]) != (rows, prompt_width):
        raise AdapterMismatchError(
            f"{language_model!r} received inputs_embeds {tuple(embeddings.shape)}, not [{rows}, "
            f"{prompt_width}, hidden]; fix Adapter.language_model."
        )
    return Prefix(states, keys_values, image, embeddings)


def _one_row_per_image(output: Any, rows: int) -> bool:
    if not hasattr(output, "items"):  # a bare tensor or tuple: not the ModelOutput declared
        return False
    tensors = [v for v in output.values() if isinstance(v, torch.Tensor)]
    return bool(tensors) and all(len(t) == rows for t in tensors)


def resume_cache(prefix: Prefix, rows: list[int], start: int) -> Any:
    """A fresh KV cache of positions < `start`, row r taken from baseline row `rows[r]`."""
    from transformers import DynamicCache

    cache = DynamicCache()
    for i, (keys, values) in enumerate(prefix.keys_values or ()):
        cache.update(keys[rows, :, :start].clone(), values[rows, :, :start].clone(), i)
    return cache


def _stack_name(vlm: VLM, stack: Stack) -> str:
    return next(name for name, s in vlm.adapter.stacks.items() if s is stack)
