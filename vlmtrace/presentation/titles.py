"""What a figure's title must say about the run it draws, read from the result itself.

A map of indirect effects means nothing until the reader knows which constraint was corrupted
and how (its phrase replaced, STR, a semantic image pair (SIP), Gaussian noise on the image or
on a phrase), in which direction states were patched, and by which metric. The sweep writes
all of it into the result's attrs (`corruption`, `direction`, `metric`). A result combined from
several sweeps (`vlmtrace.results.dataset.combine`) keeps each sweep's under `conditions`, by
the condition's name: the value of the combining dim's coordinate once the result is selected
down to one condition. So titles are built from the data, never from a recipe's own strings.

    describe_run(ds.sel(constraint="visual"))
    # 'shapes-llava; visual constraint replaced by another phrase (text corruption);
    #  clean states restored into the corrupted run; metric P(answer)'
"""

from __future__ import annotations

import json
from typing import Any

import xarray as xr

METRIC_WORDS = {
    "probability": "P(answer)",
    "log_prob": "log P(answer)",
    "logit_diff": "logit difference answer - foil",
    "kl": "KL from the clean run",
}
DIRECTION_WORDS = {
    "denoise": "clean states restored into the corrupted run",
    "noise": "corrupted states patched into the clean run",
}


def condition_attrs(ds: xr.Dataset | xr.DataArray) -> dict[str, Any]:
    """The attrs of the one sweep `ds` shows: its own, or those of the condition it was selected to.

    A combined result selected to one condition has that condition's name as a scalar
    coordinate (`ds.sel(corruption="str")` keeps `corruption="str"`); its sweep's attrs are
    then read from `conditions`. A result still holding several conditions keeps only the attrs
    they share.
    """
    attrs = dict(ds.attrs)
    try:
        conditions = json.loads(attrs.get("conditions", "{}"))
    except (TypeError, ValueError):
        return attrs
    if not isinstance(conditions, dict):
        return attrs
    chosen = {
        str(coord.values.item())
        for coord in ds.coords.values()
        if coord.ndim == 0 and str(coord.values.item()) in conditions
    }
    if len(chosen) == 1:  # two matching names would leave it unclear which sweep this is
        attrs.update(conditions[chosen.pop()])
    return attrs


def corruption_words(spec: dict[str, Any] | str | None) -> str:
    """A corruption's record (`Corruption.describe()`, as stored) in words a title can carry."""
    if spec is None or spec == "":
        return "corruption not recorded"
    if isinstance(spec, str):
        try:
            spec = json.loads(spec)
        except ValueError:
            return spec
    spec = dict(spec)
    kind = spec.pop("kind", "corruption")
    span = spec.get("span") or spec.get("target")
    phrase = f"{span} constraint" if span and span != "image" else "phrase"
    if kind == "replace_span":
        text = f" ('{spec['text']}')" if spec.get("text") else ""
        return f"{phrase} replaced by another phrase{text} (text corruption)"
    if kind == "symmetric_token_replacement":
        return f"STR: {phrase} replaced by a phrase of as many tokens (text corruption)"
    if kind == "gaussian_noise":
        noise = f"Gaussian noise {spec.get('scale', '?')} sd"
        draws = f", {spec['samples']} draws" if spec.get("samples") else ""
        if spec.get("target", "image") == "image":
            return f"{noise} on the image embeddings{draws} (image corruption)"
        return f"{noise} on the {phrase}'s embeddings{draws} (text corruption)"
    if kind == "image_pair":
        return "SIP: the corrupted run sees the sample's paired image (image corruption)"
    if kind == "inpaint_pair":
        return f"object region inpainted ({spec.get('backend', '?')}) (image corruption)"
    detail = ", ".join(f"{k}={v}" for k, v in spec.items() if v not in (None, "", [], {}))
    return kind.replace("_", " ") + (f" ({detail})" if detail else "")


def describe_run(ds: xr.Dataset | xr.DataArray) -> str:
    """'model; corruption; direction; metric' of the sweep `ds` shows, for a figure's title."""
    attrs = condition_attrs(ds)
    parts = [str(attrs.get("model", "?"))]
    if attrs.get("experiment") == "knockout":
        parts.append("attention knockout")
    elif "corruption" in attrs:
        parts.append(corruption_words(attrs["corruption"]))
    else:
        parts.append(several_corruptions(attrs))
    if attrs.get("direction") in DIRECTION_WORDS:
        parts.append(DIRECTION_WORDS[attrs["direction"]])
    if attrs.get("metric"):
        parts.append(f"metric {METRIC_WORDS.get(attrs['metric'], attrs['metric'])}")
    return "; ".join(parts)


def several_corruptions(attrs: dict[str, Any]) -> str:
    """'name: words, name: words' of every condition a combined result holds (or that none is recorded)."""
    try:
        conditions = json.loads(attrs.get("conditions", "{}"))
    except (TypeError, ValueError):
        conditions = {}
    named = {
        name: corruption_words(part["corruption"])
        for name, part in (conditions.items() if isinstance(conditions, dict) else [])
        if isinstance(part, dict) and "corruption" in part
    }
    if not named:
        return "corruption not recorded"
    return ", ".join(f"{name}: {words}" for name, words in named.items())
