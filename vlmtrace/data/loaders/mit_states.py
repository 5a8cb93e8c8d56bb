"""MIT-States, read as published: a folder of images per "adjective noun" state.

MIT-States (Isola, Lim & Adelson 2015, web.mit.edu/phillipi/Public/states_and_transformations)
unpacks to `release_dataset/images/`, one folder per state named "adjective noun" ("ancient
building", "sliced apple"; folders named by the noun alone hold unannotated images and are not
read). NOTICE (Golovanevsky et al., github wrudman/NOTICE,
`preprocessing/1_preprocessing_mit_states.ipynb`) asks of each image "Is this {noun} {adjective}
or {other}?", the other adjective being one that the same noun also has images of, in an order
drawn at random, and pairs the image with one of the same noun in the other state (SIP). Here the
same, seeded: the choice "{adjective} or {other}" is the `visual` span, the other state's image
the image pair, its adjective the foil; `meta["noun"]` and `meta["state"]` keep both words.
The other adjective is never a near-synonym of the answer: NOTICE's notebook lists them per
adjective ("old": ancient, weathered, rusty), grouped here in `NEAR_SYNONYMS`. (NOTICE also keeps
only the 58 adjectives its lists name; every state is read here.)

    samples = load_mit_states("release_dataset/images", n=100)
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

from ..sample import Sample
from .question import (
    DEFAULT_TEMPLATE,
    DatasetError,
    MissingImages,
    RawQuestion,
    SpanRequest,
    assemble,
    check_options,
    require_dir,
)

NEAR_SYNONYMS = (
    {"small", "tiny", "little"},
    {"large", "huge", "massive", "thick"},
    {"thin", "slim"},
    {"cracked", "broken", "chipped", "shattered", "splintered", "crushed", "scratched"},
    {"sliced", "diced"},
    {"cut", "torn"},
    {"wet", "moist"},
    {"old", "ancient", "weathered", "rusty"},
    {"new", "fresh", "clean"},
    {"crumpled", "wrinkled", "crinkled"},
    {"ruffled", "frayed"},
    {"windblown", "barren"},
)
"""Adjectives too close to ask "old or ancient?" about (NOTICE, 1_preprocessing_mit_states.ipynb)."""
QUESTION = "Is this {noun} {first} or {second}?"
SPAN = "visual"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def mit_states_images(root: Path) -> Path | None:
    """The folder of "adjective noun" state folders: ROOT/release_dataset/images, ROOT/images or ROOT."""
    for folder in (root / "release_dataset" / "images", root / "images", root):
        if folder.is_dir() and _states(folder):
            return folder
    return None


def _states(folder: Path) -> dict[tuple[str, str], list[Path]]:
    """(adjective, noun) -> its images, for the folders named "adjective noun" that hold images."""
    found = {}
    for state in sorted(p for p in folder.iterdir() if p.is_dir() and " " in p.name):
        images = sorted(p for p in state.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if images:
            adjective, noun = state.name.split(" ", 1)
            found[(adjective, noun)] = images
    return found


def load_mit_states(
    image_dir: str | Path,
    *,
    n: int | None = None,
    prompt_template: str = DEFAULT_TEMPLATE,
    spans: SpanRequest | None = None,
    missing_images: MissingImages = "raise",
    seed: int = 0,
) -> list[Sample]:
    """MIT-States images as NOTICE's state questions, each paired with the same noun in another state."""
    check_options(n, prompt_template, spans)
    image_dir = require_dir(image_dir, "MIT-States image")
    states = _states(image_dir)
    if not states:
        raise DatasetError(
            f"{image_dir} holds no 'adjective noun' folders of images; pass MIT-States' "
            "release_dataset/images."
        )
    rng = random.Random(f"vlmtrace.mit_states/{seed}")
    adjectives: dict[str, list[str]] = {}
    for adjective, noun in states:
        adjectives.setdefault(noun, []).append(adjective)

    def read() -> Iterator[RawQuestion]:
        for (adjective, noun), images in states.items():
            others = [a for a in adjectives[noun] if a != adjective and not _near(a, adjective)]
            if not others:
                continue  # one state of this noun: no counterfactual image
            for image in images:
                other = others[int(rng.random() * len(others))]
                first, second = (adjective, other) if rng.random() < 0.5 else (other, adjective)
                partners = states[(other, noun)]
                yield RawQuestion(
                    id=f"mit_states-{adjective}_{noun.replace(' ', '_')}-{image.stem}",
                    question=QUESTION.format(noun=noun, first=first, second=second),
                    answer=adjective,
                    image=image,
                    spans={SPAN: f"{first} or {second}"},
                    image_pair=partners[int(rng.random() * len(partners))],
                    foil=other,
                    meta={"noun": noun, "state": adjective, "pair_state": other},
                )

    hint = "MIT-States keeps each state's images in release_dataset/images/'adjective noun'/."
    return assemble(
        read(),
        source=image_dir,
        n=n,
        prompt_template=prompt_template,
        spans=spans,
        hint=hint,
        missing_images=missing_images,
    )


def _near(first: str, second: str) -> bool:
    return any(first in group and second in group for group in NEAR_SYNONYMS)
