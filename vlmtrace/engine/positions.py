"""Token positions named by what they are: image, constraint spans, markup, the rest, the last token.

Papers describe interventions in words ("restore the visual-constraint tokens"); tokenizers
split words differently, processors expand one `<image>` into 576 or 2,880 tokens, and
prompts carry system text. `Segments` labels every position of one encoded prompt so the
rest of vlmtrace addresses positions by name and never by a hard-coded offset.

    segments = find_segments(tokenizer, input_ids, spans={"visual": "this place"},
                             image_token_id=32000)
    segments.positions("visual")     # [581, 582]
    segments.labels[-1]              # "last"

Processors write more than the prompt: Idefics3 and SmolVLM put `<row_i_col_j>` tags around
every sub-image, Gemma 3's pan-and-scan writes "Here is the original image ... crops", InternVL
wraps its image in `<img>` ... `</img>`, Pixtral breaks image rows with `[IMG_BREAK]`. How many
depends on the image's size, so they are not the prompt's words. Every position the processor
wrote that the tokenizer's own encoding of the prompt does not hold (found by matching the two
token sequences, `processor_inserted`) is labelled `markup`, whatever the family: nothing is
declared per family that a new processor version could make stale.

Spans match whole words: 'he' is never found inside "the", nor 'a' inside "year". The first
occurrence of the span's text in the prompt that starts and ends on word boundaries is taken,
and it covers every token whose characters overlap it (a word split into sub-words is covered
whole). Character offsets come from the tokenizer itself (fast tokenizers), aligned with the
processor's ids (which expand one `<image>` into many tokens); without offsets, the decoded
tokens are matched instead, on token boundaries. A span that cannot be found is reported for
what it is: text missing from the prompt, text only inside a longer word, or words the
tokenizer cannot represent (they map to `<unk>`, which no intervention should trace).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from difflib import SequenceMatcher

from ..errors import UserError

IMAGE = "image"
QUESTION = "question"
LAST = "last"
SPECIAL = "special"
MARKUP = "markup"
START = "start"
ANSWER = "answer"


class SpanNotFoundError(UserError):
    """A constraint span's text does not occur in the prompt as whole words."""


class UnknownWordsError(UserError):
    """A span (or an answer) holds words the tokenizer cannot represent: they map to `<unk>`."""


class UnknownWordsWarning(UserWarning):
    """Some words of a prompt map to the tokenizer's `<unk>`: the model does not read them."""


class MissingImageTokenError(UserError):
    """A model that places image tokens in the prompt got a prompt without them."""


@dataclass(frozen=True)
class Segments:
    """Per-position token strings, token ids and segment labels of one encoded sequence."""

    tokens: tuple[str, ...]
    labels: tuple[str, ...]
    ids: tuple[int, ...] = ()
    """The token id at each position: what pairs a clean position with its corrupted partner
    (`vlmtrace.engine.alignment`); two ids can decode to the same string."""

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
    """Label each position of a prompt: image, each span, markup, special, question, last.

    `answer_positions` trailing tokens are answer tokens appended for teacher forcing
    (whole-answer metrics); they are labelled "answer" and the token before them is "last".
    With the `prompt` text, positions the processor inserted are labelled "markup".
    Warns (`UnknownWordsWarning`) when prompt words map to `<unk>`, naming them.
    """
    ids = [int(i) for i in input_ids]
    specials = set(tokenizer.all_special_ids)
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
    match = PromptMatch.of(tokenizer, ids[:n_prompt], prompt) if prompt else None
    for position in match.inserted(ids[:n_prompt], image_token_id) if match else ():
        labels[position] = MARKUP
    text = TokenText.of(tokenizer, ids[:n_prompt], prompt=prompt, image_token_id=image_token_id, match=match)
    unknown = text.unknown_words()
    if unknown:
        warnings.warn(
            f"the prompt {prompt!r} holds words the tokenizer cannot represent: {unknown} map to "
            f"{tokenizer.unk_token!r}, so the model does not read them. Use a model whose "
            "vocabulary covers them, or rephrase.",
            UnknownWordsWarning,
            stacklevel=3,
        )
    for name, span in spans.items():
        for position in text.span_positions(span, name):
            if labels[position] not in (QUESTION, LAST):
                raise SpanNotFoundError(
                    f"span {name!r} ({span!r}) overlaps segment {labels[position]!r} at position "
                    f"{position}; constraint spans must not overlap each other or the image."
                )
            labels[position] = name
    labels[n_prompt - 1] = LAST
    for i in range(n_prompt, len(ids)):
        labels[i] = ANSWER
    return Segments(tokens=tokens, labels=tuple(labels), ids=tuple(ids))


