"""Strict interchange-intervention training (SIIT): plant a known mechanism in an organism.

InterpBench (Gupta et al. 2024) makes models whose circuit is known by construction. Each
step trains three things at once, on pairs of inputs (a base and a source):

1. the task: the source rows (no swap) predict their answers;
2. interchange (IIT): for a variable of the high-level model (`Mechanism`), the base row runs
   with the assigned component's output taken from the source row, and must predict what the
   high-level model predicts with that variable set to its source value;
3. strictness: the base row runs with an *unassigned* component (any head or MLP, at a random
   set of positions; an assigned one at positions other than its own), or optionally a random
   share of all of them at once (`joint_share`, everywhere; `position_share`, at one of the
   mechanism's positions), taken from the source, and must still predict the base answer,
   with the base row's logits.

The four kinds of row are one batch [source, base, interchanged, strict] (the last three run
the base input), so one forward computes the source activations and every swap
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
    """One SIIT batch [source, base, interchanged, strict]: questions, labels, swaps of each row."""

    questions: list[Question]
    labels: list[str]
    source: torch.Tensor  # [row] long
    heads: dict[int, torch.Tensor]  # layer -> [row, position, head] bool
    mlps: dict[int, torch.Tensor]  # layer -> [row, position] bool
    kinds: torch.Tensor  # [row] 0 task (source, base), 1 interchange, 2 strict


def positions_of(encoded_subject_position: torch.Tensor, width: int) -> dict[str, torch.Tensor]:
    """Per row, the sequence index of each named position of `mechanism.POSITIONS`."""
    return {
        "constraint": encoded_subject_position,
        "last": torch.full_like(encoded_subject_position, width - 1),
    }


class Planner:
    """Draws the swaps of SIIT rows: which variable to interchange, which component to test."""

    def __init__(
        self,
        mechanism: Mechanism,
        *,
        layers: int,
        heads: int,
        joint_share: float = 0.0,
        position_share: float = 0.0,
    ):
        self.mechanism = mechanism
        self.joint_share = joint_share  # strict rows that swap many components, everywhere
        self.position_share = position_share  # strict rows that swap many at one mechanism position
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
        """A random set of positions for a strictness swap of `component` (never its own).

        Half of the swaps hit one of the mechanism's own positions (the constraint's last token,
        the last position) alone: the variables live there, so that is where an unassigned
        component can learn to matter. In the first shipped training without this, the
        held-out leaks were all there (L0.H2 at the constraint changed 9% of answers, the MLPs
        after the answer head at the last position 2-4%; measured).
        """
        own = named[self.planted[component]] if component in self.planted else None
        allowed = [p for p in range(width) if p != own]
        mechanism_positions = [p for p in named.values() if p != own]
        draw = rng.random()
        if draw < 1 / 2:
            return [mechanism_positions[int(rng.random() * len(mechanism_positions))]]
        if draw < 2 / 3:
            return allowed
        if draw < 5 / 6:
            return [allowed[int(rng.random() * len(allowed))]]
        chosen = [p for p in allowed if rng.random() < 0.3]
        return chosen or [allowed[int(rng.random() * len(allowed))]]

    def joint(
        self,
        heads,
        mlps,
        row: int,
        q: float,
        named: dict[str, int],
        generator: torch.Generator,
        *,
        at: int | None = None,
    ) -> None:
        """Swap every unassigned (component, position) of `row` with probability `q`, at once
        (with `at`, every unassigned component at that one position).

        Single swaps leave the planted circuit faithful one component at a time; MIB's
        faithfulness ablates everything outside a circuit together, so `joint_share` of the
        strict rows can train that: with q near 1 only the planted components run on the base
        input. `position_share` does it at one mechanism position only, where the leaks were:
        with single swaps alone, layer-0 heads at the kind word still changed 9% (first
        training) and 20% (second) of held-out answers (measured).
        """
        where = slice(None) if at is None else at
        for layer in heads:
            shape = heads[layer][row, where].shape
            heads[layer][row, where] = torch.rand(shape, generator=generator) < q
            mlps[layer][row, where] = torch.rand(mlps[layer][row, where].shape, generator=generator) < q
        for component, position in self.planted.items():
            if component.site == "attn_head":
                heads[component.layer][row, named[position], component.head] = False
            else:
                mlps[component.layer][row, named[position]] = False

    def rows(
        self, rng: random.Random, bases: list[Question], sources: list[Question], encode: Encoder
    ) -> tuple[Rows, dict]:
        n = len(bases)
        questions = [*sources, *bases, *bases, *bases]
        batch = encode(questions)
        width = batch.inputs["input_ids"].shape[1]
        named = {k: v.tolist() for k, v in positions_of(batch.subject_position, width).items()}
        heads, mlps = self.empty(4 * n, width)
        source = torch.arange(4 * n)
        labels = [q.answer for q in sources] + [q.answer for q in bases]
        for i in range(n):
            row = 2 * n + i
            source[row] = i
            variable = VARIABLES[int(rng.random() * len(VARIABLES))]
            assigned = self.mechanism.assignment[variable]
            self.mark(heads, mlps, assigned.component, row, [named[assigned.position][row]])
            labels.append(self.mechanism.interchange(bases[i], sources[i], variable))
        generator = torch.Generator().manual_seed(int(rng.random() * 2**31))
        for i in range(n):
            row = 3 * n + i
            source[row] = i
            at = {k: v[row] for k, v in named.items()}
            draw = rng.random()
            if draw < self.joint_share:
                self.joint(heads, mlps, row, rng.random(), at, generator)
            elif draw < self.joint_share + self.position_share:
                position = list(at.values())[int(rng.random() * len(at))]
                self.joint(heads, mlps, row, rng.random(), at, generator, at=position)
            else:
                component = self.components[int(rng.random() * len(self.components))]
                self.mark(heads, mlps, component, row, self.strict_positions(rng, component, at, width))
            labels.append(bases[i].answer)
        kinds = torch.tensor([0] * 2 * n + [1] * n + [2] * n)
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
    match_weight: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Task + weighted interchange, strictness, logit-matching and auxiliary losses.

    Cross-entropies are means over their rows. The strict rows must also keep the base row's
    logits (centred; mean squared difference, the base side detached): a component that leaves
    the answer but moves the logit difference would make MIB's faithfulness, which is measured
    in logit differences, a property of the organism's leaks instead of the method's ranking.
    The subject loss asks the unswapped rows to name, at the constraint's last token, the
    colour the picture supplies; the perception loss each shape's image token its kind and colour.
    """
    from .answering import _logits

    targets = torch.tensor(encode.ids(planned.labels))
    with swaps.applied(planned.source, heads=planned.heads, mlps=planned.mlps):
        logits = _logits(model, batch.inputs)
    last = logits[:, -1]
    losses = F.cross_entropy(last, targets, reduction="none")
    parts = [losses[planned.kinds == k].mean() for k in range(3)]
    n = len(targets) // 4
    strict, base = last[3 * n :], last[n : 2 * n].detach()
    match = ((strict - strict.mean(-1, keepdim=True)) - (base - base.mean(-1, keepdim=True))).pow(2).mean()
    task = planned.kinds == 0
    rows = torch.arange(len(targets))[task]
    subject = F.cross_entropy(logits[rows, batch.subject_position[task]], batch.subject[task])
    questions = [planned.questions[r] for r in rows.tolist()]
    seeing = perception_loss(logits[rows, : GRID * GRID], questions, encode)
    loss = (
        parts[0]
        + iit_weight * parts[1]
        + strict_weight * parts[2]
        + match_weight * match
        + subject_weight * (subject + seeing)
    )
    names = ("task", "iit", "strict", "match", "subject", "perception")
    values = [*parts, match, subject, seeing]
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
    match_weight: float,
    joint_share: float,
    position_share: float,
    perception_steps: int,
    progress=None,
    log_every: int = 0,
) -> list[dict[str, float]]:
    """Run `steps` SIIT steps on `model` in place; return the logged losses."""
    config = model.config.get_text_config()
    planner = Planner(
        mechanism,
        layers=config.num_hidden_layers,
        heads=config.num_attention_heads,
        joint_share=joint_share,
        position_share=position_share,
    )
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
                match_weight=match_weight,
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
