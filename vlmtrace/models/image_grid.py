"""Which image tokens see which pixels: each family's image-to-token mapping, declared as data.

Object regions (Zhang et al.'s object knockout, NOTICE's head functions, inpainting masks) are
boxes in the pixels of an image file; a model reads tokens of a resized, cropped, tiled, merged
or pooled copy. Each family declares how (`ImageGrid`, an adapter field), and `token_blocks`
turns one image into the blocks of tokens the model will see, each a rows x columns grid over a
rectangle of the original image:

    grid = vlm.adapter.image_grid           # LLaVA-1.5: ImageGrid(view="crop")
    blocks = token_blocks(vlm, image)       # [TokenBlock(offset=0, rows=24, columns=24, ...)]
    box_tokens(blocks, (100, 50, 220, 170)) # indices among the image's tokens, in prompt order

Views (how the processor turns the image into the tokens' grid):

- `crop`: resize the shortest edge, centre-crop, cut into patches (LLaVA-1.5, the organisms);
- `stretch`: resize to a fixed height x width, cut into patches, optionally average-pooled to
  `pooled_tokens` (Gemma 3; BLIP and PaliGemma without pooling); Gemma 3's pan-and-scan crops
  (`crops=True`) follow the whole image, each stretched over its own rectangle;
- `dynamic`: resize to a multiple of patch x merge that depends on the image (Qwen-VL's
  `image_grid_thw`), tokens = merge x merge patches in row-major order;
- `anyres`: a base view stretched to one tile, then the image fitted and centre-padded into the
  best pinpoint resolution, cut into tiles, padding removed again in feature space, and a
  newline token after every row (LLaVA-NeXT).

Counting is part of the declaration: `token_count(blocks)` must equal the image tokens of the
encoded prompt, or `vlmtrace.data.regions` refuses the region (a mapping that is off by a tile
would knock out the wrong patches without a sign).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from ..errors import UserError
from .adapter import config_value


class ImageGridError(UserError):
    """A model whose image tokens have no declared grid, or a declaration its processor contradicts."""


@dataclass(frozen=True)
class ImageGrid:
    """How a family's processor and model turn one image into a grid of image tokens."""

    view: Literal["crop", "stretch", "dynamic", "anyres"]
    """How pixels become the tokens' grid (module docstring)."""
    patch: str = "config.vision_config.patch_size"
    """Where the vision tower's patch size is: `config.PATH`, `processor.NAME` or `image_processor.NAME`."""
    merge: str | None = None
    """Where the spatial merge factor is (Qwen-VL: `image_processor.merge_size`); None: 1."""
    pooled_tokens: str | None = None
    """Where the token count per image after average pooling is (Gemma 3: `config.mm_tokens_per_image`)."""
    crops: bool = False
    """Pan-and-scan crops follow the whole image, each with its own tokens (Gemma 3)."""
    newline: bool = False
    """A newline token ends every row of the high-resolution block (LLaVA-NeXT's `image_newline`)."""


@dataclass(frozen=True)
class TokenBlock:
    """A rows x columns block of image tokens over one rectangle of the original image.

    A pixel (x, y) of the original image falls in cell (floor(y * scale[1] + shift[1]),
    floor(x * scale[0] + shift[0])); cell (r, c) is token `offset + r * stride + c` among the
    image's tokens (stride > columns when a row ends in a newline token).
    """

    offset: int
    rows: int
    columns: int
    stride: int
    scale: tuple[float, float]
    shift: tuple[float, float]
    name: str = "image"

    @property
    def tokens(self) -> int:
        return self.rows * self.stride

    def cells(self, box: Sequence[float]) -> list[tuple[int, int]]:
        """(row, column) of every cell the box (x0, y0, x1, y1, pixels, x1/y1 exclusive) overlaps."""
        x0, y0, x1, y1 = (float(v) for v in box)
        u0, u1 = (x * self.scale[0] + self.shift[0] for x in (x0, x1))
        v0, v1 = (y * self.scale[1] + self.shift[1] for y in (y0, y1))
        u0, u1 = max(u0, 0.0), min(u1, float(self.columns))
        v0, v1 = max(v0, 0.0), min(v1, float(self.rows))
        if u1 <= u0 or v1 <= v0:
            return []
        columns = range(int(math.floor(u0)), math.ceil(u1))
        rows = range(int(math.floor(v0)), math.ceil(v1))
        return [(r, c) for r in rows for c in columns]

    def token(self, row: int, column: int) -> int:
        return self.offset + row * self.stride + column


def token_count(blocks: Sequence[TokenBlock]) -> int:
    """Image tokens the blocks account for (newline tokens included)."""
    return sum(block.tokens for block in blocks)


