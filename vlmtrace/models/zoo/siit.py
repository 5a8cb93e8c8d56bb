"""Strict interchange-intervention training (SIIT): plant a known mechanism in an organism.

InterpBench (Gupta et al. 2024) makes models whose circuit is known by construction. Each
step trains three things at once, on pairs of inputs (a base and a source):

1. the task: the source rows (no swap) predict their answers;
2. interchange (IIT): for a variable of the high-level model (`Mechanism`), the base row runs
   with the assigned component's output taken from the source row, and must predict what the
   high-level model predicts with that variable set to its source value;
3. strictness: the base row runs with an *unassigned* component (any head or MLP, at a random
   set of positions; an assigned one at positions other than its own) taken from the source,
   and must still predict the base answer.

The three kinds of row are one batch [source, interchanged, strict] (the last two run the base
input), so one forward computes the source activations and every swap
(`vlmtrace.models.zoo.swaps`). Two auxiliary losses on the source rows make the picture
readable early (without them selection by kind had not started after 600 steps): the
constraint's last token names the colour, and each shape's image token its kind and colour. Like the other
organisms, training is a pure function of the spec: questions from a seeded `random.Random`,
weights from `torch.manual_seed`, one thread and deterministic kernels.

    model, processor = fit_planted(PLANTED["planted-llava"], steps=20)
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vlmtrace.data.drawing import COLOURS, GRID, KINDS
from vlmtrace.data.planted import ask_planted
from vlmtrace.data.scenes import Question

from .batches import Encoder
from .mechanism import VARIABLES, Component, Mechanism
from .swaps import Swaps


@dataclass(frozen=True)
class Rows:
    """One SIIT batch [source, interchanged, strict]: questions, labels, swaps of each row."""

    questions: list[Question]
    labels: list[str]
    source: torch.Tensor  # [row] long
    heads: dict[int, torch.Tensor]  # layer -> [row, position, head] bool
    mlps: dict[int, torch.Tensor]  # layer -> [row, position] bool
    kinds: torch.Tensor  # [row] 0 task, 1 interchange, 2 strict


def positions_of(encoded_subject_position: torch.Tensor, width: int) -> dict[str, torch.Tensor]:
    """Per row, the sequence index of each named position of `mechanism.POSITIONS`."""
    return {
        "constraint": encoded_subject_position,
        "last": torch.full_like(encoded_subject_position, width - 1),
    }


class Planner:
    """Draws the swaps of SIIT rows: which variable to interchange, which component to test."""

    def __init__(self, mechanism: Mechanism, *, layers: int, heads: int):
        self.mechanism = mechanism
        self.layers, self.n_heads = layers, heads
        self.components = Mechanism.components(layers=layers, heads=heads)
        self.planted = mechanism.planted()

    def empty(self, rows: int, width: int) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        heads = {
            layer: torch.zeros(rows, width, self.n_heads, dtype=torch.bool) for layer in range(self.layers)
        }
        mlps = {layer: torch.zeros(rows, width, dtype=torch.bool) for layer in range(self.layers)}
        return heads, mlps

    @staticmethod
    def mark(heads, mlps, component: Component, row: int, positions: Sequence[int]) -> None:
        index = list(positions)
        if component.site == "attn_head":
            heads[component.layer][row, index, component.head] = True
        else:
            mlps[component.layer][row, index] = True

    def strict_positions(self, rng: random.Random, component: Component, named: dict[str, int], width: int):
        """A random set of positions for a strictness swap of `component` (never its own)."""
        own = named[self.planted[component]] if component in self.planted else None
        allowed = [p for p in range(width) if p != own]
        draw = rng.random()
        if draw < 1 / 3:
            return allowed
        if draw < 2 / 3:
            return [allowed[int(rng.random() * len(allowed))]]
        chosen = [p for p in allowed if rng.random() < 0.3]
        return chosen or [allowed[int(rng.random() * len(allowed))]]

    def rows(
        self, rng: random.Random, bases: list[Question], sources: list[Question], encode: Encoder
    ) -> tuple[Rows, dict]:
        n = len(bases)
        questions = [*sources, *bases, *bases]
        batch = encode(questions)
        width = batch.inputs["input_ids"].shape[1]
        named = {k: v.tolist() for k, v in positions_of(batch.subject_position, width).items()}
        heads, mlps = self.empty(3 * n, width)
        source = torch.arange(3 * n)
        labels = [q.answer for q in sources]
        for i in range(n):
            row = n + i
            source[row] = i
            variable = VARIABLES[int(rng.random() * len(VARIABLES))]
            assigned = self.mechanism.assignment[variable]
            self.mark(heads, mlps, assigned.component, row, [named[assigned.position][row]])
            labels.append(self.mechanism.interchange(bases[i], sources[i], variable))
        for i in range(n):
            row = 2 * n + i
            source[row] = i
            component = self.components[int(rng.random() * len(self.components))]
            at = {k: v[row] for k, v in named.items()}
            self.mark(heads, mlps, component, row, self.strict_positions(rng, component, at, width))
            labels.append(bases[i].answer)
        kinds = torch.tensor([0] * n + [1] * n + [2] * n)
        used_heads = {k: v for k, v in heads.items() if v.any()}
        used_mlps = {k: v for k, v in mlps.items() if v.any()}
        return Rows(questions, labels, source, used_heads, used_mlps, kinds), batch


def siit_loss(
    model: torch.nn.Module,
    swaps: Swaps,
    planned: Rows,
    batch,
    encode: Encoder,
    *,
    iit_weight: float,
    strict_weight: float,
    subject_weight: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Task + weighted interchange, strictness and subject cross-entropy, each a mean over its rows.

    The subject loss asks the unswapped rows to name, at the constraint's last token, the
    colour the picture supplies: the colour variable's value where its head writes it.
    """
    from .answering import _logits

    targets = torch.tensor(encode.ids(planned.labels))
    with swaps.applied(planned.source, heads=planned.heads, mlps=planned.mlps):
        logits = _logits(model, batch.inputs)
    losses = F.cross_entropy(logits[:, -1], targets, reduction="none")
    parts = [losses[planned.kinds == k].mean() for k in range(3)]
    task = planned.kinds == 0
    rows = torch.arange(len(targets))[task]
    subject = F.cross_entropy(logits[rows, batch.subject_position[task]], batch.subject[task])
    questions = [planned.questions[r] for r in rows.tolist()]
    seeing = perception_loss(logits[rows, : GRID * GRID], questions, encode)
    loss = parts[0] + iit_weight * parts[1] + strict_weight * parts[2] + subject_weight * (subject + seeing)
    names = ("task", "iit", "strict", "subject", "perception")
    values = [*parts, subject, seeing]
    return loss, {name: float(p.detach()) for name, p in zip(names, values, strict=True)}


