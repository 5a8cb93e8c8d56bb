"""What a sweep refuses before its first forward: inputs that would return numbers, not errors.

A wrong input that crashes is an hour lost; one that returns numbers is a wrong paper. Each
check here stopped an input that used to come back as a trace: an all-NaN image, a prompt
longer than the model's positions (silently cut), a span holding the prompt's last token (it
lost the token to the "last" label), a prompt ending in its image placeholder (an image token
read as "last"), the image token as the answer, a NaN answer from a JSON file (scored as the
token "n"), an image given as a URL (fetched by transformers). Others crashed deep inside a
library: a metric given as a class, a single Sample where a list belongs, a float shard.

    check_arguments(metric=metric, max_batch=64, max_memory=None, shard=None, store=None)
    check_samples(vlm, samples)        # types, texts, images: before anything is encoded
    admitted(vlm, prepared)            # positions, last token, answer ids: once encoded

All errors are `AdmissionError` (a `UserError`), one paragraph naming the sample, what it
holds, and what to do.
"""

from __future__ import annotations

import math
import types
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..data.sample import Sample
from ..errors import UserError
from .metrics import Metric
from .positions import LAST, TokenText

if TYPE_CHECKING:
    from ..models.load import VLM
    from .planning import Prepared


class AdmissionError(UserError):
    """An input no sweep may run: it would crash inside a library, or return wrong numbers."""


# --- the call's own arguments --------------------------------------------------------------


def check_arguments(
    *,
    metric: Any,
    max_batch: Any = 1,
    max_memory: Any = None,
    shard: Any = None,
    store: Any = None,
) -> None:
    """Refuse arguments of a sweep call that are of the wrong kind or out of range."""
    if isinstance(metric, type) and issubclass(metric, Metric):
        raise AdmissionError(
            f"metric is the class {metric.__name__}, not a metric: write metric={metric.__name__}()."
        )
    if not isinstance(metric, Metric):
        raise AdmissionError(
            f"metric must be a vlmtrace metric (vt.Probability(), vt.LogProb(), vt.LogitDiff(), vt.KL()); "
            f"got {metric!r}."
        )
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise AdmissionError(f"max_batch must be a whole number of rows >= 1; got {max_batch!r}.")
    if max_memory is not None and (
        isinstance(max_memory, bool)
        or not isinstance(max_memory, int | float)
        or not math.isfinite(max_memory)
        or max_memory <= 0
    ):
        raise AdmissionError(
            f"max_memory must be a finite number of bytes > 0 (e.g. 20e9), or None for no limit; got "
            f"{max_memory!r}."
        )
    if shard is not None:
        if (
            not isinstance(shard, tuple | list)
            or len(shard) != 2
            or any(isinstance(x, bool) or not isinstance(x, int | np.integer) for x in shard)
        ):
            raise AdmissionError(
                f"shard must be two whole numbers (i, n), the i-th of n parts; got {shard!r}. E.g. "
                "shard=(0, 2) and shard=(1, 2) (CLI: --shard 0/2)."
            )
        if not 0 <= shard[0] < shard[1]:
            raise AdmissionError(
                f"shard must be (i, n) with 0 <= i < n, got {tuple(shard)}; e.g. --shard 0/2 and --shard 1/2."
            )
    if store is not None:
        from ..results.store import checked_path

        checked_path(store)


# --- samples, before anything is encoded ---------------------------------------------------


def reads_images(vlm: VLM) -> bool:
    return vlm.adapter.image_in_sequence or "image" in vlm.adapter.embeddings


def check_samples(vlm: VLM, samples: Any) -> None:
    """Refuse a samples argument that is not a list of well-formed Samples for this model."""
    if isinstance(samples, Sample):
        raise AdmissionError("samples must be a list of Sample; got a single Sample: pass [sample].")
    if (
        isinstance(samples, types.GeneratorType)
        or not isinstance(samples, Sequence)
        or isinstance(samples, str)
    ):
        raise AdmissionError(
            f"samples must be a list (or tuple) of Sample, which a sweep indexes and counts; got "
            f"{type(samples).__name__}: pass list(...)."
        )
    for index, sample in enumerate(samples):
        if not isinstance(sample, Sample):
            raise AdmissionError(f"samples[{index}] is {sample!r}, not a Sample; drop it or build a Sample.")
        check_sample(vlm, sample, index)


