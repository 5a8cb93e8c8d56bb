"""Measure an edit the way the editing literature does, side by side with the unedited model.

MMEdit (Cheng et al., 2023) and VLKEB (Huang et al., 2024) score a multimodal edit by five
probes, plus portability where the data has it:

- reliability: the edited question and image give the new answer;
- text generality: a rephrased question, same image;
- image generality: the same question about another image of the same entity;
- portability: a question whose answer follows from the edited fact (VLKEB's 1-4 hops);
- text locality, image locality: unrelated text-only and image questions, whose predictions
  must stay what the unedited model predicted.

Answers are teacher-forced; an item's `correct` is the fraction of its answer tokens whose
argmax is the target (reliability, generality, portability) or the unedited model's argmax
(locality), MMEdit's token accuracy. For one-token answers it is 1 or 0. Scores are means over
items with a seeded bootstrap interval, per probe and pooled the way edit papers summarise
them: efficacy (reliability), generalisation (text and image generality) and specificity (text
and image locality). KL(unedited || edited) at the first answer position of the locality items
says how far the rest of the distribution moved.

    scores = evaluate(vlm, edit, reliability=[...], image_generality=[...], image_locality=[...])
    scores = evaluate(vlm, edit, **probes_of(cases))       # VLKEB / E-VQA records, scene cases
    scores["score"].sel(metric="generalisation", model="edited")
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import xarray as xr

from ...data.edit_case import LOCALITY, PROBES, identity
from ...data.sample import Sample
from ...models.load import VLM
from ...results.stats import bootstrap_mean
from ..inputs import encode, scored_answer_ids
from .deltas import Edit, attrs_for_store
from .parts import EditError, chunks, forward_rows

POOLED = {
    "efficacy": ("reliability",),
    "generalisation": ("text_generality", "image_generality"),
    "specificity": LOCALITY,
}
"""The three summary scores edit papers report, as pools of probe kinds."""


def evaluate(
    vlm: VLM,
    edited: Edit,
    *,
    reliability: Sequence[Sample] = (),
    text_generality: Sequence[Sample] = (),
    image_generality: Sequence[Sample] = (),
    portability: Sequence[Sample] = (),
    text_locality: Sequence[Sample] = (),
    image_locality: Sequence[Sample] = (),
    seed: int = 0,
    max_batch: int = 64,
) -> xr.Dataset:
    """Score the unedited and the edited model on each probe (dims item, model; metric, model).

    Each sample's `answer` is its target (the new answer, the implied answer, or the reference
    answer a locality item is teacher-forced with); `meta["probe"]` names an item's finer kind.
    Locality items must not repeat an edited question or concern an edited entity
    (`check_disjoint`).
    """
    if edited.applied:
        raise EditError("evaluate compares the unedited with the edited model: pass the edit unapplied.")
    given = {
        "reliability": reliability,
        "text_generality": text_generality,
        "image_generality": image_generality,
        "portability": portability,
        "text_locality": text_locality,
        "image_locality": image_locality,
    }
    check_disjoint(edited, [s for kind in LOCALITY for s in given[kind]])
    items = [(kind, sample) for kind in PROBES for sample in given[kind]]
    if not items:
        raise EditError(f"nothing to evaluate: give samples for any of {list(PROBES)}.")
    samples = [s for _, s in items]
    before = _predictions(vlm, samples, max_batch)
    with edited:
        after = _predictions(vlm, samples, max_batch)
    correct = []
    for (kind, _), b, a in zip(items, before, after, strict=True):
        expected = b["argmax"] if kind in LOCALITY else b["target"]
        correct.append(
            [float((b["argmax"] == expected).float().mean()), float((a["argmax"] == expected).float().mean())]
        )
    kl = [
        float(torch.sum(b["first"].exp() * (b["first"] - a["first"])))
        for b, a in zip(before, after, strict=True)
    ]
    pairs = list(zip(before, after, strict=True))
    ds = xr.Dataset(
        {
            "p_target": (("item", "model"), [[b["p"], a["p"]] for b, a in pairs]),
            "correct": (("item", "model"), correct),
            "answer": (("item", "model"), np.array([[b["said"], a["said"]] for b, a in pairs], dtype=object)),
            "kl": (("item",), kl),
        },
        coords={
            "item": np.array([f"{kind}/{s.id or i}" for i, (kind, s) in enumerate(items)], dtype=object),
            "model": np.array(["unedited", "edited"], dtype=object),
            "set": ("item", np.array([kind for kind, _ in items], dtype=object)),
            "probe": ("item", np.array([str(s.meta.get("probe", kind)) for kind, s in items], dtype=object)),
            "prompt": ("item", np.array([s.prompt for s in samples], dtype=object)),
            "target": ("item", np.array([s.answer for s in samples], dtype=object)),
        },
        attrs={**attrs_for_store(edited.attrs), "experiment": "edit_evaluation"},
    )
    return _described(_with_scores(ds, seed))


def _with_scores(ds: xr.Dataset, seed: int) -> xr.Dataset:
    """Mean `correct` with a bootstrap interval per probe kind and per pooled score; locality KL."""
    kinds = {k: (k,) for k in PROBES} | POOLED
    scores = {}
    for metric, pool in kinds.items():
        chosen = ds["set"].isin(list(pool))
        if bool(chosen.any()):
            scores[metric] = bootstrap_mean(ds["correct"].where(chosen, drop=True), dim="item", seed=seed)
    for stat in ("mean", "low", "high"):
        suffix = "" if stat == "mean" else f"_{stat}"
        ds[f"score{suffix}"] = (("metric", "model"), np.stack([scores[m][stat].values for m in scores]))
    ds = ds.assign_coords(metric=np.array(list(scores), dtype=object))
    local = ds["kl"].where(ds["set"].isin(list(LOCALITY)), drop=True)
    if local.size:
        summary = bootstrap_mean(local, dim="item", seed=seed)
        for stat in ("mean", "low", "high"):
            ds[f"locality_kl{'' if stat == 'mean' else '_' + stat}"] = float(summary[stat])
    return ds


def _described(ds: xr.Dataset) -> xr.Dataset:
    text = {
        "p_target": ("probability of the item's target answer (all its tokens)", "probability (0 to 1)"),
        "correct": (
            "fraction of answer tokens predicted as expected: the target (reliability, generality, "
            "portability) or the unedited model's prediction (locality)",
            "fraction",
        ),
        "answer": ("the greedy first answer token", "token"),
        "kl": ("KL(unedited || edited) of the next-token distribution at the first answer position", "nats"),
        "score": ("mean of `correct` per probe kind and pooled metric", "fraction"),
        "score_low": ("lower end of the 95% bootstrap interval of score", "fraction"),
        "score_high": ("upper end of the 95% bootstrap interval of score", "fraction"),
        "locality_kl": ("mean KL(unedited || edited) over the locality items", "nats"),
        "locality_kl_low": ("lower end of the 95% bootstrap interval of locality_kl", "nats"),
        "locality_kl_high": ("upper end of the 95% bootstrap interval of locality_kl", "nats"),
    }
    for name, (description, units) in text.items():
        if name in ds:
            ds[name].attrs.update(description=description, units=units)
    return ds


def _predictions(vlm: VLM, samples: Sequence[Sample], max_batch: int) -> list[dict[str, Any]]:
    """Per sample, teacher-forced: P(target), argmax and target ids per answer token, the greedy
    first token, and log P at the first answer position."""
    out = []
    for chunk in chunks(list(samples), max_batch):
        answers = [scored_answer_ids(vlm, s.prompt, s.answer, whole=True) for s in chunk]
        rows = [
            encode(vlm, prompt=s.prompt, image=s.image, spans={}, answer_ids=a).inputs
            for s, a in zip(chunk, answers, strict=True)
        ]
        with torch.no_grad():
            logits, _ = forward_rows(vlm, rows)
        for row_logits, answer in zip(logits, answers, strict=True):
            log_probs = torch.log_softmax(row_logits[-len(answer) :].float(), dim=-1).cpu()
            target = torch.tensor(answer)
            argmax = log_probs.argmax(-1)
            out.append(
                {
                    "p": float(log_probs[torch.arange(len(answer)), target].sum().exp()),
                    "target": target,
                    "argmax": argmax,
                    "said": vlm.tokenizer.decode([int(argmax[0])]).strip(),
                    "first": log_probs[0],
                }
            )
    return out


def check_disjoint(edited: Edit, samples: Sequence[Sample]) -> None:
    """Refuse locality samples that repeat an edited sample (same prompt and image) or concern
    an edited entity (`Sample.meta["entity"]`, when both sides carry one)."""
    requests = edited.attr("requests", [])
    edited_inputs = {(r["prompt"], r["image"]) for r in requests}
    edited_entities = {tuple(r["entity"]) for r in requests if r.get("entity")}
    clashes = []
    for sample in samples:
        seen = identity(sample)
        if (seen["prompt"], seen["image"]) in edited_inputs:
            clashes.append(f"{sample.id}: an edited question and image")
        elif seen["entity"] and tuple(seen["entity"]) in edited_entities:
            clashes.append(f"{sample.id}: edited entity {seen['entity']}")
    if clashes:
        raise EditError(
            f"{len(clashes)} locality samples overlap the edit ({'; '.join(clashes[:3])}); locality "
            "measures what the edit must leave alone: draw them from other entities and questions."
        )


def summary_line(
    ds: xr.Dataset, metrics: Sequence[str] = ("efficacy", "generalisation", "specificity")
) -> str:
    """'efficacy 0.00 -> 1.00 [1.00, 1.00], ...' for the metrics the evaluation has."""
    cells = []
    for metric in metrics:
        if metric not in ds["metric"].values:
            continue
        score = ds.sel(metric=metric)
        before, after = float(score["score"].sel(model="unedited")), float(score["score"].sel(model="edited"))
        low, high = (
            float(score["score_low"].sel(model="edited")),
            float(score["score_high"].sel(model="edited")),
        )
        cells.append(f"{metric} {before:.2f} -> {after:.2f} [{low:.2f}, {high:.2f}]")
    return ", ".join(cells)
