"""The value an edit writes: one vector δ that makes every context give the new answer.

ROME's v*: a vector δ is added to the MLP output of the edit layer at the key position of every
context, and optimised (Adam) so that all of them give the new answer, while the essence
questions keep their next-token distribution:

    loss = mean_contexts NLL(new answer)                              (per token of the answer)
         + kl_weight * mean_essence KL(P_unedited || P_δ)  at their key positions
         + weight_decay * |δ|² / |m|²                                   m: the MLP output there
    |δ| <= clamp * |m|   (projected after every step)

Then every context's target is z_c = h_c + δ, h_c the block output of that layer at its key.
One δ for all contexts is what makes the edit about the entity: it must work whatever picture,
phrasing or prefix surrounds it. Without essence questions, the KL is taken at the key positions
of the contexts themselves when the key is a span's last token (what the model says about the
subject, ROME's "{subject} is a"), and left out when the key is the last token (there the
next-token distribution *is* the answer being changed); `fit["kl_rows"]` records which.

MultEdit (Basu et al.) optimises its value the same way on its single context, with the NLL of
the first answer token only and no KL (`first_token=True, kl_weight=0`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ...models.load import VLM
from ..gradients import activation_gradients_only
from .contexts import Row
from .parts import Parts, chunks, forward_rows, hooks, output_of


@dataclass(frozen=True)
class ValueFit:
    """Hyperparameters of the value optimisation (ROME's v*)."""

    steps: int = 25
    lr: float = 0.5
    kl_weight: float = 0.0625
    weight_decay: float = 0.01
    clamp: float = 4.0
    """|δ| at most this multiple of the mean MLP output norm at the key positions."""
    stop_nll: float = 0.01
    """Stop once the mean NLL of the new answer falls below this (nats per token)."""
    first_token: bool = False
    """Score only the first answer token (MultEdit) instead of every token (ROME): the rows are
    then encoded without teacher-forced answer tokens (`contexts.encode_row`)."""

    def describe(self) -> dict[str, Any]:
        return asdict(self)


def optimise_value(
    vlm: VLM,
    parts: Parts,
    layer: int,
    rows: Sequence[Row],
    kl_rows: Sequence[Row],
    fit: ValueFit,
    *,
    max_batch: int = 64,
) -> tuple[torch.Tensor, dict[str, float]]:
    """δ (float32, on the CPU) for `rows` at `layer`, and a record of the fit.

    `kl_rows` are the rows whose next-token distribution at the key is held by the KL term
    (essence questions, or the contexts themselves); δ is added at their keys too (ROME).
    """
    hidden = vlm.model.config.get_text_config().hidden_size
    delta = torch.zeros(hidden, device=vlm.device, requires_grad=True)
    batch = [(row, "edit") for row in rows] + [(row, "kl") for row in kl_rows]
    groups = list(chunks(batch, max_batch))
    references: list[torch.Tensor | None] = [None] * len(groups)
    norms: list[torch.Tensor] = []
    optimiser = torch.optim.Adam([delta], lr=fit.lr)
    start_nll = nll_value = kl_value = 0.0
    # frozen weights: the graph starts at δ, so the layers below the edit layer (and the image
    # encoder) keep no activations for a backward, and no weight gradient is ever formed
    with activation_gradients_only(vlm.model):
        for step in range(fit.steps + 1):
            grad = torch.zeros_like(delta)
            nll_total = kl_total = 0.0
            for g, group in enumerate(groups):
                nll, kl, mlp = _group_loss(vlm, parts, layer, group, delta, references, g)
                if step == 0:
                    norms.append(mlp)
                loss = nll / len(rows) + (fit.kl_weight * kl / len(kl_rows) if kl_rows else 0.0)
                if step < fit.steps:
                    grad += torch.autograd.grad(loss, [delta])[0]
                nll_total += float(nll.detach())
                kl_total += float(kl.detach()) if kl_rows else 0.0
            norm = torch.cat(norms).float().norm(dim=-1).mean().clamp(min=1e-6)
            nll_value, kl_value = nll_total / len(rows), kl_total / max(len(kl_rows), 1)
            if step == 0:
                start_nll = nll_value
            if nll_value < fit.stop_nll or step == fit.steps:
                break
            decay = fit.weight_decay * delta.norm() ** 2 / norm**2
            delta.grad = grad + torch.autograd.grad(decay, [delta])[0]
            optimiser.step()
            with torch.no_grad():
                delta.mul_(torch.clamp(fit.clamp * norm / delta.norm().clamp(min=1e-12), max=1.0))
    record = {
        "nll_before": start_nll,
        "nll_after": nll_value,
        "kl": kl_value,
        "steps": step,
        "delta_norm": float(delta.detach().norm()),
        "mlp_norm": float(norm),
    }
    return delta.detach().float().cpu(), record


def _group_loss(
    vlm: VLM,
    parts: Parts,
    layer: int,
    group: Sequence[tuple[Row, str]],
    delta: torch.Tensor,
    references: list[torch.Tensor | None],
    index: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed NLL of the edit rows, summed KL of the KL rows, and the MLP outputs at the keys."""
    width = max(row.length for row, _ in group)
    where = torch.tensor([width - row.length + row.key for row, _ in group])
    seen: dict[str, torch.Tensor] = {}

    def add(module, args, output):
        out = output_of(output)
        seen["mlp"] = out[torch.arange(len(group)), where.to(out.device)].detach()
        edited = out.clone()
        edited[torch.arange(len(group)), where.to(out.device)] += delta.to(out.dtype)
        return (edited, *output[1:]) if isinstance(output, tuple) else edited

    with hooks((parts.mlps[layer], add, False)):
        logits, _ = forward_rows(vlm, [row.inputs for row, _ in group])
    nll = logits.new_zeros((), dtype=torch.float32)
    kl_parts = []
    for i, (row, role) in enumerate(group):
        if role == "edit":
            nll = nll + answer_nll(logits[i], row.answer)
        else:
            kl_parts.append(torch.log_softmax(logits[i, int(where[i])].float(), dim=-1))
    kl = logits.new_zeros((), dtype=torch.float32)
    if kl_parts:
        current = torch.stack(kl_parts)
        if references[index] is None:
            references[index] = current.detach()
        reference = references[index]
        kl = torch.sum(reference.exp() * (reference - current))
    return nll, kl, seen["mlp"]


def answer_nll(logits: torch.Tensor, answer: Sequence[int]) -> torch.Tensor:
    """Mean -log P of the answer tokens, teacher-forced at the end of one row's logits (the row
    holds all answer tokens but the last after the prompt, so its last len(answer) positions
    predict them)."""
    log_probs = torch.log_softmax(logits[-len(answer) :].float(), dim=-1)
    return -log_probs[torch.arange(len(answer)), torch.tensor(answer, device=logits.device)].mean()
