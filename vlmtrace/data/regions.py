"""Object regions: from a dataset's boxes (image pixels) to the image-token positions that cover them.

Zhang et al. knock out attention from "the question-relevant object" to the question. GQA's
scene graphs give object boxes and CLEVR's scenes give object centres, in the pixels of the image
file; the model sees patches of a resized, cropped copy. `PatchGrid` declares that mapping for
processors that resize the shortest edge to S, centre-crop S x S and cut it into (S / patch)^2
patches, whose tokens follow in row-major order (LLaVA-1.5 and the organisms):

    grid = PatchGrid.of(vlm)                        # 32 px, patch 8 -> 4 x 4 (LLaVA-1.5: 336, 14 -> 24 x 24)
    cells = grid.cells((640, 480), (100, 50, 220, 170))   # [(row, column), ...] the box overlaps
    cells = region_cells(vlm, sample)                      # the cells of sample.meta["regions"]

A box that covers no patch (cropped away, or empty) is an error: a knockout with nothing to block
would read as "no effect". So is a region that covers almost every patch (more than
`MAX_REGION_SHARE` of them): object->question would then equal image->question, and a reader
would take the whole image for the object. Tiled images (LLaVA-NeXT) and models that read the
image by cross-attention have no such grid, which is an error that says so.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import UserError

MAX_REGION_SHARE = 0.9
"""The largest share of a grid's image tokens an object region may cover. Above it the object is
(nearly) the whole image, and blocking it is blocking the image."""
TOO_LARGE = f"object region covers more than {MAX_REGION_SHARE:.0%} of the image tokens"
"""The reason a sample with such a region is left out for, in the start-of-run table."""


class RegionError(UserError):
    """An object region that maps to no image token, or a model whose image tokens have no grid."""


class RegionTooLargeError(RegionError):
    """An object region that covers (almost) every image token: it would be the whole image."""


def check_share(cells: Sequence[Sequence[int]], side: int, sample_id: str) -> None:
    """Refuse a region covering more than `MAX_REGION_SHARE` of a `side` x `side` grid."""
    count = len({(int(r), int(c)) for r, c in cells})
    if count > MAX_REGION_SHARE * side * side:
        raise RegionTooLargeError(
            f"the object region of sample {sample_id!r} covers {count} of the {side * side} image tokens "
            f"({count / (side * side):.0%}, above MAX_REGION_SHARE = {MAX_REGION_SHARE:.0%}): blocking it "
            "would block the whole image, so object->question would equal image->question. Give a tighter "
            "box (boxes are in the pixels of the image file), or leave out questions about objects that "
            "fill the picture."
        )


@dataclass(frozen=True)
class PatchGrid:
    """Resize the shortest edge to `size`, centre-crop `size` x `size`, cut into `patch`-px patches."""

    size: int
    patch: int

    @property
    def side(self) -> int:
        return self.size // self.patch

    @classmethod
    def of(cls, vlm) -> PatchGrid:
        processor = vlm.processor
        image_processor = getattr(processor, "image_processor", None)
        patch = getattr(processor, "patch_size", None)
        crop = getattr(image_processor, "crop_size", None) or {}
        if not vlm.adapter.image_in_sequence or image_processor is None or not patch or not crop:
            raise RegionError(
                f"{vlm.name} has no grid of image tokens that a box can be mapped to (a processor with "
                "patch_size and crop_size, image tokens in the prompt: LLaVA-1.5 style); object regions "
                "need such a model."
            )
        if getattr(image_processor, "image_grid_pinpoints", None):
            raise RegionError(
                f"{vlm.name} tiles images (any-resolution); mapping a box onto tiles is not declared yet. "
                "Use a LLaVA-1.5-style model for object regions."
            )
        height = crop.get("height") if isinstance(crop, dict) else getattr(crop, "height", None)
        return cls(size=int(height), patch=int(patch))

    def cells(self, image_size: tuple[int, int], box: Sequence[float]) -> list[tuple[int, int]]:
        """(row, column) of every patch the box (x0, y0, x1, y1, image pixels) overlaps."""
        width, height = image_size
        scale = self.size / min(width, height)
        left = (round(width * scale) - self.size) / 2
        top = (round(height * scale) - self.size) / 2
        x0, y0, x1, y1 = (float(v) for v in box)
        xs = [min(max(x * scale - left, 0.0), self.size) for x in (x0, x1)]
        ys = [min(max(y * scale - top, 0.0), self.size) for y in (y0, y1)]
        if xs[1] <= xs[0] or ys[1] <= ys[0]:
            return []
        columns = range(int(xs[0] // self.patch), math.ceil(xs[1] / self.patch))
        rows = range(int(ys[0] // self.patch), math.ceil(ys[1] / self.patch))
        return [(r, c) for r in rows for c in columns]


def region_cells(vlm, sample) -> list[tuple[int, int]]:
    """Patch cells (row, column) covered by the boxes in `sample.meta["regions"]`, for `vlm`'s grid."""
    boxes = sample.meta.get("regions")
    if not boxes:
        raise RegionError(
            f"sample {sample.id!r} has no object region (meta['regions']); GQA needs "
            "{split}_sceneGraphs.json beside the questions, CLEVR scenes/CLEVR_{split}_scenes.json."
        )
    grid = PatchGrid.of(vlm)
    cells = sorted({cell for box in boxes for cell in grid.cells(sample.image.size, box)})
    if not cells:
        raise RegionError(
            f"the object region(s) {list(boxes)} of sample {sample.id!r} cover no image patch once the image "
            f"is resized and cropped to {grid.size} px; the object lies outside the crop."
        )
    check_share(cells, grid.side, sample.id)
    return cells


def cell_positions(cells: Sequence[Sequence[int]], side: int, segments, *, sample_id: str = "") -> list[int]:
    """Image-token positions of patch cells on a `side` x `side` grid (row-major image tokens).

    Refuses cells that cover almost the whole grid (`check_share`): the knockout would block the image.
    """
    image = segments.positions("image")
    if len(image) != side * side:
        raise RegionError(
            f"the prompt has {len(image)} image tokens, not the {side}x{side} patches of the grid its object "
            "regions were mapped to; object regions cannot be placed on them."
        )
    check_share(cells, side, sample_id)
    return [image[int(row) * side + int(column)] for row, column in cells]
