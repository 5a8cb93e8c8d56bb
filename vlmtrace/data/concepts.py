"""Visual complex concepts: B_s / B_d sets of a conjunction or a disjunction, and image pairs across them.

The seed's "visual complex concepts" contrast two sets of objects for one composed concept:

    AND   B_s = {a | red AND cone}
          B_d = {a | red AND NOT cone  (+)  NOT red AND cone  (+)  NOT red AND NOT cone}
    OR    B_s = {a | metallic AND NOT cube  (+)  NOT metallic AND cube  (+)  metallic AND cube}
          B_d = {a | NOT metallic AND NOT cube}

An image is in B_s when one of its objects is, and in B_d when none is; each B_d image (AND) or
B_s image (OR) belongs to one named *member* of its set. A question whose answer is the concept
("Is there a red cone?", "Is there a metal thing or a cube?") is yes on B_s and no on B_d, so a
B_s image paired with a B_d image is a semantic image pair (NOTICE's SIP) that flips the answer,
and the member says which attributes the pair changes: one ("red AND NOT cone": the shape), the
other, or both. Where a trace of pairs of each member differs says where the two attributes are
read and where the composition happens.

    red_cylinder = Concept.conjunction("color", "red", "shape", "cylinder")  # CLEVR attribute names
    and_pairs = clevr_concept_samples(red_cylinder, "CLEVR_v1.0", n=8)      # from CLEVR's scenes
    or_pairs = synthetic_concept_samples(Concept.disjunction("colour", "red", "kind", "square"), 8)
    both = interleaved([and_pairs, or_pairs], 8)                           # 4 of each, taking turns

On the organisms' scenes, which no yes / no question was trained on, the pairs ask instead for the
one attribute a member changes (`synthetic_concept_samples`).

Each sample carries `meta["concept"]` ("AND" / "OR"), `meta["member"]` (the member that varies across
pairs: of the B_d image for AND, of the B_s image for OR), `meta["clean_member"]` and
`meta["pair_member"]`; the concept phrase is the `concept` span.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .loaders.question import DataFileMissing, DatasetError, first_found, read_json, required_field
from .sample import Sample


@dataclass(frozen=True)
class Concept:
    """Two attribute tests combined by AND or OR, and the question that asks for the concept."""

    operator: str  # "AND" or "OR"
    first: tuple[str, str]  # (attribute, value), e.g. ("color", "red")
    second: tuple[str, str]
    question: str  # with {first} and {second}: the values as words
    phrase: str  # the concept's words in the question: the `concept` span

    @classmethod
    def conjunction(cls, attribute: str, value: str, other: str, other_value: str) -> Concept:
        return cls(
            "AND",
            (attribute, value),
            (other, other_value),
            "Is there a {first} {second}?",
            "{first} {second}",
        )

    @classmethod
    def disjunction(cls, attribute: str, value: str, other: str, other_value: str) -> Concept:
        return cls(
            "OR",
            (attribute, value),
            (other, other_value),
            "Is there a {first} thing or a {second}?",
            "{first} thing or a {second}",
        )

    def words(self) -> dict[str, str]:
        return {"first": self.first[1], "second": self.second[1]}

    def member(self, thing: Mapping[str, Any]) -> str:
        """The member of B_s or B_d an object belongs to, e.g. "red AND NOT cylinder"."""
        a = thing.get(self.first[0]) == self.first[1]
        b = thing.get(self.second[0]) == self.second[1]
        return f"{'' if a else 'NOT '}{self.first[1]} AND {'' if b else 'NOT '}{self.second[1]}"

    def holds(self, thing: Mapping[str, Any]) -> bool:
        a = thing.get(self.first[0]) == self.first[1]
        b = thing.get(self.second[0]) == self.second[1]
        return (a and b) if self.operator == "AND" else (a or b)

    def members(self) -> tuple[list[str], list[str]]:
        """(members of B_s, members of B_d), in the seed's order."""
        x, y = self.first[1], self.second[1]
        both, only_x, only_y, neither = (
            f"{x} AND {y}",
            f"{x} AND NOT {y}",
            f"NOT {x} AND {y}",
            f"NOT {x} AND NOT {y}",
        )
        if self.operator == "AND":
            return [both], [only_x, only_y, neither]
        return [only_x, only_y, both], [neither]

    def image_member(self, objects: Sequence[Mapping[str, Any]]) -> tuple[bool, str]:
        """(in B_s, the member that places the image there): B_s by any object that holds, else the
        B_d member of the object nearest to holding (most attributes matching)."""
        holding = [o for o in objects if self.holds(o)]
        if holding:
            return True, self.member(holding[0])
        nearest = min(objects, key=lambda o: self.member(o).count("NOT")) if objects else {}
        return False, self.member(nearest)


