"""The inputs an edit is computed over: the request, other images, paraphrases, text prefixes.

A key read from one input mixes the entity with that input's other features (the scene, the
phrasing); an update keyed on it moves that input and little else. ROME therefore reads the
key in about fifty contexts (the prompt after short text prefixes the model itself generated)
and optimises the value over all of them; MEMIT does the same per request. For a VLM the
natural contexts are other pictures of the same entity and other phrasings of the question,
which the data provides (`vlmtrace.data.edit_case.EditRequest`); text prefixes are generated
here, ROME's way, by sampling the model.

    contexts = Contexts(images=8, paraphrases=4, prefixes=4, prefix_lengths=(2, 5))
    rows = request_rows(vlm, request, contexts, span="last")   # encoded, key positions found
    rows.edit      # the request's sample and its contexts, each with the new answer as target
    rows.essence   # the request's essence questions (what must not change), for the KL term
    rows.record    # how many contexts of each source, and which: for the edit's provenance

The number of contexts of each source is an option, and what was used goes into the edit's
provenance, so two edits can be told apart by what they were computed over.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ...data.edit_case import EditRequest
from ...data.sample import Sample
from ...models.load import VLM
from ...prompts import image_placeholder
from ..inputs import encode, scored_answer_ids, with_forced_tokens
from ..positions import LAST, word_occurrences
from .parts import EditError, forward_rows

SOURCES = ("prompt", "image", "paraphrase", "prefix")
"""Where an edit context comes from: the request itself, another image of the entity, another
phrasing of the question, or the request after a model-generated text prefix."""


@dataclass(frozen=True)
class Contexts:
    """How many contexts of each source an edit is computed over (at most; fewer when the
    request has fewer), and how text prefixes are generated."""

    images: int = 8
    """Other images of the entity (`EditRequest.images`), first ones first."""
    paraphrases: int = 4
    """Other phrasings (`EditRequest.paraphrases`)."""
    prefixes: int = 0
    """Text prefixes sampled from the model (ROME), placed before the request's question."""
    prefix_lengths: tuple[int, ...] = (2, 5)
    """Tokens per prefix; prefixes are spread evenly over these lengths (ROME: 2, 5 and 10)."""
    seed: int = 0
    """Seed of the prefix sampler."""

    def __post_init__(self) -> None:
        counts = {"images": self.images, "paraphrases": self.paraphrases, "prefixes": self.prefixes}
        bad = {k: v for k, v in counts.items() if isinstance(v, bool) or not isinstance(v, int) or v < 0}
        lengths = tuple(self.prefix_lengths)
        if bad or not lengths or any(not isinstance(x, int) or x < 1 for x in lengths):
            raise EditError(
                f"Contexts takes counts >= 0 and prefix lengths >= 1 (tokens); got {bad or counts}, "
                f"prefix_lengths={self.prefix_lengths!r}. Example: Contexts(images=8, paraphrases=4)."
            )
        object.__setattr__(self, "prefix_lengths", lengths)

    def describe(self) -> dict[str, Any]:
        return asdict(self)


SINGLE = Contexts(images=0, paraphrases=0, prefixes=0)
"""The request's own input only: the single-context edit (ROME without its prefixes)."""


@dataclass(frozen=True)
class Row:
    """One encoded input of an edit: where its key is, what it should answer, where it came from."""

    inputs: dict[str, torch.Tensor]
    key: int
    """The key position: the span's last token (or the last token), in the unpadded row."""
    answer: tuple[int, ...]
    """Target token ids (teacher-forced after the first)."""
    source: str
    sample_id: str

    @property
    def length(self) -> int:
        return len(self.inputs["input_ids"])


@dataclass(frozen=True)
class RequestRows:
    """A request's encoded contexts (targets: the new answer) and essence questions (for the KL)."""

    edit: tuple[Row, ...]
    essence: tuple[Row, ...]
    record: dict[str, Any]


def encode_row(
    vlm: VLM, sample: Sample, answer: str, span: str, source: str, *, first_token: bool = False
) -> Row:
    """`sample` encoded with `answer` as its target, and the position of its key (span's last token)."""
    if span != LAST and span not in sample.spans:
        raise EditError(
            f"sample {sample.id!r} has no span {span!r} (spans: {list(sample.spans)}); the key is read at "
            "the span's last token: mark it in Sample.spans (every context of a request needs it), or "
            "pass span='last'."
        )
    ids = scored_answer_ids(vlm, sample.prompt, answer, whole=True)
    ids = ids[:1] if first_token else ids
    encoded = encode(vlm, prompt=sample.prompt, image=sample.image, spans=dict(sample.spans), answer_ids=ids)
    return Row(encoded.inputs, encoded.prompt.positions(span)[-1], ids, source, sample.id)


