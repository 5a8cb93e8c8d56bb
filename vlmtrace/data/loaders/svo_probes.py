"""SVO-Probes, read as published: one CSV row per sentence with a positive and a negative image.

SVO-Probes (Hendricks & Nematzadeh 2021, github google-deepmind/svo_probes, README and
`probing_image_text_models.ipynb`) publishes `svo_probes.csv`: per row a `sentence`, the
subject-verb-object triplets its positive and negative image show (`pos_triplet`,
`neg_triplet`, "girl,sit,shore"), which of the three the negative changes (`subj_neg`,
`verb_neg`, `obj_neg`, True/False), and both images by URL and id (`pos_url`, `neg_url`,
`pos_image_id`, `neg_image_id`). The images themselves are only URLs (`image_urls.txt`); the
loader looks for downloaded copies in IMAGES (the CSV's folder's `images/`, else the folder):
`{image_id}.jpg` (or .jpeg / .png), else the URL's file name.

NOTICE (Golovanevsky et al., github wrudman/NOTICE, `preprocessing/1_preprocessing_svo_probes.ipynb`)
turns each row into two questions that name both words of the changed role, "is girl sit shore
or beach?", answered by the word the image shows: one for the positive image, one for the
negative; each image is the other's semantic pair (SIP). Here the same: the choice "shore or
beach" is the `visual` span (STR replaces it with another question's choice), the other
image's word is the foil, and `meta["negative"]` says which role changed. Rows whose negative
changes not exactly one role, or whose triplets are malformed, are not read.

    samples = load_svo_probes("svo/svo_probes.csv", "svo/images", n=100)
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

from ..sample import Sample
from .question import (
    DEFAULT_TEMPLATE,
    MissingImages,
    RawQuestion,
    SpanRequest,
    assemble,
    check_options,
    csv_row_label,
    csv_rows,
    require_dir,
)

COLUMNS = ("sentence", "pos_triplet", "neg_triplet", "subj_neg", "verb_neg", "obj_neg", "pos_url", "neg_url")
ROLES = ("subject", "verb", "object")
QUESTIONS = {
    "subject": "is {a} or {b} {verb} {object}?",
    "verb": "is {subject} {a} or {b} {object}?",
    "object": "is {subject} {verb} {a} or {b}?",
}
"""NOTICE's questions (before its GPT-3.5 rewording, which is not published): the changed role's two words.
(NOTICE also drops the questions that name "person"; they are kept here.)"""
SPAN = "visual"
EXTENSIONS = (".jpg", ".jpeg", ".png")


def load_svo_probes(
    csv_file: str | Path,
    image_dir: str | Path,
    *,
    n: int | None = None,
    prompt_template: str = DEFAULT_TEMPLATE,
    spans: SpanRequest | None = None,
    missing_images: MissingImages = "raise",
) -> list[Sample]:
    """SVO-Probes rows as pairs of questions (positive image, negative image), each the other's image pair."""
    check_options(n, prompt_template, spans)
    path, image_dir = Path(csv_file), require_dir(image_dir, "SVO-Probes image")
    rows = csv_rows(path, "SVO-Probes' svo_probes.csv", COLUMNS)

    def read() -> Iterator[RawQuestion]:
        for index, row in enumerate(rows):
            role = _negative_role(row)
            positive, negative = _triplet(row["pos_triplet"]), _triplet(row["neg_triplet"])
            if role is None or positive is None or negative is None:
                continue
            slot = ROLES.index(role)
            words = {"subject": positive[0], "verb": positive[1], "object": positive[2]}
            label = csv_row_label(row, index)
            images = {
                "pos": _image(image_dir, row.get("pos_image_id"), row["pos_url"]),
                "neg": _image(image_dir, row.get("neg_image_id"), row["neg_url"]),
            }
            answers = {"pos": positive[slot], "neg": negative[slot]}
            if answers["pos"] == answers["neg"]:
                continue
            choice = f"{answers['pos']} or {answers['neg']}"
            question = QUESTIONS[role].format(a=answers["pos"], b=answers["neg"], **words)
            for side, other in (("pos", "neg"), ("neg", "pos")):
                yield RawQuestion(
                    id=f"svo_probes-{label}-{side}",
                    question=question,
                    answer=answers[side],
                    image=images[side],
                    spans={SPAN: choice},
                    image_pair=images[other],
                    foil=answers[other],
                    meta={
                        "sentence": row["sentence"],
                        "negative": role,
                        "triplet": list(positive if side == "pos" else negative),
                        "pair_id": f"svo_probes-{label}-{other}",
                    },
                )

    hint = "SVO-Probes publishes image URLs (image_urls.txt); save each as {image_id}.jpg in the folder."
    return assemble(
        read(),
        source=path,
        n=n,
        prompt_template=prompt_template,
        spans=spans,
        hint=hint,
        missing_images=missing_images,
    )


def _negative_role(row: dict) -> str | None:
    flags = [
        role
        for role, column in zip(ROLES, ("subj_neg", "verb_neg", "obj_neg"), strict=True)
        if _true(row[column])
    ]
    return flags[0] if len(flags) == 1 else None


def _true(cell: str) -> bool:
    return str(cell).strip().lower() in ("true", "1", "yes")


def _triplet(cell: str) -> tuple[str, str, str] | None:
    """'girl,sit,shore' (or "['girl,sit,shore']", as some copies store it) -> its three words."""
    text = str(cell).strip()
    if text.startswith("["):
        try:
            parsed = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return None
        if not parsed or not isinstance(parsed, list):
            return None
        text = str(parsed[0])
    words = [w.strip() for w in text.split(",")]
    return (words[0], words[1], words[2]) if len(words) == 3 and all(words) else None


def _image(image_dir: Path, image_id: str | None, url: str) -> Path:
    """The downloaded image: {image_id}.jpg / .jpeg / .png, else the URL's file name (first tried if none)."""
    names = [f"{str(image_id).strip()}{ext}" for ext in EXTENSIONS] if image_id not in (None, "") else []
    names.append(Path(urlparse(url).path).name or str(image_id))
    for name in names:
        if (image_dir / name).is_file():
            return image_dir / name
    return image_dir / names[0]
