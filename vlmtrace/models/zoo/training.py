"""Train an organism from its spec, bit-identically from the same seed on the same machine.

The shipped weights are only trustworthy ground for testing recipes if anyone can rebuild
them, so training is a pure function of the spec and the seed: questions come from a seeded
`random.Random`, the weights from `torch.manual_seed`, and while training runs torch uses a
fixed number of threads and deterministic algorithms (the previous settings are restored
afterwards).

    model, processor = fit("shapes-llava", steps=20)              # in memory
    train("shapes-llava", "out/shapes-llava")                     # + held-out eval + save

Bit-identity holds on one machine and software stack: another CPU (other SIMD kernels) or
another torch version may round differently; `organism.json` records the versions used.
"""

from __future__ import annotations

import json
import math
import platform
import random
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import transformers
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from vlmtrace.data.drawing import IMAGE_SIZE, TEST_FRACTION
from vlmtrace.data.scenes import OBJECTS, VOCABULARY, Question, ask
from vlmtrace.models.build import (
    add_byte_fallback,
    build_blip,
    build_llava,
    organism_chat_template,
    word_tokenizer,
)
from vlmtrace.models.processor import save_processor

from .answering import batch_logits, unpadded_groups
from .batches import IGNORE, Encoder
from .evaluation import held_out_accuracy
from .organisms import ORGANISMS, OrganismSpec, organism_dir
from .qwen import build_qwen2_vl


@contextmanager
def deterministic(threads: int) -> Iterator[None]:
    """Fixed thread count and deterministic kernels for the duration of the block."""
    before = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(before[0])
        torch.use_deterministic_algorithms(before[1])


def spec_for(name: str, *, seed: int | None = None, steps: int | None = None) -> OrganismSpec:
    """The catalogue spec of `name`, with the seed or step count overridden."""
    organism_dir(name)  # raises a clear error for an unknown name
    spec = ORGANISMS[name]
    return replace(
        spec,
        seed=spec.seed if seed is None else seed,
        steps=spec.steps if steps is None else steps,
    )


def build(spec: OrganismSpec) -> tuple[torch.nn.Module, Any]:
    """The untrained organism of `spec`: random weights drawn from `spec.seed`."""
    tokenizer = word_tokenizer(VOCABULARY)
    if spec.architecture == "llava":
        return build_llava(tokenizer, seed=spec.seed, **spec.model)
    if spec.architecture == "qwen":
        return build_qwen2_vl(tokenizer, seed=spec.seed, **spec.model)
    # BLIP's text positions are absolute: right padding keeps them batch-independent.
    tokenizer.padding_side = "right"
    return build_blip(tokenizer, seed=spec.seed, **spec.model)


def _template(rng: random.Random, mixture: Mapping[str, float]) -> str:
    x = rng.random() * sum(mixture.values())
    for template, share in mixture.items():
        x -= share
        if x < 0:
            return template
    return template


def _questions(rng: random.Random, spec: OrganismSpec, step: int) -> list[Question]:
    """The training questions of one step: one-shape perception first, then the mixture."""
    if step < spec.perception_steps:
        return [
            ask(rng, _template(rng, spec.perception_mixture), split="train", objects=1)
            for _ in range(spec.batch_size)
        ]
    return [
        ask(
            rng,
            _template(rng, spec.mixture),
            split="train",
            objects=1 if rng.random() < spec.one_shape else None,
        )
        for _ in range(spec.batch_size)
    ]


def _loss(
    model: torch.nn.Module, encode: Encoder, questions: list[Question], spec: OrganismSpec
) -> torch.Tensor:
    """Answer cross-entropy plus the weighted subject cross-entropy, each a mean over questions.

    BLIP batches are split into groups of equal length, so that no BLIP input is ever padded
    (see `vlmtrace.models.zoo.answering.unpadded_groups` for why).
    """
    groups = unpadded_groups(questions) if spec.architecture == "blip" else [list(range(len(questions)))]
    answer, subject, subjects = 0.0, 0.0, 0
    for group in groups:
        batch = encode([questions[i] for i in group])
        answer_logits, subject_logits = batch_logits(model, batch)
        answer = answer + F.cross_entropy(answer_logits, batch.answer, reduction="sum")
        if subject_logits is not None and spec.subject_loss:
            subject = subject + F.cross_entropy(
                subject_logits, batch.subject, ignore_index=IGNORE, reduction="sum"
            )
            subjects += int((batch.subject != IGNORE).sum())
    return answer / len(questions) + spec.subject_loss * subject / max(subjects, 1)