def box_tokens(blocks: Sequence[TokenBlock], box: Sequence[float]) -> list[int]:
    """Indices (among the image's tokens, in prompt order) of every token whose cell the box overlaps."""
    return sorted({block.token(r, c) for block in blocks for r, c in block.cells(box)})


def mask_tokens(blocks: Sequence[TokenBlock], mask: np.ndarray, *, share: float = 0.0) -> list[int]:
    """Tokens whose cell holds more than `share` of its pixels inside a boolean [height, width] mask."""
    ys, xs = np.nonzero(mask)
    found = set()
    for block in blocks:
        counts: dict[tuple[int, int], int] = {}
        us = np.floor(xs * block.scale[0] + block.shift[0]).astype(int)
        vs = np.floor(ys * block.scale[1] + block.shift[1]).astype(int)
        keep = (us >= 0) & (us < block.columns) & (vs >= 0) & (vs < block.rows)
        for v, u in zip(vs[keep], us[keep], strict=True):
            counts[(int(v), int(u))] = counts.get((int(v), int(u)), 0) + 1
        pixels = 1.0 / (block.scale[0] * block.scale[1])  # original pixels per cell
        found |= {block.token(r, c) for (r, c), n in counts.items() if n > share * pixels}
    return sorted(found)


def grid_of(vlm) -> ImageGrid:
    """The adapter's declaration, or an error naming the family that lacks one."""
    grid = getattr(vlm.adapter, "image_grid", None)
    if grid is None:
        raise ImageGridError(
            f"{vlm.name} ({vlm.adapter.family}) declares no image grid (Adapter.image_grid), so a box cannot "
            "be mapped to its image tokens. Declared: LLaVA-1.5, LLaVA-NeXT, Qwen-VL, Gemma 3, PaliGemma, "
            "BLIP and the organisms; add an ImageGrid to the adapter (vlmtrace/models/image_grid.py)."
        )
    return grid


def token_blocks(vlm, image) -> list[TokenBlock]:
    """The blocks of image tokens `vlm` makes of `image` (a PIL image), in prompt order."""
    grid = grid_of(vlm)
    width, height = image.size
    patch = int(_read(vlm, grid.patch))
    image_processor = getattr(vlm.processor, "image_processor", None)
    if image_processor is None:
        raise ImageGridError(f"{vlm.name}'s processor has no image_processor; its image grid cannot be read.")
    if grid.view == "crop":
        return [_crop_block(image_processor, width, height, patch)]
    if grid.view == "stretch":
        return _stretch_blocks(vlm, grid, image_processor, image, patch)
    if grid.view == "dynamic":
        merge = int(_read(vlm, grid.merge)) if grid.merge else 1
        thw = image_processor(images=[image], return_tensors="np")["image_grid_thw"]
        _, rows, columns = (int(v) for v in np.asarray(thw)[0])
        rows, columns = rows // merge, columns // merge
        return [TokenBlock(0, rows, columns, columns, (columns / width, rows / height), (0.0, 0.0))]
    if grid.view == "anyres":
        return _anyres_blocks(vlm, grid, image_processor, width, height, patch)
    raise ImageGridError(f"unknown image grid view {grid.view!r}; expected crop, stretch, dynamic or anyres.")


def _read(vlm, path: str) -> Any:
    """A value at `config.PATH`, `processor.NAME` or `image_processor.NAME`."""
    where, _, rest = path.partition(".")
    if where == "config":
        return config_value(vlm.model.config, rest)
    owner = vlm.processor if where == "processor" else getattr(vlm.processor, "image_processor", None)
    value = getattr(owner, rest, None)
    if value is None:
        raise ImageGridError(f"{vlm.name}'s image grid reads {path!r}, which its {where} does not have.")
    return value


def _size(size: Any, key: str) -> int | None:
    """A field of an image processor's size (a dict in some versions, a SizeDict in others)."""
    value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
    return None if value is None else int(value)


def _crop_block(image_processor, width: int, height: int, patch: int) -> TokenBlock:
    """Shortest edge resized to `size`, centre crop of `crop_size` (transformers' own rounding)."""
    short = _size(image_processor.size, "shortest_edge")
    crop_h = _size(image_processor.crop_size, "height")
    crop_w = _size(image_processor.crop_size, "width")
    if short is None or crop_h is None or crop_w is None:
        raise ImageGridError(
            "a 'crop' image grid needs an image processor with size.shortest_edge and crop_size; got "
            f"size={image_processor.size}, crop_size={image_processor.crop_size}."
        )
    if width <= height:
        new_w, new_h = short, int(short * height / width)
    else:
        new_w, new_h = int(short * width / height), short
    top, left = int((new_h - crop_h) / 2.0), int((new_w - crop_w) / 2.0)
    rows, columns = crop_h // patch, crop_w // patch
    scale = (new_w / width / patch, new_h / height / patch)
    return TokenBlock(0, rows, columns, columns, scale, (-left / patch, -top / patch))