def request_rows(
    vlm: VLM, request: EditRequest, contexts: Contexts, *, span: str, first_token: bool = False
) -> RequestRows:
    """Encode the request, its contexts (as many as `contexts` allows) and its essence questions.

    `first_token` targets only the new answer's first token (MultEdit's value)."""
    target = request.new_answer
    chosen = [
        ("prompt", request.sample),
        *(("image", s) for s in request.images[: contexts.images]),
        *(("paraphrase", s) for s in request.paraphrases[: contexts.paraphrases]),
    ]
    prefixes = generate_prefixes(vlm, request.sample, contexts) if contexts.prefixes else []
    chosen += [("prefix", with_prefix(vlm, request.sample, p)) for p in prefixes]
    edit_rows = tuple(
        encode_row(vlm, s, target, span, source, first_token=first_token) for source, s in chosen
    )
    essence = tuple(encode_row(vlm, s, s.answer, span, "essence", first_token=True) for s in request.essence)
    record = {
        **{source: sum(1 for c, _ in chosen if c == source) for source in SOURCES},
        "essence": len(essence),
        "context_ids": [s.id for c, s in chosen if c in ("image", "paraphrase")],
        "prefixes": prefixes,
    }
    return RequestRows(edit_rows, essence, record)


def question_start(vlm: VLM, sample: Sample) -> int:
    """Where the question begins in the prompt: `meta["question"]` if it occurs there, else just
    after the image placeholder, else the start. Text prefixes go here (ROME: before the prompt)."""
    question = sample.meta.get("question")
    if isinstance(question, str) and question and question in sample.prompt:
        return sample.prompt.index(question)
    placeholder = image_placeholder(vlm)
    at = sample.prompt.find(placeholder)
    if at < 0:
        return 0
    end = at + len(placeholder)
    return end + len(sample.prompt[end:]) - len(sample.prompt[end:].lstrip())


def with_prefix(vlm: VLM, sample: Sample, prefix: str) -> Sample:
    """The sample with `prefix` (and a space) placed before its question."""
    at = question_start(vlm, sample)
    prompt = f"{sample.prompt[:at]}{prefix} {sample.prompt[at:]}"
    return sample.with_(prompt=prompt, id=f"{sample.id}+prefix:{prefix}")


def generate_prefixes(vlm: VLM, sample: Sample, contexts: Contexts) -> list[str]:
    """ROME's context prefixes: `contexts.prefixes` texts sampled from the model (top-5, seeded).

    Each prefix continues what the prompt holds before the question (the chat markup and the
    image, so the model talks about the request's own picture), for one of `prefix_lengths`
    tokens. Special tokens and the image token are never drawn, and a prefix that contains one
    of the sample's spans is drawn again (the span would be found there instead of in the
    question), up to three times the count in all.
    """
    head = sample.prompt[: question_start(vlm, sample)].rstrip()
    answer_ids = (vlm.tokenizer.eos_token_id or 0,)  # not scored: encode needs a target
    start = encode(vlm, prompt=head, image=sample.image, spans={}, answer_ids=answer_ids).inputs
    banned = set(vlm.tokenizer.all_special_ids)
    if vlm.shape.image_token_id is not None:
        banned.add(vlm.shape.image_token_id)
    generator = torch.Generator().manual_seed(random.Random(f"{contexts.seed}/{sample.id}").randrange(2**31))
    lengths = [contexts.prefix_lengths[i % len(contexts.prefix_lengths)] for i in range(contexts.prefixes)]
    prefixes: list[str] = []
    for _ in range(3 * contexts.prefixes):
        if len(prefixes) == contexts.prefixes:
            break
        text = _as_text(vlm, _sample_tokens(vlm, start, lengths[len(prefixes)], banned, generator))
        if text and not any(word_occurrences(text, span) for span in sample.spans.values()):
            prefixes.append(text)
    return prefixes


def _as_text(vlm: VLM, ids: list[int]) -> str:
    """The text of sampled token ids: the tokenizer's decoding if it encodes back to the same ids,
    else the tokens decoded one by one and joined by spaces (word-level tokenizers without a
    decoder, such as the organisms')."""
    tokenizer = vlm.tokenizer
    joined = tokenizer.decode(ids, skip_special_tokens=True).strip()
    spaced = " ".join(tokenizer.decode([i], skip_special_tokens=True).strip() for i in ids)
    for text in (joined, spaced):
        if list(tokenizer(text, add_special_tokens=False).input_ids) == list(ids):
            return text
    return joined


def _sample_tokens(
    vlm: VLM, row: dict, count: int, banned: set[int], generator: torch.Generator
) -> list[int]:
    drawn: list[int] = []
    with torch.no_grad():
        for _ in range(count):
            current = with_forced_tokens(row, drawn, vlm.adapter.inputs) if drawn else row
            logits = forward_rows(vlm, [current])[0][0, -1].float().cpu()
            logits[list(banned)] = float("-inf")
            top = torch.topk(logits, k=min(5, int(torch.isfinite(logits).sum())))
            choice = torch.multinomial(torch.softmax(top.values, -1), 1, generator=generator)
            drawn.append(int(top.indices[choice]))
    return drawn


def as_request(item: EditRequest | tuple[Sample, str] | Sequence[Any]) -> EditRequest:
    """An `EditRequest` from itself or from a (sample, new answer) pair."""
    if isinstance(item, EditRequest):
        return item
    try:
        sample, answer = item
    except (TypeError, ValueError):
        raise EditError(
            f"a request is an EditRequest or a (sample, new answer) pair; got {type(item).__name__}."
        ) from None
    if not isinstance(sample, Sample):
        raise EditError(f"a request's first item is a vt.Sample; got {type(sample).__name__}.")
    return EditRequest(sample, str(answer))
