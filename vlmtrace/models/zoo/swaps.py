"""Interchange interventions on the planted organisms' components, with plain torch hooks.

Strict interchange-intervention training and its evaluation both run a batch in which some
rows take some components' outputs from other rows of the same batch: row r's head h at
position t is replaced by the same head's output on row `source[r]`. Source rows are never
edited themselves, so one forward computes them and every swap into the other rows (the same
layout as the engine's batched patching), and gradients flow through both.

    swaps = Swaps(model)
    with swaps.applied(source, heads={1: mask_1}, mlps={2: mask_2}):
        logits = model(**inputs).logits      # mask_1: [row, position, head], mask_2: [row, position]

Components are those of `vlmtrace.models.zoo.mechanism`: a head's output is its slice of the
input of `self_attn.o_proj`, an MLP's the output of `mlp`, in the language model's layers
(`model.language_model.layers` of LLaVA and Qwen2-VL alike). These hooks are independent of
the engine (nnsight), so the tests can hold the two against each other.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch

LAYERS = "model.language_model.layers"


def language_model_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder layers of a LLaVA or Qwen2-VL organism."""
    try:
        return model.get_submodule(LAYERS)
    except AttributeError:
        raise TypeError(
            f"{type(model).__name__} has no {LAYERS}; planted organisms are LLaVA or Qwen2-VL decoders"
        ) from None


class Swaps:
    """Hooks that copy head and MLP outputs between rows of one batch."""

    def __init__(self, model: torch.nn.Module):
        self.layers = language_model_layers(model)
        self.heads = model.config.get_text_config().num_attention_heads

    @contextmanager
    def applied(
        self,
        source: torch.Tensor,
        *,
        heads: Mapping[int, torch.Tensor] | None = None,
        mlps: Mapping[int, torch.Tensor] | None = None,
    ) -> Iterator[None]:
        """Within the block, row r's masked entries take row `source[r]`'s values.

        `source`: [row] long. `heads[layer]`: [row, position, head] bool. `mlps[layer]`:
        [row, position] bool. A row whose masks are all False computes what it computes alone.
        """
        handles = []
        try:
            for layer, mask in (heads or {}).items():
                handles.append(
                    self.layers[layer].self_attn.o_proj.register_forward_pre_hook(
                        _head_swap(source, mask, self.heads)
                    )
                )
            for layer, mask in (mlps or {}).items():
                handles.append(self.layers[layer].mlp.register_forward_hook(_mlp_swap(source, mask)))
            yield
        finally:
            for handle in handles:
                handle.remove()


def _head_swap(source: torch.Tensor, mask: torch.Tensor, n_heads: int):
    def hook(module: torch.nn.Module, args: tuple) -> tuple:
        x = args[0]
        rows, positions, width = x.shape
        if mask.shape != (rows, positions, n_heads):
            raise ValueError(f"head mask {tuple(mask.shape)} does not fit o_proj input {tuple(x.shape)}")
        heads = x.view(rows, positions, n_heads, width // n_heads)
        swapped = torch.where(mask[..., None], heads[source], heads)
        return (swapped.reshape(rows, positions, width), *args[1:])

    return hook


def _mlp_swap(source: torch.Tensor, mask: torch.Tensor):
    def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if mask.shape != output.shape[:2]:
            raise ValueError(f"MLP mask {tuple(mask.shape)} does not fit MLP output {tuple(output.shape)}")
        return torch.where(mask[..., None], output[source], output)

    return hook
