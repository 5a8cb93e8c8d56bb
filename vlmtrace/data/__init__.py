"""Samples: the `Sample` type, synthetic scenes for the organisms, loaders for real datasets, and
`check_answers`, which splits samples by whether the model answers them (`correctness`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .sample import Sample

if TYPE_CHECKING:
    from ..models.load import VLM


def synthetic_samples(vlm: VLM, family: str, n: int, *, seed: int = 0, split: str = "test") -> list[Sample]:
    """Held-out synthetic questions of one family, in the prompt form `vlm` reads.

    Early-fusion models (LLaVA) get the `<image>` placeholder in the prompt; BLIP reads the
    image through cross-attention, so its prompts are the bare question.
    """
    from .scenes import for_blip, make_samples

    samples = make_samples(family, n, seed=seed, split=split)
    return samples if vlm.adapter.image_in_sequence else [for_blip(s) for s in samples]


def check_answers(vlm: VLM, samples: list[Sample], **options):
    """Samples split by whether the model's greedy next token is their answer's first token
    (`vlmtrace.data.correctness.check_answers`; imported on use, as it needs torch)."""
    from .correctness import check_answers as check

    return check(vlm, samples, **options)


__all__ = ["Sample", "check_answers", "synthetic_samples"]
