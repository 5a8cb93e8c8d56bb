"""The facial-expression set NOTICE used, read as published: a folder of face images per emotion.

NOTICE (Golovanevsky et al., github wrudman/NOTICE,
`preprocessing/1_preprocessing_facial_expressions.ipynb`) uses Kaggle's "Facial Emotion
Expressions" (samaneheslamifar/facial-emotion-expressions), which unpacks to
`images/{train,validation}/{emotion}/*.jpg` with the emotions angry, disgust, fear, happy,
neutral, sad and surprise. It asks of each image "Is this person feeling {a} or {b}?" (the
emotion as an adjective: disgusted, fearful, surprised; the other emotion drawn at random, the
order too) and pairs the image with a face of the other emotion (SIP). Here the same, seeded:
the choice "{a} or {b}" is the `visual` span, the other face the image pair, its emotion the foil.

    samples = load_facial_expressions("facial-emotion-expressions/images", split="train", n=100)
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

ADJECTIVES = {
    "angry": "angry",
    "disgust": "disgusted",
    "fear": "fearful",
    "happy": "happy",
    "neutral": "neutral",
    "sad": "sad",
    "surprise": "surprised",
}
"""The release's folder names -> the adjective NOTICE's question uses."""
QUESTION = "Is this person feeling {first} or {second}?"
SPAN = "visual"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def facial_expressions_split(root: Path, split: str = "train") -> Path | None:
    """The split's folder of emotion folders: ROOT/images/SPLIT, ROOT/SPLIT, or ROOT when it holds them."""
    for folder in (root / "images" / split, root / split, root):
        if folder.is_dir() and len(_emotions(folder)) >= 2:
            return folder
    return None


def _emotions(folder: Path) -> dict[str, list[Path]]:
    found = {}
    for emotion in sorted(ADJECTIVES):
        directory = folder / emotion
        if directory.is_dir():
            images = sorted(p for p in directory.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if images:
                found[emotion] = images
    return found


def load_facial_expressions(
    split_dir: str | Path,
    *,
    n: int | None = None,
    prompt_template: str = DEFAULT_TEMPLATE,
    spans: SpanRequest | None = None,
    missing_images: MissingImages = "raise",
    seed: int = 0,
) -> list[Sample]:
    """Faces of one split (images/train/{emotion}/), each asked about and paired with another emotion's face.

    Emotions take turns (the first face of each emotion, then the second of each, ...), so the first
    n samples cover every emotion.
    """
    check_options(n, prompt_template, spans)
    split_dir = require_dir(split_dir, "facial-expression split")
    emotions = _emotions(split_dir)
    if len(emotions) < 2:
        raise DatasetError(
            f"{split_dir} holds fewer than two emotion folders ({', '.join(ADJECTIVES)}); pass the release's "
            "images/train (or images/validation)."
        )
    rng = random.Random(f"vlmtrace.facial_expressions/{seed}")
    names = list(emotions)

    def read() -> Iterator[RawQuestion]:
        longest = max(len(images) for images in emotions.values())
        for index in range(longest):
            for emotion in names:
                if index >= len(emotions[emotion]):
                    continue
                image = emotions[emotion][index]
                other = [e for e in names if e != emotion][int(rng.random() * (len(names) - 1))]
                answer, foil = ADJECTIVES[emotion], ADJECTIVES[other]
                first, second = (answer, foil) if rng.random() < 0.5 else (foil, answer)
                partners = emotions[other]
                yield RawQuestion(
                    id=f"facial_expressions-{emotion}-{image.stem}",
                    question=QUESTION.format(first=first, second=second),
                    answer=answer,
                    image=image,
                    spans={SPAN: f"{first} or {second}"},
                    image_pair=partners[int(rng.random() * len(partners))],
                    foil=foil,
                    meta={"emotion": emotion, "pair_emotion": other, "split": split_dir.name},
                )

    hint = "the release keeps faces in images/{train,validation}/{emotion}/."
    return assemble(
        read(),
        source=split_dir,
        n=n,
        prompt_template=prompt_template,
        spans=spans,
        hint=hint,
        missing_images=missing_images,
    )
