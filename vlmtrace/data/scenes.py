"""Questions about synthetic scenes, with their constraint spans and counterfactuals marked.

Causal tracing needs questions whose answer depends on a known part of the input, and a
corrupted input that changes exactly that part. Here both are built in: every question
selects one object of a scene by an attribute named in a phrase ("the red shape"), and comes
with a semantic image pair (the same scene, one attribute of that object changed) and a
symmetric replacement phrase (same number of tokens, another object or entity), each with the
answer it produces.

    samples = make_samples("multi", 100, seed=0, split="test")
    s = samples[0]
    s.prompt        # '<image> which city did the red shape represent in year 2006 ?'
    s.spans         # {'visual': 'the red shape', 'textual': 'year 2006'}
    s.replacements  # {'visual': 'the blue shape', 'textual': 'year 2008'}
    s.meta["answers"]  # what the model should say with each counterfactual applied

Families (`FAMILIES`):
- "visual": read the picture. Templates "kind" (what kind is the red shape ?), "colour" (what
  colour is the cross shape ?) and "count" (how many shapes are there ?, one to three; it has
  no phrase to replace).
- "position": which side is the red shape on ? (left or right half of the picture). The
  shipped organisms do not learn it within their training budget (LLaVA sees it in training
  and answers at chance; BLIP never sees it), so it is kept out of the "visual" accuracy; it
  is here for larger models.
- "fact": parametric memory about a seen entity: the selected shape is the mascot of which
  city (`vlmtrace.data.mascots`).
- "multi": a visual plus a textual constraint: which city did the red shape represent in
  year 2006 ? (a (shape, year) table).
- "named": the fact and multi questions with the entity named in text ("the red cross"), so
  the answer depends on the phrase and not on the picture; mixed into training, they make the
  model read the phrase, so that replacing the visual-constraint phrase (Basu et al.) really
  moves the answer. Their `image_pair` is None (no picture change moves their answer).

Every word is one token of the organisms' word-level tokenizer (`VOCABULARY`). Prompts carry
the `<image>` placeholder for LLaVA-style models; BLIP reads the image through cross-attention
and has no image token, so pass its samples through `for_blip` (which drops the placeholder).
Train and test questions never share a scene (`vlmtrace.data.drawing.split_of`).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vlmtrace.data.drawing import (
    COLOURS,
    GRID,
    KINDS,
    SIZES,
    Scene,
    Shape,
    box,
    free_cells,
    jitters,
    pick,
    random_scene,
    to_image,
    with_shape,
)
from vlmtrace.data.mascots import CITIES, YEARS, city_in_year, mascot_city
from vlmtrace.data.sample import Sample

IMAGE_TOKEN = "<image>"
FAMILIES: dict[str, tuple[str, ...]] = {
    "visual": ("kind", "colour", "count"),
    "position": ("side",),
    "fact": ("fact",),
    "multi": ("multi",),
    "named": ("named-fact", "named-multi"),
}
OBJECTS = (2,)  # shapes per scene: two, so that a phrase must select one (../shared/NOTES.md)
COUNTS = (1, 2, 3)  # shapes per scene in counting questions
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
SPLITS = ("train", "test")
TEMPLATES = {
    "kind": "what kind is {subject} ?",
    "colour": "what colour is {subject} ?",
    "side": "which side is {subject} on ?",
    "count": "how many shapes are there ?",
    "fact": "{subject} is the mascot of which city ?",
    "multi": "which city did {subject} represent in {year} ?",
    "named-fact": "{subject} is the mascot of which city ?",
    "named-multi": "which city did {subject} represent in {year} ?",
}


@dataclass(frozen=True)
class Question:
    """A question before it becomes a `Sample`: the scene is kept as data, not pixels.

    Training draws hundreds of thousands of these and renders arrays directly, so it never pays
    for PIL images or a processor; `to_sample` gives the public form.
    """

    family: str
    template: str
    scene: Scene
    text: str  # the prompt without the image placeholder
    answer: str
    spans: dict[str, str]
    replacements: dict[str, str] = field(default_factory=dict)
    answers: dict[str, str] = field(default_factory=dict)  # counterfactual -> its answer
    pair: Scene | None = None  # the semantic image pair, when a picture change moves the answer
    subject: str | None = None  # the attribute the subject phrase leaves to the picture
    meta: dict[str, Any] = field(default_factory=dict)

    def to_sample(self, id: str) -> Sample:
        # Exact boxes: object regions (knockout, head functions, inpainting) need no detector here.
        boxes = [box(s) for s in self.scene]
        selected = self.meta.get("selected")
        regions = {"regions": [boxes[selected]]} if selected is not None else {}
        return Sample(
            prompt=f"{IMAGE_TOKEN} {self.text}",
            answer=self.answer,
            image=to_image(self.scene),
            spans=dict(self.spans),
            replacements=dict(self.replacements),
            image_pair=to_image(self.pair) if self.pair is not None else None,
            foil=self.answers.get("image_pair", self.answers.get("visual")),
            id=id,
            meta={
                "family": self.family,
                "template": self.template,
                "scene": [vars(s) for s in self.scene],
                "boxes": boxes,
                **regions,
                "answers": dict(self.answers),
                "subject": self.subject,
                **self.meta,
            },
        )


def _phrase(shape: Shape, by: str) -> str:
    """The phrase that selects `shape` in its scene: by colour or by kind."""
    return f"the {shape.colour} shape" if by == "colour" else f"the {shape.kind} shape"


def _hidden(shape: Shape, by: str) -> str:
    """What the picture must supply once `shape` is selected `by` one attribute."""
    return shape.kind if by == "colour" else shape.colour


def _swap_hidden(rng: random.Random, scene: Scene, index: int, by: str) -> Scene:
    """The image pair: the selected shape's hidden attribute set to one no shape has."""
    if by == "colour":
        kind = pick(rng, [k for k in KINDS if k not in {s.kind for s in scene}])
        return with_shape(scene, index, kind=kind)
    colour = pick(rng, [c for c in COLOURS if c not in {s.colour for s in scene}])
    return with_shape(scene, index, colour=colour)


