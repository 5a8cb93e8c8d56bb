"""The engine's invariants, checked on whatever model is loaded: trust, but verify.

A batched, padded, layout-indexed forward can be wrong in ways no error reveals: a model that
recomputes positions, a mask the family drops, a tensor whose first dimension is not the batch.
Each such bug makes some invariant fail that holds for any correct engine on any model:

- a padded row scores exactly what it scores alone;
- restoring every position at the first layer gives the clean score;
- an empty patch gives the corrupted score;
- all heads together equal the attention site;
- noise leaves the clean row untouched.

    report = vt.check(vlm)          # or: vlmtrace check llava-hf/llava-1.5-7b-hf
    print(report)                   # one line per invariant: ok / FAILED, with both values

Above them all: the engine's clean and corrupted rows equal the model's own forward of the
same prompt and image (`vlmtrace.engine.native`, no vlmtrace code on that path), and padded
rows equal it too. Tolerances are in nats, by dtype (`self_check.LOG_TOLERANCE`). Every sweep
checks its own baseline rows the same way, at no extra forward (`vlmtrace.engine.self_check`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..data.sample import Sample
from ..models.load import VLM
from .corruptions import GaussianNoise, ReplaceSpan
from .forward import Edits, Scoring, run, run_probed, stack_rows
from .metrics import LogProb, Metric
from .native import native_log_probs
from .self_check import TOP_TOKENS, SelfCheckError, log_tolerance

__all__ = ["Invariant", "Report", "SelfCheckError", "check", "probe_sample"]


def close(a: float, b: float, tol: float) -> bool:
    """Equal within `tol`, in the units of log-probability (the invariants score by `LogProb`)."""
    return abs(a - b) <= tol


def unbatched(vlm: VLM, stack, prepared, side: str, metric: Metric, backend: Any, draw: int = 0) -> float:
    """The metric of one side of a sample, alone in its batch: no padding, no other rows."""
    from .planning import baseline_edits

    encoded = prepared.pair.clean if side == "clean" else prepared.pair.corrupt
    widths = {s: len(encoded.inputs[ids]) for s, (ids, _) in _sequences().items() if ids in encoded.inputs}
    batch = stack_rows(vlm, [encoded.inputs], widths)
    edits = baseline_edits(vlm, prepared, [side], [draw], padded=False) if side == "corrupt" else Edits()
    return scored(vlm, stack, prepared, batch, edits, metric, backend)[0]


def scored(vlm: VLM, stack, prepared, batch: dict, edits: Edits, metric: Metric, backend: Any) -> list[float]:
    """The metric of every row of one batched forward of `prepared`'s sample with `edits`."""
    values = run(
        vlm,
        stack,
        batch,
        edits,
        metric=metric,
        answer=prepared.answer,
        foil=prepared.foil,
        answer_slice=prepared.answer_slice(vlm),
        backend=backend,
    )
    return values.tolist()


def _baseline_rows(vlm: VLM, stack, prepared, metric: Metric, backend: Any) -> list[float]:
    """The sweep's baseline rows (clean, then every noise draw), batched and padded as a chunk
    pads them, scored by `metric`."""
    from .planning import baseline_edits

    k = prepared.pair.samples
    inputs = ["clean"] + ["corrupt"] * k
    edits = baseline_edits(vlm, prepared, inputs, [0, *range(k)])
    batch = stack_rows(vlm, prepared.rows(inputs), prepared.widths)
    return scored(vlm, stack, prepared, batch, edits, metric, backend)


def _sequences() -> dict:
    from .forward import SEQUENCE_FIELDS

    return SEQUENCE_FIELDS


@dataclass(frozen=True)
class Invariant:
    """One invariant's outcome on one model."""

    name: str
    ok: bool
    got: float
    expected: float
    detail: str = ""

    def __str__(self) -> str:
        status = "ok" if self.ok else "FAILED"
        return f"{status:6} {self.name}: {self.got:.6g} vs {self.expected:.6g} {self.detail}".rstrip()


