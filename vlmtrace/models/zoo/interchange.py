"""How well a planted organism implements its mechanism, measured on held-out pairs.

Three figures make a planted organism trustworthy ground truth (InterpBench's checks):

- task accuracy: its top-1 answer is right on held-out questions;
- interchange accuracy of each assigned component: on held-out (base, source) pairs, swapping
  the component's output from the source run into the base run gives the answer the
  high-level model predicts for that variable (counted on the pairs where that prediction
  differs from the base answer, so an idle component cannot score);
- strictness of each unassigned component: swapping it (at every position; an assigned
  component at every position but its own) changes the top-1 answer on few pairs. With
  `per_position`, every (component, position) is also swapped alone, as a causal trace does.

    figures = measure(model, processor, mechanism, pairs=200)
    figures["interchange"]["city"], max(figures["strictness"].values())

Pairs are drawn from held-out scenes only (`vlmtrace.data.drawing.split_of`), the same for
the same seed, and scored with one batched forward per swap (`vlmtrace.models.zoo.swaps`).
"""

from __future__ import annotations

import random
from typing import Any

import torch

from vlmtrace.data.planted import ask_planted
from vlmtrace.data.scenes import Question

from .answering import _logits, architecture_of
from .batches import Encoder
from .mechanism import VARIABLES, Component, Mechanism
from .siit import positions_of
from .swaps import Swaps

EVAL_SEED = 0
TARGETS = {"task": 0.95, "interchange": 0.95, "strictness": 0.02}
"""Task and interchange accuracy at least, strictness (answers changed) at most."""


def held_out_pairs(n: int, *, seed: int = EVAL_SEED) -> list[tuple[Question, Question]]:
    """`n` (base, source) pairs of held-out questions."""
    rng = random.Random(f"vlmtrace.planted.pairs/{seed}")
    return [(ask_planted(rng, split="test"), ask_planted(rng, split="test")) for _ in range(n)]


class Scorer:
    """Top-1 answers of base rows with given components swapped in from their sources."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        pairs: list[tuple[Question, Question]],
        *,
        chunk: int = 256,
        rows: int = 1024,
    ):
        self.model = model
        self.encode = Encoder(tokenizer, architecture=architecture_of(model))
        self.swaps = Swaps(model)
        self.config = model.config.get_text_config()
        self.pairs = pairs
        self.chunk = chunk  # pairs per forward
        self.rows = rows  # rows per forward: the pairs' sources, then their bases once per swap set
        batch = self.encode([p[0] for p in pairs[:1]])
        self.width = batch.inputs["input_ids"].shape[1]
        self.named = {k: int(v[0]) for k, v in positions_of(batch.subject_position, self.width).items()}

    def top1(self, swaps: list[tuple[Component, list[int]]] | None) -> torch.Tensor:
        """[pair] top-1 token of each base run, with each (component, positions) swapped from its source."""
        return self.top1_each([swaps or []])[0]

    @torch.no_grad()
    def top1_each(self, swap_sets: list[list[tuple[Component, list[int]]]]) -> list[torch.Tensor]:
        """`top1` of every swap set; sets share their source rows, several sets per forward."""
        results: list[list[torch.Tensor]] = [[] for _ in swap_sets]
        for start in range(0, len(self.pairs), self.chunk):
            part = self.pairs[start : start + self.chunk]
            n = len(part)
            per_forward = max(1, self.rows // n - 1)
            for first in range(0, len(swap_sets), per_forward):
                group = swap_sets[first : first + per_forward]
                rows = n * (1 + len(group))
                batch = self.encode([s for _, s in part] + [b for b, _ in part] * len(group))
                source = torch.arange(rows) % n
                heads: dict[int, torch.Tensor] = {}
                mlps: dict[int, torch.Tensor] = {}
                for j, swaps in enumerate(group):
                    base = slice(n * (1 + j), n * (2 + j))
                    for component, positions in swaps:
                        if component.site == "attn_head":
                            shape = (rows, self.width, self.config.num_attention_heads)
                            mask = heads.setdefault(component.layer, torch.zeros(shape, dtype=torch.bool))
                            mask[base, positions, component.head] = True
                        else:
                            mask = mlps.setdefault(
                                component.layer, torch.zeros(rows, self.width, dtype=torch.bool)
                            )
                            mask[base, positions] = True
                with self.swaps.applied(source, heads=heads, mlps=mlps):
                    top = _logits(self.model, batch.inputs)[:, -1].argmax(-1)
                for j in range(len(group)):
                    results[first + j].append(top[n * (1 + j) : n * (2 + j)])
        return [torch.cat(r) for r in results]

    def ids(self, words: list[str]) -> torch.Tensor:
        return torch.tensor(self.encode.ids(words))


def measure(
    model: torch.nn.Module,
    tokenizer: Any,
    mechanism: Mechanism,
    *,
    pairs: int = 200,
    seed: int = EVAL_SEED,
    per_position: bool = False,
) -> dict[str, Any]:
    """Task accuracy, interchange accuracy per variable, strictness per unassigned component."""
    drawn = held_out_pairs(pairs, seed=seed)
    scorer = Scorer(model, tokenizer, drawn)
    clean = scorer.top1(None)
    base_answers = scorer.ids([b.answer for b, _ in drawn])
    figures: dict[str, Any] = {"pairs": pairs, "task": float((clean == base_answers).float().mean())}
    interchange, interchange_all = {}, {}
    for variable in VARIABLES:
        assigned = mechanism.assignment[variable]
        predicted = scorer.ids([mechanism.interchange(b, s, variable) for b, s in drawn])
        got = scorer.top1([(assigned.component, [scorer.named[assigned.position]])])
        changing = predicted != base_answers
        interchange[variable] = float((got == predicted)[changing].float().mean())
        interchange_all[variable] = float((got == predicted).float().mean())
    figures["interchange"] = interchange
    figures["interchange_all_pairs"] = interchange_all
    planted = mechanism.planted()
    components = Mechanism.components(
        layers=scorer.config.num_hidden_layers, heads=scorer.config.num_attention_heads
    )
    allowed = {}
    for component in components:
        own = scorer.named[planted[component]] if component in planted else None
        allowed[component] = [p for p in range(scorer.width) if p != own]
    swapped = scorer.top1_each([[(c, allowed[c])] for c in components])
    strictness = {
        c.name: float((got != clean).float().mean()) for c, got in zip(components, swapped, strict=True)
    }
    if per_position:
        cells = [(c, p) for c in components for p in allowed[c]]
        swapped = scorer.top1_each([[(c, [p])] for c, p in cells])
        per_cell = {
            f"{c.name}@{p}": float((got != clean).float().mean())
            for (c, p), got in zip(cells, swapped, strict=True)
        }
    figures["strictness"] = strictness
    if per_position:
        worst = max(per_cell, key=per_cell.get)
        figures["strictness_per_position"] = {"max": per_cell[worst], "at": worst, "cells": len(per_cell)}
    return figures