def _ask_about_shape(rng: random.Random, template: str, split: str | None, objects: int | None) -> Question:
    """A question that selects one shape of a scene by colour or kind.

    With one shape (a training warm-up, never in `make_samples`) there is nothing to select
    against, so the question has no phrase replacement.
    """
    by = "colour" if template == "kind" else "kind" if template == "colour" else pick(rng, ("colour", "kind"))
    while True:
        scene = random_scene(rng, objects=objects or pick(rng, OBJECTS), split=split)
        index = int(rng.random() * len(scene))
        target = scene[index]
        others = [s for i, s in enumerate(scene) if i != index]
        if template == "side":  # the replacement must select a shape on the other side
            others = [s for s in others if s.side != target.side]
        if others or len(scene) == 1:
            break
    other = pick(rng, others) if others else None
    year = pick(rng, YEARS)

    def answer(shape: Shape, year: str = year) -> str:
        if template == "kind":
            return shape.kind
        if template == "colour":
            return shape.colour
        if template == "side":
            return shape.side
        if template == "fact":
            return mascot_city((shape.colour, shape.kind))
        return city_in_year((shape.colour, shape.kind), year)

    if template == "side":
        cells = [c for c in free_cells(scene) if (c[1] < GRID // 2) != (target.side == "left")]
        same_row = [c for c in cells if c[0] == target.cell[0]]
        pair = with_shape(scene, index, cell=pick(rng, same_row or cells))
        moved = pair[index]
    else:
        pair = _swap_hidden(rng, scene, index, by)
        moved = pair[index]
    subject = _phrase(target, by)
    spans = {"visual": subject}
    replacements = {"visual": _phrase(other, by)} if other else {}
    answers = {"image_pair": answer(moved)}
    if other:
        answers["visual"] = answer(other)
    text = TEMPLATES[template].format(subject=subject, year=f"year {year}")
    if template == "multi":
        other_year = pick(rng, [y for y in YEARS if y != year])
        spans["textual"] = f"year {year}"
        replacements["textual"] = f"year {other_year}"
        answers["textual"] = answer(target, other_year)
    meta = {"selected": index, "selected_by": by}
    if template in ("fact", "multi"):
        meta["entity"] = (target.colour, target.kind)
    if template == "multi":
        meta["year"] = year
    return Question(
        family=template if template in ("fact", "multi") else "visual",
        template=template,
        scene=scene,
        text=text,
        answer=answer(target),
        spans=spans,
        replacements=replacements,
        answers=answers,
        pair=pair,
        subject=_hidden(target, by),
        meta=meta,
    )


def _ask_count(rng: random.Random, template: str, split: str | None, objects: int | None) -> Question:
    """How many shapes; the image pair adds or removes one shape."""
    scene = random_scene(rng, objects=objects or pick(rng, COUNTS), split=split)
    if len(scene) == max(COUNTS) or (len(scene) > min(COUNTS) and rng.random() < 0.5):
        pair = scene[:-1]
    else:
        colour = pick(rng, [c for c in COLOURS if c not in {s.colour for s in scene}])
        kind = pick(rng, [k for k in KINDS if k not in {s.kind for s in scene}])
        size = pick(rng, list(SIZES))
        jitter = (pick(rng, jitters(size)), pick(rng, jitters(size)))
        pair = (*scene, Shape(colour, kind, size, pick(rng, free_cells(scene)), jitter))
    return Question(
        family="visual",
        template=template,
        scene=scene,
        text=TEMPLATES[template],
        answer=COUNT_WORDS[len(scene)],
        spans={"visual": "shapes"},
        answers={"image_pair": COUNT_WORDS[len(pair)]},
        pair=pair,
    )


def _ask_named(rng: random.Random, template: str, split: str | None, objects: int | None) -> Question:
    """A fact or multi question whose entity is named in text; the picture is a distractor."""
    scene = random_scene(rng, objects=objects or pick(rng, OBJECTS), split=split)
    entity = (pick(rng, list(COLOURS)), pick(rng, KINDS))
    other = pick(rng, [(c, k) for c in COLOURS for k in KINDS if (c, k) != entity])
    year = pick(rng, YEARS)

    def answer(e: tuple[str, str], year: str = year) -> str:
        return mascot_city(e) if template == "named-fact" else city_in_year(e, year)

    subject = f"the {entity[0]} {entity[1]}"
    spans = {"visual": subject}
    replacements = {"visual": f"the {other[0]} {other[1]}"}
    answers = {"visual": answer(other)}
    meta: dict[str, Any] = {"entity": entity}
    if template == "named-multi":
        other_year = pick(rng, [y for y in YEARS if y != year])
        spans["textual"] = f"year {year}"
        replacements["textual"] = f"year {other_year}"
        answers["textual"] = answer(entity, other_year)
        meta["year"] = year
    return Question(
        family="named",
        template=template,
        scene=scene,
        text=TEMPLATES[template].format(subject=subject, year=f"year {year}"),
        answer=answer(entity),
        spans=spans,
        replacements=replacements,
        answers=answers,
        meta=meta,
    )


_ASK: dict[str, Callable[[random.Random, str, str | None, int | None], Question]] = {
    "kind": _ask_about_shape,
    "colour": _ask_about_shape,
    "side": _ask_about_shape,
    "fact": _ask_about_shape,
    "multi": _ask_about_shape,
    "count": _ask_count,
    "named-fact": _ask_named,
    "named-multi": _ask_named,
}


def ask(
    rng: random.Random, template: str, *, split: str | None = None, objects: int | None = None
) -> Question:
    """One question of `template` (a key of `TEMPLATES`) about a fresh scene of `split`.

    `objects` fixes the number of shapes (default: any of `OBJECTS`); training uses one-shape
    scenes as a warm-up in which reading a shape does not yet require selecting it.
    """
    if template not in _ASK:
        raise ValueError(f"unknown question template {template!r}; expected one of {sorted(_ASK)}")
    return _ASK[template](rng, template, split, objects)


def make_samples(family: str, n: int, *, seed: int, split: str = "test") -> list[Sample]:
    """`n` questions of `family`, the same for the same (family, n, seed, split).

    Templates of a family alternate (question i uses template i mod their number), so every
    slice of the list is balanced. Samples of split "test" show only held-out scenes.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown question family {family!r}; expected one of {list(FAMILIES)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    rng = random.Random(f"vlmtrace.scenes/{family}/{split}/{seed}")
    templates = FAMILIES[family]
    return [
        ask(rng, templates[i % len(templates)], split=split).to_sample(f"{family}-{split}-{seed}-{i}")
        for i in range(n)
    ]


def for_blip(sample: Sample) -> Sample:
    """The sample as BLIP reads it: the same question without the `<image>` placeholder."""
    prompt = sample.prompt.replace(IMAGE_TOKEN, "").strip()
    return sample.with_(prompt=prompt)


def _vocabulary() -> tuple[str, ...]:
    words: list[str] = []
    for template in TEMPLATES.values():
        words += template.replace("{subject}", "the shape").replace("{year}", "year").split()
    words += [*COLOURS, *KINDS, "left", "right", *COUNT_WORDS.values(), *CITIES, *YEARS]
    return tuple(dict.fromkeys(words))


VOCABULARY = _vocabulary()
"""Every word any question or answer uses, in a fixed order (the organisms' tokenizer)."""
