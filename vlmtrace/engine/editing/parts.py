"""Where an edit acts: each layer's MLP output projection, found from declared data and checked.

ROME, MEMIT and MultEdit all change one matrix per layer: the MLP's output projection W (Llama's
`down_proj`), whose input at a token is the *key* and whose output is the MLP's contribution to
the residual stream. This module finds those modules in a loaded model from a table
(`PROJECTIONS`, adapter family -> module path), checks that the projection's output really is
the adapter's `mlp` site (on live tensors, in `updates.keys_at`), and runs the plain forwards
the edit needs (no nnsight: gradients flow through ordinary hooks here).

    parts = Parts.of(vlm)            # refuses families it does not know, naming the fix
    parts.weight(5)                  # layer 5's down_proj weight [hidden, intermediate]
    logits, offsets = forward_rows(vlm, [row.inputs for row in rows])
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from ...errors import UserError
from ...models.adapter import module_at
from ...models.load import VLM
from ..forward import stack_rows


class EditError(UserError):
    """An edit that cannot be computed, applied, restored or evaluated as asked."""


@dataclass(frozen=True)
class OutputProjection:
    """Where a family's MLP writes into the residual stream: the weight an edit changes."""

    path: str
    """Linear module, relative to one layer, whose output *is* the `site` output."""
    site: str = "mlp"
    """The adapter's site whose module contains the projection (checked at use)."""


_DOWN_PROJ = OutputProjection("mlp.down_proj")
PROJECTIONS: Mapping[tuple[str, str], OutputProjection] = {
    (family, "lm"): _DOWN_PROJ
    for family in (
        "llava", "llava_next", "llava_onevision", "mistral3", "gemma3", "paligemma", "idefics3",
        "smolvlm", "internvl", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "mllama", "llama",
    )
}  # fmt: skip
"""(adapter family, stack) -> output projection: Llama-family decoders (Llama, Mistral, Qwen,
Gemma) all end their MLP with `down_proj`. A family not listed is refused with an error."""

DUAL_STREAM = ("blip", "blip2", "instructblip")


@dataclass(frozen=True)
class Parts:
    """The modules an edit touches in one model: layers, MLP sites, output projections."""

    layers: torch.nn.ModuleList
    mlps: tuple[torch.nn.Module, ...]
    projections: tuple[torch.nn.Linear, ...]
    projection: OutputProjection

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def weight(self, layer: int) -> torch.nn.Parameter:
        return self.projections[layer].weight

    @classmethod
    def of(cls, vlm: VLM) -> Parts:
        adapter = vlm.adapter
        stack_name = adapter.default_stack
        if adapter.family in DUAL_STREAM:
            raise EditError(
                f"vt.edit refuses {adapter.family} (BLIP-style, dual-stream) models: their answer comes "
                "from a decoder cross-attending to a bidirectional question encoder, so there is no "
                "single stream in which a key at the constraint token maps to the answer. Edit an "
                f"early-fusion decoder (LLaVA, Qwen-VL, ...): families {sorted({f for f, _ in PROJECTIONS})}."
            )
        projection = PROJECTIONS.get((adapter.family, stack_name))
        if projection is None:
            raise EditError(
                f"vt.edit does not know where family {adapter.family!r} (stack {stack_name!r}) keeps its MLP "
                f"output projection; known: {sorted({f for f, _ in PROJECTIONS})}. Add an entry to "
                "vlmtrace.engine.editing.parts.PROJECTIONS (the Linear module, relative to one layer, whose "
                "output is the 'mlp' site's output)."
            )
        stack = adapter.stacks[stack_name]
        hook = stack.sites.get(projection.site)
        if hook is None or hook.layout != "row_position" or not projection.path.startswith(hook.path + "."):
            raise EditError(
                f"family {adapter.family!r}: the projection {projection.path!r} must lie inside the "
                f"{projection.site!r} site's module ({hook}) with a [row, position, hidden] layout."
            )
        layers = module_at(vlm.model, stack.layers)
        mlps = tuple(layer.get_submodule(hook.path) for layer in layers)
        projections = []
        for index, layer in enumerate(layers):
            module = module_at(layer, projection.path)
            if not isinstance(module, torch.nn.Linear):
                raise EditError(
                    f"layer {index}'s {projection.path} is a {type(module).__name__}, not a Linear; "
                    f"this {adapter.family} checkpoint's MLP differs from vlmtrace.engine.editing's table."
                )
            projections.append(module)
        return cls(layers, mlps, tuple(projections), projection)

    def check_layers(self, layers: Sequence[int]) -> tuple[int, ...]:
        """`layers` sorted and deduplicated, or an error naming the valid range."""
        chosen = tuple(sorted({int(x) for x in layers}))
        if not chosen or any(not 0 <= x < self.n_layers for x in chosen):
            raise EditError(f"layers {tuple(layers)}: give one or more of 0..{self.n_layers - 1}.")
        return chosen


def forward_rows(vlm: VLM, rows: Sequence[Mapping[str, torch.Tensor]]) -> tuple[torch.Tensor, list[int]]:
    """Logits [row, position, vocab] of left-padded rows, and each row's offset (its padding)."""
    width = max(len(row["input_ids"]) for row in rows)
    batch = stack_rows(vlm, list(rows), {"prompt": width})
    device, dtype = vlm.device, vlm.model.dtype
    batch = {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in batch.items()}
    return vlm.adapter.forward(vlm.model, **batch), [width - len(row["input_ids"]) for row in rows]


@contextmanager
def hooks(*pairs: tuple[torch.nn.Module, Any, bool]) -> Iterator[None]:
    """Register (module, function, pre) hooks for the duration of a block."""
    handles = [m.register_forward_pre_hook(f) if pre else m.register_forward_hook(f) for m, f, pre in pairs]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def output_of(value: Any) -> torch.Tensor:
    """A module's output tensor (decoder layers return a tuple whose first item is the stream)."""
    return value[0] if isinstance(value, tuple) else value


def chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    """Consecutive slices of at most `size` items."""
    for start in range(0, len(items), size):
        yield items[start : start + size]
