"""Which layers to edit: the ones a causal trace of the MLP says retrieve the fact.

Locate, then edit. `trace_for_edit` restores each layer's MLP output at the key position (a
constraint span's tokens, or the last token) from the clean run into a corrupted one, windows of
layers at a time (`vt.patch`); `traced_layers` takes the (window, layer) of largest mean indirect
effect and returns the layers of that window, with the evidence (the whole effect table, the
chosen cell's bootstrap interval, the corruption, metric and direction) for the edit's
provenance.

    trace = trace_for_edit(vlm, samples, span="last", windows=(1, 3))
    layers, evidence = traced_layers(trace, samples, span="last", n_layers=6)

The corruption is the data's own counterfactual: the samples' semantic image pairs when all have
one, else the key span's replacement phrase when all have one, else 3σ Gaussian noise on the image
(ROME's, on the picture); `corruption=` overrides it. Any `vt.patch` result with site "mlp" at the
key segment can be passed instead (`trace=`); its metric and direction are read from its attrs so
that "largest effect" means "restores most of the clean answer" under KL and noising too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import xarray as xr

from ...data.sample import Sample
from ...models.load import VLM
from ...results.stats import bootstrap_mean, by_segment
from ..corruptions import Corruption, GaussianNoise, ImagePair, ReplaceSpan
from ..positions import LAST
from ..sites import Grid, window_layers
from .parts import EditError


def default_corruption(samples: Sequence[Sample], span: str) -> Corruption:
    """The samples' own counterfactual: image pairs, else the span's replacement, else image noise."""
    if all(s.image_pair is not None for s in samples):
        return ImagePair()
    replaceable = [span] if span != LAST else []
    replaceable += sorted({name for s in samples for name in s.replacements} - {span})
    for name in replaceable:
        if all(name in s.replacements for s in samples):
            return ReplaceSpan(name)
    if all(s.image is not None for s in samples):
        return GaussianNoise("image", scale=3.0, samples=4, seed=0)
    raise EditError(
        "layers='traced' needs a corruption the samples support: give them image pairs or a "
        "replacement phrase, or pass trace_corruption= (any vt corruption), or pass layers=(...)."
    )


def trace_for_edit(
    vlm: VLM,
    samples: Sequence[Sample],
    *,
    span: str,
    windows: Sequence[int] = (1, 3),
    segments: Sequence[str] | None = None,
    corruption: Corruption | None = None,
) -> xr.Dataset:
    """The MLP trace `layers="traced"` reads: restore the MLP output at the key segment(s)."""
    from ..sweep import patch

    n = vlm.shape.layers[vlm.adapter.default_stack]
    fitting = tuple(w for w in windows if w <= n)
    if not fitting:
        raise EditError(f"trace windows {tuple(windows)} are all wider than the model's {n} layers.")
    grid = Grid(sites=("mlp",), windows=fitting, segments=tuple(segments or (span,)), positions="segments")
    chosen = corruption if corruption is not None else default_corruption(samples, span)
    return patch(vlm, list(samples), corruption=chosen, grid=grid, progress=False, recipe="edit")


def indirect_effect(trace: xr.Dataset) -> xr.DataArray:
    """How much restoring the MLP moves the run toward the clean answer, whatever the metric.

    Denoising: mlp - corrupt (higher is better), or corrupt - mlp under KL to the clean run.
    Noising (clean run, MLP corrupted): clean - mlp, or mlp - clean under KL.
    """
    lower_is_better = str(trace.attrs.get("metric", "")).lower().startswith("kl")
    if str(trace.attrs.get("direction", "denoise")) == "noise":
        effect = trace["clean"] - trace["mlp"]
    else:
        effect = trace["mlp"] - trace["corrupt"]
    return -effect if lower_is_better else effect


def traced_layers(
    trace: xr.Dataset,
    samples: Sequence[Sample],
    *,
    span: str,
    n_layers: int,
    windows: Sequence[int] | None = None,
) -> tuple[tuple[int, ...], dict[str, Any]]:
    """The layers of the (window, centre) of largest mean MLP indirect effect at `span`, and the
    evidence. `windows` restricts the choice to some window sizes (MultEdit edits one layer: (1,))."""
    if "mlp" not in trace:
        raise EditError(
            f"layers='traced' needs a trace with site 'mlp'; this one has {list(trace.data_vars)}. Run "
            f"vt.patch(..., grid=vt.Grid(sites=('mlp',), segments=({span!r},), positions='segments'))."
        )
    ids = [s.id for s in samples]
    missing = [i for i in ids if i not in set(trace["sample"].values.tolist())]
    if missing:
        raise EditError(
            f"the trace does not hold the edited samples {missing[:3]}: trace the same samples you edit "
            "(or leave trace=None to compute it)."
        )
    check_gap(trace.sel(sample=ids))
    effect = indirect_effect(trace).sel(sample=ids)
    if "position" in effect.dims:
        effect = by_segment(effect)
    if span not in effect["segment"].values:
        raise EditError(f"the trace has no segment {span!r} (it has {list(effect['segment'].values)}).")
    effect = effect.sel(segment=span)
    if windows is not None:
        kept = [w for w in effect["window"].values if int(w) in set(windows)]
        if not kept:
            raise EditError(
                f"the trace has windows {effect['window'].values.tolist()}, none of {tuple(windows)}; "
                f"trace with windows={tuple(windows)}."
            )
        effect = effect.sel(window=kept)
    mean = effect.mean("sample").transpose("window", "layer")
    if np.all(np.isnan(mean.values)):
        raise EditError(f"the trace has no MLP effect at {span!r} (all NaN); trace another segment.")
    w, c = np.unravel_index(int(np.nanargmax(mean.values)), mean.shape)
    window, centre = int(mean["window"][w]), int(mean["layer"][c])
    interval = bootstrap_mean(effect.sel(window=window, layer=centre))
    evidence = {
        "site": "mlp",
        "segment": span,
        "corruption": trace.attrs.get("corruption", ""),
        "metric": trace.attrs.get("metric", ""),
        "direction": trace.attrs.get("direction", "denoise"),
        "samples": len(ids),
        "window": window,
        "centre": centre,
        "indirect_effect": float(interval["mean"]),
        "low": float(interval["low"]),
        "high": float(interval["high"]),
        "table": {
            str(int(x)): [round(float(v), 4) for v in mean.sel(window=x).values] for x in mean["window"]
        },
        "table_layers": [int(x) for x in mean["layer"].values],
    }
    return window_layers(centre, window, n_layers), evidence


def check_gap(trace: xr.Dataset) -> None:
    """Refuse a trace whose corruption barely changed the output (mean |clean - corrupted| below
    the metric's `gap_floor`): its largest MLP effect is noise, and editing the layers it points
    at would be editing at random, with a trace in the edit's provenance that seems to justify it."""
    from ..metrics import mean_gap

    gap, floor, material = mean_gap(trace)
    if not material:
        raise EditError(
            f"layers='traced': the trace's mean |clean - corrupted| is {gap:.2g}, below "
            f"{trace.attrs.get('metric', 'its metric')}'s gap floor {floor:g}, so it locates nothing (does "
            "the model give the requests' answers?). Trace with a corruption that changes the answer "
            "(trace_corruption=), or pass layers=(...)."
        )


def effect_at(evidence: dict[str, Any], layer: int) -> float:
    """The traced indirect effect of one layer (the smallest window), from an edit's evidence."""
    table = evidence["table"][min(evidence["table"], key=int)]
    return table[evidence["table_layers"].index(layer)]