@dataclass(frozen=True)
class PromptMatch:
    """The tokenizer's own encoding of a prompt, matched against the processor's ids.

    The processor's ids are the prompt's own tokens with the image placeholder expanded and
    markup added around it. Matching the two sequences (difflib, no junk heuristic) finds the
    prompt's own tokens among them wherever the processor put its insertions: those carry the
    prompt's character offsets, and the rest, image tokens aside, is markup.
    """

    own: tuple[int, ...]
    offsets: tuple[tuple[int, int], ...] | None
    """Character range of each own token (fast tokenizers), else None."""
    matched: dict[int, int]
    """Position in the processor's ids -> position in `own`."""

    @classmethod
    def of(cls, tokenizer, ids: Sequence[int], prompt: str) -> PromptMatch:
        offsets = None
        if getattr(tokenizer, "is_fast", False):
            try:
                encoding = tokenizer(prompt, return_offsets_mapping=True, add_special_tokens=True)
                offsets = tuple((int(a), int(b)) for a, b in encoding["offset_mapping"])
            except (NotImplementedError, ValueError, TypeError):
                encoding = None
        if offsets is None:
            encoding = tokenizer(prompt, add_special_tokens=True)
        own = tuple(int(i) for i in encoding["input_ids"])
        matcher = SequenceMatcher(None, own, [int(i) for i in ids], autojunk=False)
        matched = {j + k: i + k for i, j, n in matcher.get_matching_blocks() for k in range(n)}
        return cls(own, offsets, matched)

    def inserted(self, ids: Sequence[int], image_token_id: int | None) -> list[int]:
        """Positions the processor wrote that the prompt does not hold, image tokens excepted:
        tags, crop words, image delimiters (labelled `markup`)."""
        return [i for i, token in enumerate(ids) if i not in self.matched and token != image_token_id]


def word_occurrences(text: str, phrase: str) -> list[int]:
    """Start offsets of `phrase` in `text` where it begins and ends on word boundaries."""
    if not phrase:
        return []
    head = r"(?<!\w)" if re.match(r"\w", phrase[0]) else ""
    tail = r"(?!\w)" if re.match(r"\w", phrase[-1]) else ""
    return [m.start() for m in re.finditer(head + re.escape(phrase) + tail, text)]


def replace_first(text: str, old: str, new: str) -> str:
    """`text` with the first whole-word occurrence of `old` replaced by `new`.

    `str.replace(old, new, 1)` would put a replacement for 'a' inside "year"; this does not.
    """
    found = word_occurrences(text, old)
    if not found:
        raise SpanNotFoundError(
            f"{old!r} does not occur as whole words in {text!r}; a span is replaced only where it "
            "stands as whole words. Copy the span verbatim from the prompt."
        )
    return text[: found[0]] + new + text[found[0] + len(old) :]


