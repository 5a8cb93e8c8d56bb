"""MultEdit: locate a fact with a causal trace, edit it there, and measure what else moved.

Basu et al., "Understanding Information Storage and Transfer in Multi-modal Large Language
Models" (2024), MultEdit; ROME (Meng et al., 2022) and MEMIT (Meng et al., 2023).

Hypothesis. If the trace finds where a fact is retrieved, a closed-form edit of the MLP output
projection at the traced layers changes that fact (efficacy), for other pictures and phrasings
of the same entity (generalisation), and nothing else (specificity); an edit at a layer the
trace did not select does worse.

Trace. Corrupt with the semantic image pair (the picture, not the phrase, selects the entity),
restore the MLP output at the constraint ("the red shape") and at the last token, windows 1
and 3 (`vlmtrace.engine.editing.trace_for_edit`); `layers="traced"` takes the strongest window.

Edit. `vt.edit` (ROME's v*, MEMIT's spreading and covariance) with two key positions: the
constraint's last token (Basu et al., ROME) and the last token, where this organism's trace
sits. Tasks: insert a city the entity never had; correct a deliberately wrong answer (an
inserted wrong city, edited back). Every edit is compared with one at an untraced layer.

Metric. Greedy-answer hit rates with 95% bootstrap intervals: efficacy (edited question),
generalisation (the entity in held-out scenes, selected by the other attribute, named in
text), specificity (other entities' facts and visual questions about scenes without edited
entities, disjoint by construction: `vlmtrace.engine.editing.check_disjoint`), and KL of the latter.
After the edit the trace is run again on the new answers: the effect map before and after.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import xarray as xr

import vlmtrace as vt
from vlmtrace.data.mascots import CITIES, YEARS, city_in_year, mascot_city
from vlmtrace.data.scenes import ask, make_samples
from vlmtrace.engine.editing import edit, evaluate, trace_for_edit, traced_layers
from vlmtrace.options import Options
from vlmtrace.presentation.progress import sweeping
from vlmtrace.recipes import Needs
from vlmtrace.results.dataset import provenance

DESCRIPTION = (
    "Basu et al. MultEdit: edit facts at the traced MLP layers; efficacy, generalisation, "
    "specificity vs an untraced layer"
)
DEFAULT_MODEL = "shapes-llava"
ORGANISMS = ("shapes-llava",)
NEEDS = Needs(image_pair=True)
KEYS = ("visual", "last")  # where the key is read: the constraint's last token, the last token
SETTINGS = dict(preserve_weight=100.0)
WINDOWS = (1,)  # compare single layers: a wider window always restores more


def default_samples(vlm: vt.VLM, n: int, seed: int) -> list[vt.Sample]:
    """Held-out fact questions about `n` distinct entities (at most 20 exist)."""
    samples, seen = [], set()
    for sample in make_samples("fact", 40 * n, seed=seed):
        if sample.meta["entity"] not in seen:
            seen.add(sample.meta["entity"])
            samples.append(sample)
    return samples[:n]


def new_city(entity: tuple[str, str], rng: random.Random) -> str:
    """A city the entity never had: not its mascot city, not the city of any year."""
    had = {mascot_city(entity)} | {city_in_year(entity, year) for year in YEARS}
    return rng.choice([c for c in CITIES if c not in had])


def probes(entity: tuple[str, str], answer: str, *, seed: int, n: int = 2) -> list[vt.Sample]:
    """Generalisation: the entity in held-out scenes selected by the same / other attribute, or named."""
    rng, out = random.Random(f"multimodal_edit/{entity}/{seed}"), []
    for template, by, kind in [
        ("fact", "colour", "scene"),
        ("fact", "kind", "selector"),
        ("named-fact", None, "named"),
    ]:
        found = 0
        while found < n:
            q = ask(rng, template, split="test")
            if q.meta["entity"] == entity and (by is None or q.meta["selected_by"] == by):
                sample = q.to_sample(f"{kind}-{entity[0]}-{entity[1]}-{found}")
                out.append(sample.with_(answer=answer, meta={**sample.meta, "probe": kind}))
                found += 1
    return out


def unrelated(edited: set, n: int, *, seed: int) -> list[vt.Sample]:
    """Specificity: fact questions about other entities and visual questions, no edited entity in view."""
    out = []
    for family, probe in (("fact", "other entity"), ("visual", "visual question")):
        for s in make_samples(family, 6 * n, seed=seed + 1):
            if not any((shape["colour"], shape["kind"]) in edited for shape in s.meta["scene"]):
                out.append(s.with_(meta={**s.meta, "probe": probe}))
    return out


def run(vlm: vt.VLM, samples: list[vt.Sample], *, seed: int = 0, options: Options = Options()) -> xr.Dataset:
    rng = random.Random(seed)
    n_layers = vlm.shape.layers[vlm.adapter.default_stack]
    entities = {s.meta["entity"] for s in samples}
    inserts = [(s, new_city(s.meta["entity"], rng)) for s in samples]
    preserve = [
        s for f in ("fact", "visual", "multi") for s in make_samples(f, 40, seed=seed + 7, split="train")
    ]
    specificity = unrelated(entities, len(samples), seed=seed)
    with sweeping("multimodal_edit: trace the MLP at the constraint and the last token"):
        trace = trace_for_edit(vlm, samples, span="visual", windows=WINDOWS, segments=KEYS)
    results, provenance = {}, {}
    for key in KEYS:
        traced, evidence = traced_layers(trace, samples, span=key, n_layers=n_layers)
        untraced = min(set(range(n_layers)) - set(traced), key=lambda x: _effect(evidence, x))
        for layers, label in ((traced, "traced"), ((untraced,), "untraced")):
            insert = edit(vlm, inserts, layers=layers, preserve=preserve, span=key, **SETTINGS)
            insert.attrs.update(layers_chosen=label, evidence=evidence)
            gen = [p for s, city in inserts for p in probes(s.meta["entity"], city, seed=seed)]
            efficacy = [s.with_(answer=city) for s, city in inserts]
            results[f"insert/{key}/{label}"] = evaluate(
                vlm, insert, efficacy=efficacy, generalisation=gen, specificity=specificity, seed=seed
            )
            with insert:  # the deliberately wrong answers, corrected by a second edit
                fix = edit(vlm, [(s, s.answer) for s in samples], layers=layers,
                           preserve=preserve, span=key, **SETTINGS)  # fmt: skip
                gen = [p for s in samples for p in probes(s.meta["entity"], s.answer, seed=seed)]
                results[f"correct/{key}/{label}"] = evaluate(
                    vlm, fix, efficacy=samples, generalisation=gen, specificity=specificity, seed=seed
                )
            provenance[f"{key}/{label}"] = {
                k: insert.attrs[k] for k in ("layers", "layers_chosen", "evidence")
            }
            if label == "traced" and key == "last":
                with insert, sweeping("multimodal_edit: trace again after the edit"):
                    after = trace_for_edit(vlm, efficacy, span="visual", windows=WINDOWS, segments=KEYS)
    return _assemble(results, trace, after, provenance, vlm)


def _effect(evidence: dict, layer: int) -> float:
    """The traced indirect effect of one layer (smallest window), from an edit's evidence."""
    table = evidence["table"][min(evidence["table"], key=int)]
    return table[evidence["table_layers"].index(layer)]


