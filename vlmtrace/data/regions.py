"""Object regions: from a dataset's boxes (image pixels) to the image-token positions that cover them.

Zhang et al. knock out attention from "the question-relevant object" to the question. GQA's
scene graphs give object boxes and CLEVR's scenes give object centres, in the pixels of the image
file; the model sees tokens of a resized, cropped, tiled, merged or pooled copy. Each family
declares how as adapter data (`vlmtrace.models.image_grid`), so one mapping serves LLaVA-1.5's
fixed grid, Qwen-VL's dynamic one, Gemma 3's pooled tokens and LLaVA-NeXT's tiles:

    tokens, count = region_tokens(vlm, sample)       # indices among the image's tokens, and their number
    positions = token_positions(tokens, count, segments)   # prompt positions, checked against the prompt

A box that covers no image token (cropped away, or empty) is an error: a knockout with nothing to
block would read as "no effect". So is a region that covers almost every image token (more than
`MAX_REGION_SHARE` of them): object->question would then equal image->question, and a reader would
take the whole image for the object. So is a prompt whose image tokens are not as many as the
mapping counted: the mapping would be off by a tile or a row, and knock out the wrong patches.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import UserError

MAX_REGION_SHARE = 0.9
"""The largest share of an image's tokens an object region may cover. Above it the object is
(nearly) the whole image, and blocking it is blocking the image."""
TOO_LARGE = f"object region covers more than {MAX_REGION_SHARE:.0%} of the image tokens"
"""The reason a sample with such a region is left out for, in the start-of-run table."""


class RegionError(UserError):
    """An object region that maps to no image token, or a model whose image tokens have no grid."""


class RegionTooLargeError(RegionError):
    """An object region that covers (almost) every image token: it would be the whole image."""


def check_share(tokens: Sequence[int], count: int, sample_id: str) -> None:
    """Refuse a region covering more than `MAX_REGION_SHARE` of an image's `count` tokens."""
    covered = len({int(t) for t in tokens})
    if covered > MAX_REGION_SHARE * count:
        raise RegionTooLargeError(
            f"the object region of sample {sample_id!r} covers {covered} of the {count} image tokens "
            f"({covered / count:.0%}, above MAX_REGION_SHARE = {MAX_REGION_SHARE:.0%}): blocking it "
            "would block the whole image, so object->question would equal image->question. Give a tighter "
            "box (boxes are in the pixels of the image file), or leave out questions about objects that "
            "fill the picture."
        )


def region_tokens(vlm, sample) -> tuple[list[int], int]:
    """(indices among the image's tokens covered by `sample.meta["regions"]`, the image's token count)."""
    from ..models.image_grid import ImageGridError, box_tokens, token_blocks, token_count

    boxes = sample.meta.get("regions")
    if not boxes:
        raise RegionError(
            f"sample {sample.id!r} has no object region (meta['regions']); GQA needs "
            "{split}_sceneGraphs.json beside the questions, CLEVR scenes/CLEVR_{split}_scenes.json."
        )
    if sample.image is None:
        raise RegionError(f"sample {sample.id!r} has an object region but no image to place it on.")
    try:
        blocks = token_blocks(vlm, sample.image)
    except ImageGridError as error:
        raise RegionError(str(error)) from None
    tokens = sorted({token for box in boxes for token in box_tokens(blocks, box)})
    if not tokens:
        raise RegionError(
            f"the object region(s) {list(boxes)} of sample {sample.id!r} cover no image token once the image "
            f"is resized and cropped for {vlm.name}; the object lies outside what the model sees."
        )
    count = token_count(blocks)
    check_share(tokens, count, sample.id)
    return tokens, count


def token_positions(tokens: Sequence[int], count: int, segments, *, sample_id: str = "") -> list[int]:
    """Prompt positions of image tokens `tokens`, after checking the prompt has the `count` counted
    and that they are not (almost) all of them (`check_share`)."""
    image = segments.positions("image")
    if len(image) != count:
        raise RegionError(
            f"the prompt has {len(image)} image tokens, not the {count} its object regions were mapped onto; "
            "the family's image grid (Adapter.image_grid) does not match its processor."
        )
    check_share(tokens, count, sample_id)
    return [image[int(token)] for token in tokens]


def cell_positions(cells: Sequence[Sequence[int]], side: int, segments, *, sample_id: str = "") -> list[int]:
    """Image-token positions of patch cells on a `side` x `side` grid (row-major image tokens)."""
    tokens = [int(row) * side + int(column) for row, column in cells]
    return token_positions(tokens, side * side, segments, sample_id=sample_id)
