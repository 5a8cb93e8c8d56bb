"""A forward's image encoder runs once per distinct image, and every row reads its image's encoding.

A sweep's rows show the clean and the corrupted image over and over; a `row_position` image
encoder (`Adapter.image_encoder`) now encodes each of them once per forward
(`vlmtrace.engine.forward.ImageRows`). The reference is the same sweep with an adapter that
declares no encoder inputs (`image_encoder_inputs=()`), whose every row encodes its own image
as before: every cell must agree. The noise corruptions matter most: noise on the token
embeddings is added before or after the encoder's output as the model runs them
(`Adapter.image_encoder_runs_first`), and noise on BLIP's image embeddings is added to the
encoder's output itself, which every row must then hold as its own copy.
"""

from __future__ import annotations

import dataclasses
import importlib
import warnings

import numpy as np
import pytest
import torch
from test_families import FAMILIES, loaded, sample_of

import vlmtrace as vt
from vlmtrace.engine.attribution import AttributionWarning
from vlmtrace.models.adapter import AdapterMismatchError
from vlmtrace.models.registry import registered

CORRUPTIONS = {
    "image_pair": lambda: vt.ImagePair(),
    "image_noise": lambda: vt.GaussianNoise("image", scale=3.0, samples=2, seed=5),
    "token_noise": lambda: vt.GaussianNoise("visual", scale=3.0, samples=2, seed=5),
    "str": lambda: vt.SymmetricTokenReplacement("visual"),
}
ROW_ENCODER_FAMILIES = sorted(
    adapter.family
    for adapter in registered()
    if adapter.image_encoder is not None
    and adapter.image_encoder.layout == "row_position"
    and adapter.family in FAMILIES  # BLIP has no family module: its own test below
)
"""Every registered family whose encoder encodes one row per image, read from the adapters so a
new one is covered without editing this list."""


def test_the_families_with_a_row_encoder_are_read_from_the_adapters():
    assert {"llava", "paligemma", "blip2", "instructblip_t5", "mllama"} <= set(ROW_ENCODER_FAMILIES)


def every_row(vlm: vt.VLM) -> vt.VLM:
    return dataclasses.replace(vlm, adapter=dataclasses.replace(vlm.adapter, image_encoder_inputs=()))


def encoded_batches(vlm: vt.VLM, run) -> tuple[object, list[int]]:
    """What `run()` returns, and how many images the image encoder encoded at each call during it."""
    module = vlm.model.get_submodule(vlm.adapter.image_encoder.path)
    sizes: list[int] = []

    def count(_module, args, kwargs):  # the pixels it is given (its output is expanded to rows)
        sizes.append(len(args[0] if args else kwargs["pixel_values"]))

    handle = module.register_forward_pre_hook(count, with_kwargs=True)
    try:
        return run(), sizes
    finally:
        handle.remove()


def sweep(vlm: vt.VLM, sample: vt.Sample, corruption: str, stack: str | None = None) -> object:
    return vt.patch(
        vlm,
        [sample],
        corruption=CORRUPTIONS[corruption](),
        grid=vt.Grid(sites=("block", "mlp"), windows=(1,), stack=stack),
        max_batch=12,
        progress=False,
        verify=False,  # the self-check's own unbatched forwards would add encoder calls of one row
    )


def assert_same_cells(once, every) -> None:
    for name in ("block", "mlp", "clean", "corrupt"):
        np.testing.assert_allclose(once[name].values, every[name].values, atol=1e-6, rtol=0, err_msg=name)


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
@pytest.mark.parametrize("family", ROW_ENCODER_FAMILIES)
def test_each_image_is_encoded_once_per_forward_and_every_cell_equals_encoding_every_row(family, corruption):
    vlm = loaded(family)
    sample = sample_of(importlib.import_module(f"families.{family}").FAMILY)
    once, sizes = encoded_batches(vlm, lambda: sweep(vlm, sample, corruption))
    every, every_sizes = encoded_batches(vlm, lambda: sweep(every_row(vlm), sample, corruption))
    assert_same_cells(once, every)
    images = 2 if corruption == "image_pair" else 1  # STR and noise show the clean image throughout
    assert max(sizes) == images, sizes  # a forward of 12 rows encodes each of its images once
    assert max(every_sizes) >= 10  # the reference did encode every row (up to 12 a forward)


@pytest.mark.parametrize("stack", ["encoder", "decoder"])
@pytest.mark.parametrize("corruption", ["image_pair", "image_noise", "token_noise"])
def test_blip_encodes_each_image_once_and_its_noised_encodings_stay_per_row(
    tiny_blip, blip_sample, corruption, stack
):
    once, sizes = encoded_batches(tiny_blip, lambda: sweep(tiny_blip, blip_sample, corruption, stack))
    every = sweep(every_row(tiny_blip), blip_sample, corruption, stack)
    assert_same_cells(once, every)
    assert max(sizes) == (2 if corruption == "image_pair" else 1), sizes