def _assemble(results: dict, before: xr.Dataset, after: xr.Dataset, edits: dict, vlm: vt.VLM) -> xr.Dataset:
    parts = []
    for ds in results.values():
        ds = ds.reset_coords("target")
        ds["target"].attrs.update(description="the answer an item should get", units="text")
        ds.attrs = {}  # the edits' provenance is written once, below
        parts.append(ds)
    ds = xr.concat(parts, dim="condition", coords="minimal", compat="override")
    ds = ds.assign_coords(condition=np.array(list(results), dtype=object))
    for name, trace in (("trace_before", before), ("trace_after", after)):
        effect = (trace["mlp"] - trace["corrupt"]).transpose("sample", "window", "layer", "segment")
        ds[name] = (("trace_sample", "window", "layer", "segment"), effect.values)
        ds[name].attrs.update(
            description=f"MLP indirect effect (image pair corruption), {name.split('_')[1]} the edit "
            "(insert/last/traced), on the answer the model should give",
            units="probability (0 to 1)",
        )
    ds = ds.assign_coords(
        trace_sample=before["sample"].values, window=before["window"].values,
        layer=before["layer"].values, segment=np.array(before["segment"].values, dtype=object),
    )  # fmt: skip
    attrs = provenance(vlm, recipe="multimodal_edit", experiment="edit", edits=edits)
    return ds.assign_attrs(attrs)


