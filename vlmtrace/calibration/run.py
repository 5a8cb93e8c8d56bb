"""Run every method on the planted organisms and score each against the planted mechanism.

The seed papers disagree about what causal traces of VLMs show (Gaussian noise "localises late
layers", STR and image pairs "early and middle layers", attribution "misses effects"). On a
model whose mechanism is known by construction (`vlmtrace.models.zoo.planted`), each claim
becomes a number: does the method rank the planted components first (AUROC, precision and
recall of the cells it returns), and is the circuit it returns the mechanism (MIB's CPR and CMD)?

    ds = calibrate(["planted-llava"], Settings(samples=8))
    ds["auroc"].sel(organism="planted-llava").to_series()

Methods (one row each): causal traces of the `mlp`, `attn` and `block` sites under STR, the
semantic image pair and Gaussian image noise, denoising and noising, windows 1 and 3; head
patching (`attn_head`, every position); attention knockout of four blocks (image -> constraint,
constraint -> last, image -> last, question -> last); the attribution screens `atp` and `ig`
for the same sites, corruptions and directions (window 1); and the layers `vt.edit(...,
layers="traced")` chooses.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import xarray as xr

import vlmtrace as vt
from vlmtrace.data.planted import SPAN, make_planted_samples
from vlmtrace.data.sample import Sample
from vlmtrace.engine.editing import trace_for_edit, traced_layers
from vlmtrace.models.zoo.answering import next_token_probabilities
from vlmtrace.models.zoo.mechanism import Mechanism
from vlmtrace.models.zoo.organisms import organism_dir
from vlmtrace.models.zoo.planted import PLANTED
from vlmtrace.results.dataset import versions

from .faithfulness import faithfulness_curve, rank, space_of
from .methods import Scored, from_edit_choice, from_knockout, from_patch, oracle, where_of
from .scores import SIZES, auroc, curve_areas, precision_recall
from .truth import IMAGE_ROUTE, TEXT_ROUTE

PLANTED_NAMES = tuple(PLANTED)
TRACE_SITES = ("mlp", "attn", "block")
SCREEN_SITES = ("mlp", "attn", "attn_head")
METHODS = ("trace", "heads", "knockout", "atp", "ig", "edit")
CORRUPTIONS = ("str", "image_pair", "noise")
DIRECTIONS = ("denoise", "noise")
FAITHFULNESS_CORRUPTIONS = ("str", "image_pair")
"""Counterfactuals of the faithfulness runs (MIB ablates with in-distribution counterfactuals;
the curve is the mean of the two)."""
BLOCKS = {
    "image->visual": (("image",), (SPAN,)),
    "visual->last": ((SPAN,), ("last",)),
    "image->last": (("image",), ("last",)),
    "question->last": (("question",), ("last",)),
}


@dataclass(frozen=True)
class Settings:
    """What to run: samples, noise draws, windows, and which methods, corruptions, directions."""

    samples: int = 8
    noise_draws: int = 10
    windows: tuple[int, ...] = (1, 3)
    methods: tuple[str, ...] = METHODS
    corruptions: tuple[str, ...] = CORRUPTIONS
    directions: tuple[str, ...] = DIRECTIONS
    faithfulness: bool = True
    skip_image: bool = True
    """Patch text positions only (image tokens are the corrupted input, not a place to look for
    the mechanism; and 16 of every 25 positions, so skipping them makes a run ~3x cheaper)."""
    seed: int = 0

    def __post_init__(self) -> None:
        for name, chosen, allowed in (
            ("methods", self.methods, METHODS),
            ("corruptions", self.corruptions, CORRUPTIONS),
            ("directions", self.directions, DIRECTIONS),
        ):
            unknown = [c for c in chosen if c not in allowed]
            if unknown or not chosen:
                raise vt.UserError(f"{name} {list(chosen)}: choose one or more of {list(allowed)}.")
        if self.samples < 1 or self.noise_draws < 1:
            raise vt.UserError("samples and noise draws must be at least 1.")


def corruption_of(name: str, settings: Settings) -> tuple[object, str]:
    """(corruption, route of the variable it changes) for a corruption name."""
    if name == "str":
        return vt.SymmetricTokenReplacement(SPAN), TEXT_ROUTE
    if name == "image_pair":
        return vt.ImagePair(), IMAGE_ROUTE
    return vt.GaussianNoise("image", scale=3.0, samples=settings.noise_draws, seed=settings.seed), IMAGE_ROUTE


def with_foil(samples: Sequence[Sample], corruption: str) -> list[Sample]:
    """The samples with `foil` set to the answer their counterfactual gives (for LogitDiff)."""
    key = SPAN if corruption == "str" else "image_pair"
    return [s.with_(foil=s.meta["answers"][key]) for s in samples]


def answered(vlm: vt.VLM, samples: list[Sample]) -> list[Sample]:
    """The samples the organism answers right (top-1), as the papers keep only those."""
    probs = next_token_probabilities(vlm.model, vlm.processor, samples)
    ids = vlm.tokenizer.convert_tokens_to_ids([s.answer for s in samples])
    return [s for s, p, i in zip(samples, probs, ids, strict=True) if int(p.argmax()) == i]


def run_methods(
    vlm: vt.VLM, mechanism: Mechanism, samples: list[Sample], settings: Settings, log: Callable[[str], None]
) -> list[Scored]:
    """Every chosen method on `samples`, each in the `Scored` form."""
    where = [where_of(vlm, s) for s in samples]
    scored: list[Scored] = []
    quiet = {"progress": False}
    skip = ("image",) if settings.skip_image else ()
    for name in settings.corruptions:
        corruption, route = corruption_of(name, settings)
        cells = {"mechanism": mechanism, "where": where, "route": route, "corruption": name}
        for direction in settings.directions:
            if "trace" in settings.methods:
                grid = vt.Grid(sites=TRACE_SITES, windows=settings.windows, skip=skip)
                ds = vt.patch(vlm, samples, corruption=corruption, grid=grid, direction=direction, **quiet)
                for site in TRACE_SITES:
                    for window in settings.windows:
                        scored.append(from_patch(ds, site, window=window, **cells))
            if "heads" in settings.methods:
                grid = vt.Grid(sites=("attn_head",), skip=skip)
                ds = vt.patch(vlm, samples, corruption=corruption, grid=grid, direction=direction, **quiet)
                scored.append(from_patch(ds, "attn_head", window=1, method="heads", **cells))
            if not any(s.method == "planted" for s in scored):  # the reference rows, once
                scored += [oracle(s) for s in scored if s.window == 1 and s.site != "block"]
            for method in ("atp", "ig"):
                if method in settings.methods:
                    ds = vt.attribute(
                        vlm,
                        samples,
                        corruption=corruption,
                        grid=vt.Grid(sites=SCREEN_SITES, skip=skip),
                        direction=direction,
                        method=method,
                        **quiet,
                    )
                    for site in SCREEN_SITES:
                        scored.append(from_patch(ds, site, window=1, method=method, **cells))
            log(f"  {vlm.name}: {name} {direction} done")
    if "knockout" in settings.methods:
        ds = vt.knockout(vlm, samples, blocks=BLOCKS, windows=settings.windows, **quiet)
        for window in settings.windows:
            scored.append(from_knockout(ds, BLOCKS, window=window, mechanism=mechanism, where=where))
    if "edit" in settings.methods:
        n_layers = vlm.shape.layers[vlm.adapter.default_stack]
        trace = trace_for_edit(vlm, samples, span=SPAN, windows=settings.windows)
        chosen, evidence = traced_layers(trace, samples, span=SPAN, n_layers=n_layers)
        scored.append(
            from_edit_choice(evidence, chosen, mechanism=mechanism, where=where[0], n_layers=n_layers)
        )
    return scored


def _nanmean(values: Sequence[float]) -> float:
    values = np.asarray(values, dtype=float)
    return float(np.nanmean(values)) if not np.isnan(values).all() else float("nan")


def localisation(s: Scored) -> dict[str, float]:
    """Mean over samples of AUROC, and of precision and recall of the returned cells."""
    returned = s.returned_cells()
    aurocs, precisions, recalls = [], [], []
    for i in range(len(s.scores)):
        aurocs.append(auroc(s.scores[i], s.truth[i]))
        precision, recall = precision_recall(returned[i], s.truth[i])
        precisions.append(precision)
        recalls.append(recall)
    figures = {"auroc": _nanmean(aurocs), "precision": _nanmean(precisions), "recall": _nanmean(recalls)}
    figures.update({k: s.extra[k] for k in ("precision", "recall") if k in s.extra})
    return figures


def space_kind(s: Scored) -> str:
    """The component space a method's circuit lives in (knockouts cut attention)."""
    return s.site


