"""From files on disk to samples one model can trace, with every sample left out accounted for.

A published dataset is not ready for causal tracing: its questions carry no constraint spans and
no counterfactual phrases, its prompts are not the model's, some answers are words the model
cannot produce, and some questions have no image pair. `prepare` makes every sample ready for
one model and one recipe *before any forward*, and says what it left out and why, so a long run
never dies on sample 137 and a shorter data set never goes unnoticed:

    prepared = prepare(vlm, "data/vqa", needs=recipe.NEEDS, n=8,
                       spans=["visual=@demonstrative"], replace=[], template=None, seed=0)
    print(prepared.report())          # a table: kept, and each reason with a count and examples
    recipe.run(vlm, prepared.samples)

Steps, per sample, in order: leave out a sample whose image is missing or unreadable (the loader
marks it instead of raising); find the `--span`s in the question (`vlmtrace.data.spans`); the
model's own answer where the data set publishes none (Basu et al.'s CSVs:
`vlmtrace.data.own_answers`, batched clean forwards); replacement phrases (`--replace NAME=PHRASE`,
else the file's own, else one drawn from the data set: another sample's span of the same name, of
the same token count, with a different answer, as NOTICE builds STR pairs; the donor is recorded in
`meta["replaced_from"]` and its answer becomes the foil); an image pair if the recipe needs one
(another image with the same question and a different answer; VQA v2's complementary pairs are read
by the loader); object regions mapped to the model's image tokens; the model's prompt
(`vlmtrace.prompts`); the encoding the engine will do (answer ids, segments, both sides of each
span replacement), whose errors become reasons; and finally, unless `keep_wrong`, the check that the
model answers the sample (`vlmtrace.data.correctness`: its greedy next token is the answer's first),
run in one batched forward for as many samples as are still wanted. `prepare` fails only when
nothing is left, and its error names the way to keep each reason's samples (`fix_for`).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError
from .correctness import KEEP_WRONG, WRONG, check_answers
from .loaders import load_dataset
from .loaders.question import DatasetError
from .regions import TOO_LARGE
from .sample import Sample
from .spans import find_spans, parse_pairs, parse_span_options

SAMPLE_COORDINATES = ("relatedness",)
"""Per-sample labels a loader puts in `meta` that results keep as coordinates along `sample`, so they
split by them (COOCO's relatedness level)."""

LOAD_FACTOR = 4
"""Questions read per sample wanted: samples are left out after reading (no span, no pair...)."""


@dataclass
class Prepared:
    """Samples ready for a recipe, and those left out, by reason."""

    samples: list[Sample]
    read: int
    left_out: dict[str, list[str]] = field(default_factory=dict)
    """reason -> ids of the samples left out for it."""
    origin: str = "data"
    """Where the samples came from, as the table's first word ("data", "samples")."""
    notes: list[str] = field(default_factory=list)
    """What the table should also say about the samples kept (those without an object region)."""

    def provenance(self) -> dict[str, Any]:
        """What to store with the results: counts, reasons, and each sample's spans and counterfactuals."""
        return {
            "read": self.read,
            "kept": len(self.samples),
            "left_out": {reason: len(ids) for reason, ids in self.left_out.items()},
            "samples": [
                {
                    "id": s.id,
                    "answer": s.answer,
                    "answer_source": s.meta.get("answer_source", "data"),  # or the model's own prediction
                    "spans": dict(s.spans),
                    "replacements": dict(s.replacements),
                    "replaced_from": dict(s.meta.get("replaced_from", {})),
                    "image_pair_from": s.meta.get("pair_id") or s.meta.get("pair_question_id"),
                    "foil": s.foil,
                }
                for s in self.samples
            ],
        }

    def fixes(self) -> str:
        """How to keep the samples left out, one line per reason that has a way out."""
        lines = [
            f"  {reason}: {fix}"
            for reason in sorted(self.left_out, key=lambda r: -len(self.left_out[r]))
            if (fix := fix_for(reason)) is not None
        ]
        return "\n".join(["How to keep them:", *lines]) if lines else ""

    def coordinates(self, ids) -> dict[str, tuple[str, list[str]]]:
        """`SAMPLE_COORDINATES` the samples carry, for the results' `sample` ids (in their order)."""
        by_id = {s.id: s for s in self.samples}
        found = {}
        for name in SAMPLE_COORDINATES:
            if any(name in s.meta for s in self.samples):
                found[name] = ("sample", [str(by_id[str(i)].meta.get(name, "")) for i in ids])
        return found

    def report(self) -> str:
        """A small table: how many samples were read, kept, and left out for each reason."""
        lines = [f"{self.origin}: read {self.read} questions, kept {len(self.samples)}"]
        if self.left_out:
            width = max(len(reason) for reason in self.left_out)
            lines.append(f"  {'left out because':<{width}}  count  e.g.")
            for reason, ids in sorted(self.left_out.items(), key=lambda item: -len(item[1])):
                lines.append(f"  {reason:<{width}}  {len(ids):>5}  {', '.join(ids[:3])}")
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


FIXES: tuple[tuple[str, str], ...] = (
    # (what the reason starts with, the way out), in the words of the CLI
    (WRONG, KEEP_WRONG),
    ("image missing", "put the images where the layout keeps them (README, Your own data) or fix the paths"),
    ("image unreadable", "replace the unreadable image files"),
    (
        "no span",
        "mark the span with --span NAME=PATTERN: a phrase or a regex that occurs in the questions (first "
        "whole-word match), or @demonstrative, @year, @number, @object",
    ),
    ("span ", "give a --span pattern that matches whole words of the question"),
    ("no other", "give the replacement phrase yourself: --replace NAME=PHRASE"),
    (
        "no image pair",
        "use data with image pairs (VQA v2: v2_mscoco_val2014_complementary_pairs.json beside the "
        "questions; or the same question asked of images with different answers), or a recipe without SIP",
    ),
    (
        "no object region",
        "give object boxes: GQA's {split}_sceneGraphs.json beside the questions, CLEVR's "
        "scenes/CLEVR_{split}_scenes.json",
    ),
    ("region outside crop", "choose questions about objects inside the model's centre crop"),
    (TOO_LARGE, "choose questions about smaller objects, or give tighter boxes"),
    ("a span's words also occur", "give another --prompt-template, or a longer span"),
    ("answer: ", "use answers the model can produce (words of its vocabulary)"),
    ("words outside the vocabulary", "use questions in words of the model's vocabulary"),
    ("the model's own answer", "add an answer column to the file"),
    (
        "no foil answer",
        "leave out --replace, so STR draws each replacement phrase from the data and scores the answer "
        "against the donor's; or give each question a foil answer (a table's `foil` column)",
    ),
)


def fix_for(reason: str) -> str | None:
    """The way to keep samples left out for `reason`, or None when there is none to name."""
    return next((fix for start, fix in FIXES if reason.startswith(start)), None)


def prepare(
    vlm,
    path: str | Path,
    *,
    needs: Any = None,
    n: int = 8,
    spans: Sequence[str] = (),
    replace: Sequence[str] = (),
    template: str | None = None,
    seed: int = 0,
    regions: bool = False,
    keep_wrong: bool = False,
    max_batch: int = 64,
    backend: Any = None,
    load: Callable[[Path, int], list[Sample]] | None = None,
) -> Prepared:
    """Load `path` and make up to `n` samples ready for `vlm` and a recipe that `needs` them.

    `needs` is a recipe's `NEEDS` (`replacements`: spans a corruption replaces; `image_pair`).
    `regions=True` maps object regions onto the model's image tokens (samples without one are kept).
    Samples the model answers wrongly are left out (counted) unless `keep_wrong`; the check runs
    batched forwards of up to `max_batch` rows, on `backend` if one is given (remote).
    `load(path, count)` reads the samples instead of `load_dataset` (a recipe that builds its own
    pairs from a data set's files: `concepts` from CLEVR's scenes).
    """
    finders = parse_span_options(spans)
    phrases = parse_pairs(replace, "--replace")
    count = max(n * LOAD_FACTOR, n + 32)
    loaded = (
        load(Path(path), count) if load is not None else load_dataset(path, n=count, missing_images="mark")
    )
    left_out: dict[str, list[str]] = {}

    def leave(sample: Sample, reason: str) -> None:
        left_out.setdefault(reason, []).append(sample.id)

    with_spans = []
    for sample in loaded:
        if "image_error" in sample.meta:  # "image missing" / "image unreadable", marked by the loader
            leave(sample, sample.meta["image_error"])
            continue
        question = sample.meta.get("question", sample.prompt)
        found, reason = find_spans(finders, question, sample.meta)
        if reason is not None:
            leave(sample, reason)
            continue
        with_spans.append(sample.with_(spans={**sample.spans, **found}))
    with_spans = _own_answers(vlm, with_spans, template, leave, max_batch, backend)
    wanted = tuple(getattr(needs, "replacements", ()) or ())
    ready = _replacements(vlm, with_spans, wanted, phrases, seed, leave)
    if getattr(needs, "image_pair", False):
        ready = _image_pairs(ready, leave)
    if getattr(needs, "foil", False):  # the logit difference's second answer: a donor's, a pair's, the file's
        ready = _with_foils(ready, leave)
    if regions:
        ready = _regions(vlm, ready, leave)
    from ..prompts import PromptTemplateError, for_model

    kept: list[Sample] = []
    pending: list[Sample] = []  # traceable, not yet checked for a correct answer

    def settle() -> None:
        """Keep the pending samples the model answers (all of them with `keep_wrong`): one batch."""
        if keep_wrong or not pending:
            kept.extend(pending)
        else:
            checked = check_answers(vlm, pending, max_batch=max_batch, backend=backend)
            kept.extend(checked.right)
            for sample, _ in checked.wrong:
                leave(sample, WRONG)
        pending.clear()

    for sample in ready:
        try:
            sample = for_model(vlm, [sample], template=template)[0]
        except PromptTemplateError as error:
            if "before the question" not in str(error):
                raise  # a template that fails every sample: the user must fix it
            leave(sample, "a span's words also occur in the prompt template before the question")
            continue
        reason = _untraceable(vlm, sample, wanted)
        if reason is not None:
            leave(sample, reason)
            continue
        pending.append(sample)
        if len(kept) + len(pending) == n:  # enough to fill n if all are right: check them at once
            settle()
            if len(kept) == n:
                break
    settle()
    prepared = Prepared(samples=kept, read=len(loaded), left_out=left_out, notes=_region_notes(kept))
    if not kept:
        raise DatasetError(
            f"no sample of {path} can be traced by this recipe on {vlm.name}:\n{prepared.report()}\n"
            + (prepared.fixes() or "Give data with what the recipe needs (README, Your own data).")
        )
    return prepared


def _own_answers(
    vlm, samples: list[Sample], template: str | None, leave, max_batch: int, backend: Any
) -> list[Sample]:
    """The model's prediction as the answer of samples whose data set gives none (before STR draws)."""
    from ..prompts import PromptTemplateError, for_model
    from .own_answers import needs_own_answer, own_answers

    prompted = []
    for sample in samples:
        if needs_own_answer(sample):
            try:
                sample = for_model(vlm, [sample], template=template)[0]
            except PromptTemplateError as error:
                if "before the question" not in str(error):
                    raise
                leave(sample, "a span's words also occur in the prompt template before the question")
                continue
        prompted.append(sample)
    answered, reasons = own_answers(vlm, prompted, max_batch=max_batch, backend=backend)
    for sample in prompted:
        if sample.id in reasons:
            leave(sample, reasons[sample.id])
    return answered


def _first_clause(error: BaseException) -> str:
    return str(error).split(";")[0][:100]


def _token_count(vlm, text: str) -> int:
    return len(vlm.tokenizer(" " + text, add_special_tokens=False).input_ids)


def _replacements(vlm, samples, wanted, phrases, seed, leave) -> list[Sample]:
    """Give every sample a replacement for each wanted span: --replace, its own, or a donor's."""
    rng = random.Random(seed)
    pools: dict[str, list[Sample]] = {name: [s for s in samples if name in s.spans] for name in wanted}
    out = []
    for sample in samples:
        replacements, meta, foil = dict(sample.replacements), dict(sample.meta), sample.foil
        missing = None
        for name in wanted:
            if name not in sample.spans:
                missing = f"no span {name!r} to replace"
                break
            if name in phrases:
                replacements[name] = phrases[name]
            if name in replacements:
                continue
            count = _token_count(vlm, sample.spans[name])
            donors = [
                d
                for d in pools[name]
                if d.answer != sample.answer
                and d.spans[name] != sample.spans[name]
                and _token_count(vlm, d.spans[name]) == count
            ]
            if not donors:
                missing = f"no other {name!r} phrase of {count} tokens with another answer (STR)"
                break
            donor = rng.choice(donors)
            replacements[name] = donor.spans[name]
            meta.setdefault("replaced_from", {})[name] = donor.id
            foil = foil or donor.answer
        if missing is not None:
            leave(sample, missing)
            continue
        out.append(sample.with_(replacements=replacements, meta=meta, foil=foil))
    return out


def _image_pairs(samples: list[Sample], leave) -> list[Sample]:
    """An image pair for each sample without one: an image with the same question, another answer."""
    by_question: dict[str, list[Sample]] = {}
    for sample in samples:
        by_question.setdefault(_normal(sample), []).append(sample)
    out = []
    for sample in samples:
        if sample.image_pair is None:
            partners = [
                p for p in by_question[_normal(sample)] if p.answer != sample.answer and p.image is not None
            ]
            if not partners:
                leave(sample, "no image pair (no other image with this question and another answer)")
                continue
            partner = partners[0]
            meta = {**sample.meta, "pair_id": partner.id}
            sample = sample.with_(image_pair=partner.image, foil=sample.foil or partner.answer, meta=meta)
        out.append(sample)
    return out


def _with_foils(samples: list[Sample], leave) -> list[Sample]:
    """The samples that carry a foil answer; the others are left out (a phrase given with --replace has
    no answer of its own to score against)."""
    from ..recipes import NO_FOIL

    out = []
    for sample in samples:
        if sample.foil:
            out.append(sample)
        else:
            leave(sample, NO_FOIL)
    return out


def _normal(sample: Sample) -> str:
    return " ".join(str(sample.meta.get("question", sample.prompt)).lower().split())


def _regions(vlm, samples: list[Sample], leave) -> list[Sample]:
    """Each sample's object regions mapped onto `vlm`'s image tokens (`region_tokens`, `image_tokens`).

    A sample without a region is kept (a recipe runs what needs none and says what it skipped, with
    `meta["region_skipped"]` saying why); one whose region falls outside what the model sees is left out.
    """
    from .regions import RegionError, RegionTooLargeError, region_tokens

    out = []
    for sample in samples:
        if not sample.meta.get("regions"):
            out.append(sample.with_(meta={**sample.meta, "region_skipped": "no object region in the data"}))
            continue
        try:
            tokens, count = region_tokens(vlm, sample)
        except RegionTooLargeError:
            leave(sample, TOO_LARGE)
            continue
        except RegionError as error:
            if "declares no image grid" not in str(error):
                leave(sample, "region outside crop")
                continue
            out.append(sample.with_(meta={**sample.meta, "region_skipped": _first_clause(error)}))
            continue
        out.append(sample.with_(meta={**sample.meta, "region_tokens": tokens, "image_tokens": count}))
    return out


def _region_notes(kept: list[Sample]) -> list[str]:
    """A note per reason that kept samples have no object region (object knockouts skip them)."""
    reasons = Counter(s.meta["region_skipped"] for s in kept if s.meta.get("region_skipped"))
    return [
        f"{count} of {len(kept)} kept samples have {reason}, so knockouts of an object region skip them"
        + (f"; to include them, {fix}" if (fix := fix_for(reason)) else "")
        for reason, count in reasons.items()
    ]


def _untraceable(vlm, sample: Sample, wanted: Sequence[str]) -> str | None:
    """Why the engine would refuse `sample`, found by encoding it as the engine will; or None."""
    from ..engine.corruptions import ReplaceSpan, clean_side
    from ..engine.inputs import scored_answer_ids

    if sample.image is None and vlm.adapter.image_in_sequence:
        return "image missing"
    try:
        answer = scored_answer_ids(vlm, sample.prompt, sample.answer, whole=False)
    except UserError as error:
        return "answer: " + _reason(error)
    except ValueError as error:
        return "answer: " + _first_clause(error)
    try:
        clean_side(vlm, sample, answer)
        for name in wanted:
            ReplaceSpan(name).pair(vlm, sample, answer)
    except UserError as error:
        return _reason(error)
    return None


def _reason(error: BaseException) -> str:
    """A short reason for the table, from an error's class and message."""
    name = type(error).__name__
    text = str(error)
    if name == "UnknownWordsError":
        return "words outside the vocabulary (<unk>)"
    if "only inside a longer word" in text:
        return "span only inside a longer word"
    if name == "SpanNotFoundError":
        return "span not in the prompt"
    return _first_clause(error)


def count_reasons(prepared: Prepared) -> Counter:
    """reason -> number of samples left out for it."""
    return Counter({reason: len(ids) for reason, ids in prepared.left_out.items()})
