"""Locate, then edit: change a fact at the traced MLP layer, over many contexts, and measure it.

Basu et al., "Understanding Information Storage and Transfer in Multi-modal Large Language
Models" (2024), MultEdit; ROME (Meng et al., 2022) and MEMIT (Meng et al., 2023); the probes of
MMEdit (Cheng et al., 2023) and VLKEB (Huang et al., 2024).

Hypothesis. If the trace finds where a fact is retrieved, a closed-form edit of the MLP output
projection at the traced layer changes that fact for the edited question (reliability), for
the same entity in other pictures and phrasings (generality), and nothing else (locality); an
edit keyed on many contexts of the entity generalises where a single-key edit (MultEdit)
memorises one input; an edit at a layer the trace did not select does worse.

Trace. Corrupt with the semantic image pair (the picture, not the phrase, selects the entity),
restore the MLP output at the constraint ("the red shape") and at the last token, one layer at
a time (`vlmtrace.engine.editing.trace_for_edit`); each key position takes its strongest layer.

Edit. For 8 entities, insert a city the entity never had. `method="memit"`: keys and one value
over the request, 8 other training-split pictures of the entity and 4 paraphrases (the other
selector, the entity named in text), KL on the entity's visual questions
(`vlmtrace.data.scene_edits`). `method="multedit"`: Basu et al.'s single key and ridge step.
Both at both key positions; MEMIT at the last token also on the request alone (no contexts: the
ablation), at the layer of least effect, and to correct: with a wrong city inserted, edit the
true one back.

Metric. Token accuracy with 95% bootstrap intervals, on held-out scenes only: reliability, text
generality (the request's picture asked the other two ways), image generality (other pictures),
text locality (other entities named) and image locality (pictures with no edited entity), pooled
as efficacy, generalisation and specificity, and KL on the locality items. After the MEMIT edit
at the last token the trace is run again on the new answers: the effect map before and after.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import xarray as xr

import vlmtrace as vt
from vlmtrace.data.scene_edits import locality, new_answer, scene_edit_case
from vlmtrace.data.scenes import make_samples
from vlmtrace.engine.editing import (
    METHODS,
    SINGLE,
    Contexts,
    edit,
    effect_at,
    evaluate,
    measure_key_covariance,
    probes_of,
    trace_for_edit,
    traced_layers,
)
from vlmtrace.options import Options
from vlmtrace.presentation import plots
from vlmtrace.presentation.progress import sweeping
from vlmtrace.recipes import Needs
from vlmtrace.results.dataset import provenance

DESCRIPTION = (
    "Basu et al. MultEdit vs MEMIT over contexts: edit facts at the traced MLP layer; reliability, "
    "generality, locality"
)
DEFAULT_MODEL = "shapes-llava"
ORGANISMS = ("shapes-llava", "shapes-qwen")
NEEDS = Needs(image_pair=True)
READS_DATA = False
OWN_DATA_ONLY_BECAUSE = (
    "each edit case needs the scene's entity, other pictures of it and paraphrases; for edit files "
    "(MMEdit, VLKEB) use vlmtrace.data.loaders.load_edit_records with vt.edit (README, Editing)"
)
KEYS = ("visual", "last")  # where the key is read: the constraint's last token, the last token
CONTEXTS = Contexts(images=8, paraphrases=4)
WINDOWS = (1,)  # compare single layers: a wider window always restores more


def default_samples(vlm: vt.VLM, n: int, seed: int) -> list[vt.Sample]:
    """Held-out fact questions about `n` distinct entities (at most 20 exist)."""
    samples, seen = [], set()
    for sample in make_samples("fact", 40 * n, seed=seed):
        if sample.meta["entity"] not in seen:
            seen.add(sample.meta["entity"])
            samples.append(sample)
    return samples[:n]


def ordinary(seed: int, n: int = 150) -> list[vt.Sample]:
    """The keys MEMIT preserves: every token of 4n training-split questions (fact, visual, multi,
    named), the organisms' stand-in for MEMIT's Wikipedia statistics."""
    families = ("fact", "visual", "multi", "named")
    return [s for f in families for s in make_samples(f, n, seed=seed + 7, split="train")]


def run(vlm: vt.VLM, samples: list[vt.Sample], *, seed: int = 0, options: Options = Options()) -> xr.Dataset:
    rng = random.Random(seed)
    n_layers = vlm.shape.layers[vlm.adapter.default_stack]
    inserts = [scene_edit_case(s, new_answer(s.meta["entity"], rng), seed=seed) for s in samples]
    corrects = [scene_edit_case(s, s.answer, seed=seed) for s in samples]
    text_locality, image_locality = locality({s.meta["entity"] for s in samples}, len(samples), seed=seed)
    local = {"text_locality": text_locality, "image_locality": image_locality}
    preserve = ordinary(seed)
    with sweeping("multimodal_edit: trace the MLP at the constraint and the last token"):
        before = trace_for_edit(vlm, samples, span="visual", windows=WINDOWS, segments=KEYS)
    plan = {}  # key -> (its trace evidence, the edits to compute there)
    for key in KEYS:
        traced, evidence = traced_layers(before, samples, span=key, n_layers=n_layers)
        conditions = [(method, traced, "traced") for method in METHODS]
        if key == "last":  # MEMIT on the request alone (the ablation of contexts), and at the layer
            least = min(set(range(n_layers)) - set(traced), key=lambda x: effect_at(evidence, x))
            conditions += [("memit", traced, "single"), ("memit", (least,), "untraced")]
        plan[key] = (evidence, conditions)
    # MEMIT's statistics of ordinary keys, measured once on the unedited model for every layer a
    # MEMIT edit below uses (each edit would otherwise measure its own)
    memit_layers = sorted(
        {
            x
            for _, conditions in plan.values()
            for method, layers, _ in conditions
            if method == "memit"
            for x in layers
        }
    )
    covariance = measure_key_covariance(vlm, preserve, memit_layers)
    results, edits = {}, {}
    for key, (evidence, conditions) in plan.items():
        for method, layers, label in conditions:
            settings = dict(method=method, layers=layers, span=key)
            if method == "memit":
                settings["covariance"] = covariance
                settings["contexts"] = SINGLE if label == "single" else CONTEXTS
            insert = edit(vlm, [c.request for c in inserts], **settings)
            results[f"insert/{method}/{key}/{label}"] = evaluate(
                vlm, insert, **probes_of(inserts), **local, seed=seed
            )
            edits[f"{method}/{key}/{label}"] = {
                "layers": list(layers), "evidence": evidence, "contexts": insert.attr("contexts"),
                "hyperparameters": insert.attr("hyperparameters"),
            }  # fmt: skip
            if key == "last" and label == "traced" and method == "memit":
                with insert:  # the deliberately wrong answers, corrected by a second edit (of the
                    # edited model: its keys' statistics are measured again, on its weights)
                    settings = {**settings, "covariance": None, "preserve": preserve}
                    fix = edit(vlm, [c.request for c in corrects], **settings)
                    results[f"correct/{method}/{key}/{label}"] = evaluate(
                        vlm, fix, **probes_of(corrects), **local, seed=seed
                    )
                with insert, sweeping("multimodal_edit: trace again after the edit"):
                    efficacy = [c.probes["reliability"][0] for c in inserts]
                    after = trace_for_edit(vlm, efficacy, span="visual", windows=WINDOWS, segments=KEYS)
    return _assemble(results, before, after, edits, vlm)


def _assemble(results: dict, before: xr.Dataset, after: xr.Dataset, edits: dict, vlm: vt.VLM) -> xr.Dataset:
    parts = []
    for ds in results.values():
        ds = ds.reset_coords("target")
        ds["target"].attrs.update(description="the answer an item should get", units="text")
        ds.attrs = {}  # the edits' provenance is written once, below
        parts.append(ds)
    ds = xr.concat(parts, dim="condition", coords="minimal", compat="override", join="outer")
    ds = ds.assign_coords(condition=np.array(list(results), dtype=object))
    for name, trace in (("trace_before", before), ("trace_after", after)):
        effect = (trace["mlp"] - trace["corrupt"]).transpose("sample", "window", "layer", "segment")
        ds[name] = (("trace_sample", "window", "layer", "segment"), effect.values)
        ds[name].attrs.update(
            description=f"MLP indirect effect (image pair corruption), {name.split('_')[1]} the edit "
            "(insert/memit/last/traced), on the answer the model should give",
            units="probability (0 to 1)",
        )
        ds[f"{name}_gap"] = (("trace_sample",), (trace["clean"] - trace["corrupt"]).values)
        ds[f"{name}_gap"].attrs.update(
            description=f"clean minus corrupted P(answer) of each traced sample, {name.split('_')[1]} the "
            "edit: the most an MLP restoration can move it (the figure's colour range)",
            units="probability (0 to 1)",
        )
    ds = ds.assign_coords(
        trace_sample=before["sample"].values, window=before["window"].values,
        layer=before["layer"].values, segment=np.array(before["segment"].values, dtype=object),
    )  # fmt: skip
    attrs = provenance(vlm, recipe="multimodal_edit", experiment="edit", edits=edits)
    return ds.assign_attrs(attrs)


def figures(ds: xr.Dataset, out_dir: Path) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    traces = {  # panel title -> variable
        "before the edit (true answer)": "trace_before",
        "after the MEMIT edit (inserted answer)": "trace_after",
    }
    maps = xr.concat(
        [ds[n].isel(window=0).mean("trace_sample") for n in traces.values()],
        dim=xr.DataArray(list(traces), dims="trace"),
    )
    gaps = [ds[f"{n}_gap"].values for n in traces.values() if f"{n}_gap" in ds]  # older stores lack them
    total = float(np.nanmean(np.abs(np.concatenate(gaps)))) if gaps else None
    window = int(ds["window"].values[0])
    paths = [
        plots.window_panels(
            maps,
            by="trace",
            label="MLP indirect effect on P(answer)",
            total=total,
            floor=vt.Probability.gap_floor,
            title=f"MLP restored at the traced segments (window {window}), before and after the edit",
            path=out_dir / "trace_before_after.png",
        )
    ]
    shown = [m for m in ("efficacy", "generalisation", "specificity") if m in ds["metric"].values]
    edited = {"model": "edited", "metric": shown}
    paths.append(
        plots.score_bars(
            ds["score"].sel(edited),
            ds["score_low"].sel(edited),
            ds["score_high"].sel(edited),
            label="token accuracy (95% CI)",
            title="edited model, by condition",
            path=out_dir / "scores.png",
        )
    )
    return paths


def summary(ds: xr.Dataset) -> str:
    edits = json.loads(ds.attrs["edits"])
    lines = ["scores before -> after the edit [95% CI] (correct: before = with the wrong insert applied)"]
    for condition in ds["condition"].values:
        task, method, key, label = str(condition).split("/")
        s, before = ds.sel(condition=condition, model="edited"), ds.sel(condition=condition, model="unedited")
        cells = ", ".join(
            f"{m} {float(before['score'].sel(metric=m)):.2f} -> {float(s['score'].sel(metric=m)):.2f} "
            f"[{float(s['score_low'].sel(metric=m)):.2f}, {float(s['score_high'].sel(metric=m)):.2f}]"
            for m in ("efficacy", "generalisation", "specificity")
        )
        layers = edits[f"{method}/{key}/{label}"]["layers"]
        kl = float(s["locality_kl"])
        lines.append(f"{task:<7} {method:<8} key {key:<6} {label:<8} layers {layers}: {cells}, KL {kl:.3f}")
    return "\n".join(lines)