def faithfulness_of(
    vlm: vt.VLM, s: Scored, samples: list[Sample], settings: Settings, *, positions: Sequence[int]
) -> list[float]:
    """The method's MIB faithfulness curve over every component at `positions`, averaged over
    the in-distribution counterfactuals."""
    config = vlm.model.config.get_text_config()
    space = space_of(
        space_kind(s), layers=config.num_hidden_layers, heads=config.num_attention_heads, positions=positions
    )
    ranking = rank(space, s.component_scores())
    curves = []
    for name in FAITHFULNESS_CORRUPTIONS:
        corruption, _ = corruption_of(name, settings)
        curves.append(faithfulness_curve(vlm, with_foil(samples, name), corruption, space, ranking))
    return list(np.mean(curves, axis=0))


def calibrate_organism(
    name: str, settings: Settings, log: Callable[[str], None] = lambda line: None
) -> tuple[list[Scored], list[dict[str, float]], dict]:
    """Scored methods, their figures and facts about the run, on one planted organism."""
    vlm = vt.load(name)
    mechanism = Mechanism.from_json(mechanism_path(name))
    drawn = make_planted_samples(settings.samples, seed=settings.seed)
    samples = answered(vlm, drawn)
    if not samples:
        raise vt.UserError(
            f"{name} answers none of {len(drawn)} held-out questions right: nothing to calibrate."
        )
    scored = run_methods(vlm, mechanism, samples, settings, log)
    where = where_of(vlm, samples[0])
    image = set(where.segments["image"]) if settings.skip_image else set()
    positions = [p for p in range(where.last + 1) if p not in image]
    figures = []
    for s in scored:
        row = localisation(s)
        if settings.faithfulness:
            curve = faithfulness_of(vlm, s, samples, settings, positions=positions)
            row["cpr"], row["cmd"] = curve_areas(SIZES, curve)
            row["curve"] = curve
        figures.append(row)
        log(line(name, s, row))
    facts = {"samples": len(samples), "dropped_wrong": len(drawn) - len(samples)}
    return scored, figures, facts