@dataclass(frozen=True)
class TokenText:
    """The text of a prompt with the character range of every token (None: image, special).

    Built from the tokenizer's offsets when the tokenizer gives them and its ids agree with the
    processor's (image runs collapsed); else from the decoded tokens, whitespace removed, in
    which case spans must start and end on token boundaries.
    """

    text: str
    ranges: tuple[tuple[int, int] | None, ...]
    exact: bool
    """True: `text` is the prompt and ranges are the tokenizer's offsets into it."""
    unknown_positions: tuple[int, ...]
    unk_token: str | None
    tokenizer: object

    @classmethod
    def of(
        cls,
        tokenizer,
        ids: Sequence[int],
        *,
        prompt: str,
        image_token_id: int | None,
        match: PromptMatch | None = None,
    ) -> TokenText:
        specials = set(tokenizer.all_special_ids)
        unk = tokenizer.unk_token_id
        unknown = tuple(i for i, t in enumerate(ids) if unk is not None and t == unk)
        if prompt and match is None:
            match = PromptMatch.of(tokenizer, ids, prompt)
        ranges = _offset_ranges(tokenizer, ids, match, image_token_id) if match else None
        if ranges is not None:
            return cls(prompt, ranges, True, unknown, tokenizer.unk_token, tokenizer)
        pieces, built = [], []
        offset = 0
        for t in ids:
            if t == image_token_id or (t in specials and t != unk):
                built.append(None)
                continue
            piece = "".join(tokenizer.decode([t]).split())
            built.append((offset, offset + len(piece)) if piece else None)
            pieces.append(piece)
            offset += len(piece)
        return cls("".join(pieces), tuple(built), False, unknown, tokenizer.unk_token, tokenizer)

    def unknown_words(self) -> list[str]:
        """The prompt's words that map to `<unk>` (the tokens themselves without offsets)."""
        if not self.unknown_positions:
            return []
        if not self.exact:
            return [self.unk_token] * len(self.unknown_positions)
        words = []
        for position in self.unknown_positions:
            r = self.ranges[position]
            if r is not None and r[1] > r[0]:
                words.append(self.text[r[0] : r[1]])
        return list(dict.fromkeys(words))

    def span_positions(self, span: str, name: str) -> list[int]:
        """Token positions covering the first whole-word occurrence of `span`."""
        key = span if self.exact else "".join(span.split())
        starts = word_occurrences(self.text, key) if self.exact else self._token_aligned(key)
        for start in starts:
            end = start + len(key)
            positions = [
                i for i, r in enumerate(self.ranges) if r is not None and r[0] < end and r[1] > start
            ]
            if not positions:
                continue
            if self.exact:
                lo, hi = self.ranges[positions[0]][0], self.ranges[positions[-1]][1]
                if re.search(r"\w", self.text[lo:start] + self.text[end:hi]):
                    continue  # the span is only part of a token here: 'he' of a token 'the'
            unknown = [i for i in positions if i in self.unknown_positions]
            if unknown:
                raise UnknownWordsError(
                    f"span {name!r} = {span!r} holds words the tokenizer cannot represent: "
                    f"{self._words(unknown)} map to {self.unk_token!r}. Tracing them would trace "
                    "the unknown-word token, not the words: use a model whose vocabulary covers "
                    "them, or choose another span."
                )
            return positions
        raise SpanNotFoundError(self._missing(span, name))

    def _token_aligned(self, key: str) -> list[int]:
        starts = {r[0] for r in self.ranges if r is not None}
        ends = {r[1] for r in self.ranges if r is not None}
        found, at = [], self.text.find(key) if key else -1
        while at >= 0:
            if at in starts and at + len(key) in ends:
                found.append(at)
            at = self.text.find(key, at + 1)
        return found

    def _words(self, positions: Sequence[int]) -> list[str]:
        if not self.exact:
            return [self.unk_token] * len(positions)
        return list(dict.fromkeys(self.text[self.ranges[i][0] : self.ranges[i][1]] for i in positions))

    def _missing(self, span: str, name: str) -> str:
        text = self.text
        if self.exact and span in text:
            return (
                f"span {name!r} = {span!r} occurs in the prompt {text!r} only inside a longer word "
                "(spans match whole words: 'he' is not found in 'the'). Give the whole word(s)."
            )
        if not self.exact and self.unknown_positions:
            return (
                f"span {name!r} = {span!r} is not among the prompt's tokens, and the prompt holds "
                f"{len(self.unknown_positions)} token(s) the tokenizer could not represent "
                f"({self.unk_token!r}); the span's words are probably outside the vocabulary."
            )
        return (
            f"span {name!r} = {span!r} does not occur in the prompt {text!r}. Copy the span "
            "verbatim from the prompt (case and spelling matter), or fix the sample's spans."
        )


def _offset_ranges(tokenizer, ids: Sequence[int], match: PromptMatch, image_token_id: int | None):
    """Character ranges of `ids` in the prompt from the tokenizer's offsets, or None if unavailable.

    A token of `ids` matched to the prompt's own encoding (`PromptMatch`) takes its offsets; an
    inserted one (markup, image, special tokens the processor adds) none. If any of the prompt's
    own text tokens is missing from `ids` (the processor rewrote the text), this gives None and
    the caller falls back to decoded tokens.
    """
    if match.offsets is None:
        return None
    specials = set(tokenizer.all_special_ids) - {tokenizer.unk_token_id}
    found = set(match.matched.values())
    for j, token in enumerate(match.own):
        if j not in found and token not in specials and token != image_token_id:
            return None
    ranges: list[tuple[int, int] | None] = []
    for i, token in enumerate(ids):
        j = match.matched.get(i)
        ranges.append(None if j is None or token in specials or token == image_token_id else match.offsets[j])
    return tuple(ranges)


def decoder_segments(tokenizer, decoder_ids: Sequence[int]) -> Segments:
    """Labels for an answer decoder's input: the start token, then teacher-forced answer."""
    tokens = tuple(tokenizer.decode([int(i)]) for i in decoder_ids)
    labels = (START, *([ANSWER] * (len(tokens) - 1)))
    return Segments(tokens=tokens, labels=labels, ids=tuple(int(i) for i in decoder_ids))
