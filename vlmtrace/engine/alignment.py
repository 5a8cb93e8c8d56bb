"""Which corrupted position a clean position is patched from (or into): paired by what it holds.

Patching copies an activation from one run into the other at "the same position". When both
runs have the same tokens in the same places that is the same index, but it often is not:

- a replacement phrase of another length shifts everything after it (Basu et al.'s corruption);
- an image pair of another size gives another number of image tokens (tiled images, Qwen's
  dynamic grid), and processors write size-dependent markup before the question: Idefics3's
  `<row_i_col_j>` tags, Gemma 3's pan-and-scan words. Pairing by index within a segment then
  restores "which" into "did", with no error.

So positions are paired by content, one rule for every family:

- the same text token at the same place in the text (the prompt's words, special tokens, the
  last token with the last token);
- the k-th token of a constraint span with the k-th token of its replacement;
- the k-th image token with the k-th, in the processor's tile and patch order;
- processor markup with the same markup token.

The two runs' positions are matched in order (difflib over these keys, no junk heuristic), so
a shift anywhere never drags later positions along. A clean position left without a partner is
not patched: its cells are NaN, and `reasons` (stored with the result as `unpaired`) says why.

    aligned = align(clean_segments, corrupt_segments)
    aligned.pairs[12]          # the corrupted position that clean position 12 pairs with
    aligned.reasons[31]        # "the corrupted image has fewer image tokens (16 of 20)"
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from difflib import SequenceMatcher

from .positions import ANSWER, IMAGE, LAST, MARKUP, QUESTION, SPECIAL, START, Segments

TEXT_LABELS = (QUESTION, SPECIAL)
"""Labels whose positions pair by token id: the prompt's own text and special tokens."""


@dataclass(frozen=True)
class Alignment:
    """Clean position -> corrupted position, and why the other clean positions have none."""

    pairs: dict[int, int]
    reasons: dict[int, str]
    """Clean position -> why no corrupted position pairs with it."""

    def partner(self, position: int) -> int:
        """The paired corrupted position, or -1 (stored as the `partner` coordinate)."""
        return self.pairs.get(position, -1)


def keys(segments: Segments) -> list[Hashable]:
    """What each position holds, in the terms positions are paired by."""
    if len(segments.ids) != len(segments.labels):
        raise ValueError("positions are paired by token id: build Segments with their ids")
    counters: dict[str, int] = {}
    found: list[Hashable] = []
    for token, label in zip(segments.ids, segments.labels, strict=True):
        if label in TEXT_LABELS:
            found.append(("text", token))
        elif label == MARKUP:
            found.append((MARKUP, token))
        elif label in (LAST, START):
            found.append((label,))
        else:  # image, answer and constraint spans: the k-th with the k-th
            k = counters.get(label, 0)
            counters[label] = k + 1
            found.append((label, k))
    return found


def align(clean: Segments, corrupt: Segments) -> Alignment:
    """Pair every clean position with the corrupted position that holds the same thing."""
    ours, theirs = keys(clean), keys(corrupt)
    matcher = SequenceMatcher(None, ours, theirs, autojunk=False)
    pairs = {a + k: b + k for a, b, n in matcher.get_matching_blocks() for k in range(n)}
    reasons = {p: _why_unpaired(clean, corrupt, p) for p in range(len(clean)) if p not in pairs}
    return Alignment(pairs, reasons)


def _why_unpaired(clean: Segments, corrupt: Segments, position: int) -> str:
    label = clean.labels[position]
    count = (clean.labels.count(label), corrupt.labels.count(label))
    if label == IMAGE:
        return f"the corrupted image has fewer image tokens ({count[1]} of {count[0]})"
    if label == MARKUP:
        return f"the processor wrote {clean.tokens[position]!r} here for the clean image only"
    if label == ANSWER:
        return "the corrupted run has fewer teacher-forced answer tokens"
    if label in TEXT_LABELS or label in (LAST, START):
        return f"the corrupted prompt has no {clean.tokens[position]!r} at this place in its text"
    return f"the replacement for span {label!r} has fewer tokens ({count[1]} of {count[0]})"