def pair_samples(
    concept: Concept,
    images: Sequence[tuple[str, Any, list[Mapping[str, Any]], Any]],
    n: int,
    *,
    source: str,
    seed: int = 0,
) -> list[Sample]:
    """`n` pairs: a B_s image (yes) with a B_d image (no), members taking turns on the side that varies.

    `images`: (id, image or its path, objects, meta extra) per image; AND varies the B_d member, OR the
    B_s one. Paths are opened only for the images paired (a CLEVR split has 15,000 scenes).
    """
    inside: dict[str, list[tuple]] = {}
    outside: dict[str, list[tuple]] = {}
    for entry in images:
        holds, member = concept.image_member(entry[2])
        (inside if holds else outside).setdefault(member, []).append(entry)
    members_s, members_d = concept.members()
    varying, fixed = (members_d, inside) if concept.operator == "AND" else (members_s, outside)
    pool_varying = outside if concept.operator == "AND" else inside
    rng = random.Random(f"vlmtrace.concepts/{concept.operator}/{seed}")
    phrase = concept.phrase.format(**concept.words())
    available = [m for m in varying if pool_varying.get(m)]
    fixed_images = [entry for entries in fixed.values() for entry in entries]
    if not available or not fixed_images:
        side = "B_s" if concept.operator == "AND" else "B_d"
        raise DatasetError(
            f"{source} has no image pair for {concept.operator} ({phrase}): "
            f"it needs images in {side} and in at least one member of {varying}; choose attribute values "
            "its scenes hold."
        )
    samples = []
    question = concept.question.format(**concept.words())
    for i in range(n):
        member = available[i % len(available)]
        varied = pool_varying[member][(i // len(available)) % len(pool_varying[member])]
        other = fixed_images[int(rng.random() * len(fixed_images))]
        clean, corrupt = (other, varied) if concept.operator == "AND" else (varied, other)
        samples.append(
            Sample(
                prompt=question,
                answer="yes",
                image=_opened(clean[1], source),
                spans={"concept": phrase},
                image_pair=_opened(corrupt[1], source),
                foil="no",
                id=f"concept-{concept.operator.lower()}-{i}",
                meta={
                    "question": question,
                    "concept": concept.operator,
                    "member": member,
                    "clean_member": concept.image_member(clean[2])[1],
                    "pair_member": concept.image_member(corrupt[2])[1],
                    "clean_image": clean[0],
                    "pair_id": corrupt[0],
                    **clean[3],
                },
            )
        )
    return samples


def _opened(image: Any, source: str) -> Any:
    """A PIL image: `image` itself, or the file at the path `image`."""
    if not isinstance(image, Path):
        return image
    if not image.is_file():
        raise DataFileMissing(
            f"image {image} of a scene in {source} does not exist; CLEVR keeps images in images/{{split}}/."
        )
    from PIL import Image

    with Image.open(image) as picture:
        return picture.convert("RGB")


def clevr_concept_samples(
    concept: Concept, root: str | Path, n: int, *, split: str = "val", seed: int = 0
) -> list[Sample]:
    """Pairs from CLEVR's scenes as CLEVR_v1.0.zip unpacks (Johnson et al. 2017,
    cs.stanford.edu/people/jcjohns/clevr): scenes/CLEVR_{split}_scenes.json, whose `scenes` list each
    image's `image_filename` and `objects` (color, shape, material, size), and images/{split}/."""
    root = Path(root)
    scenes_file = first_found(f"CLEVR_{split}_scenes.json", [root / "scenes", root])
    if not scenes_file.is_file():
        raise DataFileMissing(
            f"the concepts' pairs come from CLEVR's scenes, and {root} has no "
            f"scenes/CLEVR_{split}_scenes.json. Give CLEVR_v1.0 as it unpacks (scenes/ and images/{split}/), "
            "or leave out --data to use the organisms' own scenes."
        )
    scenes = read_json(scenes_file, "CLEVR scenes")
    if not isinstance(scenes, dict) or not isinstance(scenes.get("scenes"), list):
        raise DatasetError(f"{scenes_file} is not a CLEVR scenes file (an object with a 'scenes' list).")
    folders = [root / "images" / split, root / "images", root]
    images = []
    for index, scene in enumerate(scenes["scenes"]):
        name = required_field(scene, "image_filename", scenes_file, index)
        objects = scene.get("objects") or []
        images.append((f"clevr-{scene.get('image_index', index)}", first_found(name, folders), objects, {}))
    return pair_samples(concept, images, n, source=str(scenes_file), seed=seed)


def interleaved(groups: Sequence[Sequence[Sample]], n: int) -> list[Sample]:
    """The first `n` samples taking turns across `groups` (AND, OR, AND, ...), so a cut keeps both."""
    turns = [group[i] for i in range(max(map(len, groups), default=0)) for group in groups if i < len(group)]
    return turns[:n]


def synthetic_concept_samples(
    concept: Concept, n: int, *, seed: int = 0, split: str = "test"
) -> list[Sample]:
    """Pairs of the organisms' scenes: a scene with the target object in one member and the same scene
    with only that object changed into the other side's member, so the pair differs in one object.

    The organisms never learned a yes / no question, so these pairs ask what they did learn: the
    attribute the member changes, selecting the object by the attribute it keeps ("what kind is the
    red shape ?" when "red AND NOT square" replaces "red AND square"). Members that change both
    attributes (AND: NOT red AND NOT square; OR: red AND square) leave no phrase that names the
    object in both images and are not drawn here; CLEVR's yes / no pairs keep them. Attributes are
    the scenes' `colour` and `kind`; the target's exact box is `meta["regions"]`.
    """
    from .drawing import COLOURS, KINDS, box, random_scene, to_image, with_shape

    rng = random.Random(f"vlmtrace.synthetic_concepts/{concept.operator}/{seed}")
    values = {"colour": list(COLOURS), "kind": list(KINDS)}
    unknown = sorted({concept.first[0], concept.second[0]} - set(values))
    if unknown or concept.first[0] == concept.second[0]:
        raise ValueError(
            f"the organisms' scenes have the attributes colour and kind; {concept} names {unknown}."
        )
    members_s, members_d = concept.members()
    varying = members_d if concept.operator == "AND" else members_s
    single = [m for m in varying if len(_flipped(concept, *_sides(concept, m, members_s, members_d))) == 1]

    def meets(member: str, attribute: str, value: str) -> bool:
        wanted = concept.first if concept.first[0] == attribute else concept.second
        return (value == wanted[1]) != (f"NOT {wanted[1]}" in member)

    def draw(member: str, attribute: str, avoid: str | None = None) -> str:
        options = [v for v in values[attribute] if meets(member, attribute, v) and v != avoid]
        return options[int(rng.random() * len(options))]

    samples: list[Sample] = []
    attempts = 0
    while len(samples) < n:
        attempts += 1
        if attempts > 1000 * n:
            raise DatasetError(
                f"could not draw {n} synthetic pairs for {concept}; choose other attribute values."
            )
        member = single[len(samples) % len(single)]
        clean_member, pair_member = _sides(concept, member, members_s, members_d)
        (changed,) = _flipped(concept, clean_member, pair_member)
        kept = "kind" if changed == "colour" else "colour"
        scene = random_scene(rng, objects=2, split=split)
        target = int(rng.random() * len(scene))
        clean_values = {a: draw(clean_member, a) for a in values}
        pair_values = {**clean_values, changed: draw(pair_member, changed, avoid=clean_values[changed])}
        clean = with_shape(scene, target, **clean_values)
        corrupt = with_shape(scene, target, **pair_values)
        others = [{"colour": s.colour, "kind": s.kind} for i, s in enumerate(clean) if i != target]
        if any(concept.holds(o) for o in others) or not (_distinct(clean) and _distinct(corrupt)):
            continue  # the other object must not hold the concept, and selector phrases name one object
        phrase = f"the {clean_values[kept]} shape"
        question = f"what {changed} is {phrase} ?"
        samples.append(
            Sample(
                prompt=question,
                answer=clean_values[changed],
                image=to_image(clean),
                spans={"concept": phrase},
                image_pair=to_image(corrupt),
                foil=pair_values[changed],
                id=f"concept-{concept.operator.lower()}-{split}-{seed}-{len(samples)}",
                meta={
                    "question": question,
                    "concept": concept.operator,
                    "member": member,
                    "clean_member": clean_member,
                    "pair_member": pair_member,
                    "changed": changed,
                    "regions": [box(clean[target])],
                    "scene": [vars(s) for s in clean],
                    "pair_scene": [vars(s) for s in corrupt],
                },
            )
        )
    return samples


def _sides(concept: Concept, member: str, members_s: list[str], members_d: list[str]) -> tuple[str, str]:
    """(clean member, pair member) of a pair whose varying side is `member`: AND varies B_d against B_s's
    one member, OR varies B_s against B_d's one member."""
    return (members_s[0], member) if concept.operator == "AND" else (member, members_d[0])


def _flipped(concept: Concept, clean_member: str, pair_member: str) -> list[str]:
    """The attributes whose test differs between two members."""
    flipped = []
    for attribute, value in (concept.first, concept.second):
        if (f"NOT {value}" in clean_member) != (f"NOT {value}" in pair_member):
            flipped.append(attribute)
    return flipped


def _distinct(scene) -> bool:
    return len({s.colour for s in scene}) == len(scene) and len({s.kind for s in scene}) == len(scene)
