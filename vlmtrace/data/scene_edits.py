"""Edit cases on the synthetic scenes: a fact to change, its contexts, and the literature's probes.

The organisms know facts about entities they *see* (`vlmtrace.data.mascots`): "the red shape is
the mascot of which city ?" is answered by reading which shape is red. An edit of such a fact
should hold whatever picture shows the entity and however the question names it, and leave other
entities and other questions alone. This module builds, for a question about an entity:

- contexts (`EditRequest`): the same question about other training-split pictures of the entity
  (`images`), the other phrasings on training-split pictures (`paraphrases`: selecting the shape by
  its other attribute, and naming it in text, "the red cross"), and the entity's visual questions
  on the request's own picture (`essence`: what kind or colour it is, which must not change);
- probes (`EditCase.probes`), all on held-out scenes never used as contexts: reliability (the
  question itself), text generality (the request's picture asked the other two ways), image
  generality (the same question about other held-out pictures of the entity), and locality
  (`locality`: other entities named in text; visual and fact questions about pictures that show
  no edited entity).

    case = scene_edit_case(sample, "avalor", seed=0)
    text_locality, image_locality = locality(edited_entities, n=8, seed=0)

Requests are fact ("mascot") or multi ("which city ... in year 2006") questions; for the latter
every context and probe keeps the request's year.
"""

from __future__ import annotations

import random
from collections.abc import Collection

from .edit_case import EditCase, EditRequest
from .mascots import CITIES, YEARS, city_in_year, mascot_city
from .sample import Sample
from .scenes import TEMPLATES, ask, make_samples

Entity = tuple[str, str]


def new_answer(entity: Entity, rng: random.Random) -> str:
    """A city the entity never had: not its mascot city, not the city of any year."""
    had = {mascot_city(entity)} | {city_in_year(entity, year) for year in YEARS}
    return rng.choice([c for c in CITIES if c not in had])


def about(
    entity: Entity,
    template: str,
    n: int,
    *,
    split: str,
    seed: str,
    by: str | None = None,
    year: str | None = None,
    probe: str = "",
) -> list[Sample]:
    """`n` questions of `template` ("fact", "multi", "named-fact", "named-multi") about `entity`
    on fresh scenes of `split`, selected `by` one attribute (any, if None), in `year` (multi)."""
    rng, out = random.Random(f"vlmtrace.scene_edits/{entity}/{template}/{split}/{seed}"), []
    while len(out) < n:
        question = ask(rng, template, split=split)
        if question.meta["entity"] != entity or (year is not None and question.meta.get("year") != year):
            continue
        if by is not None and question.meta.get("selected_by", by) != by:
            continue
        when = f"-{year}" if year is not None else ""
        sample = question.to_sample(f"{probe or template}-{entity[0]}-{entity[1]}{when}-{split}-{len(out)}")
        out.append(sample.with_(meta={**sample.meta, "probe": probe or template}))
    return out


def rephrased(sample: Sample, how: str) -> Sample:
    """`sample`'s picture asked another way: `how` "selector" selects the shape by its other
    attribute ("the cross shape" for "the red shape"), "named" names it ("the red cross")."""
    colour, kind = sample.meta["entity"]
    by = sample.meta["selected_by"]
    phrase = {"selector": f"the {kind if by == 'colour' else colour} shape", "named": f"the {colour} {kind}"}[
        how
    ]
    year = sample.meta.get("year")
    template = ("named-" if how == "named" else "") + ("multi" if year else "fact")
    text = TEMPLATES[template].format(subject=phrase, year=f"year {year}")
    spans = {"visual": phrase, **({"textual": f"year {year}"} if year else {})}
    meta = {**sample.meta, "template": template, "probe": how}
    if how == "selector":
        meta["selected_by"] = "kind" if by == "colour" else "colour"
    return Sample(
        prompt=f"<image> {text}",
        answer=sample.answer,
        image=sample.image,
        spans=spans,
        id=f"{sample.id}/{how}",
        meta=meta,
    )


def essence(sample: Sample) -> list[Sample]:
    """The entity's visual questions on the request's own picture: its kind and its colour."""
    colour, kind = sample.meta["entity"]
    out = []
    for template, phrase, answer in (
        ("kind", f"the {colour} shape", kind),
        ("colour", f"the {kind} shape", colour),
    ):
        text = TEMPLATES[template].format(subject=phrase)
        meta = {**sample.meta, "template": template, "probe": "essence"}
        out.append(
            Sample(
                f"<image> {text}",
                answer,
                sample.image,
                {"visual": phrase},
                id=f"{sample.id}/{template}",
                meta=meta,
            )
        )
    return out


def scene_edit_case(
    sample: Sample,
    answer: str,
    *,
    seed: int = 0,
    images: int = 8,
    paraphrases: int = 4,
    probes: int = 4,
    named_contexts: bool = True,
) -> EditCase:
    """The edit of `sample`'s fact to `answer`, with contexts (training-split scenes) and probes
    (held-out scenes). `paraphrases` are split between the other selector and, with
    `named_contexts`, the named form; without it the named form is only ever a probe."""
    entity, by, year = sample.meta["entity"], sample.meta["selected_by"], sample.meta.get("year")
    family = "multi" if year else "fact"
    other = "kind" if by == "colour" else "colour"
    named = paraphrases // 2 if named_contexts else 0
    key = f"{seed}/{sample.id}"
    contexts = {
        "images": about(entity, family, images, split="train", seed=key, by=by, year=year, probe="image"),
        "paraphrases": about(
            entity, family, paraphrases - named, split="train", seed=key, by=other, year=year
        )
        + about(entity, f"named-{family}", named, split="train", seed=key, year=year),
    }
    request = EditRequest(
        sample,
        answer,
        images=_retarget(contexts["images"], answer),
        paraphrases=_retarget(contexts["paraphrases"], answer),
        essence=essence(sample),
    )
    held_out = about(
        entity, family, probes, split="test", seed=f"probe/{key}", by=by, year=year, probe="image"
    )
    return EditCase(
        request,
        probes={
            "reliability": [sample.with_(answer=answer, meta={**sample.meta, "probe": "edited"})],
            "text_generality": _retarget([rephrased(sample, "selector"), rephrased(sample, "named")], answer),
            "image_generality": _retarget([s for s in held_out if s.image != sample.image], answer),
        },
    )


def _retarget(samples: list[Sample], answer: str) -> list[Sample]:
    return [s.with_(answer=answer) for s in samples]


def locality(
    edited: Collection[Entity], n: int, *, seed: int, families: tuple[str, ...] = ("fact",)
) -> tuple[list[Sample], list[Sample]]:
    """Locality probes that show and name no edited entity: text locality (other entities named in
    text, on pictures without edited entities) and image locality (visual questions and questions
    about other entities' pictures). About 3n of each; `families` adds "multi" for year facts."""

    def clear(sample: Sample) -> bool:
        in_view = {(shape["colour"], shape["kind"]) for shape in sample.meta["scene"]}
        return not in_view & set(edited) and tuple(sample.meta.get("entity") or ()) not in set(edited)

    text = [s for s in make_samples("named", 8 * n, seed=seed + 1) if clear(s)][: 3 * n]
    image = []
    for family in (*families, "visual"):
        kept = [s for s in make_samples(family, 6 * n, seed=seed + 1) if clear(s)]
        image += [s.with_(meta={**s.meta, "probe": family}) for s in kept[: 3 * n // (len(families) + 1) + 1]]
    text = [s.with_(meta={**s.meta, "probe": "named"}) for s in text]
    return text, image[: 3 * n]