def _named(sample: Sample, index: int) -> str:
    return f"sample {sample.id!r}" if sample.id else f"samples[{index}]"


def check_sample(vlm: VLM, sample: Sample, index: int = 0) -> None:
    """One sample's fields: texts are text, images are images (one placeholder for one image)."""
    who = _named(sample, index)
    for field in ("prompt", "answer"):
        _check_text(getattr(sample, field), f"{who}: {field}")
    if sample.foil is not None:  # an empty foil is no foil (metrics that need one say so)
        _check_text(sample.foil, f"{who}: foil", empty_ok=True)
    for field in ("spans", "replacements"):
        value = getattr(sample, field)
        if not isinstance(value, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):
            raise AdmissionError(f"{who}: {field} must map names to text; got {value!r}.")
    if reads_images(vlm):
        _check_image(sample.image, f"{who}: image", required=True)
        if sample.image_pair is not None:
            _check_image(sample.image_pair, f"{who}: image_pair", required=False)
        placeholder = getattr(vlm.processor, "image_token", None)
        if vlm.adapter.image_in_sequence and isinstance(placeholder, str) and placeholder:
            count = sample.prompt.count(placeholder)
            if count > 1:
                raise AdmissionError(
                    f"{who}: the prompt holds {count} image placeholders ({placeholder!r}) but a Sample "
                    "has one image; keep one placeholder where the image goes."
                )


def _span_holds_last(who: str, name: str, span: str) -> AdmissionError:
    return AdmissionError(
        f"{who}: span {name!r} = {span!r} holds the prompt's last token, which is the position the "
        "answer is read from (labelled 'last'); the span would silently lose it. End the prompt after "
        "the span (e.g. with ' ?' or the model's answer cue)."
    )


def _check_text(value: Any, what: str, *, empty_ok: bool = False) -> None:
    if isinstance(value, float) and math.isnan(value):
        raise AdmissionError(
            f"{what} is NaN, a missing value (an empty cell or a NaN in a JSON or CSV file), not text; "
            "fill it in or drop the sample."
        )
    if not isinstance(value, str):
        raise AdmissionError(
            f"{what} must be text; got {type(value).__name__} {value!r}: write it as a string."
        )
    if not value.strip() and not empty_ok:
        raise AdmissionError(f"{what} is empty; give the text.")


def _check_image(image: Any, what: str, *, required: bool) -> None:
    from PIL import Image

    if image is None:
        if required:
            raise AdmissionError(
                f"{what} is None, but this model reads an image; give a PIL image (PIL.Image.open(path))."
            )
        return
    if isinstance(image, str) and image.split("://", 1)[0].lower() in ("http", "https", "ftp", "s3", "gs"):
        raise AdmissionError(
            f"{what} is the URL {image!r}; vlmtrace fetches nothing from the network for a sample. "
            "Download it and give a PIL image (PIL.Image.open(path))."
        )
    if isinstance(image, str | bytes | bytearray) or hasattr(image, "__fspath__"):
        kind = "bytes" if isinstance(image, bytes | bytearray) else f"the path {str(image)!r}"
        raise AdmissionError(
            f"{what} is {kind}, not an image; open it with PIL.Image.open(path) "
            "(bytes: PIL.Image.open(io.BytesIO(data)))."
        )
    if not isinstance(image, Image.Image):
        raise AdmissionError(f"{what} is a {type(image).__name__}, not a PIL image.")
    if image.width == 0 or image.height == 0:
        raise AdmissionError(f"{what} is {image.width}×{image.height} pixels: it holds no image.")
    if image.mode in ("F", "I", "I;16", "I;16B", "I;16L", "I;16N"):
        pixels = np.asarray(image, dtype=np.float64)
        if not np.isfinite(pixels).all():
            raise AdmissionError(
                f"{what} holds non-finite pixel values (NaN or infinity: {int((~np.isfinite(pixels)).sum())} "
                f"of {pixels.size}); the model would compute NaN. Fix or drop the image."
            )


