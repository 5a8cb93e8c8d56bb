"""Held-out accuracy of an organism, per question family.

The accuracy targets of the zoo (visual >= 0.95, fact >= 0.95, multi >= 0.90) are claims
about scenes the organism never saw: questions come from the "test" split, whose scenes are
disjoint from training's by construction (`vlmtrace.data.drawing.split_of`), and are scored
through the HF processor, as a user would.

    evaluate("shapes-llava", n=400)   # {'visual': 0.99, 'fact': 0.99, 'multi': 0.97, 'named': 1.0}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    BlipForQuestionAnswering,
    LlavaForConditionalGeneration,
    Qwen2VLForConditionalGeneration,
)

from vlmtrace.data.scenes import FAMILIES, make_samples
from vlmtrace.models.processor import load_processor
from vlmtrace.presentation.progress import progress_bar

from .answering import accuracy
from .organisms import ORGANISMS, organism_dir

EVAL_SEED = 0  # held-out questions are the same for every evaluation
TARGETS = {"visual": 0.95, "fact": 0.95, "multi": 0.90}  # held-out accuracy the zoo promises


def load_organism(name_or_dir: str | Path) -> tuple[torch.nn.Module, Any]:
    """(model, processor) of a shipped organism name or of a directory `train` wrote."""
    from .planted import PLANTED

    shipped = str(name_or_dir) in ORGANISMS or str(name_or_dir) in PLANTED
    path = organism_dir(str(name_or_dir)) if shipped else Path(name_or_dir)
    if not (path / "config.json").exists():
        raise FileNotFoundError(
            f"{path} holds no organism (no config.json); pass one of {', '.join([*ORGANISMS, *PLANTED])} "
            "or a directory written by `vlmtrace zoo train`"
        )
    architecture = AutoConfig.from_pretrained(path).architectures[0]
    organisms = (LlavaForConditionalGeneration, BlipForQuestionAnswering, Qwen2VLForConditionalGeneration)
    classes = {c.__name__: c for c in organisms}
    if architecture not in classes:
        raise ValueError(f"{path} holds a {architecture}; organisms are {sorted(classes)}")
    model = classes[architecture].from_pretrained(path, attn_implementation="eager").eval()
    return model, load_processor(path)  # Qwen's is image-only here (no torchvision)


def held_out_accuracy(
    model: torch.nn.Module, processor: Any, *, n: int = 400, progress: bool = False
) -> dict[str, float]:
    """Accuracy on `n` held-out questions of each family (argmax over the whole vocabulary).

    With `progress`, a bar advances once per family (each is scored in the same batches as
    without it, so the numbers do not change).
    """
    accuracies = {}
    with progress_bar(progress, "held-out accuracy") as bar:
        task = bar.add_task(f"{n} questions per family", total=len(FAMILIES))
        for family in FAMILIES:
            samples = make_samples(family, n, seed=EVAL_SEED, split="test")
            accuracies[family] = accuracy(model, processor, samples)
            bar.advance(task)
    return accuracies


def evaluate(name_or_dir: str | Path, *, n: int = 400, progress: bool = False) -> dict[str, float]:
    """Load an organism (shipped name or directory) and measure its held-out accuracy."""
    model, processor = load_organism(name_or_dir)
    return held_out_accuracy(model, processor, n=n, progress=progress)
