"""A fact to edit, the contexts that show it, and the probes that measure the edit.

Model editing needs more than (question, new answer). An edit that only ever saw one picture
and one phrasing learns that picture (ROME's generalisation comes from averaging over many
contexts), and an edit is judged by the editing literature's probes: the edited question
(reliability), a rephrased question (text generality), another image of the same entity
(image generality), unrelated text and image questions whose answers must not move (text and
image locality), and questions whose answer follows from the edited fact (portability, VLKEB).
Both belong to the data, not to the editing algorithm, so they live here:

    request = EditRequest(sample, "avalor", images=other_pictures, paraphrases=rephrasings,
                          essence=questions_whose_answers_must_not_change)
    case = EditCase(request, probes={"reliability": [...], "image_generality": [...], ...})
    vt.edit(vlm, [case.request], layers="traced", preserve=ordinary)

`vlmtrace.data.scene_edits` builds cases on the synthetic scenes; `vlmtrace.data.loaders.edit_records`
reads VLKEB and MMEdit (E-VQA) records from their published JSON files.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .sample import Sample

PROBES = (
    "reliability",
    "text_generality",
    "image_generality",
    "portability",
    "text_locality",
    "image_locality",
)
"""The editing literature's probe kinds (MMEdit, VLKEB), in the order they are reported."""
FOLLOWING = PROBES[:4]
"""Probes whose target is the new answer (or, for portability, the answer the edit implies)."""
LOCALITY = PROBES[4:]
"""Probes whose answer must stay what the unedited model said."""


@dataclass(frozen=True)
class EditRequest:
    """One fact to change: a question (sample) and the answer the edited model should give.

    The contexts are other inputs that ask for the same fact; an edit computed over them all
    (`vt.edit(..., contexts=Contexts(...))`) keys on the entity rather than on one input.
    Each context is a `Sample` with the same spans as `sample` (the key is read at a span's last
    token, or at the last token); its own `answer` is ignored, the request's `new_answer` is its
    target.
    """

    sample: Sample
    new_answer: str
    images: Sequence[Sample] = ()
    """The same question about other images of the same entity."""
    paraphrases: Sequence[Sample] = ()
    """Other phrasings of the question (another selector, the entity named in text)."""
    essence: Sequence[Sample] = ()
    """Other questions about the entity whose answers must not change (ROME's KL prompts):
    the value is optimised to leave their next-token distribution where it was."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "new_answer", str(self.new_answer))
        for name in ("images", "paraphrases", "essence"):
            object.__setattr__(self, name, tuple(getattr(self, name)))


@dataclass(frozen=True)
class EditCase:
    """An edit request with its evaluation probes, keyed by the literature's probe kinds (`PROBES`).

    A probe's `answer` is its target: the new answer (reliability, generality), the answer the
    edit implies (portability), or the reference answer a locality question is scored with
    (its tokens are teacher-forced; locality itself compares the edited model's predictions
    with the unedited model's, as MMEdit does).
    """

    request: EditRequest
    probes: Mapping[str, Sequence[Sample]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.probes) - set(PROBES))
        if unknown:
            raise ValueError(f"unknown probe kinds {unknown}; use {list(PROBES)}.")
        object.__setattr__(self, "probes", {k: tuple(v) for k, v in self.probes.items()})


def probes_of(cases: Sequence[EditCase]) -> dict[str, list[Sample]]:
    """All cases' probes pooled by kind (what `evaluate` takes for a batch of edits)."""
    pooled: dict[str, list[Sample]] = {kind: [] for kind in PROBES}
    for case in cases:
        for kind, samples in case.probes.items():
            pooled[kind].extend(samples)
    return {kind: samples for kind, samples in pooled.items() if samples}


def identity(sample: Sample) -> dict[str, Any]:
    """What identifies a sample in an edit's provenance and in disjointness checks: its id, prompt,
    a hash of its image, its answer and the entity it is about (`meta["entity"]`, when known)."""
    image = None if sample.image is None else hashlib.sha256(sample.image.tobytes()).hexdigest()[:16]
    entity = sample.meta.get("entity")
    return {
        "id": sample.id,
        "prompt": sample.prompt,
        "answer": sample.answer,
        "image": image,
        "entity": list(entity) if entity else None,
    }
