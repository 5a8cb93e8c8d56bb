"""Which samples the model answers correctly, found before any sweep: the papers trace only those.

Basu et al., Zhang et al. and NOTICE keep the questions their model answers correctly. A trace of
a question the model gets wrong measures where an answer it does not give comes from: on GQA a
knockout moved a clean P(answer) of 3e-5 by "+50,394 %". So every recipe leaves those samples
out (and counts them) unless told to keep them (`--keep-wrong`, `keep_wrong=True`).

A sample is answered correctly when the model's greedy next token after the clean prompt is the
first token of its answer, tokenised as the metrics score it (`engine.inputs.answer_token_ids`).
The check is one batched forward for many samples (rows that batch exactly share a forward, as
in the sweep), through the same trace as every intervention, so it also runs remotely:

    checked = check_answers(vlm, samples)           # .right: samples; .wrong: [(sample, said)]
    tokens = top_tokens(vlm, samples)               # the model's next token after each prompt
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..engine.metrics import Metric
from .sample import Sample

WRONG = "answered wrongly (the model's top token is not the answer's first)"
"""The reason a wrongly answered sample is left out for, in the start-of-run table."""
KEEP_WRONG = "pass --keep-wrong (Python: keep_wrong=True) to trace the samples the model gets wrong"
"""How to keep them: the fix named when this reason leaves nothing to trace."""


@dataclass(frozen=True)
class TopToken(Metric):
    """The id of the most probable token at the last scored position (a check, not a trace metric)."""

    name: ClassVar[str] = "top_token"

    def __call__(self, logits, answer, foil):
        return logits[:, -1].argmax(-1).to(torch.float64)  # float64 holds every token id exactly


@dataclass(frozen=True)
class Answers:
    """Samples split by whether the model's greedy next token is their answer's first token."""

    right: list[Sample]
    wrong: list[tuple[Sample, str]]
    """(sample, what the model said instead: its top token, decoded)."""


def check_answers(vlm, samples: Sequence[Sample], *, max_batch: int = 64, backend: Any = None) -> Answers:
    """Split `samples` (prompts in the model's form) into those the model answers and the rest."""
    from ..engine.inputs import answer_token_ids

    tokens = top_tokens(vlm, samples, max_batch=max_batch, backend=backend)
    right, wrong = [], []
    for sample, top in zip(samples, tokens, strict=True):
        ids = answer_token_ids(vlm, sample.prompt, sample.answer)
        if ids and ids[0] == top:
            right.append(sample)
        else:
            wrong.append((sample, vlm.tokenizer.decode([top]).strip()))
    return Answers(right, wrong)


def top_tokens(vlm, samples: Sequence[Sample], *, max_batch: int = 64, backend: Any = None) -> list[int]:
    """The model's greedy next token after each sample's clean prompt.

    Samples whose inputs batch exactly (`engine.packing.inputs_signature`; for an answer read
    from a decoder, the same decoder width) share a forward of up to `max_batch` rows. Rows are
    left-padded, so every row's next-token logits sit at its last position.
    """
    from ..engine.forward import Edits, run, stack_rows
    from ..engine.packing import inputs_signature

    rows = [vlm.adapter.encode(vlm.processor, s.prompt, s.image, None) for s in samples]
    groups: dict[Any, list[int]] = {}
    for i, row in enumerate(rows):
        key = inputs_signature(vlm, row)
        if vlm.adapter.answer_sequence == "decoder":
            key = (key, len(row["decoder_input_ids"]))
        groups.setdefault(key, []).append(i)
    stack = vlm.adapter.stacks[vlm.adapter.default_stack]
    tokens = [0] * len(rows)
    for members in groups.values():
        for start in range(0, len(members), max_batch):
            chunk = members[start : start + max_batch]
            widths = {"prompt": max(len(rows[i]["input_ids"]) for i in chunk)}
            if "decoder_input_ids" in rows[chunk[0]]:
                widths["decoder"] = max(len(rows[i]["decoder_input_ids"]) for i in chunk)
            batch = stack_rows(vlm, [rows[i] for i in chunk], widths)
            found = run(
                vlm,
                stack,
                batch,
                Edits(),
                metric=TopToken(),
                answer=torch.tensor([0]),  # unused by TopToken; one position kept
                answer_slice=slice(-1, None),
                backend=backend,
            )
            for i, token in zip(chunk, found.tolist(), strict=True):
                tokens[i] = int(token)
    return tokens