def perception_loss(logits: torch.Tensor, questions: list[Question], encode: Encoder) -> torch.Tensor:
    """At the image token of each shape, name its kind (among the kinds) and its colour (among
    the colours): the picture's tokens must say what the colour head is to select and read."""
    kinds, colours = torch.tensor(encode.ids(list(KINDS))), torch.tensor(encode.ids(list(COLOURS)))
    rows, cells, kind, colour = [], [], [], []
    for r, q in enumerate(questions):
        for shape in q.scene:
            rows.append(r)
            cells.append(shape.cell[0] * GRID + shape.cell[1])
            kind.append(KINDS.index(shape.kind))
            colour.append(list(COLOURS).index(shape.colour))
    at = logits[rows, cells]
    named_kind = F.cross_entropy(at[:, kinds], torch.tensor(kind))
    return named_kind + F.cross_entropy(at[:, colours], torch.tensor(colour))


def draw_questions(rng: random.Random, n: int, *, objects: int = 2) -> list[Question]:
    return [ask_planted(rng, split="train", objects=objects) for _ in range(n)]


def schedule(steps: int, warmup: int):
    warmup = min(warmup, max(steps // 10, 1))

    def factor(step: int) -> float:
        return min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))

    return factor


def train_loop(
    model: torch.nn.Module,
    encode: Encoder,
    mechanism: Mechanism,
    *,
    rng: random.Random,
    steps: int,
    batch_size: int,
    learning_rate: float,
    warmup: int,
    iit_weight: float,
    strict_weight: float,
    subject_weight: float,
    perception_steps: int,
    progress=None,
    log_every: int = 0,
) -> list[dict[str, float]]:
    """Run `steps` SIIT steps on `model` in place; return the logged losses."""
    config = model.config.get_text_config()
    planner = Planner(mechanism, layers=config.num_hidden_layers, heads=config.num_attention_heads)
    swaps = Swaps(model)
    optimiser = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, schedule(steps, warmup))
    history = []
    model.train()
    with progress or nullcontext():
        for step in range(steps):
            objects = 1 if step < perception_steps else 2
            bases = draw_questions(rng, batch_size, objects=objects)
            sources = draw_questions(rng, batch_size, objects=objects)
            planned, batch = planner.rows(rng, bases, sources, encode)
            loss, parts = siit_loss(
                model,
                swaps,
                planned,
                batch,
                encode,
                iit_weight=iit_weight,
                strict_weight=strict_weight,
                subject_weight=subject_weight,
            )
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimiser.step()
            scheduler.step()
            if log_every and step % log_every == 0:
                history.append({"step": step, **parts})
                print(step, {k: round(v, 3) for k, v in parts.items()}, flush=True)
    model.eval()
    return history
