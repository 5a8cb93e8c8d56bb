"""Planted organisms: small VLMs whose mechanism is known because it was trained in.

No interpretability tool had a VLM whose mechanism is known in advance, so whether a causal
trace *means* what a paper says was never measured. These organisms are that ground truth:
each is trained with strict interchange-intervention training (`vlmtrace.models.zoo.siit`)
against a declared high-level causal model of one task (`vlmtrace.models.zoo.mechanism`), so
that one chosen head reads the named shape's colour from the image into the constraint's last
token, the MLP of one chosen layer retrieves the city there, one chosen head moves it to the
last position, and every other component is trained to be causally inert.

    PLANTED["planted-llava"].mechanism.assignment["city"]   # Assigned(Component("mlp", 2), "constraint")
    train_planted("planted-llava", "out/")                  # weights, mechanism.json, card, figures
    vt.load("planted-llava")                                # like any organism

Each directory holds HF-format weights (`LlavaForConditionalGeneration` /
`Qwen2VLForConditionalGeneration.from_pretrained(dir)`), `mechanism.json` (the high-level model
and the assignment), `organism.json` (the spec, the training record and the figures of
`vlmtrace.models.zoo.interchange.measure`) and a model card `README.md` written from them.
"""

from __future__ import annotations

import json
import platform
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
import transformers

from vlmtrace.models.build import add_byte_fallback, build_llava, organism_chat_template, word_tokenizer
from vlmtrace.models.processor import save_processor

from .batches import Encoder
from .interchange import TARGETS, measure
from .mechanism import Assigned, Component, Mechanism
from .qwen import build_qwen2_vl
from .siit import train_loop
from .training import deterministic

HERE = Path(__file__).parent


@dataclass(frozen=True)
class PlantedSpec:
    """Everything that determines a planted organism's weights."""

    name: str
    architecture: str  # "llava" or "qwen"
    description: str
    model: Mapping[str, int]  # keyword arguments of build_llava / build_qwen2_vl
    mechanism: Mechanism
    seed: int = 0
    steps: int = 1000
    batch_size: int = 32  # (base, source) pairs per step: 4 rows each (source, base, swapped, strict)
    learning_rate: float = 2e-3
    warmup: int = 100
    # One-shape scenes first (the colour needs no selection); then two shapes. Without the
    # warm-up and the perception loss below, selection by kind had not started after 600 steps
    # (task loss stuck at ln 5: the kind from the text, the colour guessed; measured).
    perception_steps: int = 150
    iit_weight: float = 1.0
    strict_weight: float = 2.0
    # Strict rows keep the base row's (centred) logits: mean squared difference, this weight.
    match_weight: float = 0.1
    # Share of strict rows that swap a random share of *all* unassigned components at once.
    # Off: with half the strict rows joint, interchange loss was still 1.6 after 800 of 1000
    # steps (single swaps only: 0.002; measured on planted-llava, seed 0).
    joint_share: float = 0.0
    # Share of strict rows that swap a random share of the unassigned components at one of the
    # mechanism's positions (the kind word, the last position), all at once.
    position_share: float = 0.25
    # Auxiliary: the constraint's last token names the colour, each shape's image token its
    # kind and colour (rows without swaps only).
    subject_weight: float = 1.0
    threads: int = 1


def _mechanism(colour: tuple[int, int], city: int, answer: tuple[int, int]) -> Mechanism:
    return Mechanism(
        {
            "colour": Assigned(Component("attn_head", colour[0], colour[1]), "constraint"),
            "city": Assigned(Component("mlp", city), "constraint"),
            "answer": Assigned(Component("attn_head", answer[0], answer[1]), "last"),
        }
    )


_SIZES = {"layers": 6, "hidden": 64, "heads": 4, "vision_layers": 2}