def _stretch_blocks(vlm, grid: ImageGrid, image_processor, image, patch: int) -> list[TokenBlock]:
    """Resize to height x width; patches, optionally average-pooled; then pan-and-scan crops."""
    size_h, size_w = _size(image_processor.size, "height"), _size(image_processor.size, "width")
    if size_h is None or size_w is None:
        raise ImageGridError(
            f"a 'stretch' image grid needs size.height and width; got {image_processor.size}."
        )
    rows, columns = size_h // patch, size_w // patch
    if grid.pooled_tokens:
        side = math.isqrt(int(_read(vlm, grid.pooled_tokens)))
        rows = columns = side
    rectangles = [(0, 0, image.size[0], image.size[1])]
    if grid.crops:
        rectangles += _pan_and_scan_rectangles(vlm, image_processor, image)
    blocks, offset = [], 0
    for index, (x0, y0, x1, y1) in enumerate(rectangles):
        scale = (columns / (x1 - x0), rows / (y1 - y0))
        name = "image" if index == 0 else f"crop {index}"
        blocks.append(
            TokenBlock(offset, rows, columns, columns, scale, (-x0 * scale[0], -y0 * scale[1]), name)
        )
        offset += rows * columns
    return blocks


def _pan_and_scan_rectangles(vlm, image_processor, image) -> list[tuple[int, int, int, int]]:
    """The crops' rectangles, found by the processor's own pan-and-scan on an image of coordinates."""
    defaults = getattr(vlm.processor, "images_kwargs", {}) or {}

    def setting(name: str):
        value = defaults.get(name)
        return getattr(image_processor, name, None) if value is None else value

    if not setting("do_pan_and_scan"):
        return []
    width, height = image.size
    ys, xs = np.mgrid[0:height, 0:width]
    coordinates = np.stack([xs, ys]).astype(np.int64)  # channels first: x, y
    crops = image_processor.pan_and_scan(
        image=coordinates,
        pan_and_scan_min_crop_size=setting("pan_and_scan_min_crop_size"),
        pan_and_scan_max_num_crops=setting("pan_and_scan_max_num_crops"),
        pan_and_scan_min_ratio_to_activate=setting("pan_and_scan_min_ratio_to_activate"),
    )
    return [
        (int(c[0].min()), int(c[1].min()), int(c[0].max()) + 1, int(c[1].max()) + 1) for c in crops if c.size
    ]


def _anyres_blocks(
    vlm, grid: ImageGrid, image_processor, width: int, height: int, patch: int
) -> list[TokenBlock]:
    """LLaVA-NeXT: the base view, then the unpadded high-resolution grid with a newline per row."""
    from transformers.image_processing_utils import select_best_resolution

    tile = _size(image_processor.crop_size, "height") or _size(image_processor.size, "shortest_edge")
    pinpoints = getattr(image_processor, "image_grid_pinpoints", None)
    if not tile or not pinpoints:
        raise ImageGridError(
            "an 'anyres' image grid needs crop_size and image_grid_pinpoints on the image processor."
        )
    side = tile // patch
    base = TokenBlock(0, side, side, side, (side / width, side / height), (0.0, 0.0), "base")
    best_h, best_w = select_best_resolution((height, width), pinpoints)
    # The processor fits the image into the best resolution and pads it evenly (get_patch_output_size)...
    if best_w / width < best_h / height:
        new_w, new_h = best_w, min(math.ceil(height * best_w / width), best_h)
    else:
        new_h, new_w = best_h, min(math.ceil(width * best_h / height), best_w)
    paste_x, paste_y = (best_w - new_w) // 2, (best_h - new_h) // 2
    # ...then the model cuts the padding off in feature space (unpad_image), its own way.
    feature_h, feature_w = best_h // tile * side, best_w // tile * side
    cut_y = cut_x = 0
    if width / height > feature_w / feature_h:
        cut_y = (feature_h - int(round(height * feature_w / width, 7))) // 2
    else:
        cut_x = (feature_w - int(round(width * feature_h / height, 7))) // 2
    rows, columns = feature_h - 2 * cut_y, feature_w - 2 * cut_x
    pixel = best_h / feature_h  # canvas pixels per feature cell
    scale = (new_w / width / pixel, new_h / height / pixel)
    shift = (paste_x / pixel - cut_x, paste_y / pixel - cut_y)
    stride = columns + (1 if grid.newline else 0)
    return [base, TokenBlock(side * side, rows, columns, stride, scale, shift, "tiles")]