def figures(ds: xr.Dataset, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3), sharey=True)
    maps = [
        ds[n].isel(window=0).mean("trace_sample").transpose("segment", "layer")
        for n in ("trace_before", "trace_after")
    ]
    for ax, name, data in zip(
        axes, ("MLP effect before (true answer)", "after (inserted answer)"), maps, strict=True
    ):
        image = ax.imshow(data.values, vmin=-1, vmax=1, cmap="RdBu_r", aspect="auto")
        ax.set(title=name, xlabel="layer", xticks=range(data.sizes["layer"]))
        ax.set_yticks(range(data.sizes["segment"]), [str(x) for x in data["segment"].values])
    fig.colorbar(image, ax=axes)
    paths = [out_dir / "trace_before_after.png"]
    fig.savefig(paths[0], dpi=120, bbox_inches="tight")
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(10, 3.5))
    scores = ds["score"].sel(model="edited")
    width = 0.8 / scores.sizes["condition"]
    for i, condition in enumerate(scores["condition"].values):
        mean = scores.sel(condition=condition).values
        low = ds["score_low"].sel(model="edited", condition=condition).values
        high = ds["score_high"].sel(model="edited", condition=condition).values
        x = np.arange(len(mean)) + i * width
        ax.bar(x, mean, width, yerr=[mean - low, high - mean], label=str(condition))
    ax.set_xticks(
        np.arange(scores.sizes["metric"]) + 0.4 - width / 2, [str(m) for m in scores["metric"].values]
    )
    ax.set(ylim=(0, 1.05), ylabel="hit rate (95% CI)", title="edited model, by condition")
    ax.legend(fontsize=7, ncol=2, bbox_to_anchor=(1, 1), loc="upper left")
    paths.append(out_dir / "scores.png")
    fig.savefig(paths[1], dpi=120, bbox_inches="tight")
    plt.close(fig)
    return paths


def summary(ds: xr.Dataset) -> str:
    edits = json.loads(ds.attrs["edits"])
    lines = ["hit rates before -> after the edit [95% CI] (correct: before = with the wrong insert applied)"]
    for condition in ds["condition"].values:
        task, key, label = str(condition).split("/")
        s, before = ds.sel(condition=condition, model="edited"), ds.sel(condition=condition, model="unedited")
        cells = ", ".join(
            f"{m} {float(before['score'].sel(metric=m)):.2f} -> {float(s['score'].sel(metric=m)):.2f} "
            f"[{float(s['score_low'].sel(metric=m)):.2f}, {float(s['score_high'].sel(metric=m)):.2f}]"
            for m in s["metric"].values
        )
        layers = edits[f"{key}/{label}"]["layers"]
        lines.append(
            f"{task:<7} key {key:<6} {label:<8} layers {layers}: {cells}, KL {float(s['specificity_kl']):.3f}"
        )
    return "\n".join(lines)
