"""Cross-sample batching: which samples' rows share a forward, and where each sample's rows sit.

One sample's grid often has fewer cells than a forward holds (a window sweep over segments is
a few dozen rows), so a forward of one sample leaves a GPU mostly idle. The sweep therefore
fills a forward with the next samples' rows. Each sample brings its own baseline rows (clean,
corrupted draws), followed by its patched rows, whose sources are its own baseline rows:

    max_batch=16, k=1:  A clean, A corrupt, A cell 7, A cell 8 | B clean, B corrupt, B cells 0..9
                        (A's last two cells, B's first ten: B goes on in the next forward)

Rows of different samples are left-padded to a common width per sequence, as the clean and
corrupted rows of one sample already are: positions count from the attention mask (or the
model computes them from it), so a padded row computes what it computes alone, and each
sample's rows are scored against its own answer (`forward.Scoring`) and noised with its own
sigma (`NoisePlan.span`). Samples share a forward only where that is exact: every input
batches as the adapter declares (`signature`), and, for an answer predicted by a decoder,
the decoder sequence needs no padding (its answer positions are counted from its start).
Otherwise a forward ends and the next sample starts its own: never a guess.

    shares = next_forward(plans, pending, rows=64, pack=True)   # [Share(A, 2 cells), Share(B, ...)]
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from ..models.load import VLM
from .forward import Edits, Scoring
from .planning import Plan, Prepared, baseline_edits, image_units


@dataclass(frozen=True)
class Share:
    """One sample's part of a forward: its baseline rows, then a patched row per (cell, draw)."""

    sample: int
    """The sample's index in the sweep."""
    plan: Plan
    start: int
    """Position in `plan.work` of the share's first cell (cells before it are finished)."""
    cells: tuple[int, ...]
    """The cells this forward runs, consecutive in `plan.work` from `start`."""

    @property
    def prepared(self) -> Prepared:
        return self.plan.prepared

    @property
    def rows(self) -> int:
        return self.prepared.baseline_rows + self.prepared.pair.samples * len(self.cells)

    @property
    def end(self) -> int:
        """Position in `plan.work` after this share: the sample's progress once it has run."""
        return self.start + len(self.cells)

    @property
    def completes(self) -> bool:
        return self.end >= len(self.plan.work)


def signature(vlm: VLM, prepared: Prepared) -> Hashable:
    """What must agree for two samples' rows to be batched exactly, in one hashable value.

    The input names; per input, how it batches and every dimension the batch does not pad or
    concatenate (a per-row input that is not declared `pad_to_largest` must have the same shape);
    dtypes; and, for an answer predicted by a decoder, the decoder's width.
    """
    parts: list[Hashable] = [inputs_signature(vlm, prepared.pair.clean.inputs)]
    parts.append(inputs_signature(vlm, prepared.pair.corrupt.inputs))
    if vlm.adapter.answer_sequence == "decoder":
        parts.append(("decoder width", prepared.widths.get("decoder")))
    return tuple(parts)


def inputs_signature(vlm: VLM, inputs: Mapping[str, Any]) -> Hashable:
    """How one row of inputs batches: per input, its declared kind, the dimensions the batch
    neither pads nor concatenates (a per-row input declared `pad_to_largest` keeps only its
    number of dimensions: rows of any size are zero-padded to the largest), and its dtype.
    Rows with equal signatures stack exactly (`forward.stack_rows`)."""
    described = []
    for name, value in sorted(inputs.items()):
        spec = vlm.adapter.inputs.get(name)
        if spec is None:  # stack_rows names the undeclared input when the forward runs
            described.append((name, None, tuple(value.shape), value.dtype))
            continue
        if spec.kind == "row":
            fixed = (value.dim(),) if spec.pad_to_largest else value.shape
        else:
            fixed = value.shape[1:]
        described.append((name, spec.kind, tuple(fixed), value.dtype))
    return tuple(described)


