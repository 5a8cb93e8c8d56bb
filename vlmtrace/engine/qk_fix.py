"""AtP*'s QK fix: recompute the attention softmax a patch meets first, instead of linearising it.

Attribution patching estimates a patch's effect with one gradient. Where that gradient crosses
an attention softmax in saturation (one key takes nearly all the weight), a large change of
scores moves the pattern much more, or much less, than the gradient says, and the cell is
ranked wrong: AtP*'s first cause of false negatives (Kramár et al. 2024, section 3.1.1). The fix
computes the attention pattern exactly for the patched queries and keys and linearises only
from the pattern on, through the gradient of the metric with respect to the pattern.

vlmtrace's cells patch the *outputs* of sites (a block, an attention, an MLP, a head), not
queries and keys. The first softmax a patch of layer l at position p meets is the self-attention
of layer l + 1: its query at p (row p of the pattern) and its key at p (column p of every row).
After a stack's last layer it is the cross-attention of every layer of a stack that reads this
one's output (BLIP's answer decoder reads the question encoder): its key at p (`Reader`).
Queries and keys depend on the patched layer position by position, so one extra row per
(site, layer, head) in which that site is patched at *every* position at once holds, at each
position, the query and key that patching that one position gives (`queries_keys_moved` in
`vlmtrace.engine.gradients`). With them, for every cell:

    query side   row p:      A'_p = softmax(s_p + ds),  ds_s = scale (q'_p - q_p) . k_s
    key side     every row t: s_tp moves by scale q_t . (k'_p - k_p), the row renormalises
    fix          sum_rows G . (A' - A)  -  the same through the softmax's Jacobian

where G = dm/dA is the gradient of the metric with respect to the pattern. The fix is added to
the attribution estimate, so the linear path through those queries and keys is replaced by the
exact softmax, and everything else (values, residual, later layers) stays first order. As in
AtP*, the query and key sides are fixed separately (a cell moves both; their interaction is
second order), and a cell that patches several positions changes its rows independently and
its columns jointly. A window sums its layers' fixes, as attribution sums their terms. The
last layer has no next attention: its cells are plain attribution.

The stack must declare where its attention computes scores (`Stack.scores`, and
`Stack.cross_scores` for a reader's cross-attention), and every use checks that the
declaration reproduces the attention's pattern. Cost: that extra forward (rows = sites x
layers, plus heads, per noise draw, `QK_ROWS` per trace) and O(heads x positions) per cell.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import UserError
from ..models.adapter import Scores, Stack
from .forward import envoy_at

__all__ = [
    "PATTERN_TOLERANCE",
    "LayerScores",
    "QKFixError",
    "Reader",
    "correction",
    "declared",
    "read",
    "readers",
    "summarize",
]

PATTERN_TOLERANCE = 1e-4
"""How far (absolute) the pattern recomputed from the declared queries and keys may be from the
model's own (fp32). Further means the declaration reads the wrong tensors."""


class QKFixError(UserError):
    """A stack whose attention scores are not declared, or declared wrongly, for the QK fix."""


def declared(stack: Stack, stack_name: str) -> Scores:
    """The stack's score declaration, or a clear error naming what is missing."""
    if stack.scores is None:
        raise QKFixError(
            f"the {stack_name!r} stack does not declare where its attention computes scores "
            "(Stack.scores), so the QK fix cannot recompute its softmax; use method='atp+graddrop', "
            "'atp' or 'ig', or declare Stack.scores in the model's adapter."
        )
    return stack.scores


