"""How the corrupted run differs from the clean one.

Causal tracing compares a clean run with a corrupted one, then patches activations between
them. The papers disagree on the corruption, and the choice changes the answer (Zhang &
Nanda), so vlmtrace makes it an explicit, recorded object:

    ReplaceSpan("visual")                  # Basu et al.: "this place" -> another phrase's ids
    SymmetricTokenReplacement("visual")    # STR: same token count, in-distribution
    GaussianNoise("image", scale=3.0, samples=10, seed=0)   # ROME / Palit et al.
    ImagePair()                            # NOTICE's semantic image pairs (SIP)

Text replacements default to the sample's own counterfactual (`Sample.replacements[span]`)
and image pairs to `Sample.image_pair`, because good counterfactuals belong to the data.
Gaussian noise is drawn from a seeded CPU generator, one draw per noise sample, and added
inside the trace; its scale is a multiple of the standard deviation of the clean embeddings
being noised, measured in the same forward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from numbers import Integral
from typing import Any

import torch

from ..data.sample import Sample
from ..errors import UserError
from ..models.load import VLM
from .inputs import Encoded, encode
from .positions import replace_first


class CorruptionError(UserError):
    """A corruption that cannot be applied to a sample as given."""


@dataclass(frozen=True)
class Noise:
    """Gaussian noise added inside the trace to the corrupted rows' embeddings."""

    embedding: str
    """Which embedding hook of the adapter: "image" or "tokens"."""
    positions: tuple[int, ...] | None
    """Token positions to noise (for "tokens"); None noises the whole image embedding."""
    scale: float
    """Noise std as a multiple of the std of the clean embeddings being noised."""
    seed: int


@dataclass(frozen=True)
class Pair:
    """A sample's clean and corrupted sides, ready for the engine."""

    clean: Encoded
    corrupt: Encoded
    noise: Noise | None = None
    samples: int = 1
    """Noise draws: each patched cell is run this many times and averaged."""


class Corruption:
    """Base class: turn a sample into a clean/corrupted `Pair`."""

    name = "corruption"

    def pair(self, vlm: VLM, sample: Sample, answer_ids: tuple[int, ...]) -> Pair:
        raise NotImplementedError

    def describe(self) -> dict:
        """What to record in a result's attrs (provenance)."""
        fields = {k: v for k, v in vars(self).items() if not k.startswith("_")}
        return {"kind": self.name, **fields}


def clean_side(vlm: VLM, sample: Sample, answer_ids: tuple[int, ...]) -> Encoded:
    return encode(
        vlm, prompt=sample.prompt, image=sample.image, spans=dict(sample.spans), answer_ids=answer_ids
    )


def other_image_side(vlm: VLM, sample: Sample, image: Any, clean: Encoded) -> Encoded:
    """The clean side's prompt, spans and answer, shown `image` (an image pair, an inpainting)."""
    return encode(
        vlm,
        prompt=sample.prompt,
        image=image,
        spans=dict(sample.spans),
        answer_ids=clean.answer_ids,
        like=clean,
    )


def with_clean_image(vlm: VLM, side: Encoded, clean: Encoded) -> Encoded:
    """`side`, shown the clean side's image, holding the clean side's image-encoder inputs.

    The processor gives the same image equal but separate tensors on each side; a forward
    finds rows that share an image by identity (`forward.shared_images`), so without this a
    phrase-replacement sweep encodes its one image twice per forward. Shared only where every
    encoder input is equal, value for value.
    """
    names = vlm.adapter.image_encoder_inputs
    if not names or any(name not in side.inputs or name not in clean.inputs for name in names):
        return side
    for name in names:
        a, b = side.inputs[name], clean.inputs[name]
        if a.shape != b.shape or a.dtype != b.dtype or not torch.equal(a, b):
            return side
    return replace(side, inputs={**side.inputs, **{name: clean.inputs[name] for name in names}})