def next_forward(
    plans: Sequence[Plan],
    pending: Sequence[tuple[int, int]],
    *,
    rows: Callable[[list[Prepared]], int],
    pack: bool,
    signatures: Mapping[int, Hashable],
) -> list[Share]:
    """The shares of the next forward, taken in order from `pending` (sample, next position).

    The first pending sample always gets a share (at least one cell, unless it has none);
    the following ones join while their baseline rows and at least one cell fit in
    `rows(prepared of the forward's samples)` and their `signatures` equal the first's. Every
    share but the last finishes its sample, so progress stays a prefix of each work list.
    """
    shares: list[Share] = []
    used = 0
    for sample, start in pending:
        plan = plans[sample]
        prepared, k = plan.prepared, plan.prepared.pair.samples
        if shares:
            if not pack or signatures[sample] != signatures[shares[0].sample]:
                break
        budget = rows([s.prepared for s in shares] + [prepared])
        remaining = len(plan.work) - start
        room = (budget - used - prepared.baseline_rows) // k
        if not shares and remaining and room < 1:
            raise ValueError(
                f"max_batch={budget} leaves no room for one cell ({k} rows) next to the "
                f"{prepared.baseline_rows} baseline rows; use max_batch >= {prepared.baseline_rows + k}."
            )
        if room < (1 if remaining else 0):
            break
        taken = min(remaining, room)
        shares.append(Share(sample, plan, start, tuple(plan.work[start : start + taken])))
        used += shares[-1].rows
        if taken < remaining:
            break
    return shares


def offsets(prepared: Sequence[Prepared], patched: Sequence[int]) -> list[int]:
    """The first batch row of each sample of a forward: `patched[i]` patched rows follow its baselines."""
    firsts, row = [], 0
    for p, n in zip(prepared, patched, strict=True):
        firsts.append(row)
        row += p.baseline_rows + n
    return firsts


def common_widths(prepared: Sequence[Prepared]) -> dict[str, int]:
    """The padded width of each sequence in a forward of these samples: the widest row's."""
    return {sequence: max(p.widths[sequence] for p in prepared) for sequence in prepared[0].widths}


def pad(prepared: Prepared, side: str, sequence: str, widths: dict[str, int]) -> int:
    """Left padding of a sample's clean or corrupted row in a forward padded to `widths`."""
    return prepared.pad(side, sequence) + widths[sequence] - prepared.widths[sequence]


def packed_edits(
    vlm: VLM,
    prepared: Sequence[Prepared],
    inputs: Sequence[list[str]],
    draws: Sequence[list[int]],
    widths: dict[str, int],
) -> Edits:
    """The Gaussian noise of every sample of a forward, each on its own rows (`NoisePlan.span`).

    Each sample's plan is the one it gets alone (`planning.baseline_edits`), moved to its
    rows and to its positions under the forward's wider padding.
    """
    if len(prepared) == 1 and widths == prepared[0].widths:
        return baseline_edits(vlm, prepared[0], inputs[0], draws[0])
    edits = Edits()
    all_rows = [row for p, sides in zip(prepared, inputs, strict=True) for row in p.rows(sides)]
    patched = [len(sides) - p.baseline_rows for p, sides in zip(prepared, inputs, strict=True)]
    units: tuple[int, ...] | None = None  # every batch row's image units, counted once
    for p, sides, sample_draws, first in zip(
        prepared, inputs, draws, offsets(prepared, patched), strict=True
    ):
        for own in baseline_edits(vlm, p, sides, sample_draws).noise:
            if units is None:
                units = image_units(vlm, all_rows) if own.hook.layout.startswith("image_") else ()
            shift = widths["prompt"] - p.widths["prompt"]
            edits.noise.append(
                replace(
                    own,
                    rows=tuple(first + r for r in own.rows),
                    positions=None if own.positions is None else tuple(q + shift for q in own.positions),
                    units=units,
                    span=(first, len(sides)),
                )
            )
    return edits


def scoring(
    vlm: VLM,
    prepared: Sequence[Prepared],
    patched: Sequence[int],
    probes: Sequence[torch.Tensor | None] | None = None,
) -> list[Scoring]:
    """Each sample's rows of a forward and its answer, foil and answer positions, and the tokens
    its baseline rows are probed at (the self-check's, `vlmtrace.engine.self_check`)."""
    probes = probes if probes is not None else [None] * len(prepared)
    return [
        Scoring(
            first, first + p.baseline_rows + n, p.answer, p.foil, p.answer_slice(vlm), ids, p.baseline_rows
        )
        for p, n, first, ids in zip(prepared, patched, offsets(prepared, patched), probes, strict=True)
    ]
