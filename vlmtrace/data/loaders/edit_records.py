"""Knowledge-editing records of MMEdit (E-VQA) and VLKEB, read as published, as `EditCase`s.

Both benchmarks ship a JSON list of records in one layout (EasyEdit's `VQADataset` /
VLKEB's `CaptionDataset` read it), one record per edit:

    src, image                 the edited question and its image (reliability)
    alt                        the new answer; pred, the unedited model's answer (kept in meta)
    rephrase                   the question rephrased, same image (text generality)
    image_rephrase             another image of the same entity, same question (image generality)
    loc, loc_ans               an unrelated text-only question and its answer (text locality)
    m_loc, m_loc_q, m_loc_a    an unrelated image, question and answer (image locality)
    port_new                   VLKEB only: [{"port_type": "1-hop", "Q&A": {"Question", "Answer"}}],
                               questions about the edited image whose answer follows from the
                               edit (portability)

Image fields are paths relative to an image folder: COCO's (E-VQA: "val2014/COCO_val2014_...jpg",
the rephrased images in a folder of their own) or VLKEB's `VLKEB_images/mmkb_images`
("m.0104lr/google_15.jpg"). Records with an empty `alt` are left out, as both loaders do.

    cases = load_edit_records("VLKEB/eval_multihop.json", "VLKEB/VLKEB_images/mmkb_images",
                              prompt_template="USER: <image>\\n{question} ASSISTANT:", n=32)
    e = vt.edit(vlm, [c.request for c in cases], layers="traced", preserve=ordinary)
    scores = evaluate(vlm, e, **probes_of(cases))

A record holds one image per probe, so the requests carry no contexts of their own: an edit over
contexts needs other images and phrasings of the entity from elsewhere (`EditRequest(images=...)`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ..edit_case import EditCase, EditRequest
from ..sample import Sample
from .question import (
    DEFAULT_TEMPLATE,
    DataFileMissing,
    DatasetError,
    RawQuestion,
    assemble,
    check_options,
    describe_json,
    read_json,
    required_field,
)

FIELDS = (
    "src", "alt", "rephrase", "image", "image_rephrase", "loc", "loc_ans", "m_loc", "m_loc_q", "m_loc_a",
)  # fmt: skip
"""The fields every record of both benchmarks has."""


def load_edit_records(
    records_json: str | Path,
    images: str | Path | None = None,
    *,
    rephrase_images: str | Path | None = None,
    n: int | None = None,
    prompt_template: str = DEFAULT_TEMPLATE,
    text_template: str = DEFAULT_TEMPLATE,
    hops: Sequence[int] | None = None,
) -> list[EditCase]:
    """The first `n` edit records of an E-VQA or VLKEB file as cases with their probes.

    `images`: the folder the `image` and `m_loc` paths are relative to (default: the first of
    VLKEB_images/mmkb_images, VLKEB_images, images, or the file's own folder, that holds the first
    record's image); `rephrase_images`: the folder of `image_rephrase` (default: `images`).
    `prompt_template` makes the prompts of image questions, `text_template` those of the text-only
    locality questions (no image placeholder). `hops`: which VLKEB portability hops to keep
    (default all; `meta["hop"]` says each item's).
    """
    check_options(n, prompt_template, None)
    check_options(n, text_template, None)
    source = Path(records_json)
    document = read_json(source, "edit records")
    if not isinstance(document, list):
        raise DatasetError(
            f"{source} is not an E-VQA / VLKEB edit file: expected a JSON list of records with "
            f"{list(FIELDS[:4])}, ...; got {describe_json(document)}."
        )
    records = []
    for index, record in enumerate(document):
        for key in FIELDS:
            required_field(record, key, source, index)
        if str(record["alt"]).strip():
            records.append((index, record))
        if n is not None and len(records) == n:
            break
    if not records:
        raise DatasetError(f"{source} holds no edit record with a new answer (`alt`); is it the right file?")
    dataset = "vlkeb" if any("port_new" in r for _, r in records) else "e_vqa"
    root = _image_root(source, images, str(records[0][1]["image"]))
    rephrase_root = Path(rephrase_images) if rephrase_images is not None else root
    hint = (
        f"pass the folder the records' image paths are relative to (images=..., rephrase_images=...; "
        f"now {root} and {rephrase_root})."
    )

    def questions(kind: str) -> Iterator[RawQuestion]:
        for index, record in records:
            for question, answer, image, meta in _probe_fields(kind, record, root, rephrase_root, hops):
                meta = {"dataset": dataset, "record": index, "probe": kind, "pred": record.get("pred")} | meta
                suffix = f"/{meta['hop']}" if "hop" in meta else ""
                yield RawQuestion(f"{dataset}-{index}/{kind}{suffix}", question, answer, image, meta)

    def read(kind: str, template: str) -> list[Sample]:
        if not any(True for _ in questions(kind)):
            return []
        return assemble(
            questions(kind), source=source, n=None, prompt_template=template, spans=None, hint=hint
        )

    kinds = ("reliability", "text_generality", "image_generality", "image_locality", "portability")
    probes = {kind: read(kind, prompt_template) for kind in kinds}
    probes["text_locality"] = read("text_locality", text_template)
    cases = []
    for index, _ in records:
        mine = {kind: [s for s in samples if s.meta["record"] == index] for kind, samples in probes.items()}
        (edited,) = mine["reliability"]
        request = EditRequest(edited, edited.answer)
        cases.append(EditCase(request, probes={kind: found for kind, found in mine.items() if found}))
    return cases


def _probe_fields(
    kind: str, record: dict[str, Any], root: Path, rephrase_root: Path, hops: Sequence[int] | None
) -> list[tuple[str, str, Path | None, dict[str, Any]]]:
    """(question, answer, image path, meta) of one record's probes of `kind`."""
    image = root / str(record["image"])
    new = str(record["alt"])
    if kind == "reliability":
        return [(str(record["src"]), new, image, {})]
    if kind == "text_generality":
        return [(str(record["rephrase"]), new, image, {})]
    if kind == "image_generality":
        return [(str(record["src"]), new, rephrase_root / str(record["image_rephrase"]), {})]
    if kind == "text_locality":
        return [(str(record["loc"]), str(record["loc_ans"]), None, {})]
    if kind == "image_locality":
        return [(str(record["m_loc_q"]), str(record["m_loc_a"]), root / str(record["m_loc"]), {})]
    out = []
    for port in record.get("port_new") or []:
        hop = int(str(port.get("port_type", "")).split("-")[0] or 0)
        qa = port.get("Q&A") or {}
        if hops is not None and hop not in hops:
            continue
        if "Question" not in qa or "Answer" not in qa:
            raise DatasetError(
                f"a port_new entry of record {record.get('src')!r} has no 'Q&A' with 'Question' and "
                "'Answer'; is this a VLKEB file as published?"
            )
        out.append((str(qa["Question"]), str(qa["Answer"]), image, {"hop": hop}))
    return out


def _image_root(source: Path, images: str | Path | None, first: str) -> Path:
    """The given image folder, or the first conventional folder beside the file that holds `first`."""
    if images is not None:
        root = Path(images)
        if not root.is_dir():
            raise DataFileMissing(
                f"image folder {root} does not exist; pass the folder the records' image paths are "
                "relative to."
            )
        return root
    here = source.parent
    for folder in (here / "VLKEB_images" / "mmkb_images", here / "VLKEB_images", here / "images", here):
        if (folder / first).is_file():
            return folder
    return here  # the image errors then name the path tried and the option to set
