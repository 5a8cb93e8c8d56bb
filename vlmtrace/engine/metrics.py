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
1 means the patch fully restores the clean behaviour, 0 means it does nothing.
`relative_change(ds, "knockout")` gives (m - m_clean) / m_clean, only where the clean probability
is at least `CLEAN_FLOOR`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

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

    def __call__(self, logits, answer, foil):
        return _answer_log_probs(logits, answer).exp()


@dataclass(frozen=True)
class LogProb(Metric):
    """log P(answer), summed over the answer's tokens (whole-answer scoring)."""

    name: ClassVar[str] = "log_prob"

    def __call__(self, logits, answer, foil):
        return _answer_log_probs(logits, answer)


@dataclass(frozen=True)
class LogitDiff(Metric):
    """logit(answer) - logit(foil) at the first answer token (foil: `Sample.foil`)."""

    name: ClassVar[str] = "logit_diff"
    needs_foil: ClassVar[bool] = True
    whole_answer_ok: ClassVar[bool] = False

    def __call__(self, logits, answer, foil):
        first = logits[:, 0].float()
        return first[:, answer[0]] - first[:, foil[0]]


@dataclass(frozen=True)
class KL(Metric):
    """KL(P_clean || P_row) at the answer positions, summed over them. 0 for the clean run."""

    name: ClassVar[str] = "kl"
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


def normalised(ds, variable: str):
    """(m_patched - m_corrupt) / (m_clean - m_corrupt) for one site variable of a result.

    NaN where clean and corrupted runs score the same: the corruption did nothing there, so
    no patch can be said to restore anything (pick a stronger corruption or another sample).
    """
    gap = ds["clean"] - ds["corrupt"]
    return (ds[variable] - ds["corrupt"]) / gap.where(gap != 0)
