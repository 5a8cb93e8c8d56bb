"""Training batches for the organisms, encoded straight from `Question`s.

Training reads about 300,000 questions; going through PIL images and the HF processor for each
would cost more than the model's forward pass. So questions become tensors here directly:
pixels normalised as the processor normalises them, word ids looked up in the tokenizer's
vocabulary, the `<image>` placeholder expanded to one token per patch as `LlavaProcessor`
expands it (or per merged patch group, `Qwen2VLProcessor`, with its flat patches, grid and
token types). `tests/test_zoo.py` checks that these tensors equal the processor's.

    encode = Encoder(tokenizer, architecture="llava")
    batch = encode([ask(rng, "multi", split="train") for _ in range(128)])
    logits = model(**batch.inputs).logits

Two targets per question: the answer (next token after the prompt) and the *subject*: at the
last token of the visual-constraint phrase ("shape" in "the red shape") the attribute the
picture must supply ("cross"). The subject loss is what made multi-constraint traces spread
out in the prototype (../shared/NOTES.md): a causal model's state at "shape" is the same for
every question with that prefix, so the phrase tokens must gather the picture's information
instead of leaving all of it to the last token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedTokenizerFast

from vlmtrace.data.drawing import GRID, render
from vlmtrace.data.scenes import Question
from vlmtrace.models.build import CLIP_MEAN, CLIP_STD, IMAGE_TOKEN

from .qwen import flat_patches, grid_thw

IGNORE = -100  # cross-entropy's ignore_index: this question has no subject target
ARCHITECTURES = ("llava", "blip", "qwen")
EARLY_FUSION = ("llava", "qwen")  # image tokens in the prompt, answer read at the last position
_MEAN = np.array(CLIP_MEAN, dtype=np.float32)[:, None, None]
_STD = np.array(CLIP_STD, dtype=np.float32)[:, None, None]


@dataclass(frozen=True)
class Batch:
    """Model inputs plus the two targets; positions index the (padded) prompt sequence."""

    inputs: dict[str, torch.Tensor]
    answer: torch.Tensor  # [question] token id of the answer
    subject_position: torch.Tensor  # [question] position of the subject phrase's last token
    subject: torch.Tensor  # [question] token id of the subject, or IGNORE


def pixels(questions: Sequence[Question]) -> torch.Tensor:
    """[question, channel, height, width] float32 pixels, normalised like the processors do."""
    images = np.stack([render(q.scene) for q in questions]).astype(np.float32)
    images = images.transpose(0, 3, 1, 2) * np.float32(1 / 255)
    return torch.from_numpy((images - _MEAN) / _STD)


class Encoder:
    """Encodes questions for one architecture ("llava", "blip" or "qwen") with one tokenizer."""

    def __init__(self, tokenizer: PreTrainedTokenizerFast, *, architecture: str):
        if architecture not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {architecture!r}; expected one of {ARCHITECTURES}")
        self.architecture = architecture
        self.vocab = tokenizer.get_vocab()
        self.pad = tokenizer.pad_token_id
        self.bos = tokenizer.bos_token_id
        # LLaVA's prompt starts with one image token per patch, Qwen's with one per 2x2 patch
        # group (both 16: one per scene cell); BLIP has none in its text.
        self.prefix = [self.vocab[IMAGE_TOKEN]] * (GRID * GRID) if architecture in EARLY_FUSION else []

    def ids(self, words: Sequence[str]) -> list[int]:
        try:
            return [self.vocab[w] for w in words]
        except KeyError as missing:
            raise ValueError(f"word {missing} is not in the organism vocabulary") from None

    def __call__(self, questions: Sequence[Question]) -> Batch:
        rows, subject_positions, subjects = [], [], []
        for q in questions:
            words = q.text.split()
            rows.append(self.prefix + self.ids(words))
            phrase = q.spans["visual"].split()
            start = _find(words, phrase)
            subject_positions.append(len(self.prefix) + start + len(phrase) - 1)
            has_subject = q.subject is not None and q.family != "named"
            subjects.append(self.vocab[q.subject] if has_subject else IGNORE)
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        position = torch.tensor(subject_positions)
        for i, row in enumerate(rows):
            # LLaVA and Qwen pad on the left (the answer is read at the last position); BLIP on
            # the right, so its absolute position embeddings never depend on the batch.
            start = width - len(row) if self.architecture in EARLY_FUSION else 0
            ids[i, start : start + len(row)] = torch.tensor(row)
            mask[i, start : start + len(row)] = 1
            position[i] += start
        inputs = {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels(questions)}
        if self.architecture == "qwen":  # flat patches and M-RoPE inputs; never position_ids
            inputs["mm_token_type_ids"] = (ids == self.prefix[0]).long()
            inputs["pixel_values"] = flat_patches(inputs["pixel_values"])
            inputs["image_grid_thw"] = grid_thw(len(rows))
        if self.architecture == "blip":
            inputs["decoder_input_ids"] = torch.full((len(rows), 1), self.bos, dtype=torch.long)
        answers = torch.tensor(self.ids([q.answer for q in questions]))
        return Batch(inputs, answers, position, torch.tensor(subjects))


def _find(words: Sequence[str], phrase: Sequence[str]) -> int:
    for start in range(len(words) - len(phrase) + 1):
        if list(words[start : start + len(phrase)]) == list(phrase):
            return start
    raise ValueError(f"phrase {' '.join(phrase)!r} does not occur in {' '.join(words)!r}")
