"""What a family's reference test needs: a tiny model, a prompt, and where its modules are;
and the parts that many families build alike (words, sites of a Llama-style layer, tiny sizes).

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

WORDS = "which city did this shape represent in year 2006 ? the circle paris rome".split()
"""The words of the question, the replacement ("the circle") and the answers, in vocabulary order."""
QUESTION = "which city did this shape represent in year 2006 ?"


def decoder_sites(layer: str) -> dict[str, At]:
    """Sites of a Llama-style decoder layer (`self_attn` ending in `o_proj`, then `mlp`)."""
    return {
        "block": At(layer),
        "attn": At(layer + ".self_attn", index=0),
        "mlp": At(layer + ".mlp"),
        "attn_head": At(layer + ".self_attn.o_proj", side="input"),
    }


def tiny_vision(**sizes) -> dict:
    """Vision tower sizes: 2 layers of width 32 on 32 px images in 8 px patches, 2 heads
    (`sizes` changes or adds any of them)."""
    return (
        dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        )
        | sizes
    )


def tiny_text(tokens, **sizes) -> dict:
    """Decoder sizes: 2 layers, hidden 64, 4 query heads and 2 key/value heads, the tokenizer's
    vocabulary and special ids (`sizes` changes or adds any of them)."""
    return (
        dict(
            vocab_size=len(tokens),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            pad_token_id=tokens.pad_token_id,
            bos_token_id=tokens.bos_token_id,
            eos_token_id=tokens.eos_token_id,
        )
        | sizes
    )


def tiny_model(model_class, config, seed: int) -> torch.nn.Module:
    """The model with eager attention and weights drawn from `seed`, in eval mode."""
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return model_class(config).eval()


def without_video_processor(processor_class, **parts):
    """The family's real processor class, built without a video processor.

    Its constructor insists on one, every video processor needs torchvision (not installable
    beside torch 2.13), and without torchvision transformers 5.24 fails inside the argument class
    check (`VIDEO_PROCESSOR_MAPPING._extra_content`). Only that check is skipped, for the absent
    video processor; images never reach it.
    """
    made = processor_class.__new__(processor_class)
    check = made.check_argument_for_proper_class
    made.check_argument_for_proper_class = lambda name, value: None if value is None else check(name, value)
    processor_class.__init__(made, video_processor=None, **parts)
    del made.check_argument_for_proper_class
    return made


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
    causal: bool = True
    """Whether that self-attention is causal (a decoder) or bidirectional (T5's encoder): the
    reference builds the knockout mask from it where the model passes none."""
    attention_layers: tuple[int, ...] | None = None
    """Layers that have that self-attention module (None: every layer). Mllama's cross-attention
    layers have none: a knockout window over them cuts no edge there."""
    replacement: str = "the circle"
    """Same token count as "this shape" under this family's tokenizer (STR)."""
    answer: str = "paris"
    score: Callable[[torch.nn.Module, dict], torch.Tensor] = last_position_logits
    image_size: tuple[int, int] = (32, 32)
    pair_size: tuple[int, int] | None = (64, 32)
    """Size of the image pair (None: same as the image). Another size, the default, gives other
    numbers of tiles, image tokens and processor markup where the family's processor depends on
    the size; the image-pair test then compares every question position with the reference."""
    segments: tuple[str, ...] = ("image", "visual", "last")
    """Segments whose positions the patching test covers (no "image" where the image is not
    in the sequence, as in Mllama)."""
    knockout: tuple[str, str] = ("image", "last")
    """(keys, queries) segments of the knockout test's block."""
    skip: dict[str, str] = field(default_factory=dict)
    """Checks this family cannot run ("str", "image_pair", "noise", "knockout"), with the reason
    (shown in the support matrix)."""
