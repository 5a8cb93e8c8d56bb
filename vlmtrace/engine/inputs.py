"""One sample encoded for one model: a row of inputs, its segments, its answer token ids.

Encoding is where words become positions, so everything that needs the tokenizer is done
here once per (sample, side): the clean prompt and the corrupted prompt are each encoded to
an `Encoded`, and the engine only ever sees tensors and segment labels.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch

from ..models.load import VLM
from .positions import Segments, UnknownWordsError, decoder_segments, find_segments


class AnswerTokenWarning(UserWarning):
    """The answer is several tokens and only the first is scored."""


@dataclass(frozen=True)
class Encoded:
    """One row of model inputs and the labels of its positions."""

    inputs: dict[str, torch.Tensor]
    """1D sequence tensors (`input_ids`, `attention_mask`, maybe `decoder_input_ids`) and
    per-row tensors (`pixel_values`)."""
    prompt: Segments
    """Labels of the prompt sequence (image tokens included for early-fusion models)."""
    decoder: Segments | None
    """Labels of the answer decoder's input sequence (BLIP), else None."""
    answer_ids: tuple[int, ...]
    """The answer tokens scored by the metric (first token only, unless whole answer)."""
    text: str = ""
    """The prompt this side was encoded from (the self-check runs the model's own forward on it)."""
    image: Any = None
    """The image this side was encoded with."""

    def segments(self, sequence: str) -> Segments:
        return self.decoder if sequence == "decoder" else self.prompt


def answer_token_ids(vlm: VLM, prompt: str, answer: str) -> list[int]:
    """Token ids of `answer` as the model would produce it after `prompt`.

    For decoder-only models the answer is tokenized in context (prompt + " " + answer, minus
    the prompt's ids), because SentencePiece and BPE tokenizers give a word a different id at
    the start of a text than after a space.
    """
    tokenizer = vlm.tokenizer
    if vlm.adapter.answer_sequence == "decoder":
        return list(tokenizer(answer, add_special_tokens=False).input_ids)
    alone, joined = tokenizer([prompt, prompt + " " + answer]).input_ids  # one call: it is per sample
    if joined[: len(alone)] == alone and len(joined) > len(alone):
        return list(joined[len(alone) :])
    return list(tokenizer(answer, add_special_tokens=False).input_ids)


def scored_answer_ids(vlm: VLM, prompt: str, answer: str, *, whole: bool) -> tuple[int, ...]:
    """The answer ids a metric scores; warns when a first-token metric cuts an answer."""
    ids = answer_token_ids(vlm, prompt, answer)
    if not ids:
        raise ValueError(f"the answer {answer!r} tokenizes to nothing; give a non-empty answer.")
    unknown = vlm.tokenizer.unk_token_id
    if unknown is not None and unknown in ids:
        words = [w for w in answer.split() if unknown in vlm.tokenizer(w, add_special_tokens=False).input_ids]
        raise UnknownWordsError(
            f"the answer {answer!r} holds words outside the model's vocabulary: {words or [answer]} "
            f"map to {vlm.tokenizer.unk_token!r}, so the model cannot produce it. Use an answer the "
            "model can produce (for the shipped organisms, any text: they fall back to bytes)."
        )
    if len(ids) > 1 and not whole:
        first = vlm.tokenizer.decode([ids[0]])
        warnings.warn(
            f"answer {answer!r} is {len(ids)} tokens; the metric scores only the first, {first!r}. "
            "To score the whole answer, pass whole_answer=True to vt.patch from Python (recipes score "
            "first tokens).",
            AnswerTokenWarning,
            stacklevel=3,
        )
        ids = ids[:1]
    return tuple(ids)


def with_forced_tokens(row: dict, forced: list[int], inputs) -> dict:
    """Append teacher-forced answer tokens to every per-token input of the prompt.

    `input_ids` get the tokens; every other per-token input takes its declared `Input.forced`
    value or repeats its last position's (the attention mask's 1, a text token type, Mllama's
    last cross-attention row), so each input keeps one entry per token, as the adapter declares.
    """
    row = dict(row)
    for name, spec in inputs.items():
        if spec.kind != "token" or spec.sequence != "prompt" or name not in row:
            continue
        value = row[name]
        if name == "input_ids":
            extra = torch.tensor(forced, dtype=value.dtype)
        elif spec.forced is not None:
            extra = torch.full((len(forced), *value.shape[1:]), spec.forced, dtype=value.dtype)
        else:
            extra = value[-1:].expand(len(forced), *value.shape[1:])
        row[name] = torch.cat([value, extra.to(value.dtype)])
    return row


def encode(
    vlm: VLM,
    *,
    prompt: str,
    image: Any,
    spans: dict[str, str],
    answer_ids: tuple[int, ...],
    like: Encoded | None = None,
) -> Encoded:
    """Encode one side (clean or corrupted) of a sample.

    Answers of more than one token are teacher-forced: the scored tokens but the last are
    appended to the prompt (decoder-only) or to the decoder's start token (BLIP). `like` is the
    other side of the same prompt, spans and answer, shown another image: where the processor
    gave the same ids, its labels are these too (found once; an image of another size that
    changes the ids is labelled anew).
    """
    adapter = vlm.adapter
    forced = list(answer_ids[:-1])
    in_decoder = adapter.answer_sequence == "decoder"
    row = adapter.encode(vlm.processor, prompt, image, forced if in_decoder else None)
    if forced and not in_decoder:
        row = with_forced_tokens(row, forced, adapter.inputs)
    ids = row["input_ids"].tolist()
    if like is not None and (like.text, like.answer_ids, like.prompt.ids) == (prompt, answer_ids, tuple(ids)):
        prompt_segments = like.prompt
    else:
        prompt_segments = find_segments(
            vlm.tokenizer,
            ids,
            spans=spans,
            image_token_id=vlm.shape.image_token_id if adapter.image_in_sequence else None,
            prompt=prompt,
            answer_positions=0 if in_decoder else len(forced),
        )
    decoder = None
    if in_decoder:
        decoder_ids = row["decoder_input_ids"].tolist()
        same = like is not None and like.decoder is not None and like.decoder.ids == tuple(decoder_ids)
        decoder = like.decoder if same else decoder_segments(vlm.tokenizer, decoder_ids)
    return Encoded(
        inputs=row, prompt=prompt_segments, decoder=decoder, answer_ids=answer_ids, text=prompt, image=image
    )
