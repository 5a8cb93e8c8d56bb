"""Every sweep checks itself against the model's own forward, for no extra forward of its own.

Each forward of a sweep starts every sample's rows with its baseline rows (clean, corrupted).
Those rows are already computed, so the trace also reads back a few log-probabilities of each
baseline row at the first answer position (`forward.Scoring.probes`), and:

- the first forward's most padded sample (padding is what batching adds to a row) is compared
  with the model's own forward of the same prompt and image (`native.native_log_probs`: the
  processor and `generate`, no vlmtrace code), clean side and, where the corruption is an
  input (a replaced phrase, an image pair; not noise added inside the trace), corrupted side,
  over the answer's token and the model's own top tokens;
- every later forward that carries a sample again (another chunk, a resumed prefix-reuse
  chunk, another packing) must give its baseline rows what the sample's first forward gave.

Tolerances are in nats (log-probability), by dtype, so a small P(answer) cannot hide an error:
two probabilities of 1e-4 and 2e-4 are 0.69 nats apart. A failure stops the sweep with
`SelfCheckError` naming the sample, the side, both values and the likely cause.

    check = SweepCheck(vlm, backend=None)
    ids = check.probes_for(sample_index, prepared, native=True)   # before the forward
    check.verify(sample_index, prepared, probed_rows)             # after it
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..models.load import VLM
from .native import native_log_probs

LOG_TOLERANCE = {torch.float64: 1e-7, torch.float32: 1e-4, torch.float16: 0.05, torch.bfloat16: 0.1}
"""Largest |log p(engine) - log p(model)| over the checked tokens, in nats, by dtype. In float32
every family agrees to <= 2.4e-7 (an M-RoPE model given 1-D positions is 2.8e-3 off on
shapes-qwen, 5.6e-4 on a tiny random Qwen2-VL); bfloat16 rows padded differently agree
exactly on a CPU, and 0.1 nats still catches a 15% error in P(answer) (0.14 nats). Not yet
measured on a GPU, where kernels differ with the batch shape."""

TOP_TOKENS = 8
"""The model's own most likely tokens checked besides the answer (and the foil)."""


class SelfCheckError(RuntimeError):
    """The engine disagrees with the model (or with itself) on this model: its numbers would be wrong."""


def log_tolerance(vlm: VLM, override: float | None = None) -> float:
    """The self-check's tolerance in nats for this model's dtype (or `override`)."""
    return override if override is not None else LOG_TOLERANCE.get(vlm.model.dtype, 1e-3)


class SweepCheck:
    """The checks of one sweep: which tokens each sample's baseline rows are probed at, and what
    they must equal (the model's own forward first, then the sample's first forward)."""

    def __init__(self, vlm: VLM, *, backend: Any = None, tolerance: float | None = None):
        self.vlm = vlm
        self.backend = backend
        self.tolerance = log_tolerance(vlm, tolerance)
        self.native_done = False
        self.ids: dict[int, torch.Tensor] = {}
        self.expected: dict[int, torch.Tensor] = {}
        """Sample -> the probes of its first forward's baseline rows, [baseline row, token]."""
        self.native: dict[int, dict[str, torch.Tensor]] = {}
        """The natively checked sample -> side -> the model's own log-probabilities."""
        self.worst = 0.0
        """Largest discrepancy with the model's own forward seen (provenance)."""

    def probes_for(self, sample: int, prepared: Any, *, native: bool) -> torch.Tensor:
        """Token ids to probe in `sample`'s baseline rows; with `native`, the model's own forward
        runs now (once per distinct input in a process) and its top tokens are probed too."""
        if sample in self.ids:
            return self.ids[sample]
        ids = [int(prepared.answer[0])]
        if prepared.foil is not None:
            ids.append(int(prepared.foil[0]))
        if native and not self.native_done:
            self.native_done = True
            self.native[sample] = self._native(prepared)
            for log_probs in self.native[sample].values():
                ids += torch.topk(log_probs, min(TOP_TOKENS, len(log_probs))).indices.tolist()
        self.ids[sample] = torch.tensor(sorted(set(ids)))
        return self.ids[sample]

    def _native(self, prepared: Any) -> dict[str, torch.Tensor]:
        pair = prepared.pair
        sides = {"clean": pair.clean}
        if pair.noise is None:  # noise is added inside the trace: the model alone cannot add it
            sides["corrupted"] = pair.corrupt
        native = {}
        for side, encoded in sides.items():
            try:
                native[side] = native_log_probs(self.vlm, encoded.text, encoded.image, self.backend)
            except Exception as error:  # a model whose own forward fails cannot vouch for the engine
                if self.backend is not None:
                    raise  # the server's own error (refused key, unknown model, ...) says it best
                raise SelfCheckError(
                    f"the self-check could not run {self.vlm.name}'s own forward on the {side} input "
                    f"({type(error).__name__}: {error}). Without it no number of this sweep is "
                    "checked; pass verify=False to trace anyway, at your own risk."
                ) from error
        return native

    def verify(self, sample: int, prepared: Any, probed: torch.Tensor) -> None:
        """Check one forward's baseline-row probes of `sample` ([baseline row, token])."""
        ids = self.ids[sample]
        if sample in self.native:
            for side, log_probs in self.native.pop(sample).items():
                rows = probed[:1] if side == "clean" else probed[1:]
                want = log_probs[ids].expand_as(rows)
                self._compare(sample, prepared, side, rows, want, "the model's own forward")
        if sample not in self.expected:
            self.expected[sample] = probed
            return
        self._compare(sample, prepared, "baseline", probed, self.expected[sample], "its first forward")

    def _compare(
        self, sample: int, prepared: Any, side: str, got: torch.Tensor, want: torch.Tensor, what: str
    ) -> None:
        gap = (got - want).abs()
        gap = torch.where(torch.isnan(gap), torch.full_like(gap, math.inf), gap)
        worst = float(gap.max())
        if what.startswith("the model"):
            self.worst = max(self.worst, worst)
        if worst <= self.tolerance:
            return
        row, column = divmod(int(gap.argmax()), gap.shape[1])
        token = int(self.ids[sample][column])
        answer = int(prepared.answer[0])
        is_answer = " (the answer)" if token == answer else ""
        word = self.vlm.tokenizer.decode([token])
        raise SelfCheckError(
            f"self-check failed on {self.vlm.name} ({self.vlm.adapter.family}), sample "
            f"{prepared.sample.id!r}: the {side} row gives log P({word!r}){is_answer} = "
            f"{float(got[row, column]):.6g} but {what} gives {float(want[row, column]):.6g} "
            f"({worst:.3g} nats apart; tolerance {self.tolerance:g} for {self.vlm.model.dtype}). "
            "Every cell of this sweep would be wrong. Likely an input the adapter declares wrongly "
            "(Adapter.inputs, positions, a layout) or a stack declared causal that is not (prefix "
            f"reuse). Run `vlmtrace check {self.vlm.name}`; pass verify=False only to debug."
        )