def mechanism_path(name: str) -> Path:
    """`mechanism.json` of a planted organism (shipped name or directory)."""
    path = (organism_dir(name) if name in PLANTED else Path(name)) / "mechanism.json"
    if not path.exists():
        raise vt.UserError(
            f"{name} has no planted mechanism ({path} is missing); calibrate runs on the planted "
            f"organisms ({', '.join(PLANTED_NAMES)}) or a directory `vlmtrace zoo train` wrote for one."
        )
    return path


def line(organism: str, s: Scored, row: dict[str, float]) -> str:
    """One printed line per method: localisation and faithfulness."""
    text = (
        f"{organism:14s} {s.name:38s} auroc={row['auroc']:.3f} P={row['precision']:.2f} R={row['recall']:.2f}"
    )
    if "cpr" in row:
        text += f" cpr={row['cpr']:.3f} cmd={row['cmd']:.3f}"
    return text


def calibrate(
    organisms: Sequence[str] | None = None,
    settings: Settings = Settings(),
    *,
    log: Callable[[str], None] = lambda line: None,
) -> xr.Dataset:
    """Scores of every method on every organism (default: all planted).

    Dims (organism, method_name[, size]).
    """
    organisms = list(organisms or PLANTED_NAMES)
    results = {}
    facts = {}
    for organism in organisms:
        scored, figures, facts[organism] = calibrate_organism(organism, settings, log)
        results[organism] = (scored, figures)
    names = list(dict.fromkeys(s.name for scored, _ in results.values() for s in scored))
    described = {s.name: s for scored, _ in results.values() for s in scored}
    shape = (len(organisms), len(names))
    data = {k: np.full(shape, np.nan) for k in ("auroc", "precision", "recall", "cpr", "cmd")}
    planted = np.zeros(shape, dtype=np.int64)
    top_layer = np.full(shape, -1, dtype=np.int64)
    top_segment = np.full(shape, "", dtype=object)
    curve = np.full((*shape, len(SIZES)), np.nan)
    for o, organism in enumerate(organisms):
        scored, figures = results[organism]
        for s, row in zip(scored, figures, strict=True):
            m = names.index(s.name)
            for k in data:
                data[k][o, m] = row.get(k, np.nan)
            planted[o, m] = int(s.truth[0].sum())
            top_layer[o, m], top_segment[o, m] = s.top_place()
            if "curve" in row:
                curve[o, m] = row["curve"]
    coords = {
        "organism": list(organisms),
        "method_name": names,  # not "method": that is a keyword of Dataset.sel
        "family": ("method_name", [described[n].method for n in names]),
        "site": ("method_name", [described[n].site for n in names]),
        "corruption": ("method_name", [described[n].corruption for n in names]),
        "direction": ("method_name", [described[n].direction for n in names]),
        "window": ("method_name", [described[n].window for n in names]),
        "size": list(SIZES),
    }
    ds = xr.Dataset(
        {
            **{k: (("organism", "method_name"), v) for k, v in data.items()},
            "planted_cells": (("organism", "method_name"), planted),
            "top_layer": (("organism", "method_name"), top_layer),
            "top_segment": (("organism", "method_name"), top_segment),
            "faithfulness": (("organism", "method_name", "size"), curve),
        },
        coords=coords,
    )
    for k, (description, units) in DESCRIPTIONS.items():
        ds[k].attrs.update(description=description, units=units)
    ds.attrs.update(
        experiment="calibration",
        settings=json.dumps(asdict(settings)),
        samples=json.dumps(facts),
        **{f"version_{k}": v for k, v in versions().items()},
    )
    return ds


DESCRIPTIONS = {
    "auroc": ("AUROC of the method's cell scores detecting the planted cells, mean over samples", "1"),
    "precision": (
        "share of returned cells (normalised effect >= 0.5) that are planted, mean over samples",
        "1",
    ),
    "recall": ("share of planted cells returned, mean over samples", "1"),
    "cpr": ("MIB CPR: area under the faithfulness curve of the method's ranking (higher is better)", "1"),
    "cmd": ("MIB CMD: area between the faithfulness curve and 1 (lower is better)", "1"),
    "planted_cells": ("planted cells in the method's grid (first sample)", "cells"),
    "top_layer": ("centre layer of the cell with the best mean score", "layer"),
    "top_segment": ("segment (or knockout block) of the cell with the best mean score", "name"),
    "faithfulness": (
        "(m(circuit) - m(empty)) / (m(full) - m(empty)), logit difference, per circuit size",
        "1",
    ),
}
