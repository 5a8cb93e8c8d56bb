"""How an organism answers: next-token probabilities for training batches and for Samples.

The organism architectures answer in different places. LLaVA and Qwen2-VL are decoders: the
answer is the next token after the prompt, read at the last position (Qwen2-VL also takes its
flat patches, image grid and token types, and makes its M-RoPE positions itself). BLIP-VQA
encodes the question with cross-attention to the image and a separate decoder produces the
answer from its start token; `BlipForQuestionAnswering.forward` returns only a loss, so the three stages are
called here one by one. Everything else in the zoo (training, evaluation, the tests) goes
through these functions, so every architecture is scored the same way.

    probs = next_token_probabilities(model, processor, samples)   # [sample, vocab]
    p = answer_probability(model, processor, samples)              # [sample]
    acc = accuracy(model, processor, samples)

The Sample path uses the HF processor, exactly as a user (and `vlmtrace.load`) would.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import (
    BlipForQuestionAnswering,
    LlavaForConditionalGeneration,
    Qwen2VLForConditionalGeneration,
)

from vlmtrace.data.sample import Sample
from vlmtrace.data.scenes import for_blip

from .batches import EARLY_FUSION, Batch

QWEN_INPUTS = ("mm_token_type_ids", "image_grid_thw")  # besides ids, mask and pixels


def architecture_of(model: torch.nn.Module) -> str:
    """ "llava", "blip" or "qwen"; organisms are only ever one of these three classes."""
    if isinstance(model, LlavaForConditionalGeneration):
        return "llava"
    if isinstance(model, BlipForQuestionAnswering):
        return "blip"
    if isinstance(model, Qwen2VLForConditionalGeneration):
        return "qwen"
    raise TypeError(
        f"expected LlavaForConditionalGeneration, BlipForQuestionAnswering or "
        f"Qwen2VLForConditionalGeneration, got {type(model).__name__}; the zoo only scores its own "
        "organism architectures"
    )


def _logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """[row, position, vocab] logits: of the prompt (LLaVA, Qwen) or of the answer decoder (BLIP)."""
    architecture = architecture_of(model)
    if architecture in EARLY_FUSION:
        extra = {k: inputs[k] for k in QWEN_INPUTS} if architecture == "qwen" else {}
        return model(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            pixel_values=inputs["pixel_values"],
            **extra,
        ).logits
    image = model.vision_model(pixel_values=inputs["pixel_values"]).last_hidden_state
    question = model.text_encoder(
        input_ids=inputs["input_ids"],
        attention_mask=inputs["attention_mask"],
        encoder_hidden_states=image,
    ).last_hidden_state
    return model.text_decoder(
        input_ids=inputs["decoder_input_ids"],
        encoder_hidden_states=question,
        encoder_attention_mask=inputs["attention_mask"],
    ).logits


def batch_logits(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Answer logits [question, vocab] and, for LLaVA and Qwen, logits at the subject position."""
    logits = _logits(model, batch.inputs)
    if architecture_of(model) == "blip":
        return logits[:, 0], None
    rows = torch.arange(logits.shape[0])
    return logits[:, -1], logits[rows, batch.subject_position]


def _encode(model: torch.nn.Module, processor: Any, samples: Sequence[Sample]) -> dict:
    if architecture_of(model) in EARLY_FUSION:
        return processor(
            text=[s.prompt for s in samples],
            images=[s.image for s in samples],
            return_tensors="pt",
            padding=True,
        )
    inputs = processor(
        text=[for_blip(s).prompt for s in samples],
        images=[s.image for s in samples],
        return_tensors="pt",
        padding=True,
    )
    start = processor.tokenizer.bos_token_id
    inputs["decoder_input_ids"] = torch.full((len(samples), 1), start, dtype=torch.long)
    return inputs


def unpadded_groups(items: Sequence[Any]) -> list[list[int]]:
    """Indices of `items` (Questions or Samples) grouped by prompt length, in first-seen order.

    BLIP in transformers 5.x ignores the answer decoder's cross-attention mask (BlipTextLayer
    hands it over as `attention_mask`, which BlipTextAttention replaces by the absent
    `encoder_attention_mask` for cross-attention), so the decoder reads the question's padding
    and a padded question gets another answer than the same question alone. BLIP organisms are
    therefore trained and scored only on batches of equal-length questions.
    """
    groups: dict[int, list[int]] = {}
    for i, item in enumerate(items):
        text = getattr(item, "text", None) or for_blip(item).prompt
        groups.setdefault(len(text.split()), []).append(i)
    return list(groups.values())


@torch.no_grad()
def next_token_probabilities(
    model: torch.nn.Module, processor: Any, samples: Sequence[Sample], *, batch_size: int = 64
) -> torch.Tensor:
    """[sample, vocab] probabilities of the answer's first token, through the HF processor."""
    llava = architecture_of(model) in EARLY_FUSION  # read at the last position, any padding
    groups = [list(range(len(samples)))] if llava else unpadded_groups(samples)
    out = torch.empty(0)
    for group in groups:
        for i in range(0, len(group), batch_size):
            rows = group[i : i + batch_size]
            logits = _logits(model, _encode(model, processor, [samples[r] for r in rows]))
            probs = logits[:, -1 if llava else 0].softmax(-1)
            if out.numel() == 0:
                out = torch.empty(len(samples), probs.shape[-1])
            out[rows] = probs
    return out


def answer_ids(processor: Any, samples: Sequence[Sample]) -> torch.Tensor:
    """[sample] token ids of each answer (organism answers are one word, one token)."""
    return torch.tensor(processor.tokenizer.convert_tokens_to_ids([s.answer for s in samples]))


def answer_probability(model: torch.nn.Module, processor: Any, samples: Sequence[Sample]) -> torch.Tensor:
    """[sample] probability the model gives each sample's answer."""
    probs = next_token_probabilities(model, processor, samples)
    return probs.gather(1, answer_ids(processor, samples)[:, None])[:, 0]


def accuracy(model: torch.nn.Module, processor: Any, samples: Sequence[Sample]) -> float:
    """Fraction of samples whose most probable next token (whole vocabulary) is the answer."""
    probs = next_token_probabilities(model, processor, samples)
    return (probs.argmax(-1) == answer_ids(processor, samples)).float().mean().item()
