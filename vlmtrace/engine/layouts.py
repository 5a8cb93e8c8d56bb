"""Tensor layouts: how a hooked tensor holds the batch, checked and applied in one place.

Every edit the engine makes (a patch, noise, a skip) indexes a live tensor by batch row and
position. Most hooks hold `[row, position, hidden]`, but not all: OPT flattens rows and
positions before its MLP's second projection, LLaVA-NeXT's projector returns one entry per
image *tile*, and Qwen-VL's merger returns one entry per image *token* of the whole batch.
Indexing those as `[row, position]` writes into other rows and returns a plausible, wrong
number. So each hook declares its layout (`Hook.layout`, in the adapter), and the functions
here are the only code that turns (row, position) into an index of a live tensor. Each checks
the live shape against the declared layout first and stops with an error that names the hook
and both shapes when they disagree.

    view = rows_view(x, "flat_rows", rows=8, width=27, hook="layers.3.fc2")   # [8, 27, D] view
    view[dst_row, dst_pos] = view[src_row, src_pos]
    add_image_noise(x, "image_tiles", units=[2, 2, 2], ...)                # rows own 2 tiles each

These functions run inside nnsight traces, possibly on a remote server that has no vlmtrace
installed (`vlmtrace.remote.client.ENGINE_MODULES` ships this module by value): they use
torch and plain Python values only, and callers import them by name (a module object named
in a trace would be pickled by reference, and the server cannot import it).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

LAYOUTS = ("row_position", "flat_rows", "image_tiles", "image_tokens")


class LayoutError(RuntimeError):
    """A live tensor does not have the shape its declared layout implies (an adapter bug)."""


def _mismatch(hook: str, layout: str, expected: str, x: torch.Tensor) -> LayoutError:
    return LayoutError(
        f"hook {hook!r} is declared {layout!r}, so its tensor should be {expected}, but it is "
        f"{tuple(x.shape)}. The adapter's layout for this hook is wrong for this model: fix "
        "Hook.layout (vlmtrace.models.adapter.LayoutName lists the layouts), or run "
        "`vlmtrace check MODEL` to see every invariant."
    )


def rows_view(x: torch.Tensor, layout: str, *, rows: int, width: int, hook: str) -> torch.Tensor:
    """A `[row, position, ...]` view of a layer-site tensor; writes to it land in `x`."""
    if layout == "row_position":
        if x.dim() < 3 or x.shape[0] != rows or x.shape[1] != width:
            raise _mismatch(hook, layout, f"[{rows}, {width}, ...]", x)
        return x
    if layout == "flat_rows":
        if x.dim() < 2 or x.shape[0] != rows * width:
            raise _mismatch(hook, layout, f"[{rows} * {width}, ...]", x)
        return x.view(rows, width, *x.shape[1:])
    raise LayoutError(
        f"hook {hook!r}: layout {layout!r} is not a layer-site layout; use row_position or flat_rows."
    )


def heads_view(x: torch.Tensor, n_heads: int, *, hook: str) -> torch.Tensor:
    """`[row, position, head, head_dim]` view of a `[row, position, heads * head_dim]` tensor."""
    if x.shape[-1] % n_heads:
        raise LayoutError(
            f"hook {hook!r}: last dimension {x.shape[-1]} is not a multiple of {n_heads} heads; "
            "the head site must be the input of the attention output projection."
        )
    return x.view(*x.shape[:-1], n_heads, x.shape[-1] // n_heads)


def patch_through_layout(
    x: torch.Tensor,
    layout: str,
    *,
    rows: int,
    width: int,
    hook: str,
    dst_row: Sequence[int],
    dst_pos: Sequence[int],
    src_row: Sequence[int],
    src_pos: Sequence[int],
    head: Sequence[int] = (),
    n_heads: int = 0,
) -> None:
    """`x[dst] = x[src]` for every entry, through the layout (heads when `head` is given)."""
    view = rows_view(x, layout, rows=rows, width=width, hook=hook)
    dst_r, dst_p = torch.tensor(list(dst_row)), torch.tensor(list(dst_pos))
    src_r, src_p = torch.tensor(list(src_row)), torch.tensor(list(src_pos))
    if head:
        h = torch.tensor(list(head))
        heads = heads_view(view, n_heads, hook=hook)
        heads[dst_r, dst_p, h] = heads[src_r, src_p, h]
    else:
        view[dst_r, dst_p] = view[src_r, src_p]


def image_blocks(x: torch.Tensor, layout: str, *, rows: int, units: Sequence[int], hook: str) -> list[slice]:
    """The slice of `x`'s first dimension that each batch row's image occupies.

    `row_position`: one entry per row. `image_tiles` / `image_tokens`: row r owns `units[r]`
    consecutive entries (tiles or tokens), in row order; the total must be the tensor's length.
    """
    if layout == "row_position":
        if x.shape[0] != rows:
            raise _mismatch(hook, layout, f"[{rows}, ...] (one entry per row)", x)
        return [slice(r, r + 1) for r in range(rows)]
    if layout in ("image_tiles", "image_tokens"):
        if len(units) != rows or sum(units) != x.shape[0]:
            shown = list(units) if len(units) <= 8 else f"{list(units[:8])}..."
            raise _mismatch(hook, layout, f"[{sum(units)}, ...] ({shown} per row)", x)
        blocks, start = [], 0
        for count in units:
            blocks.append(slice(start, start + count))
            start += count
        return blocks
    raise LayoutError(f"hook {hook!r}: layout {layout!r} cannot hold image features.")


def add_noise(
    x: torch.Tensor,
    layout: str,
    *,
    rows: int,
    units: Sequence[int],
    hook: str,
    noised_rows: Sequence[int],
    draws: Sequence[int],
    positions: Sequence[int] | None,
    scale: float,
    seed: int,
    samples: int,
    width: int = 0,
) -> None:
    """Add `scale * std(clean)` Gaussian noise, in place, to the noised rows' part of `x`.

    The clean run is row 0; its part of `x` (its whole image, every tile or token of it, or
    its tokens at `positions`) gives sigma and the noise's shape. Each noised row receives
    draw `draws[i]` of a seeded CPU generator, so results do not depend on the device.
    """
    if not noised_rows:
        return
    if positions is None:
        blocks = image_blocks(x, layout, rows=rows, units=units, hook=hook)
        target = x[blocks[0]]
    else:
        view = rows_view(x, layout, rows=rows, width=width, hook=hook)
        blocks = None
        target = view[0, list(positions)]
    sigma = scale * target.float().std()
    generator = torch.Generator().manual_seed(seed)
    noise = sigma * torch.randn(samples, *target.shape, generator=generator)
    noise = noise.to(x.dtype).to(x.device)
    if blocks is not None:
        for row, draw in zip(noised_rows, draws, strict=True):
            part = x[blocks[row]]
            if part.shape != target.shape:
                raise LayoutError(
                    f"hook {hook!r}: row {row}'s image is {tuple(part.shape)} but the clean row's is "
                    f"{tuple(target.shape)}; noised rows must show the clean image."
                )
            x[blocks[row]] += noise[draw]
    else:
        index_rows = torch.tensor(list(noised_rows))
        index_pos = torch.tensor(list(positions))
        view[index_rows[:, None], index_pos[None, :]] += noise[list(draws)]


def interpolate(
    x: torch.Tensor,
    layout: str,
    *,
    rows: int,
    hook: str,
    moved_rows: Sequence[int],
    toward_rows: Sequence[int],
    alphas: Sequence[float],
    moved_pos: Sequence[int] | None = None,
    toward_pos: Sequence[int] | None = None,
    units: Sequence[int] = (),
    width: int = 0,
) -> None:
    """Move each moved row's part of `x` a fraction `alpha` of the way to its toward row's, in place.

    `x[moved] += alpha * (x[toward] - x[moved])`: the points of an integrated-gradients path
    between two runs (`vlmtrace.engine.attribution`). With positions, over those positions of
    the rows (`moved_pos[i]` goes toward `toward_pos[i]`); without, over each row's whole image.
    Toward rows must not be moved rows: they are read after nothing has written them.
    """
    if not moved_rows:
        return
    alpha = torch.tensor(list(alphas), dtype=x.dtype, device=x.device)
    if moved_pos is None:
        blocks = image_blocks(x, layout, rows=rows, units=units, hook=hook)
        for row, toward, a in zip(moved_rows, toward_rows, alpha, strict=True):
            part, target = x[blocks[row]], x[blocks[toward]]
            if part.shape != target.shape:
                raise LayoutError(
                    f"hook {hook!r}: row {row}'s image is {tuple(part.shape)} but row {toward}'s is "
                    f"{tuple(target.shape)}; a path between two images needs images of the same "
                    "size (tiles, tokens). Use the first-order screen (method='atp') for this pair."
                )
            x[blocks[row]] = part + a * (target - part)
        return
    view = rows_view(x, layout, rows=rows, width=width, hook=hook)
    moved_r, toward_r = torch.tensor(list(moved_rows)), torch.tensor(list(toward_rows))
    moved_p, toward_p = torch.tensor(list(moved_pos)), torch.tensor(list(toward_pos))
    here = view[moved_r[:, None], moved_p[None, :]]
    there = view[toward_r[:, None], toward_p[None, :]]
    view[moved_r[:, None], moved_p[None, :]] = here + alpha.view(-1, *[1] * (here.dim() - 1)) * (there - here)


def skip_in_backward(
    output: torch.Tensor,
    layer_input: torch.Tensor,
    layout: str,
    *,
    rows: int,
    width: int,
    hook: str,
    skipped_rows: Sequence[int],
) -> None:
    """Make a layer the identity in the backward pass of `skipped_rows`, its forward values unchanged.

    `output[r] = input[r] + (output[r] - input[r]).detach()`, in place: the value is the same,
    but the gradient reaching the output goes straight to the input and none flows through the
    layer's own computation (GradDrop, `vlmtrace.engine.attribution`). `output` and
    `layer_input` hold the same rows and positions (a layer's hidden states in and out).
    """
    if not skipped_rows:
        return
    out = rows_view(output, layout, rows=rows, width=width, hook=hook)
    into = rows_view(layer_input, layout, rows=rows, width=width, hook=f"{hook} (input)")
    if out.shape != into.shape:
        raise LayoutError(
            f"hook {hook!r}: the layer's output is {tuple(out.shape)} but its input is "
            f"{tuple(into.shape)}; a layer skipped in the backward pass must keep its shape."
        )
    r = torch.tensor(list(skipped_rows))
    out[r] = into[r] + (out[r] - into[r]).detach()