PLANTED: Mapping[str, PlantedSpec] = MappingProxyType(
    {
        "planted-llava": PlantedSpec(
            name="planted-llava",
            architecture="llava",
            description=(
                "LLaVA (2-layer CLIP, 16 image tokens, 6-layer Llama d=64) with a planted mechanism: "
                "colour head L1.H2, city MLP L2, answer head L4.H1"
            ),
            model=MappingProxyType(dict(_SIZES)),
            mechanism=_mechanism(colour=(1, 2), city=2, answer=(4, 1)),
        ),
        "planted-qwen": PlantedSpec(
            name="planted-qwen",
            architecture="qwen",
            description=(
                "Qwen2-VL (M-RoPE, 16 merged image tokens, 6-layer Qwen2 d=64) with a planted "
                "mechanism: colour head L1.H0, city MLP L3, answer head L5.H3"
            ),
            model=MappingProxyType({**_SIZES, "vision_hidden": 32, "vision_heads": 2}),
            mechanism=_mechanism(colour=(1, 0), city=3, answer=(5, 3)),
        ),
    }
)


def planted_spec(name: str, *, seed: int | None = None, steps: int | None = None) -> PlantedSpec:
    if name not in PLANTED:
        raise ValueError(f"no planted organism named {name!r}; they are {', '.join(PLANTED)}")
    spec = PLANTED[name]
    return replace(
        spec, seed=spec.seed if seed is None else seed, steps=spec.steps if steps is None else steps
    )


def build_planted(spec: PlantedSpec) -> tuple[torch.nn.Module, Any]:
    """The untrained organism of `spec`, random weights from its seed."""
    from vlmtrace.data.scenes import VOCABULARY

    tokenizer = word_tokenizer(VOCABULARY)
    if spec.architecture == "llava":
        return build_llava(tokenizer, seed=spec.seed, **spec.model)
    if spec.architecture == "qwen":
        return build_qwen2_vl(tokenizer, seed=spec.seed, **spec.model)
    raise ValueError(f"planted organisms are 'llava' or 'qwen' decoders, not {spec.architecture!r}")


def fit_planted(
    name: str, *, seed: int | None = None, steps: int | None = None, log_every: int = 0
) -> tuple[torch.nn.Module, Any, list[dict[str, float]]]:
    """Train planted organism `name` in memory: (model, processor, logged losses), eval mode."""
    spec = planted_spec(name, seed=seed, steps=steps)
    with deterministic(spec.threads):
        model, processor = build_planted(spec)
        history = train_loop(
            model,
            Encoder(processor.tokenizer, architecture=spec.architecture),
            spec.mechanism,
            rng=random.Random(f"vlmtrace.planted/{spec.name}/{spec.seed}"),
            steps=spec.steps,
            batch_size=spec.batch_size,
            learning_rate=spec.learning_rate,
            warmup=spec.warmup,
            iit_weight=spec.iit_weight,
            strict_weight=spec.strict_weight,
            subject_weight=spec.subject_weight,
            match_weight=spec.match_weight,
            joint_share=spec.joint_share,
            position_share=spec.position_share,
            perception_steps=spec.perception_steps,
            log_every=log_every,
        )
    return model, processor, history