# --- once encoded ----------------------------------------------------------------------------


def max_positions(vlm: VLM) -> int | None:
    """The language model's maximum positions, when its config declares them."""
    config = vlm.model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    value = getattr(text, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else None


def admitted(vlm: VLM, prepared: Prepared) -> Prepared:
    """`prepared`, once `check_prepared` found nothing to refuse (how `planning.prepare` calls it)."""
    check_prepared(vlm, prepared)
    return prepared


def check_prepared(vlm: VLM, prepared: Prepared) -> None:
    """Refuse an encoded sample whose trace would be wrong: too long, a last token that is no
    question token, an image token as the answer, non-finite pixels."""
    sample = prepared.sample
    who = _named(sample, 0)
    image_token = vlm.shape.image_token_id
    limit = max_positions(vlm)
    for side, encoded in (("clean", prepared.pair.clean), ("corrupted", prepared.pair.corrupt)):
        ids = encoded.inputs.get("input_ids")
        if ids is not None and limit is not None and len(ids) > limit:
            raise AdmissionError(
                f"{who}: the {side} prompt is {len(ids)} tokens (image tokens included), more than the "
                f"{limit} positions the model has; its result would be meaningless. Shorten the prompt, or "
                "use a smaller image or a model with more positions."
            )
        for name, value in encoded.inputs.items():
            if torch.is_tensor(value) and value.is_floating_point() and not torch.isfinite(value).all():
                source = "image pair" if side == "corrupted" and sample.image_pair is not None else "image"
                raise AdmissionError(
                    f"{who}: the {side} input {name!r} holds NaN or infinite values (from the {source}?); "
                    "the model would compute NaN. Fix or drop the image."
                )
        if ids is None or LAST not in encoded.prompt.labels:
            continue
        last = encoded.prompt.labels.index(LAST)
        if image_token is not None and int(ids[last]) == image_token:
            raise AdmissionError(
                f"{who}: the {side} prompt ends in its image placeholder, so the last position (where "
                "the answer is read) is an image token. Put the question (and the answer cue) after the "
                "image."
            )
        if side == "clean":  # a corrupted side's spans are replacements, placed like the originals
            _check_last_not_in_spans(vlm, sample, ids[: last + 1], who)
    answers = [("answer", prepared.answer)] + ([("foil", prepared.foil)] if prepared.foil is not None else [])
    for what, answer_ids in answers:
        if image_token is not None and image_token in [int(i) for i in answer_ids]:
            raise AdmissionError(
                f"{who}: the {what} {getattr(sample, what)!r} is (or holds) the image token, which the "
                "model never produces as text; give the answer as words."
            )


def _check_last_not_in_spans(vlm: VLM, sample: Sample, prompt_ids: torch.Tensor, who: str) -> None:
    """Refuse a span whose tokens reach the prompt's last position (the last of `prompt_ids`):
    the span would silently lose that token to the "last" label. Found with the tokenizer's own
    offsets (`TokenText`), as the encoder found the span."""
    if not sample.spans:
        return
    last = len(prompt_ids) - 1
    image_token = vlm.shape.image_token_id if vlm.adapter.image_in_sequence else None
    text = TokenText.of(
        vlm.tokenizer, [int(i) for i in prompt_ids], prompt=sample.prompt, image_token_id=image_token
    )
    for name, span in sample.spans.items():
        try:
            positions = text.span_positions(span, name)
        except UserError:
            continue  # the encoder reported it already
        if last in positions:
            raise _span_holds_last(who, name, span)
