"""The planted organisms' task: the city of the named shape, with every counterfactual marked.

A planted organism (`vlmtrace.models.zoo.planted`) is trained so that one known component
computes each variable of a small high-level causal model of this task. The task is the
"fact" question of `vlmtrace.data.scenes`, made so that each step of the answer has one
place where it can happen:

    "<image> the cross is the mascot of which city ?"

- the phrase names a shape by its kind, and its last token *is* the kind word, so the kind
  needs no moving before it can be used;
- the picture supplies the colour of that shape (every scene holds two shapes of distinct
  kinds and colours, so the kind selects exactly one);
- the city is the invented fact `mascot_city((colour, kind))` (`vlmtrace.data.mascots`).

Every question carries the two counterfactuals calibration corrupts with, each with the answer
it produces: symmetric token replacement of the kind word by the *other* shape's kind (STR,
same token count) and the semantic image pair (the selected shape recoloured to a colour no
shape has).

    rng = random.Random(0)
    q = ask_planted(rng, split="test")
    q.text, q.answer                   # 'the cross is the mascot of which city ?', 'kelmoor'
    q.meta["kind"], q.subject          # 'cross', 'green' (the colour the picture supplies)
    make_planted_samples(8, seed=0)    # held-out `Sample`s for the engine
"""

from __future__ import annotations

import random

from vlmtrace.data.drawing import Scene, random_scene
from vlmtrace.data.mascots import mascot_city
from vlmtrace.data.sample import Sample
from vlmtrace.data.scenes import Question, _swap_hidden

TEMPLATE = "the {kind} is the mascot of which city ?"
SPAN = "visual"
"""The constraint span's name: "the cross", whose last token is the kind word."""


def selected(scene: Scene, kind: str) -> int:
    """Index of the shape of `kind` in `scene` (scenes hold distinct kinds)."""
    for i, shape in enumerate(scene):
        if shape.kind == kind:
            return i
    raise ValueError(f"no {kind} in the scene {scene}")


def planted_question(scene: Scene, index: int, *, rng: random.Random | None = None) -> Question:
    """The question about shape `index` of `scene`, with its STR and image-pair counterfactuals.

    Without `rng` (one-shape scenes, a training warm-up) there is no counterfactual.
    """
    target = scene[index]
    others = [s for i, s in enumerate(scene) if i != index]
    phrase = f"the {target.kind}"
    answer = mascot_city((target.colour, target.kind))
    replacements, answers, pair = {}, {}, None
    if rng is not None and others:
        other = others[int(rng.random() * len(others))]
        replacements[SPAN] = f"the {other.kind}"
        answers[SPAN] = mascot_city((other.colour, other.kind))
        pair = _swap_hidden(rng, scene, index, "kind")  # recolour to a colour no shape has
        answers["image_pair"] = mascot_city((pair[index].colour, target.kind))
    return Question(
        family="planted",
        template="planted",
        scene=scene,
        text=TEMPLATE.format(kind=target.kind),
        answer=answer,
        spans={SPAN: phrase},
        replacements=replacements,
        answers=answers,
        pair=pair,
        subject=target.colour,
        meta={"kind": target.kind, "colour": target.colour, "selected": index},
    )


def ask_planted(rng: random.Random, *, split: str | None = None, objects: int = 2) -> Question:
    """One question about a fresh scene of `split` (two shapes; one for the warm-up)."""
    scene = random_scene(rng, objects=objects, split=split)
    index = int(rng.random() * len(scene))
    return planted_question(scene, index, rng=rng if objects > 1 else None)


def make_planted_samples(n: int, *, seed: int, split: str = "test") -> list[Sample]:
    """`n` questions as `Sample`s (held-out scenes by default), the same for the same seed."""
    rng = random.Random(f"vlmtrace.planted/{split}/{seed}")
    return [ask_planted(rng, split=split).to_sample(f"planted-{split}-{seed}-{i}") for i in range(n)]