@dataclass(frozen=True)
class ReplaceSpan(Corruption):
    """Replace a named span's tokens with another phrase's (Basu et al.'s corruption).

    The phrase may have a different token count; positions are then aligned segment by
    segment, and span positions without a partner stay unpatched (NaN in results).
    """

    span: str
    text: str | None = None
    """The replacement phrase; None takes `sample.replacements[span]`."""
    name = "replace_span"

    def replacement(self, sample: Sample) -> str:
        if self.span not in sample.spans:
            raise CorruptionError(
                f"sample {sample.id!r} has no span {self.span!r} (it has {list(sample.spans)}); "
                "name the span in Sample.spans."
            )
        text = self.text if self.text is not None else sample.replacements.get(self.span)
        if text is None:
            raise CorruptionError(
                f"no replacement phrase for span {self.span!r} of sample {sample.id!r}: pass "
                f"{type(self).__name__}({self.span!r}, text=...) or set Sample.replacements."
            )
        return text

    def pair(self, vlm: VLM, sample: Sample, answer_ids: tuple[int, ...]) -> Pair:
        clean = clean_side(vlm, sample, answer_ids)
        text = self.replacement(sample)
        original = sample.spans[self.span]
        prompt = replace_first(sample.prompt, original, text)
        spans = {**sample.spans, self.span: text}
        corrupt = encode(vlm, prompt=prompt, image=sample.image, spans=spans, answer_ids=answer_ids)
        corrupt = with_clean_image(vlm, corrupt, clean)
        self.check(clean, corrupt, original, text)
        return Pair(clean=clean, corrupt=corrupt)

    def check(self, clean: Encoded, corrupt: Encoded, original: str, text: str) -> None:
        """Phrase replacement accepts any length; STR overrides this."""


@dataclass(frozen=True)
class SymmetricTokenReplacement(ReplaceSpan):
    """Replace a span with a phrase of the same token count (STR, Zhang & Nanda; NOTICE).

    Same length keeps every position aligned and the corrupted prompt in distribution.
    """

    name = "symmetric_token_replacement"

    def check(self, clean: Encoded, corrupt: Encoded, original: str, text: str) -> None:
        n_clean = len(clean.prompt.positions(self.span))
        n_corrupt = len(corrupt.prompt.positions(self.span))
        if n_clean != n_corrupt:
            raise CorruptionError(
                f"symmetric token replacement needs equal token counts: {original!r} is "
                f"{n_clean} tokens but {text!r} is {n_corrupt}. Choose a replacement of "
                f"{n_clean} tokens, or use ReplaceSpan, which aligns unequal spans."
            )


@dataclass(frozen=True)
class GaussianNoise(Corruption):
    """Add seeded Gaussian noise to the image embeddings or to a span's token embeddings.

    `target="image"` noises the image embeddings (LLaVA: projector output; BLIP: the vision
    encoder's output, as in Palit et al.); any other value names a span whose token
    embeddings are noised (ROME). `samples` draws are averaged for every cell.
    """

    target: str = "image"
    scale: float = 3.0
    samples: int = 10
    seed: int = 0
    name = "gaussian_noise"

    def pair(self, vlm: VLM, sample: Sample, answer_ids: tuple[int, ...]) -> Pair:
        if isinstance(self.samples, bool) or not isinstance(self.samples, int) or self.samples < 1:
            raise CorruptionError(f"GaussianNoise needs an integer samples >= 1, got {self.samples!r}.")
        if not (isinstance(self.scale, int | float) and math.isfinite(self.scale) and self.scale >= 0):
            raise CorruptionError(
                f"GaussianNoise needs a finite scale >= 0 (a multiple of the embeddings' std; 0 is a "
                f"no-op control), got {self.scale!r}; ROME and Palit et al. use 3.0."
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, Integral) or not 0 <= self.seed < 2**63:
            raise CorruptionError(
                f"GaussianNoise needs a whole-number seed between 0 and 2**63 - 1 (torch's generator "
                f"takes no other), got {self.seed!r}."
            )
        clean = clean_side(vlm, sample, answer_ids)
        if self.target == "image":
            if "image" not in vlm.adapter.embeddings:
                raise CorruptionError(f"{vlm.name} has no image embeddings to noise.")
            noise = Noise("image", None, self.scale, self.seed)
        else:
            if self.target not in sample.spans:
                raise CorruptionError(
                    f"GaussianNoise target {self.target!r} is neither 'image' nor a span of "
                    f"sample {sample.id!r} (spans: {list(sample.spans)})."
                )
            positions = tuple(clean.prompt.positions(self.target))
            noise = Noise("tokens", positions, self.scale, self.seed)
        return Pair(clean=clean, corrupt=clean, noise=noise, samples=self.samples)


@dataclass(frozen=True)
class ImagePair(Corruption):
    """Show the corrupted run another image (NOTICE's semantic image pairs, SIP)."""

    name = "image_pair"

    def pair(self, vlm: VLM, sample: Sample, answer_ids: tuple[int, ...]) -> Pair:
        if sample.image_pair is None:
            raise CorruptionError(
                f"sample {sample.id!r} has no image_pair; set Sample.image_pair to the same scene "
                "with one concept changed."
            )
        clean = clean_side(vlm, sample, answer_ids)
        return Pair(clean=clean, corrupt=other_image_side(vlm, sample, sample.image_pair, clean))
