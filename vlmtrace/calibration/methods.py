"""Every localisation method vlmtrace offers, run on a planted organism and put in one form.

Each method answers in its own layout (`vt.patch`: site, window, layer, position, head;
`vt.knockout`: block, window, layer; `vt.attribute`: `vt.patch`'s layout with estimates;
`vt.edit`'s layer choice: a table of window x layer). `Scored` puts every answer in one form:
for every cell of the method's grid, its score per sample (the effect on P(answer): restoration
for "denoise", damage for "noise", the probability lost for a knockout), its normalised score
(the share of the clean-corrupt gap), whether it is planted (`vlmtrace.calibration.truth`),
and the components it covers (for faithfulness).

    where = [where_of(vlm, s) for s in samples]
    scored = from_patch(ds, "mlp", window=1, mechanism=m, where=where, route="image")
    scored.scores.shape     # (sample, cell)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import xarray as xr

from vlmtrace.data.sample import Sample
from vlmtrace.engine.corruptions import clean_side
from vlmtrace.engine.inputs import scored_answer_ids
from vlmtrace.engine.metrics import above_floor
from vlmtrace.engine.sites import window_layers
from vlmtrace.models.load import VLM
from vlmtrace.models.zoo.mechanism import Mechanism

from .truth import Key, Where, covered, is_planted_block, is_planted_cell

RETURNED = 0.5
"""A cell is in the circuit a method returns when it moves at least this share of the
clean-corrupt gap (restores it, or for a noising patch or a knockout, destroys it)."""


@dataclass
class Scored:
    """One method's answer on one organism, cell by cell."""

    method: str  # "trace", "heads", "knockout", "atp", "ig", "edit"
    site: str  # "mlp", "attn", "block", "attn_head"; "attn" for knockout
    corruption: str  # "str", "image_pair", "noise" ("" for knockout)
    direction: str  # "denoise" or "noise" ("" for knockout)
    window: int
    scores: np.ndarray  # [sample, cell]
    normalised: np.ndarray  # [sample, cell]
    truth: np.ndarray  # [sample, cell] bool
    covers: list[list[Key]]  # per cell, the components it covers (one layout for all samples)
    places: list[tuple[int, str]]  # per cell, (centre layer, segment of its positions) for reports
    returned: np.ndarray | None = None  # [sample, cell] bool; default normalised >= RETURNED
    extra: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        parts = [self.method, self.site, self.corruption, self.direction, f"w{self.window}"]
        return " ".join(p for p in parts if p)

    def returned_cells(self) -> np.ndarray:
        if self.returned is not None:
            return self.returned
        return np.nan_to_num(self.normalised, nan=-np.inf) >= RETURNED

    def component_scores(self) -> dict[Key, float]:
        """Each covered component's score: the best mean (over samples) of the cells covering it."""
        mean = np.nanmean(self.scores, axis=0) if len(self.scores) else np.zeros(len(self.covers))
        out: dict[Key, float] = {}
        for value, keys in zip(mean, self.covers, strict=True):
            if np.isnan(value):
                continue
            for key in keys:
                out[key] = max(out.get(key, -np.inf), float(value))
        return out

    def top_place(self) -> tuple[int, str]:
        """(centre layer, segment) of the cell with the best mean score over samples."""
        mean = np.nan_to_num(np.nanmean(self.scores, axis=0), nan=-np.inf)
        return self.places[int(np.argmax(mean))]


def one_layout(ds: xr.Dataset) -> np.ndarray:
    """The prompt index of each grid position, the same for every sample (else an error)."""
    index = ds["index"].values
    if not (index == index[:1]).all():
        raise ValueError("calibration needs every sample to share one prompt layout (the planted task does)")
    return index[0]


def where_of(vlm: VLM, sample: Sample) -> Where:
    """Named positions of one sample's clean prompt, from the engine's own segment labels."""
    answer = scored_answer_ids(vlm, sample.prompt, sample.answer, whole=False)
    return Where.of(sample, clean_side(vlm, sample, answer).prompt.labels)


def effect(ds: xr.Dataset, variable: str, direction: str) -> tuple[xr.DataArray, xr.DataArray]:
    """(effect, normalised effect): restoration when denoising, damage when noising.

    The normalised effect is NaN where |clean - corrupted| is below the metric's gap floor, as in
    `vt.normalised`: a share of a gap the corruption barely opened is noise, and a cell "returned"
    on it (normalised effect >= 0.5) would be a finding made of it."""
    gap = ds["clean"] - ds["corrupt"]
    moved = ds[variable] - ds["corrupt"] if direction == "denoise" else ds["clean"] - ds[variable]
    return moved, moved / gap.where(above_floor(ds))


