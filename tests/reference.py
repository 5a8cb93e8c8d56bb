"""An independent reference for every intervention: plain torch hooks on one unbatched row.

The engine batches hundreds of rows, pads them, indexes tensors through declared layouts and
edits inside nnsight traces. None of that is here. This module runs the Hugging Face model on
one row at a time, exactly as its processor encodes it, and makes each intervention with a
plain `register_forward_hook` / `register_forward_pre_hook` on module paths written out by
hand per family (`tests/families/*.py`). It shares no code with vlmtrace.

With one row there is no layout to get wrong: a hooked tensor is `[1, position, ...]`, or
`[position, ...]` where the model flattens (OPT's MLP), or, for image features, the one row's
whole image (tiles or tokens), whatever its shape.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

Inputs = dict
Score = Callable[[torch.nn.Module, Inputs], torch.Tensor]
"""(model, inputs) -> the logits [vocab] that predict the answer's first token."""


@dataclass(frozen=True)
class At:
    """A hook point: a module path (with `{i}` for the layer), which side, which tuple element."""

    path: str
    side: str = "output"
    index: int | None = None


def _value(at: At, args, output):
    value = args[0] if at.side == "input" else output
    return value[at.index] if at.index is not None else value


def _positions_of(value: torch.Tensor, width: int) -> torch.Tensor:
    """A `[position, ...]` view of one row's tensor: `[1, T, ...]` or flat `[T, ...]`."""
    if value.dim() >= 3 and value.shape[0] == 1 and value.shape[1] == width:
        return value[0]
    if value.shape[0] == width:
        return value
    raise AssertionError(f"reference cannot read positions of {tuple(value.shape)} (width {width})")


class Hooks:
    """Registered hooks, removed on exit."""

    def __init__(self):
        self.handles = []

    def output(self, module, fn):
        self.handles.append(module.register_forward_hook(fn))

    def pre(self, module, fn):
        self.handles.append(module.register_forward_pre_hook(fn, with_kwargs=True))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


def log_prob(
    model, score: Score, inputs: Inputs, answer: int, hooks: Callable[[Hooks], None] = lambda h: None
):
    """log P(answer) of one row, with the interventions `hooks` registers."""
    with torch.no_grad(), Hooks() as registered:
        hooks(registered)
        logits = score(model, inputs)
    return torch.log_softmax(logits.float(), -1)[answer].item()


def record(model, score: Score, inputs: Inputs, at: At, layers: Sequence[int], extra=lambda h: None) -> dict:
    """The activation at `at` in each layer of `layers`, from one run (with `extra` interventions)."""
    cache = {}
    with torch.no_grad(), Hooks() as registered:
        extra(registered)
        for layer in layers:
            module = model.get_submodule(at.path.format(i=layer))
            if at.side == "input":

                def keep_input(mod, args, kwargs, layer=layer):
                    cache[layer] = _value(at, args, None).detach().clone()

                registered.pre(module, keep_input)
            else:

                def keep_output(mod, args, output, layer=layer):
                    cache[layer] = _value(at, args, output).detach().clone()

                registered.output(module, keep_output)
        score(model, inputs)
    return cache


def replace(
    registered: Hooks,
    model,
    at: At,
    layer: int,
    position: int,
    width: int,
    source: torch.Tensor,
    head: int | None = None,
    n_heads: int = 1,
    *,
    source_position: int | None = None,
    source_width: int | None = None,
) -> None:
    """Write `source`'s values at `position` (one head's slice if `head`) into `at` in `layer`.

    `source_position` / `source_width`: where the value sits in `source` when the source run has
    another length (an image pair with other numbers of image tokens); default: the same place.
    """
    module = model.get_submodule(at.path.format(i=layer))
    origin_position = position if source_position is None else source_position
    origin_width = width if source_width is None else source_width

    def write(value):
        target = _positions_of(value, width)
        origin = _positions_of(source, origin_width)
        if head is None:
            target[position] = origin[origin_position]
        else:
            size = target.shape[-1] // n_heads
            target[position, head * size : (head + 1) * size] = origin[
                origin_position, head * size : (head + 1) * size
            ]

    if at.side == "input":

        def pre(mod, args, kwargs):
            write(args[0])

        registered.pre(module, pre)
    else:

        def post(mod, args, output):
            write(_value(at, args, output))

        registered.output(module, post)


def add_noise(
    registered: Hooks,
    model,
    at: At,
    *,
    scale: float,
    seed: int,
    samples: int,
    draw: int,
    positions: Sequence[int] | None = None,
    width: int = 0,
) -> None:
    """Seeded Gaussian noise on one row's image features (all of them) or token embeddings."""
    module = model.get_submodule(at.path)

    def post(mod, args, output):
        value = _value(at, args, output)
        if positions is None:
            target = value
        else:
            target = _positions_of(value, width)[list(positions)]
        sigma = scale * target.float().std()
        noise = sigma * torch.randn(samples, *target.shape, generator=torch.Generator().manual_seed(seed))
        if positions is None:
            value += noise[draw].to(value.dtype)
        else:
            _positions_of(value, width)[list(positions)] += noise[draw].to(value.dtype)

    registered.output(module, post)


def knock_out(
    registered: Hooks, model, path: str, layer: int, keyword: str, queries, keys, causal=True
) -> None:
    """Block attention from `keys` to `queries` in one layer by editing the mask keyword."""
    module = model.get_submodule(path.format(i=layer))

    def pre(mod, args, kwargs):
        mask = kwargs.get(keyword)
        states = args[0] if args else kwargs["hidden_states"]
        width = states.shape[-2]
        if mask is None:
            mask = torch.zeros(1, 1, width, width, dtype=states.dtype)
            if causal:
                mask = mask.masked_fill(
                    torch.ones(width, width, dtype=torch.bool).triu(1), torch.finfo(states.dtype).min
                )
        mask = mask.clone()
        for q in queries:
            for k in keys:
                mask[0, :, q, k] = torch.finfo(mask.dtype).min
        kwargs[keyword] = mask
        return args, kwargs

    registered.pre(module, pre)