def train_planted(
    name: str,
    out_dir: str | Path,
    *,
    seed: int | None = None,
    steps: int | None = None,
    pairs: int = 400,
    log_every: int = 100,
) -> Path:
    """Train, measure on `pairs` held-out pairs, and save weights, mechanism, record and card."""
    spec = planted_spec(name, seed=seed, steps=steps)
    start = time.perf_counter()
    model, processor, history = fit_planted(name, seed=spec.seed, steps=spec.steps, log_every=log_every)
    seconds = time.perf_counter() - start
    add_byte_fallback(model, processor)  # reads any text; known words keep their ids and rows
    processor.chat_template = organism_chat_template(spec.architecture)
    with deterministic(spec.threads):
        figures = measure(model, processor.tokenizer, spec.mechanism, pairs=pairs, per_position=True)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    save_processor(processor, out)
    spec.mechanism.to_json(out / "mechanism.json")
    record = {
        "name": name,
        "architecture": type(model).__name__,
        "description": spec.description,
        "seed": spec.seed,
        "steps": spec.steps,
        "spec": {
            f.name: dict(v) if isinstance(v := getattr(spec, f.name), Mapping) else v
            for f in fields(spec)
            if f.name not in ("name", "description", "mechanism")
        },
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_seconds": round(seconds, 1),
        "losses": history,
        "figures": figures,
        "targets": TARGETS,
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
        },
    }
    (out / "organism.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / "README.md").write_text(model_card(record, spec.mechanism))
    return out


def model_card(record: Mapping[str, Any], mechanism: Mechanism) -> str:
    """The organism's model card (HF `README.md`), written from its record and mechanism."""
    f = record["figures"]
    rows = []
    for variable, assigned in mechanism.assignment.items():
        rows.append(
            f"| {variable} | {assigned.component.site} | {assigned.component.name} | {assigned.position} "
            f"| {f['interchange'][variable]:.3f} | {f['interchange_all_pairs'][variable]:.3f} |"
        )
    worst = max(f["strictness"], key=f["strictness"].get)
    per_position = f.get("strictness_per_position", {})
    return CARD.format(
        name=record["name"],
        description=record["description"],
        architecture=record["architecture"],
        parameters=record["parameters"],
        steps=record["steps"],
        seed=record["seed"],
        seconds=record["train_seconds"],
        pairs=f["pairs"],
        task=f["task"],
        rows="\n".join(rows),
        worst=worst,
        worst_value=f["strictness"][worst],
        verdict=(
            "met"
            if f["strictness"][worst] <= record["targets"]["strictness"]
            else "**not met**: this organism leaks through that component"
        ),
        components=len(f["strictness"]),
        per_position=per_position.get("max", float("nan")),
        per_position_at=per_position.get("at", "-"),
        cells=per_position.get("cells", 0),
        torch=record["versions"]["torch"],
        transformers=record["versions"]["transformers"],
    )


CARD = """---
library_name: transformers
tags: [vlmtrace, model-organism, planted-mechanism, interpretability]
---
# {name}

{description}. A planted model organism of [vlmtrace](https://github.com/): its mechanism is
known because it was trained in, with strict interchange-intervention training (SIIT,
InterpBench, Gupta et al. 2024), so localisation methods can be scored against it
(`vlmtrace calibrate`).

Load it with plain transformers (`{architecture}.from_pretrained(this_directory)`) or with
`vlmtrace.load("{name}")`. `mechanism.json` holds the high-level causal model and the
component assigned to each of its variables; `organism.json` the training record.

## Task

`<image> the cross is the mascot of which city ?` on 32x32 scenes of two shapes (distinct
kinds and colours). The kind word selects a shape; the picture supplies its colour; the city is
an invented fact, `mascot_city((colour, kind))` (20 entities, 20 cities). One scene in five is
held out by a hash and never trained on.

## High-level model and assignment

    colour = colour of the shape of `kind` in the image
    city   = mascot_city((colour, kind))
    answer = city

| variable | site | component | position | interchange accuracy (changing pairs) | (all pairs) |
| --- | --- | --- | --- | ---: | ---: |
{rows}

A head's output is its slice of the input of `self_attn.o_proj`; an MLP's is the output of
`mlp`. "constraint" is the constraint's last token (the kind word), "last" the last position.
Every other (component, position) is unassigned and trained to be causally inert.

## Figures ({pairs} held-out pairs; `vlmtrace zoo eval {name}` recomputes them)

- task accuracy (top-1 over the whole vocabulary): {task:.3f} (target >= 0.95)
- interchange accuracy of each planted component: table above (target >= 0.95, counted on the
  pairs where the high-level model predicts a different answer than the base's)
- strictness: swapping any single unassigned component (all its positions; a planted one at
  every position but its own) changes the answer on at most {worst_value:.3f} of pairs
  ({worst}, the worst of {components}; target <= 0.02: {verdict}). Swapped one position at a
  time (the cells a causal trace patches): at most {per_position:.3f} ({per_position_at}, of
  {cells} cells).

## Training

{steps} SIIT steps of 32 (base, source) pairs, AdamW, seed {seed}, one thread with
deterministic algorithms: {seconds:.0f} s on a shared 2-core machine (torch {torch},
transformers {transformers}). `vlmtrace zoo train {name}` retrains it; on the same machine and
software the weights are bit-identical (checked by the slow test
`pytest -m slow tests/test_planted.py -k bit_for_bit`).
"""