@dataclass(frozen=True)
class Report:
    model: str
    family: str
    invariants: tuple[Invariant, ...]

    @property
    def ok(self) -> bool:
        return all(invariant.ok for invariant in self.invariants)

    def __str__(self) -> str:
        lines = [f"vlmtrace check {self.model} ({self.family})"]
        lines += [f"  {invariant}" for invariant in self.invariants]
        lines.append(
            "all invariants hold" if self.ok else "SOME INVARIANTS FAILED: do not trust this model's traces"
        )
        return "\n".join(lines)


def probe_sample(vlm: VLM, *, image_size: int = 64, seed: int = 0) -> Sample:
    """A sample any model can run: its own prompt format, a random image, a span to replace."""
    from ..prompts import build_prompt

    pixels = np.random.RandomState(seed).randint(0, 256, size=(image_size, image_size, 3), dtype=np.uint8)
    question = "which city did this shape represent in year 2006 ?"
    return Sample(
        prompt=build_prompt(vlm, question),
        answer="paris",
        image=Image.fromarray(pixels),
        spans={"visual": "this shape"},
        replacements={"visual": "the red circle"},  # one token longer: the clean row is padded
        id="probe",
    )


def check(vlm: VLM, sample: Sample | None = None, *, backend: Any = None) -> Report:
    """Run every invariant on `vlm` with `sample` (a probe sample by default); return the report.

    Every score is log P(answer), and every tolerance is in nats for the model's dtype
    (`self_check.LOG_TOLERANCE`), so a small probability cannot hide a difference.
    """
    from .planning import prepare

    sample = sample or probe_sample(vlm)
    stack_name = vlm.adapter.default_stack
    stack = vlm.adapter.stacks[stack_name]
    tol = log_tolerance(vlm)
    metric = LogProb()
    results = []

    prepared = prepare(vlm, sample, ReplaceSpan("visual"), metric, False)
    results += _against_the_model(vlm, stack, prepared, tol, backend)
    values = _rows(vlm, stack, prepared, Edits(), metric, backend)
    for side, got in (("clean", values[0]), ("corrupt", values[1])):
        expected = unbatched(vlm, stack, prepared, side, metric, backend)
        padded = prepared.pad(side, stack.sequence) > 0
        results.append(
            Invariant(
                f"a {'padded ' if padded else ''}{side} row scores what it scores alone",
                close(got, expected, tol),
                got,
                expected,
            )
        )

    same = _same_length_replacement(vlm, sample)
    if same is None:
        results.append(
            Invariant(
                "restoring every position at the first layer gives the clean score",
                False,
                float("nan"),
                float("nan"),
                "(no same-length replacement found)",
            )
        )
    else:
        aligned = prepare(
            vlm, sample.with_(replacements={"visual": same}), ReplaceSpan("visual"), metric, False
        )
        restore = Edits()
        for position in range(_width(aligned, stack)):
            restore.patch(0, "block").add(2, position, 0, position, None)
        values = _rows(vlm, stack, aligned, restore, metric, backend, patched="corrupt")
        results.append(
            Invariant(
                "restoring every position at the first layer gives the clean score",
                close(values[2], values[0], tol),
                values[2],
                values[0],
            )
        )

    empty = Edits()
    last = _width(prepared, stack) - 1
    empty.patch(0, "block").add(2, last, 2, last, None)  # a row's own activation: changes nothing
    values = _rows(vlm, stack, prepared, empty, metric, backend, patched="corrupt")
    results.append(
        Invariant(
            "an empty patch gives the corrupted score", close(values[2], values[1], tol), values[2], values[1]
        )
    )

    if "attn_head" in stack.sites and "attn" in stack.sites:
        heads, whole = Edits(), Edits()
        n_heads = vlm.shape.heads[stack_name]
        layer = vlm.shape.layers_with(stack_name, "attn")[0]
        for head in range(n_heads):
            heads.patch(layer, "attn_head").add(2, last, 0, last, head)
        whole.patch(layer, "attn").add(2, last, 0, last, None)
        with_heads = _rows(vlm, stack, prepared, heads, metric, backend, patched="corrupt")
        with_site = _rows(vlm, stack, prepared, whole, metric, backend, patched="corrupt")
        results.append(
            Invariant(
                f"all heads together equal the attention site (layer {layer})",
                close(with_heads[2], with_site[2], tol),
                with_heads[2],
                with_site[2],
                ""
                if abs(with_site[2] - with_site[1]) > tol
                else "(warning: the patch did not move the score)",
            )
        )

    if "image" in vlm.adapter.embeddings and sample.image is not None:
        noised = prepare(vlm, sample, GaussianNoise("image", samples=2), metric, False)
        values = _baseline_rows(vlm, stack, noised, metric, backend)  # clean, then two noise draws
        expected = unbatched(vlm, stack, noised, "clean", metric, backend)
        moved = abs(values[1] - values[0]) > tol
        results.append(
            Invariant(
                "noise leaves the clean row untouched",
                close(values[0], expected, tol),
                values[0],
                expected,
                "" if moved else "(warning: the noise did not move the corrupted rows)",
            )
        )
    return Report(vlm.name, vlm.adapter.family, tuple(results))


