"""Faithfulness of a method's circuit: keep its top components, ablate the rest, measure.

MIB's circuit track asks whether the components a method ranks highest *are* the model's
mechanism: run the clean input with every component outside the circuit replaced by its value
on the counterfactual input (interchange ablation), and see how much of the clean behaviour is
left. Here a component is one of the grid's units at one position (an MLP output, an attention
output, one head's output: `vlmtrace.calibration.truth.Key`), and the ablated runs are rows of
the engine's batched forward (`vlmtrace.engine.forward.run`: row 0 clean, row 1
counterfactual, each further row the clean input with the circuit's complement patched in from
row 1), scored by the logit difference between the clean and the counterfactual answer.

    ranking = rank(space, scores)                               # components, best first
    curve = faithfulness_curve(vlm, samples, ImagePair(), space, ranking)
    cpr, cmd = curve_areas(SIZES, curve)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from vlmtrace.data.sample import Sample
from vlmtrace.engine.alignment import align
from vlmtrace.engine.corruptions import Corruption
from vlmtrace.engine.forward import Edits, run, stack_rows
from vlmtrace.engine.metrics import LogitDiff
from vlmtrace.engine.planning import prepare
from vlmtrace.models.load import VLM

from .scores import SIZES, circuit_sizes, faithfulness
from .truth import Key

ROWS = 48  # patched rows per forward


def space_of(kind: str, *, layers: int, heads: int, positions: Sequence[int]) -> list[Key]:
    """Every component of a space at `positions`, in a fixed order: "mlp", "attn", "attn_head",
    or "block" (attention and MLP outputs: the parts of a residual-stream cell)."""
    sites = ("attn", "mlp") if kind == "block" else (kind,)
    keys: list[Key] = []
    for layer in range(layers):
        for site in sites:
            for position in positions:
                if site == "attn_head":
                    keys += [(site, layer, position, h) for h in range(heads)]
                else:
                    keys.append((site, layer, position, None))
    return keys


def rank(space: Sequence[Key], scores: Mapping[Key, float]) -> list[Key]:
    """Components of `space` by descending score; unscored and NaN ones last, in space order."""

    def value(key: Key) -> float:
        v = scores.get(key, -np.inf)
        return -np.inf if np.isnan(v) else v

    order = sorted(range(len(space)), key=lambda i: (-value(space[i]), i))
    return [space[i] for i in order]


def circuit_values(
    vlm: VLM, sample: Sample, corruption: Corruption, space: Sequence[Key], circuits: Sequence[set[Key]]
) -> tuple[float, float, list[float]]:
    """(m(full), m(empty), [m(circuit) ...]) of one sample: LogitDiff(answer, foil)."""
    metric = LogitDiff()
    prepared = prepare(vlm, sample, corruption, metric, False)
    stack = vlm.adapter.stacks[vlm.adapter.default_stack]
    aligned = align(
        prepared.pair.clean.segments(stack.sequence), prepared.pair.corrupt.segments(stack.sequence)
    ).pairs  # clean position -> corrupted position, paired by content
    clean_pad = prepared.pad("clean", stack.sequence)
    corrupt_pad = prepared.pad("corrupt", stack.sequence)
    wanted = [set(), *circuits]  # the empty circuit first
    values: list[float] = []
    full = None
    for start in range(0, len(wanted), ROWS):
        chunk = wanted[start : start + ROWS]
        rows = prepared.rows(["clean", "corrupt"] + ["clean"] * len(chunk))
        batch = stack_rows(vlm, rows, prepared.widths)
        edits = Edits()
        for offset, circuit in enumerate(chunk):
            for site, layer, position, head in space:
                if (site, layer, position, head) in circuit or position not in aligned:
                    continue
                edits.patch(layer, site).add(
                    2 + offset, position + clean_pad, 1, aligned[position] + corrupt_pad, head
                )
        out = run(
            vlm,
            stack,
            batch,
            edits,
            metric=metric,
            answer=prepared.answer,
            foil=prepared.foil,
            answer_slice=prepared.answer_slice(vlm),
        )
        full = float(out[0])
        values += [float(v) for v in out[2:]]
    return full, values[0], values[1:]


def faithfulness_curve(
    vlm: VLM,
    samples: Sequence[Sample],
    corruption: Corruption,
    space: Sequence[Key],
    ranking: Sequence[Key],
    sizes: Sequence[float] = SIZES,
) -> list[float]:
    """f at each circuit size (top-k of `ranking`), from the metric's means over `samples`."""
    ks = circuit_sizes(len(space), sizes)
    circuits = [set(ranking[:k]) for k in ks]
    full, empty, kept = [], [], []
    with torch.no_grad():
        for sample in samples:
            f, e, values = circuit_values(vlm, sample, corruption, space, circuits)
            full.append(f)
            empty.append(e)
            kept.append(values)
    mean_full, mean_empty = float(np.mean(full)), float(np.mean(empty))
    return [faithfulness(float(v), mean_empty, mean_full) for v in np.mean(kept, axis=0)]
