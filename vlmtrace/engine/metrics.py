"""What a patched run is scored by, computed inside the trace.

Zhang & Nanda show that the metric changes the conclusions of activation patching:
probability saturates and hides negative components, logit difference against a foil is
linear in the residual stream, KL to the clean distribution needs no answer at all. Each
metric here maps the answer logits of every row of a batched forward to one float per row,
so only those floats leave the trace (this matters when the trace runs remotely).

    Probability()           # P(answer); whole answers: product of token probabilities
    LogProb()               # log P(answer), summed over answer tokens
    LogitDiff()             # logit(answer) - logit(foil), first tokens
    KL()                    # KL(clean || patched) over the vocabulary, at the answer positions

`normalised(ds)` turns stored values into (m_patched - m_corrupt) / (m_clean - m_corrupt):
1 means the patch fully restores the clean behaviour, 0 means it does nothing; samples whose
|m_clean - m_corrupt| is below the metric's `gap_floor` have none (their gap is noise).
`relative_change(ds, "knockout")` gives (m - m_clean) / m_clean, only where the clean probability
is at least `CLEAN_FLOOR`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch


@dataclass(frozen=True)
class Metric:
    """Scores answer logits [rows, answer tokens, vocab] -> [rows]. Row 0 is the clean run."""

    name: ClassVar[str] = "metric"
    needs_foil: ClassVar[bool] = False
    whole_answer_ok: ClassVar[bool] = True
    scores_against_row_0: ClassVar[bool] = False
    """True when a row's value depends on row 0 (the clean run) of the same forward: such a
    metric cannot score a row alone, so the self-check scores baselines with `LogProb`."""
    gap_floor: ClassVar[float] = 0.0
    """The smallest |clean - corrupted| this metric localises. Below it the corruption barely
    moved the output: a ratio to the gap is noise over noise, and a map scaled to the gap draws
    noise as a finding (README's `--keep-wrong` multi_constraint run: a gap of 5e-05 in P(answer)
    drawn on a full colour scale, its "last" cell deep red). `normalised` is NaN there, a headline
    names no cell (`presentation.report`), and effect maps span at least this range."""

    def __call__(self, logits: torch.Tensor, answer: torch.Tensor, foil: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError


def _answer_log_probs(logits: torch.Tensor, answer: torch.Tensor) -> torch.Tensor:
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    index = answer.view(1, -1, 1).expand(log_probs.shape[0], -1, 1)
    return log_probs.gather(-1, index).squeeze(-1).sum(-1)


@dataclass(frozen=True)
class Probability(Metric):
    """P(answer): the indirect effect of Basu et al. and ROME is a difference of these."""

    name: ClassVar[str] = "probability"
    gap_floor: ClassVar[float] = 0.01  # one point of probability

    def __call__(self, logits, answer, foil):
        return _answer_log_probs(logits, answer).exp()


@dataclass(frozen=True)
class LogProb(Metric):
    """log P(answer), summed over the answer's tokens (whole-answer scoring)."""

    name: ClassVar[str] = "log_prob"
    gap_floor: ClassVar[float] = 0.1  # a tenth of a nat: P(answer) changed by ~10 %

    def __call__(self, logits, answer, foil):
        return _answer_log_probs(logits, answer)


@dataclass(frozen=True)
class LogitDiff(Metric):
    """logit(answer) - logit(foil) at the first answer token (foil: `Sample.foil`)."""

    name: ClassVar[str] = "logit_diff"
    gap_floor: ClassVar[float] = 0.1  # a tenth of a logit
    needs_foil: ClassVar[bool] = True
    whole_answer_ok: ClassVar[bool] = False

    def __call__(self, logits, answer, foil):
        first = logits[:, 0].float()
        return first[:, answer[0]] - first[:, foil[0]]


@dataclass(frozen=True)
class KL(Metric):
    """KL(P_clean || P_row) at the answer positions, summed over them. 0 for the clean run."""

    name: ClassVar[str] = "kl"
    gap_floor: ClassVar[float] = 0.01  # a hundredth of a nat
    scores_against_row_0: ClassVar[bool] = True

    def __call__(self, logits, answer, foil):
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        clean = log_probs[:1]
        return (clean.exp() * (clean - log_probs)).sum(-1).sum(-1)


METRICS: dict[str, type[Metric]] = {m.name: m for m in (Probability, LogProb, LogitDiff, KL)}


def metric_named(name: str) -> Metric:
    """A metric by name, with the valid names in the error."""
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; choose one of {sorted(METRICS)}.")
    return METRICS[name]()


CLEAN_FLOOR = 0.05
"""The smallest clean P(answer) a relative change is reported for. Below it the ratio divides by
a probability the model barely gives the answer: a GQA knockout that moved 3e-5 to 0.015 read as
"+50,394 %". Above it a relative change lies in [-1, (1 - floor) / floor] = [-1, +19]."""


