"""Counterfactual inpainting: the corrupted image is the clean one with one object removed or replaced.

NOTICE's semantic image pairs need a second photograph that differs in one concept; most data
sets have none. Visual Jenga (Bhattad et al.) makes one instead: paint over an object's region and
let an inpainting model fill it, so that everything outside the region stays exactly the clean
image. `InpaintPair` is that corruption:

    vt.InpaintPair()                                       # the sample's own regions (GQA, CLEVR, synthetic)
    vt.InpaintPair(region=(40, 30, 120, 90))               # a box, image pixels (x0, y0, x1, y1)
    vt.InpaintPair(region=mask)                            # a boolean [height, width] array
    vt.InpaintPair(backend="stabilityai/stable-diffusion-2-inpainting", prompt="a red ball")   # replace

Backends:

- `"opencv"` (the default): OpenCV's classical inpainting (Telea's fast marching, or Navier-Stokes
  with `method="ns"`), offline and deterministic: the object is removed and its region filled from
  its surroundings. Needs `opencv-python-headless` (`pip install "vlmtrace[inpaint]"`).
- any diffusers inpainting pipeline, by Hub id or local directory (`AutoPipelineForInpainting`),
  run with a seeded generator: the region is repainted from `prompt` (empty: background). The
  result is resized back and pasted inside the mask only, so no pixel outside the region changes.

Each inpainted image is computed once per (image, mask, backend, settings) in a process. The
corruption's description (stored in every result's attrs) names the backend and its settings;
`inpainting_record` gives the masks and inpainted images for a store.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import xarray as xr
from PIL import Image

from ..data.sample import Sample
from ..models.load import VLM
from .corruptions import Corruption, CorruptionError, Pair, clean_side, other_image_side

OPENCV = "opencv"
Region = None | Sequence[float] | Sequence[Sequence[float]] | np.ndarray | Callable[[Sample], Any]


@dataclass(frozen=True, eq=False)
class InpaintPair(Corruption):
    """Show the corrupted run the clean image with its object region inpainted (Visual Jenga).

    `region`: None (the sample's `meta["regions"]` boxes), a box, a list of boxes, a boolean mask
    [height, width], or a function of the sample returning any of these.
    """

    region: Region = None
    backend: str = OPENCV
    """"opencv", or a diffusers inpainting pipeline's Hub id or local directory."""
    prompt: str = ""
    """diffusers: what to paint into the region ("" fills it with background)."""
    method: str = "telea"
    """opencv: "telea" (fast marching) or "ns" (Navier-Stokes)."""
    radius: int = 3
    """opencv: the neighbourhood (pixels) each inpainted pixel is filled from."""
    dilate: int = 0
    """Grow the mask by this many pixels (an object's anti-aliased edge lies just outside its box)."""
    steps: int = 25
    """diffusers: denoising steps."""
    seed: int = 0
    """diffusers: the generator's seed."""
    name = "inpaint_pair"

    def __post_init__(self) -> None:
        if self.backend == OPENCV and self.method not in ("telea", "ns"):
            raise CorruptionError(
                f"InpaintPair(method=...) is 'telea' or 'ns' for OpenCV, not {self.method!r}."
            )
        for field_name in ("radius", "dilate", "steps"):
            value = getattr(self, field_name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise CorruptionError(
                    f"InpaintPair({field_name}=...) is a non-negative integer, not {value!r}."
                )

    def describe(self) -> dict:
        """Provenance: the backend and its settings, and where the region came from."""
        if self.region is None:
            region = "the sample's regions (meta['regions'])"
        elif callable(self.region):
            region = f"function {getattr(self.region, '__name__', repr(self.region))}"
        elif isinstance(self.region, np.ndarray):
            region = f"mask {list(self.region.shape)} ({int(np.asarray(self.region).sum())} pixels)"
        else:
            region = [list(map(float, box)) for box in _boxes(self.region)]
        settings = (
            {"method": self.method, "radius": self.radius}
            if self.backend == OPENCV
            else {"prompt": self.prompt, "steps": self.steps, "seed": self.seed}
        )
        return {
            "kind": self.name,
            "backend": self.backend,
            "region": region,
            "dilate": self.dilate,
            **settings,
        }

    def mask(self, sample: Sample) -> np.ndarray:
        """The boolean [height, width] mask of the region to inpaint, in the sample's image pixels."""
        if sample.image is None:
            raise CorruptionError(f"sample {sample.id!r} has no image to inpaint.")
        width, height = sample.image.size
        region = self.region(sample) if callable(self.region) else self.region
        if region is None:
            region = sample.meta.get("regions")
            if not region:
                raise CorruptionError(
                    f"sample {sample.id!r} has no object region to inpaint: give InpaintPair(region=...) a "
                    "box or a mask, or data with regions (GQA scene graphs, CLEVR scenes, synthetic scenes)."
                )
        if isinstance(region, np.ndarray) and region.ndim == 2:
            if region.shape != (height, width):
                raise CorruptionError(
                    f"the inpainting mask is {region.shape[1]}x{region.shape[0]} but the image of sample "
                    f"{sample.id!r} is {width}x{height}; give a mask of the image's size."
                )
            mask = region.astype(bool)
        else:
            mask = np.zeros((height, width), dtype=bool)
            for x0, y0, x1, y1 in _boxes(region):
                left, top = max(int(math.floor(x0)), 0), max(int(math.floor(y0)), 0)
                mask[top : max(int(math.ceil(y1)), 0), left : max(int(math.ceil(x1)), 0)] = True
        if self.dilate:
            mask = _dilate(mask, self.dilate)
        if not mask.any():
            raise CorruptionError(
                f"the inpainting region of sample {sample.id!r} covers no pixel of its {width}x{height} "
                "image; give a region inside the image."
            )
        return mask

    def inpainted(self, sample: Sample) -> Image.Image:
        """The sample's image with its region inpainted (computed once per image, mask and settings)."""
        mask = self.mask(sample)
        image = sample.image.convert("RGB")
        key = _key(image, mask, self.describe())
        if key not in _CACHE:
            if self.backend == OPENCV:
                painted = _opencv(image, mask, self.method, self.radius)
            else:
                painted = _diffusers(image, mask, self.backend, self.prompt, self.steps, self.seed)
            pixels = np.where(
                mask[..., None], np.asarray(painted), np.asarray(image)
            )  # outside: the clean image
            _CACHE[key] = Image.fromarray(pixels.astype(np.uint8))
        return _CACHE[key]

    def pair(self, vlm: VLM, sample: Sample, answer_ids: tuple[int, ...]) -> Pair:
        clean = clean_side(vlm, sample, answer_ids)
        return Pair(clean=clean, corrupt=other_image_side(vlm, sample, self.inpainted(sample), clean))


def as_inpainting(spec: str | InpaintPair, *, seed: int = 0) -> InpaintPair:
    """The InpaintPair a recipe runs: `Options.inpaint` as given, or a backend name with default settings."""
    return spec if isinstance(spec, InpaintPair) else InpaintPair(backend=str(spec), seed=seed)


def inpainting_record(corruption: InpaintPair, samples: Sequence[Sample]) -> xr.Dataset:
    """The mask and the inpainted image of every sample, for a store: `inpaint_mask` (sample, y, x) and
    `inpainted` (sample, y, x, rgb), padded to the largest image (`image_height` / `image_width` say
    each sample's own size), with the backend and its settings in the attrs."""
    masks = [corruption.mask(s) for s in samples]
    images = [np.asarray(corruption.inpainted(s)) for s in samples]
    height = max(m.shape[0] for m in masks)
    width = max(m.shape[1] for m in masks)
    mask_array = np.zeros((len(samples), height, width), dtype=bool)
    image_array = np.zeros((len(samples), height, width, 3), dtype=np.uint8)
    for i, (mask, image) in enumerate(zip(masks, images, strict=True)):
        mask_array[i, : mask.shape[0], : mask.shape[1]] = mask
        image_array[i, : image.shape[0], : image.shape[1]] = image
    record = xr.Dataset(
        {
            "inpaint_mask": (("sample", "y", "x"), mask_array),
            "inpainted": (("sample", "y", "x", "rgb"), image_array),
        },
        coords={
            "image_height": ("sample", [m.shape[0] for m in masks]),
            "image_width": ("sample", [m.shape[1] for m in masks]),
        },
    )
    record["inpaint_mask"].attrs = {
        "description": f"pixels inpainted to make the corrupted image ({corruption.backend})",
        "units": "boolean",
    }
    record["inpainted"].attrs = {
        "description": "the corrupted image: the clean one with its region inpainted",
        "units": "8-bit intensity (0 to 255)",
    }
    record.attrs["inpainting"] = corruption.describe()
    return record


_CACHE: dict[str, Image.Image] = {}
_PIPELINES: dict[str, Any] = {}


def _boxes(region: Any) -> list[tuple[float, float, float, float]]:
    """One box (x0, y0, x1, y1) or a list of them, as a list of 4-tuples."""
    values = list(region)
    if len(values) == 4 and all(isinstance(v, int | float | np.integer | np.floating) for v in values):
        return [tuple(float(v) for v in values)]
    boxes = []
    for box in values:
        box = list(box)
        if len(box) != 4:
            raise CorruptionError(f"an inpainting box is (x0, y0, x1, y1) in pixels; got {box!r}.")
        boxes.append(tuple(float(v) for v in box))
    return boxes


def _dilate(mask: np.ndarray, pixels: int) -> np.ndarray:
    grown = mask.copy()
    for _ in range(pixels):
        shifted = grown.copy()
        shifted[1:] |= grown[:-1]
        shifted[:-1] |= grown[1:]
        shifted[:, 1:] |= grown[:, :-1]
        shifted[:, :-1] |= grown[:, 1:]
        grown = shifted
    return grown


def _key(image: Image.Image, mask: np.ndarray, settings: dict) -> str:
    digest = hashlib.sha256()
    digest.update(np.asarray(image).tobytes())
    digest.update(str(image.size).encode())
    digest.update(np.packbits(mask).tobytes())
    digest.update(repr(sorted((k, str(v)) for k, v in settings.items() if k != "region")).encode())
    return digest.hexdigest()


def _opencv(image: Image.Image, mask: np.ndarray, method: str, radius: int) -> Image.Image:
    try:
        import cv2
    except ImportError:
        raise CorruptionError(
            "InpaintPair's default backend needs OpenCV: pip install opencv-python-headless "
            '(or "vlmtrace[inpaint]").'
        ) from None
    flag = cv2.INPAINT_TELEA if method == "telea" else cv2.INPAINT_NS
    filled = cv2.inpaint(np.ascontiguousarray(np.asarray(image)), mask.astype(np.uint8) * 255, radius, flag)
    return Image.fromarray(filled)


def _diffusers(
    image: Image.Image, mask: np.ndarray, backend: str, prompt: str, steps: int, seed: int
) -> Image.Image:
    import torch

    try:
        from diffusers import AutoPipelineForInpainting
    except ImportError:
        raise CorruptionError(
            f"InpaintPair(backend={backend!r}) needs diffusers: pip install diffusers, or use "
            "backend='opencv'."
        ) from None
    if backend not in _PIPELINES:
        try:
            pipeline = AutoPipelineForInpainting.from_pretrained(backend)
        except (OSError, ValueError) as error:
            raise CorruptionError(
                f"cannot load the inpainting pipeline {backend!r} ({str(error).splitlines()[0]}); give a "
                "diffusers inpainting pipeline's Hub id or local directory, or backend='opencv'."
            ) from None
        pipeline.set_progress_bar_config(disable=True)
        _PIPELINES[backend] = pipeline
    pipeline = _PIPELINES[backend]
    width, height = image.size
    factor = 8 * getattr(pipeline, "vae_scale_factor", 1)  # the UNet halves the latent this many times
    size = (max(factor, round(width / factor) * factor), max(factor, round(height / factor) * factor))
    mask_image = Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.NEAREST)
    painted = pipeline(
        prompt=prompt,
        image=image.resize(size, Image.BICUBIC),
        mask_image=mask_image,
        width=size[0],
        height=size[1],
        num_inference_steps=steps,
        generator=torch.Generator("cpu").manual_seed(seed),
        output_type="pil",
    ).images[0]
    return painted.convert("RGB").resize((width, height), Image.BICUBIC)
