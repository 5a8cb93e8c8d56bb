"""Token positions named by what they are: image, constraint spans, the rest, the last token.

Papers describe interventions in words ("restore the visual-constraint tokens"); tokenizers
split words differently, processors expand one `<image>` into 576 or 2,880 tokens, and
prompts carry system text. `Segments` labels every position of one encoded prompt so the
rest of vlmtrace addresses positions by name and never by a hard-coded offset.

    segments = find_segments(tokenizer, input_ids, spans={"visual": "this place"},
                             image_token_id=32000)
    segments.positions("visual")     # [581, 582]
    segments.labels[-1]              # "last"

Spans are found in the decoded text of the tokens with whitespace removed, which works for
word-level, SentencePiece and byte-level BPE tokenizers alike; a span covers every token
that overlaps it (a word split into sub-words is covered whole).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .errors import UserError

IMAGE = "image"
QUESTION = "question"
LAST = "last"
SPECIAL = "special"
START = "start"
ANSWER = "answer"


class SpanNotFoundError(UserError):
    """A constraint span's text does not occur in the prompt."""


class MissingImageTokenError(UserError):
    """A model that places image tokens in the prompt got a prompt without them."""


@dataclass(frozen=True)
class Segments:
    """Per-position token strings and segment labels of one encoded sequence."""

    tokens: tuple[str, ...]
    labels: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def names(self) -> tuple[str, ...]:
        """Segment names in order of first appearance."""
        return tuple(dict.fromkeys(self.labels))

    def positions(self, name: str) -> list[int]:
        """Positions labelled `name`, or an error listing the segments that exist."""
        found = [i for i, label in enumerate(self.labels) if label == name]
        if not found:
            raise KeyError(f"no segment {name!r}; this prompt has {list(self.names)}")
        return found


def find_segments(
    tokenizer,
    input_ids: Sequence[int],
    *,
    spans: Mapping[str, str],
    image_token_id: int | None = None,
    prompt: str = "",
    answer_positions: int = 0,
) -> Segments:
    """Label each position of a prompt: image, each span, special, question, last.

    `answer_positions` trailing tokens are answer tokens appended for teacher forcing
    (whole-answer metrics); they are labelled "answer" and the token before them is "last".
    """
    ids = [int(i) for i in input_ids]
    specials = set(tokenizer.all_special_ids)
    pieces = []
    for i in ids:
        if i == image_token_id or i in specials:
            pieces.append("")
        else:
            pieces.append("".join(tokenizer.decode([i]).split()))
    tokens = tuple(tokenizer.decode([i]) if i != image_token_id else "<img>" for i in ids)
    labels = [QUESTION] * len(ids)
    for i, token_id in enumerate(ids):
        if token_id == image_token_id:
            labels[i] = IMAGE
        elif token_id in specials:
            labels[i] = SPECIAL
    if image_token_id is not None and IMAGE not in labels:
        raise MissingImageTokenError(
            f"the prompt {prompt!r} has no image token (id {image_token_id}); this model reads "
            "the image only where the prompt says. Put the processor's image placeholder "
            "(e.g. '<image>') in the prompt."
        )
    n_prompt = len(ids) - answer_positions
    for name, text in spans.items():
        for position in _span_positions(pieces[:n_prompt], text, name, prompt):
            if labels[position] not in (QUESTION, LAST):
                raise SpanNotFoundError(
                    f"span {name!r} ({text!r}) overlaps segment {labels[position]!r} at position "
                    f"{position}; constraint spans must not overlap each other or the image."
                )
            labels[position] = name
    labels[n_prompt - 1] = LAST
    for i in range(n_prompt, len(ids)):
        labels[i] = ANSWER
    return Segments(tokens=tokens, labels=tuple(labels))


def decoder_segments(tokenizer, decoder_ids: Sequence[int]) -> Segments:
    """Labels for an answer decoder's input: the start token, then teacher-forced answer."""
    tokens = tuple(tokenizer.decode([int(i)]) for i in decoder_ids)
    labels = (START, *([ANSWER] * (len(tokens) - 1)))
    return Segments(tokens=tokens, labels=labels)


def _span_positions(pieces: Sequence[str], text: str, name: str, prompt: str) -> list[int]:
    """Positions of the tokens that overlap the first occurrence of `text`."""
    key = "".join(text.split())
    joined = "".join(pieces)
    start = joined.find(key) if key else -1
    if start < 0:
        raise SpanNotFoundError(
            f"span {name!r} = {text!r} does not occur in the prompt {prompt!r}. Copy the span "
            "verbatim from the prompt (case and spelling matter), or fix the sample's spans."
        )
    end = start + len(key)
    positions, offset = [], 0
    for i, piece in enumerate(pieces):
        if piece and offset < end and offset + len(piece) > start:
            positions.append(i)
        offset += len(piece)
    return positions