def relative_change(ds, variable: str, *, floor: float = CLEAN_FLOOR):
    """(m - m_clean) / m_clean for one variable of a result whose metric is a probability.

    NaN for samples whose clean probability is below `floor` (`CLEAN_FLOOR`): a ratio to a
    near-zero probability is no measure of how much of the answer survived. The floor is kept
    in the result's `clean_floor` attr, and the count of samples above it in `samples_above_floor`.
    """
    if not 0 < floor < 1:
        raise ValueError(f"floor must lie in (0, 1), not {floor}; {CLEAN_FLOOR} is the default.")
    if ds.attrs.get("metric", "probability") != "probability":
        raise ValueError(
            f"a relative change divides by the clean probability, but this result holds "
            f"{ds.attrs['metric']!r}; run it with metric=vt.Probability()."
        )
    clean = ds["clean"]
    relative = (ds[variable] - clean) / clean.where(clean >= floor)
    relative.attrs = {
        "description": f"relative change in P(answer): ({variable} - clean) / clean; NaN for samples "
        f"whose clean P(answer) is below {floor}",
        "units": "fraction of the clean probability (-1 = answer lost)",
        "clean_floor": floor,
        "samples_above_floor": int((clean >= floor).sum()),
    }
    return relative


def floor_of(name: str) -> float:
    """The `gap_floor` of the metric called `name`: one of `METRICS`, or any `Metric` subclass
    (a user's own declares its floor as a class attribute); 0 for a name no class has."""
    classes, found = [Metric], {}
    while classes:
        cls = classes.pop()
        found.setdefault(cls.name, cls)
        classes.extend(cls.__subclasses__())
    cls = METRICS.get(name) or found.get(name)
    return cls.gap_floor if cls is not None else 0.0


def gap_floor(ds):
    """The gap floor (`Metric.gap_floor`) of a result's metric: its `metric` attr, or its `metric`
    coordinate where the result stacks several (`results.dataset.combine(..., dim="metric")`, as
    gn_vs_str does: then a DataArray along it) or was cut to one of them (`ds.sel(metric=...)`);
    0 for a Dataset that does not say which metric it holds (one built by hand)."""
    name = ds.attrs.get("metric")
    if name is not None:
        return floor_of(str(name))
    if "metric" in ds.coords:
        names = ds["metric"]
        if names.ndim == 0:
            return floor_of(str(names.values))
        return names.copy(data=[floor_of(str(m)) for m in names.values]).rename("gap_floor")
    return 0.0


def mean_gap(ds) -> tuple[float, float, bool]:
    """(mean |clean - corrupted| over a result's samples, its metric's gap floor, whether the gap is
    material: finite, not 0 and at least the floor). The one test of "did the corruption move the
    output enough to localise anything", read alike by headlines and `vt.edit(layers="traced")`."""
    gap, floor = float(abs(ds["clean"] - ds["corrupt"]).mean()), float(gap_floor(ds))
    return gap, floor, bool(np.isfinite(gap) and gap > 0 and gap >= floor)


def above_floor(ds, *, floor: float | None = None):
    """Where |clean - corrupted| reaches the gap floor (default: the metric's `gap_floor`) and is not
    0: the samples (per condition, for a stacked result) that have a normalised effect."""
    floor = gap_floor(ds) if floor is None else floor
    gap = ds["clean"] - ds["corrupt"]
    return (abs(gap) >= floor) & (gap != 0)


def normalised(ds, variable: str, *, floor: float | None = None):
    """(m_patched - m_corrupt) / (m_clean - m_corrupt) for one site variable of a result.

    NaN where |clean - corrupted| is below `floor` (default: the metric's `gap_floor`; with a
    floor of 0, where they are equal): the corruption barely changed the output there, so no
    patch can be said to restore a share of it, and a ratio to that gap is noise over noise
    (pick a stronger corruption, or leave out the samples the model gets wrong). The floor is kept
    in the result's `gap_floor` attr, and the count of gaps below it in `gaps_below_floor`.
    """
    floor = gap_floor(ds) if floor is None else floor
    if (np.asarray(floor) < 0).any():
        raise ValueError(f"floor must be >= 0, not {floor}.")
    gap = ds["clean"] - ds["corrupt"]
    kept = above_floor(ds, floor=floor)
    result = (ds[variable] - ds["corrupt"]) / gap.where(kept)
    shown = (  # zarr attrs are JSON: several floors as a JSON object, as other structured attrs
        json.dumps({str(m): float(f) for m, f in zip(ds["metric"].values, floor.values, strict=True)})
        if getattr(floor, "ndim", 0)
        else float(floor)
    )
    result.attrs = {
        "description": f"({variable} - corrupt) / (clean - corrupt); NaN where |clean - corrupt| is "
        "below the gap floor, or 0",
        "units": "fraction of the clean - corrupted gap (1 = fully restored)",
        "gap_floor": shown,
        "gaps_below_floor": int((~kept & gap.notnull()).sum()),
    }
    return result