def read(layer, scores: Scores, *, n_heads: int, rows: int, width: int, key_width: int, causal: bool):
    """(queries, keys, mask) of one layer's attention, inside a trace.

    Queries come back as [row, head, position, head_dim] and keys as [row, head, key, head_dim],
    after rotary embeddings, keys repeated for grouped-query attention (`key_width` is `width`
    but for cross-attention); the mask as [row or 1, 1 or head, query, key], built (nothing
    masked but the future of a causal stack) where the model passes none. Touches the attention
    module's inputs, then its queries and keys: call before the layer's sites.
    """
    module = envoy_at(layer, scores.module)
    _, kwargs = module.inputs
    mask = kwargs.get(scores.mask)
    if scores.call:
        try:
            call = getattr(module.source, scores.call)
        except AttributeError as error:
            raise QKFixError(
                f"Stack.scores names the call {scores.call!r} inside {scores.module!r}, which this "
                f"model's attention does not make ({error}); declare the call that returns its "
                "queries and keys after rotary embeddings."
            ) from None
        queries, keys = call.output[:2]
    else:
        queries = _heads_first(envoy_at(module, scores.query).output, n_heads, rows, width, scores.query)
        keys = envoy_at(module, scores.key).output
        keys = _heads_first(keys, keys.shape[-1] // queries.shape[-1], rows, key_width, scores.key)
    if (
        queries.dim() != 4
        or queries.shape[:3] != (rows, n_heads, width)
        or keys.shape[0] != rows
        or keys.shape[2] != key_width
    ):
        raise QKFixError(
            f"Stack.scores of {scores.module!r} gives queries {tuple(queries.shape)} and keys "
            f"{tuple(keys.shape)}, not [rows={rows}, heads={n_heads}, positions={width} (keys: "
            f"{key_width}), head_dim]; fix the declaration (`call` must return queries and keys "
            "after rotary embeddings)."
        )
    if keys.shape[1] != n_heads:
        if n_heads % keys.shape[1]:
            raise QKFixError(f"{n_heads} query heads cannot share {keys.shape[1]} key heads evenly.")
        keys = keys.repeat_interleave(n_heads // keys.shape[1], dim=1)
    if mask is None:
        mask = torch.zeros(1, 1, width, key_width, device=queries.device)
        if causal:
            future = torch.ones(width, key_width, dtype=torch.bool, device=queries.device).triu(1)
            mask = mask.masked_fill(future, torch.finfo(mask.dtype).min)
    return queries, keys, mask


def _heads_first(x, n_heads: int, rows: int, width: int, name: str):
    if x.dim() != 3 or x.shape[0] != rows or x.shape[1] != width or x.shape[-1] % n_heads:
        raise QKFixError(
            f"Stack.scores: {name!r} gives {tuple(x.shape)}, not [rows={rows}, positions={width}, "
            f"{n_heads} heads * head_dim]."
        )
    return x.view(rows, width, n_heads, -1).transpose(1, 2)


@dataclass(frozen=True)
class Reader:
    """An attention that reads a patched position first.

    After layer l < L - 1 of the traced stack, the self-attention of layer l + 1 (its query and
    its key at the position). After the last layer, the cross-attention of every layer of each
    stack that reads the traced stack's output (BLIP's answer decoder reads the question
    encoder): its key at the position, queries unchanged.
    """

    stack: str
    layer: int
    cross: bool = False


def readers(vlm, stack_name: str, layer: int) -> list[Reader]:
    """The attentions a patch of `stack_name`'s `layer` meets first (see `Reader`)."""
    if layer + 1 < vlm.shape.layers[stack_name]:
        return [Reader(stack_name, layer + 1)]
    sequence = vlm.adapter.stacks[stack_name].sequence
    found = []
    for name, other in vlm.adapter.stacks.items():
        if name == stack_name or other.cross_sequence != sequence:
            continue
        if other.cross_scores is None:
            raise QKFixError(
                f"the {name!r} stack cross-attends to the {stack_name!r} stack's output but does not "
                "declare where its cross-attention computes scores (Stack.cross_scores), so the QK fix "
                "cannot recompute its softmax; declare it, or use method='atp+graddrop', 'atp' or 'ig'."
            )
        found += [Reader(name, j, cross=True) for j in range(vlm.shape.layers[name])]
    return found


@dataclass
class LayerScores:
    """What the fix needs of one attention, at the rows that give gradients.

    `D` noise draws, `C` gradient copies (GradDrop), `H` heads, `T` query and `K` key positions,
    `P` the patched positions (the aligned pairs, in their order). Scores and queries do not
    depend on the copy; gradients do. A cross-attention's rows are not patched positions: its
    row fields hold no positions (P = 0 there).
    """

    queries: torch.Tensor  # [D, H, T, head_dim]
    keys: torch.Tensor  # [D, H, K, head_dim]
    scale: float
    rows: torch.Tensor  # [D, H, P, K] scores of the patched positions' rows
    columns: torch.Tensor  # [D, H, T, P] scores of the patched positions' columns
    logsumexp: torch.Tensor  # [D, H, T] of every row's scores
    row_logsumexp: torch.Tensor  # [D, H, P] of the patched positions' rows
    grad_rows: torch.Tensor  # [C, D, H, P, K] dm/dA at those rows
    grad_columns: torch.Tensor  # [C, D, H, T, P]
    grad_dot: torch.Tensor  # [C, D, H, T]: sum over keys of dm/dA * A, per row
    error: float  # max |softmax(scores) - the model's pattern|


def summarize(
    queries,
    keys,
    mask,
    scale: float | None,
    pattern,
    grad,
    *,
    base_rows: Sequence[int],
    grad_rows: Sequence[Sequence[int]],
    at: torch.Tensor,
    cross: bool = False,
) -> dict:
    """The small tensors of `LayerScores`, computed inside a trace (fields as a dict of tensors).

    `scale` None means head_dim ** -0.5. `base_rows[d]`: the row whose queries and keys draw d
    uses; `grad_rows[c][d]`: the row whose gradient copy c, draw d uses; `at`: the patched
    positions in those rows (keys only, for a `cross`-attention).
    """
    base = torch.tensor(list(base_rows))
    copies = torch.tensor([list(row) for row in grad_rows])
    q, k = queries[base].double(), keys[base].double()
    scale = queries.shape[-1] ** -0.5 if scale is None else scale
    full = mask.expand(queries.shape[0], -1, -1, -1)
    scores = scale * q @ k.transpose(-1, -2) + full[base].double()
    lse = scores.logsumexp(-1)
    probabilities = (scores - lse[..., None]).exp()
    g = grad[copies].double()  # [C, D, H, T, K]
    rows_at = at[:0] if cross else at
    return {
        "queries": q,
        "keys": k,
        "rows": scores[:, :, rows_at],
        "columns": scores[..., at],
        "logsumexp": lse,
        "row_logsumexp": lse[:, :, rows_at],
        "grad_rows": g[:, :, :, rows_at],
        "grad_columns": g[..., at],
        "grad_dot": (g * probabilities).sum(-1),
        "error": (probabilities - pattern[base].double()).abs().max(),
    }


def correction(
    layer: LayerScores, dq: torch.Tensor | None, dk: torch.Tensor, cells: torch.Tensor
) -> torch.Tensor:
    """Exact-softmax minus linear effect of cells' query and key changes, per cell, copy and draw.

    `dq`, `dk`: [D, P, H, head_dim], the patched minus the unpatched queries and keys at every
    patched position (`dq` None: a cross-attention, whose queries the patch does not move);
    `cells`: [n, m], for each of n cells the m positions (indices into P) it patches. Returns
    [n, C, D], summed over heads, rows and positions.
    """
    dk = dk.double()[:, cells]  # [D, n, m, H, head_dim]
    fix = _key_side(layer, dk, cells)
    if dq is not None:
        fix = fix + _query_side(layer, dq.double()[:, cells], cells)
    return fix.permute(2, 0, 1)


def _query_side(layer: LayerScores, dq: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
    """Each patched row on its own, keys unchanged: exact minus linear, [C, D, n]."""
    ds = layer.scale * torch.einsum("dnmhe,dhse->dhnms", dq, layer.keys)  # [D, H, n, m, T]
    rows = layer.rows[:, :, cells]
    before = (rows - layer.row_logsumexp[:, :, cells][..., None]).exp()
    after = (rows + ds).softmax(-1)
    g = layer.grad_rows[:, :, :, cells]  # [C, D, H, n, m, T]
    exact = (g * (after - before)).sum((-1, -2)).sum(2)  # [C, D, n]
    moved = ds - (before * ds).sum(-1, keepdim=True)
    linear = (g * before * moved).sum((-1, -2)).sum(2)
    return exact - linear


def _key_side(layer: LayerScores, dk: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
    """In every row the patched columns move together, queries unchanged: exact minus linear, [C, D, n]."""
    dcol = layer.scale * torch.einsum("dhte,dnmhe->dhtnm", layer.queries, dk)  # [D, H, T, n, m]
    columns = layer.columns[..., cells]
    lse = layer.logsumexp[..., None, None]
    weight = (columns - lse).exp()
    rest = lse[..., 0] + torch.log1p(-weight.sum(-1).clamp(max=1.0))  # log of the other keys' mass
    renormed = torch.logaddexp(rest, (columns + dcol).logsumexp(-1))  # [D, H, T, n]
    ratio = torch.expm1((lse[..., 0] - renormed).clamp(max=700.0))  # others' weights scale by 1 + ratio
    moved_weight = (columns + dcol - renormed[..., None]).exp()
    gc = layer.grad_columns[..., cells]  # [C, D, H, T, n, m]
    others = layer.grad_dot[..., None] - (gc * weight).sum(-1)
    exact = (ratio * others + (gc * (moved_weight - weight)).sum(-1)).sum((2, 3))
    linear = (weight * dcol * (gc - layer.grad_dot[..., None, None])).sum((-1, 2, 3))
    return exact - linear