def _schedule(spec: OrganismSpec) -> Any:
    warmup = min(spec.warmup, max(spec.steps // 10, 1))

    def factor(step: int) -> float:
        return min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / spec.steps))

    return factor


def fit(
    name: str, *, seed: int | None = None, steps: int | None = None, progress: bool = False
) -> tuple[torch.nn.Module, Any]:
    """Train organism `name` in memory and return (model, processor), in eval mode."""
    spec = spec_for(name, seed=seed, steps=steps)
    with deterministic(spec.threads):
        model, processor = build(spec)
        model.train()
        encode = Encoder(processor.tokenizer, architecture=spec.architecture)
        optimiser = torch.optim.AdamW(model.parameters(), lr=spec.learning_rate, weight_decay=0.01)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, _schedule(spec))
        rng = random.Random(f"vlmtrace.zoo/{spec.name}/{spec.seed}")
        bar = _progress() if progress else nullcontext()
        with bar:
            task = bar.add_task(f"training {name}", total=spec.steps) if progress else None
            for step in range(spec.steps):
                loss = _loss(model, encode, _questions(rng, spec, step), spec)
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimiser.step()
                scheduler.step()
                if progress:
                    bar.update(task, advance=1, description=f"training {name} loss {loss.item():.3f}")
        model.eval()
    return model, processor


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )


def train(
    name: str,
    out_dir: str | Path,
    *,
    seed: int | None = None,
    steps: int | None = None,
    progress: bool = True,
    held_out: int = 400,
) -> Path:
    """Train `name`, measure held-out accuracy on `held_out` questions per family, save.

    Writes an HF-format directory (safetensors weights, tokenizer, processor config) that
    `from_pretrained` loads, plus `organism.json`: the spec, seed, steps, data, training time,
    accuracies and software versions.
    """
    spec = spec_for(name, seed=seed, steps=steps)
    start = time.perf_counter()
    model, processor = fit(name, seed=spec.seed, steps=spec.steps, progress=progress)
    seconds = time.perf_counter() - start
    with deterministic(spec.threads):
        accuracies = held_out_accuracy(model, processor, n=held_out) if held_out else {}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    add_byte_fallback(model, processor)  # reads any text; known words keep their ids and rows
    processor.chat_template = organism_chat_template(spec.architecture)
    model.save_pretrained(out)
    save_processor(processor, out)  # Qwen's has no video processor (torchvision): saved image-only
    record = {
        "name": name,
        "architecture": type(model).__name__,
        "description": spec.description,
        "seed": spec.seed,
        "steps": spec.steps,
        "batch_size": spec.batch_size,
        "spec": {
            f.name: dict(v) if isinstance(v := getattr(spec, f.name), Mapping) else v
            for f in fields(spec)
            if f.name not in ("name", "description")
        },
        "parameters": sum(p.numel() for p in model.parameters()),
        "data": {
            "generator": "vlmtrace.data.scenes",
            "image_size": IMAGE_SIZE,
            "objects_per_scene": list(OBJECTS),
            "held_out_rule": f"crc32(scene) % {TEST_FRACTION} == 0 is test, never trained on",
            "vocabulary_size": len(processor.tokenizer),
        },
        "train_seconds": round(seconds, 1),
        "held_out_accuracy": {k: round(v, 4) for k, v in accuracies.items()},
        "held_out_questions_per_family": held_out,
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
        },
    }
    (out / "organism.json").write_text(json.dumps(record, indent=2) + "\n")
    return out