def test_knockout_encodes_the_image_once_per_forward(tiny_llava, llava_sample):
    run = lambda vlm: vt.knockout(  # noqa: E731
        vlm, [llava_sample], blocks={"image->last": ("image", "last")}, max_batch=8, progress=False
    )
    once, sizes = encoded_batches(tiny_llava, lambda: run(tiny_llava))
    every = run(every_row(tiny_llava))
    for name in once.data_vars:
        if np.issubdtype(once[name].dtype, np.floating):
            np.testing.assert_allclose(once[name].values, every[name].values, atol=1e-6, rtol=0, err_msg=name)
    assert set(sizes) == {1}, sizes


def test_an_encoder_that_does_not_return_one_entry_per_image_stops_the_forward(tiny_llava, llava_sample):
    """A misdeclared encoder (its output not [image, ...]) is caught on the live output."""
    # doubled inside the vision tower (its transformer layers' output), before nnsight sees it
    module = tiny_llava.model.get_submodule(f"{tiny_llava.adapter.image_encoder.path}.encoder")

    def doubled(_module, _args, output):  # two entries per image
        twice = {
            k: torch.cat([v, v]) if isinstance(v, torch.Tensor) else tuple(torch.cat([h, h]) for h in v)
            for k, v in output.items()
        }
        return type(output)(**twice)

    handle = module.register_forward_hook(doubled)
    try:
        with pytest.raises(AdapterMismatchError, match="one entry per"):
            sweep(tiny_llava, llava_sample, "image_pair")
    finally:
        handle.remove()


def test_a_forward_that_edits_inside_the_encoder_encodes_every_row(tiny_llava, llava_sample):
    """A stack (or noise) inside the vision tower differs between rows that show one image:
    such a forward runs the encoder on every row, as before."""
    from vlmtrace.engine.forward import Edits, shared_images
    from vlmtrace.engine.planning import prepare

    prepared = prepare(tiny_llava, llava_sample, vt.ImagePair(), vt.Probability(), False)
    rows = prepared.rows(["clean", "corrupt", "corrupt", "corrupt"])
    language = tiny_llava.adapter.stacks["lm"]
    vision = dataclasses.replace(language, layers="model.vision_tower.encoder.layers")
    shared = shared_images(tiny_llava, rows, language, Edits())
    assert shared is not None and shared.first == (0, 1) and shared.of_row == (0, 1, 1, 1)
    assert shared_images(tiny_llava, rows, vision, Edits()) is None


def test_an_encoder_output_that_is_not_a_model_output_is_named_as_misdeclared():
    from vlmtrace.engine.forward import encodings_of_rows

    with pytest.raises(AdapterMismatchError, match="not row_position"):
        encodings_of_rows((torch.zeros(2, 3),), torch.tensor([0, 1, 1]), "vision_tower")


ESTIMATORS = {
    "atp": {"method": "atp"},
    "ig": {"method": "ig", "steps": 3},
    "graddrop": {"method": "atp+graddrop"},
}


def attribution(vlm: vt.VLM, sample: vt.Sample, corruption: str, estimator: str) -> object:
    return vt.attribute(
        vlm,
        [sample],
        corruption=CORRUPTIONS[corruption](),
        grid=vt.Grid(sites=("block", "mlp"), windows=(1,)),
        progress=False,
        **ESTIMATORS[estimator],
    )


def shares_images(vlm: vt.VLM, corruption: str, estimator: str) -> bool:
    """Where the attribution pass encodes once per image: its rows get their encodings before any
    embedding edit, so not where the model embeds tokens first and the pass edits them (noise on
    the tokens, or the integrated-gradients path, which moves every embedding)."""
    return vlm.adapter.image_encoder_runs_first or (estimator != "ig" and corruption != "token_noise")


@pytest.mark.parametrize("estimator", list(ESTIMATORS))
@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
@pytest.mark.parametrize("family", [*ROW_ENCODER_FAMILIES, "blip"])
def test_attribution_encodes_each_image_once_and_every_estimate_equals_encoding_every_row(
    family, corruption, estimator, tiny_blip, blip_sample
):
    """GradDrop's copies and the path's points repeat the pass's two images in every row: on BLIP
    the vision transformer, most of a row's work, ran 13 times for the 2 images of a GradDrop pass.

    The path's end is checked inside (`AttributionWarning` when it misses the other run), made an
    error here except for an image pair of two shapes, whose aspect-ratio inputs no path moves.
    Before the embeddings were edited in the order the model runs them, Mllama's and BLIP-2's
    integrated gradients stopped with nnsight's OutOfOrderError."""
    if family == "blip":
        vlm, sample = tiny_blip, blip_sample
    else:
        vlm, sample = loaded(family), sample_of(importlib.import_module(f"families.{family}").FAMILY)
    if not (corruption == "image_pair" and sample.image.size != sample.image_pair.size):
        warnings.simplefilter("error", AttributionWarning)  # pytest restores the filters after the test
    once, sizes = encoded_batches(vlm, lambda: attribution(vlm, sample, corruption, estimator))
    every, every_sizes = encoded_batches(
        vlm, lambda: attribution(every_row(vlm), sample, corruption, estimator)
    )
    assert_same_cells(once, every)
    rows = max(every_sizes)  # what every pass encoded before: one image per row
    images = 2 if corruption == "image_pair" else 1
    assert rows >= (2 if estimator == "atp" else 3)  # clean and corrupted, + copies or path points
    assert max(sizes) == (images if shares_images(vlm, corruption, estimator) else rows), (sizes, every_sizes)
