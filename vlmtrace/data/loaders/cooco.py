"""COOCO (Common Objects Out-of-Context), read by the file names its generation code writes.

COOCO (Merlo, Takmaz, Chen & Gatt, "Common Objects Out-of-Context: Semantic Violation in Scenes
...", github cs-nlp-uu/scenereg) takes a COCO-Search18 scene with a target object and inpaints a
replacement of low, middle or high semantic relatedness to the scene, plus a same-target
control. Its README documents no file layout; the generation code (github
filippo-merlo/making_COOCO, `code/dataset/`) writes one of two ('/' and ' ' in names as '_'):

    generated_images/{scene}/{image}_{scene}_{target}_original.jpg          utils_powerpaint.py, the
    generated_images/{scene}/{image}_{scene}_{target}_{replacement}_relscore_{level}.jpg
                                                                             layout filter_dataset.py reads
    generated_images/{image}__{scene}__{target}__{replacement}_relscore_{level}.jpg
                                                                             utils_powerpaint_high_sim.py,
                                                                             utils_powerpaint_gen_target.py

with `level` in low, middle, high, same_target. In the first, the `_original` file of an image is
its scene and names its target (single underscores alone are ambiguous: "teddy_bear"); in the
second, the scenes are COCO-Search18's `{image}.jpg` in DIR/images (or DIR/original_images, or DIR).
Each edited scene becomes one NOTICE-style choice about the original scene, "Which is in the
scene, {a} or {b}?" (target and replacement, in a seeded order), answered by the target; its image
pair is the edited scene, whose answer (the foil) is the replacement. The choice is the `visual`
span (STR replaces it with another scene's choice). The relatedness level is `meta["relatedness"]`,
which the CLI stores as a `relatedness` coordinate along `sample`, so results split by it. The
same-target control changes no answer (its choice would be "cup or cup") and is read only when
`levels` asks for it, as a yes/no question "Is there a {target} in the scene?".

    samples = load_cooco("cooco", n=100)
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
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
    first_found,
    require_dir,
)

LEVELS = ("low", "middle", "high", "same_target")
EDITED = re.compile(
    r"^(?P<image>.+?)__(?P<scene>.+?)__(?P<target>.+?)__(?P<replacement>.+)_relscore_"
    r"(?P<level>low|middle|high|same_target)\.(?:jpg|jpeg|png)$"
)
QUESTION = "Which is in the scene, {first} or {second}?"
CONTROL = "Is there {article} {target} in the scene?"
"""The same-target control's question: its edit keeps the answer (yes)."""
SPAN = "visual"


def cooco_root(root: Path) -> Path | None:
    """ROOT when ROOT/generated_images holds edited scenes by either of COOCO's names."""
    folder = root / "generated_images"
    if folder.is_dir() and (_by_scene(folder) or any(EDITED.match(p.name) for p in folder.iterdir())):
        return root
    return None


@dataclass(frozen=True)
class _Edit:
    """One edited scene: its file, the original scene's file, and the words its name gives."""

    path: Path
    original: Path
    image: str
    scene: str
    target: str
    replacement: str
    level: str


def _by_scene(folder: Path) -> list[_Edit]:
    """Edits of the per-scene layout: each {image}_{scene}_{target}_original.jpg and the files that
    extend its name with _{replacement}_relscore_{level}."""
    edits = []
    for scene_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        for original in sorted(scene_dir.glob("*_original.*")):
            prefix = original.stem.removesuffix("_original")
            image = prefix.split("_", 1)[0]
            head = f"{image}_{scene_dir.name}_"
            if not prefix.startswith(head):
                continue  # not named after its folder's scene: the target cannot be told apart
            pattern = re.compile(
                re.escape(prefix) + r"_(?P<replacement>.+)_relscore_(?P<level>" + "|".join(LEVELS) + r")"
                r"\.(?:jpg|jpeg|png)$"
            )
            for path in sorted(scene_dir.iterdir()):
                match = pattern.match(path.name)
                if match:
                    edits.append(
                        _Edit(
                            path, original, image, scene_dir.name, prefix[len(head) :], match["replacement"],
                            match["level"],
                        )
                    )  # fmt: skip
    return edits


