"""What a family's reference test needs: a tiny model, a prompt, and where its modules are.

Paths here are written out by hand from the model's printout, independently of the adapter
(`vlmtrace/models/<family>.py`): if both said the same wrong thing, the reference test would
compare the engine with itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from reference import At


def last_position_logits(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    return model(**inputs).logits[0, -1]


@dataclass(frozen=True)
class Family:
    name: str
    """Family name as the adapter calls it (`vlm.adapter.family`)."""
    build: Callable[[], tuple[torch.nn.Module, Any]]
    """A tiny random-weight model (2-3 layers, seeded, an image that moves the answer) and its
    real processor class, built offline."""
    prompt: str
    """The prompt, with the family's image placeholder, containing "this shape" and "year 2006"."""
    sites: dict[str, At]
    """Engine site name -> reference hook (path with `{i}` for the layer)."""
    image: At
    """The image features the engine noises (absolute path)."""
    attention: str | None
    """Self-attention module path (with `{i}`) whose `attention_mask` keyword knockout edits."""
    attention_layers: tuple[int, ...] | None = None
    """Layers that have that self-attention module (None: every layer). Mllama's cross-attention
    layers have none: a knockout window over them cuts no edge there."""
    replacement: str = "the circle"
    """Same token count as "this shape" under this family's tokenizer (STR)."""
    answer: str = "paris"
    score: Callable[[torch.nn.Module, dict], torch.Tensor] = last_position_logits
    image_size: tuple[int, int] = (32, 32)
    pair_size: tuple[int, int] | None = None
    """Size of the image pair (None: same as the image); another size exercises unequal tiles."""
    segments: tuple[str, ...] = ("image", "visual", "last")
    """Segments whose positions the patching test covers (no "image" where the image is not
    in the sequence, as in Mllama)."""
    knockout: tuple[str, str] = ("image", "last")
    """(keys, queries) segments of the knockout test's block."""
    skip: dict[str, str] = field(default_factory=dict)
    """Checks this family cannot run ("str", "image_pair", "noise", "knockout"), with the reason
    (shown in the support matrix)."""