def from_patch(
    ds: xr.Dataset,
    site: str,
    *,
    window: int,
    mechanism: Mechanism,
    where: Sequence[Where],
    route: str,
    method: str = "trace",
    corruption: str = "",
) -> Scored:
    """A `vt.patch` (or `vt.attribute`) result's `site` at one window size, scored cell by cell."""
    direction = str(ds.attrs["direction"])
    n_layers = len(ds["layer"])
    index = one_layout(ds)
    moved, normalised = effect(ds.sel(window=window), site, direction)
    heads = [int(h) for h in ds["head"].values] if "head" in moved.dims else [None]
    order = (
        ["sample", "layer", "head", "position"] if "head" in moved.dims else ["sample", "layer", "position"]
    )
    moved, normalised = moved.transpose(*order), normalised.transpose(*order)
    n = len(where)
    scores = moved.values.reshape(n, -1)
    covers, places, truth_columns = [], [], []
    for layer in ds["layer"].values:
        layers = window_layers(int(layer), window, n_layers)
        for head in heads:
            for p in index:
                covers.append(covered(site, layers, [int(p)], head))
                places.append((int(layer), where[0].label(int(p))))
                truth_columns.append(
                    [
                        is_planted_cell(
                            mechanism,
                            w,
                            site=site,
                            layers=layers,
                            positions=[int(p)],
                            head=head,
                            route_kind=route,
                            n_layers=n_layers,
                        )
                        for w in where
                    ]
                )
    return Scored(
        method=method,
        site=site,
        corruption=corruption,
        direction=direction,
        window=window,
        scores=scores,
        normalised=normalised.values.reshape(n, -1),
        truth=np.array(truth_columns).T,
        covers=covers,
        places=places,
    )


def from_knockout(
    ds: xr.Dataset,
    blocks: Mapping[str, tuple[Sequence[str], Sequence[str]]],
    *,
    window: int,
    mechanism: Mechanism,
    where: Sequence[Where],
) -> Scored:
    """A `vt.knockout` result at one window size: score = P(answer) lost by cutting the block."""
    n_layers = len(ds["layer"])
    lost = (ds["clean"] - ds["knockout"]).sel(window=window).transpose("sample", "block", "layer")
    relative = lost / ds["clean"]
    covers, places, truth_columns = [], [], []
    for block in ds["block"].values:
        keys_side, queries_side = blocks[str(block)]
        for layer in ds["layer"].values:
            layers = window_layers(int(layer), window, n_layers)
            queries = [p for name in queries_side for p in where[0].segments.get(name, ())]
            covers.append(covered("attn", layers, queries, None))
            places.append((int(layer), str(block)))
            truth_columns.append(
                [
                    is_planted_block(
                        mechanism,
                        w,
                        layers=layers,
                        keys=[p for name in keys_side for p in w.segments.get(name, ())],
                        queries=[p for name in queries_side for p in w.segments.get(name, ())],
                    )
                    for w in where
                ]
            )
    n = len(where)
    return Scored(
        method="knockout",
        site="attn",
        corruption="",
        direction="",
        window=window,
        scores=lost.values.reshape(n, -1),
        normalised=relative.values.reshape(n, -1),
        truth=np.array(truth_columns).T,
        covers=covers,
        places=places,
    )


def from_edit_choice(
    evidence: Mapping, chosen: Sequence[int], *, mechanism: Mechanism, where: Where, n_layers: int
) -> Scored:
    """`vt.edit(layers="traced")`'s choice: its trace table (mean MLP restoration of the span,
    window x layer) as the scores of one row, and the chosen window as the returned cell."""
    table = evidence["table"]
    span = where.segments["visual"]
    scores, covers, places, truth, returned = [], [], [], [], []
    planted = mechanism.assignment["city"].component.layer
    for window, values in table.items():
        for layer, value in zip(evidence["table_layers"], values, strict=True):
            layers = window_layers(int(layer), int(window), n_layers)
            scores.append(value)
            covers.append(covered("mlp", layers, span, None))
            places.append((int(layer), "visual"))
            truth.append(planted in layers and where.constraint in span)
            returned.append(tuple(layers) == tuple(chosen))
    row = np.array([scores], dtype=float)
    return Scored(
        method="edit",
        site="mlp",
        corruption="image_pair",
        direction="denoise",
        window=int(evidence["window"]),
        scores=row,
        normalised=row,  # the edit's own trace table; `returned` marks its choice
        truth=np.array([truth]),
        covers=covers,
        places=places,
        returned=np.array([returned]),
        # precision and recall of the chosen *layers* against the city MLP's
        extra={
            "chosen_layers": list(chosen),
            "precision": float(planted in chosen) / len(chosen),
            "recall": float(planted in chosen),
        },
    )


def oracle(like: Scored) -> Scored:
    """The planted ranking itself in `like`'s grid (planted cells 1, others 0): the best
    localisation, and the faithfulness any method can reach on this organism."""
    truth = like.truth.astype(float)
    return replace(
        like,
        method="planted",
        corruption="",
        direction="",
        scores=truth,
        normalised=truth,
        returned=None,
        extra={},
    )