def _flat(root: Path, folder: Path) -> list[_Edit]:
    """Edits of the flat layout, {image}__{scene}__{target}__{replacement}_relscore_{level}.jpg, with the
    original scenes in ROOT/images (or ROOT/original_images, or ROOT)."""
    originals = [f for f in (root / "images", root / "original_images", root) if f.is_dir()]
    edits = []
    for path in sorted(folder.iterdir()):
        match = EDITED.match(path.name)
        if match:
            edits.append(
                _Edit(
                    path, _original(originals, match["image"]), match["image"], match["scene"],
                    match["target"], match["replacement"], match["level"],
                )
            )  # fmt: skip
    return edits


def load_cooco(
    root: str | Path,
    *,
    n: int | None = None,
    prompt_template: str = DEFAULT_TEMPLATE,
    spans: SpanRequest | None = None,
    missing_images: MissingImages = "raise",
    levels: tuple[str, ...] = ("low", "middle", "high"),
    seed: int = 0,
) -> list[Sample]:
    """COOCO's edits (ROOT/generated_images) as questions about the original scene, paired with the edit.

    Levels take turns (low, middle, high, low, ...) in file-name order, so the first n samples cover
    every level.
    """
    check_options(n, prompt_template, spans)
    root = require_dir(root, "COOCO")
    edited = require_dir(root / "generated_images", "COOCO generated_images")
    unknown = sorted(set(levels) - set(LEVELS))
    if unknown:
        raise ValueError(f"COOCO's relatedness levels are {LEVELS}; got {unknown}.")
    rng = random.Random(f"vlmtrace.cooco/{seed}")
    found: dict[str, list[_Edit]] = {level: [] for level in levels}
    for edit in _by_scene(edited) + _flat(root, edited):
        if edit.level in found:
            found[edit.level].append(edit)
    if not any(found.values()):
        raise DatasetError(
            f"{edited} holds no COOCO edits of the levels {list(levels)} named "
            "{scene}/{image}_{scene}_{target}_{replacement}_relscore_{level}.jpg (beside "
            "{image}_{scene}_{target}_original.jpg) or "
            "{image}__{scene}__{target}__{replacement}_relscore_{level}.jpg."
        )

    def read() -> Iterator[RawQuestion]:
        longest = max(len(items) for items in found.values())
        for index in range(longest):
            for level in levels:
                if index >= len(found[level]):
                    continue
                edit = found[level][index]
                target, replacement = _words(edit.target), _words(edit.replacement)
                meta = {
                    "relatedness": level,
                    "scene": _words(edit.scene),
                    "target": target,
                    "replacement": replacement,
                    "pair_id": edit.path.name,
                }
                common = dict(id=f"cooco-{edit.path.stem}", image=edit.original, image_pair=edit.path)
                if level == "same_target":
                    article = "an" if target[:1] in "aeiou" else "a"
                    yield RawQuestion(
                        question=CONTROL.format(article=article, target=target),
                        answer="yes",
                        spans={SPAN: f"{article} {target}"},
                        foil="no",
                        meta=meta,
                        **common,
                    )
                    continue
                first, second = (target, replacement) if rng.random() < 0.5 else (replacement, target)
                yield RawQuestion(
                    question=QUESTION.format(first=first, second=second),
                    answer=target,
                    spans={SPAN: f"{first} or {second}"},
                    foil=replacement,
                    meta=meta,
                    **common,
                )

    hint = (
        "COOCO's original scenes are {image}_{scene}_{target}_original.jpg beside the edits, or "
        "COCO-Search18's {image}.jpg in ROOT/images."
    )
    return assemble(
        read(),
        source=edited,
        n=n,
        prompt_template=prompt_template,
        spans=spans,
        hint=hint,
        missing_images=missing_images,
    )


def _words(name: str) -> str:
    return name.replace("_", " ").strip()


def _original(folders: list[Path], image: str) -> Path:
    for suffix in (".jpg", ".jpeg", ".png"):
        path = first_found(image + suffix, folders)
        if path.is_file():
            return path
    return folders[0] / f"{image}.jpg"
