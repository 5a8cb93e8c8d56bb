"""The model's own answer, for data sets that publish questions without answers.

Basu et al. released their constraint questions without answers: their trace scores whatever the
model predicts next on the clean input, as ROME's causal trace does. A loader marks such samples
(`meta["answer_from"] == "model"`); `own_answers` runs the marked samples' clean prompts, batched,
before any trace, and makes each top next token the answer:

    samples, reasons = own_answers(vlm, samples)   # answers filled in; {sample id: why not} for the rest

The predicted token must decode to text that encodes back to the same first token after the
prompt (`vlmtrace.engine.inputs.answer_token_ids`), or the metric would score another token than the one
predicted; a sample whose prediction does not (a lone byte, a space) is left out with that reason.
The answer source is recorded in `meta["answer_source"]`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .sample import Sample

FROM_MODEL = "model"
"""`meta["answer_from"]` of a sample whose answer is the model's own prediction."""


def needs_own_answer(sample: Sample) -> bool:
    return sample.meta.get("answer_from") == FROM_MODEL and not sample.answer


def own_answers(
    vlm, samples: Sequence[Sample], *, max_batch: int = 64, backend: Any = None
) -> tuple[list[Sample], dict[str, str]]:
    """(samples with the model's top next token as answer, {id: reason} for those without one).

    Samples not marked for the model's answer pass through unchanged. Prompts must already be the
    model's (`vlmtrace.prompts.for_model`). The marked samples share batched forwards
    (`vlmtrace.data.correctness.top_tokens`).
    """
    from ..engine.inputs import answer_token_ids
    from .correctness import top_tokens

    marked = [sample for sample in samples if needs_own_answer(sample)]
    tops = iter(top_tokens(vlm, marked, max_batch=max_batch, backend=backend))  # in the order of `marked`
    out, reasons = [], {}
    for sample in samples:
        if not needs_own_answer(sample):
            out.append(sample)
            continue
        top = next(tops)
        text = vlm.tokenizer.decode([top]).strip()
        if not text or not text.isprintable():
            reasons[sample.id] = (
                "the model's own answer is no word (its top token decodes to nothing printable)"
            )
            continue
        ids = answer_token_ids(vlm, sample.prompt, text)
        if not ids or ids[0] != top:
            reasons[sample.id] = "the model's own answer does not encode back to the token it predicted"
            continue
        out.append(sample.with_(answer=text, meta={**sample.meta, "answer_source": "the model's prediction"}))
    return out, reasons
