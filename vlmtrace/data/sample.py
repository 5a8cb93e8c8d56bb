"""One visual question, with the names of the text spans an experiment will corrupt or patch.

Causal-tracing papers talk about "the visual constraint" or "the subject" of a question;
the model sees token ids. A `Sample` keeps the words (`spans`), and `vlmtrace.engine.positions`
turns them into token positions for whatever tokenizer the model uses, so an experiment
never carries hard-coded offsets such as "576 image tokens, then 3 tokens of subject".

    Sample(
        prompt="<image> which city did this shape represent in year 2006 ?",
        answer="paris",
        image=scene_image,
        spans={"visual": "this shape", "textual": "year 2006"},
        replacements={"visual": "the circle"},  # a symmetric counterfactual phrase
        image_pair=other_scene_image,             # the same scene with one attribute changed
        foil="tokyo",                              # the answer on the corrupted side
    )

The counterfactual fields are per sample because a good counterfactual is a property of the
data set (NOTICE's semantic image pairs, STR phrase pairs), not of the experiment.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from PIL.Image import Image


@dataclass(frozen=True)
class Sample:
    """A prompt, its answer and everything an intervention needs to know about it."""

    prompt: str
    """The text the model reads. For models that place image tokens inside the text (LLaVA)
    it contains the processor's image placeholder (`<image>`)."""
    answer: str
    """The answer whose probability the metrics score (its first token, by default)."""
    image: Image | None = None
    """The image; None for a text-only model."""
    spans: Mapping[str, str] = field(default_factory=dict)
    """Named constraint spans: segment name -> text that occurs in `prompt` (first occurrence)."""
    replacements: Mapping[str, str] = field(default_factory=dict)
    """Counterfactual text for a span (segment name -> replacement phrase), for token replacement."""
    image_pair: Image | None = None
    """A semantic image pair: the same scene with one concept changed (NOTICE's SIP)."""
    foil: str | None = None
    """The competing answer for logit-difference metrics: usually the answer of the corrupted side."""
    id: str = ""
    """A stable identifier, written as the `sample` coordinate of results."""
    meta: Mapping[str, Any] = field(default_factory=dict)
    """Anything else worth keeping with the sample (question family, scene attributes)."""

    def with_(self, **changes: Any) -> Sample:
        """A copy with some fields changed (Samples are frozen so they can be shared safely)."""
        from dataclasses import replace

        return replace(self, **changes)