def _against_the_model(vlm: VLM, stack, prepared, tol: float, backend: Any) -> list[Invariant]:
    """The engine's clean and corrupted rows, batched together (the shorter one padded), against
    the model's own forward of each side's prompt and image, over the answer's token and the
    model's top tokens: the largest |log p(engine) - log p(model)|."""
    native = {
        side: native_log_probs(vlm, encoded.text, encoded.image, backend)
        for side, encoded in (("clean", prepared.pair.clean), ("corrupt", prepared.pair.corrupt))
    }
    ids = {int(prepared.answer[0])}
    for log_probs in native.values():
        ids |= set(torch.topk(log_probs, min(TOP_TOKENS, len(log_probs))).indices.tolist())
    ids = torch.tensor(sorted(ids))
    batch = stack_rows(vlm, prepared.rows(["clean", "corrupt"]), prepared.widths)
    scoring = [Scoring(0, 2, prepared.answer, None, prepared.answer_slice(vlm), ids, 2)]
    _, probed = run_probed(vlm, stack, batch, Edits(), metric=LogProb(), scoring=scoring, backend=backend)
    probed = probed.view(2, len(ids))
    results = []
    for row, side in enumerate(native):
        gap = float((probed[row] - native[side][ids]).abs().max())
        padded = "padded " if prepared.pad(side, stack.sequence) > 0 else ""
        answer = int(prepared.answer[0])
        results.append(
            Invariant(
                f"the {padded}{side} row equals the model's own forward (log P(answer); largest gap "
                f"over {len(ids)} tokens {gap:.2g} nats)",
                gap <= tol,
                float(probed[row, ids.tolist().index(answer)]),
                float(native[side][answer]),
            )
        )
    return results


def _width(prepared, stack) -> int:
    return prepared.widths[stack.sequence]


def _same_length_replacement(vlm: VLM, sample: Sample) -> str | None:
    """A phrase with as many tokens as the sample's visual span, so every position aligns."""

    def ids(text: str) -> list[int]:
        return vlm.tokenizer(" " + text, add_special_tokens=False).input_ids

    wanted = len(ids(sample.spans["visual"]))
    for candidate in ("that shape", "the circle", "this thing", "that thing", "the shape", "a shape"):
        found = ids(candidate)
        if len(found) == wanted and vlm.tokenizer.unk_token_id not in found:
            return candidate
    return None


def _rows(vlm, stack, prepared, edits, metric, backend, *, patched: str | None = None):
    """Metric of rows [clean, corrupt(, patched)] in one batched forward with `edits`."""
    inputs = ["clean", "corrupt"] + ([patched] if patched else [])
    batch = stack_rows(vlm, prepared.rows(inputs), prepared.widths)
    return scored(vlm, stack, prepared, batch, edits, metric, backend)
