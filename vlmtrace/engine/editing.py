"""Locate, then edit: change one fact a VLM knows at the MLP layers a causal trace found.

Causal tracing says *where* a model retrieves a fact; the first use of that is memory editing:
change the fact there and nowhere else. ROME (Meng et al., 2022) and MEMIT (Meng et al., 2023)
edit the MLP output projections of GPTs; Basu et al.'s MultEdit edits the early MLP layers that
MultimodalCausalTrace found causal for a VLM's visual constraint. This module does that for any
decoder family whose MLP output projection it knows (`PROJECTIONS`):

    edit = vt.edit(vlm, [(sample, "avalor")], layers="traced", preserve=ordinary_samples)
    with edit:                                   # the weights change inside the block only
        ...                                      # the model now answers "avalor"
    edit.apply(); ...; edit.restore()            # or explicitly; restore is bit-exact
    vt.save(edit.to_dataset(), "edit.zarr")      # the weight deltas and their provenance
    scores = evaluate(vlm, edit, efficacy=..., generalisation=..., specificity=...)

A request is (sample, new answer). For request i and edit layer l:

1. Key. k_i^l is the input of layer l's MLP output projection W^l (Llama's `down_proj`) at the
   last token of the sample's constraint span (`span`, e.g. "shape" in "the red shape").
2. Value. A vector δ_i is added to the MLP output of the last edit layer L at that position and
   optimised (Adam, `steps` steps) so that the model gives the new answer:

       loss = -log P(new answer) / tokens + kl_weight * KL(P_0 || P_δ) + weight_decay * |δ|² / |m|²

   where the KL compares the next-token distributions *at the constraint's last token* before
   and after (what the model says about the subject itself, ROME's "essence"), and m is the
   MLP output there; |δ| is clamped to `clamp` * |m|. The target is z_i = h_i^L + δ_i, h^L
   the block output of layer L.
3. Spread (MEMIT). For each edit layer l, lowest first, with the updates below it in place,
   every request's remaining residual is shared among the layers left:

       R^l = (Z - H^L) / (edit layers from l on)          (one column per request)
       ΔW^l = R^l Kᵀ (C^l + K Kᵀ)⁻¹,   C^l = preserve_weight * mean_j k_j k_jᵀ

   over keys k_j of ordinary inputs (`preserve`, every token of every sample, unedited model).
   ΔW^l is the least-squares solution of

       min_Δ  |Δ K - R|²  +  (preserve_weight / N) Σ_j |Δ k_j|²,

   i.e. the edited keys move to their targets while the ordinary keys keep their outputs
   (`least_squares_update`; `tests/test_editing.py` checks it against `torch.linalg.lstsq`).
   With one request at one layer, ΔW is rank one.

`layers="traced"` reads the window of largest indirect effect of the MLP site at the constraint
positions from a `vt.patch` result on the same samples (given as `trace=`, or computed), and
writes the chosen layers and that evidence into the edit's provenance. Weights change only in
`Edit.apply()` / `with edit:`; the originals are kept and put back exactly by `restore()`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import xarray as xr

from ..data.sample import Sample
from ..errors import UserError
from ..models.adapter import module_at
from ..models.load import VLM
from ..results.dataset import provenance
from ..results.stats import bootstrap_mean, by_segment
from .forward import stack_rows
from .inputs import encode, scored_answer_ids
from .positions import LAST
from .sites import window_layers

Request = tuple[Sample, str]
"""A sample and the answer the edited model should give to it."""


@dataclass(frozen=True)
class OutputProjection:
    """Where a family's MLP writes into the residual stream: the weight an edit changes."""

    path: str
    """Linear module, relative to one layer, whose output *is* the `site` output."""
    site: str = "mlp"
    """The adapter's site whose module contains the projection (checked at use)."""


_DOWN_PROJ = OutputProjection("mlp.down_proj")
PROJECTIONS: Mapping[tuple[str, str], OutputProjection] = {
    (family, "lm"): _DOWN_PROJ
    for family in (
        "llava", "llava_next", "llava_onevision", "mistral3", "gemma3", "paligemma", "idefics3",
        "smolvlm", "internvl", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "mllama", "llama",
    )
}  # fmt: skip
"""(adapter family, stack) -> output projection: Llama-family decoders (Llama, Mistral, Qwen,
Gemma) all end their MLP with `down_proj`. A family not listed is refused with an error."""

DUAL_STREAM = ("blip", "blip2", "instructblip")


class EditError(UserError):
    """An edit that cannot be computed, applied or restored as asked."""


def edit(
    vlm: VLM,
    requests: Sequence[Request],
    *,
    layers: Sequence[int] | Literal["traced"],
    preserve: Sequence[Sample],
    span: str = "visual",
    trace: xr.Dataset | None = None,
    trace_windows: Sequence[int] = (1, 3),
    preserve_weight: float = 1000.0,
    steps: int = 40,
    lr: float = 0.5,
    kl_weight: float = 0.0625,
    weight_decay: float = 0.01,
    clamp: float = 4.0,
    stop_nll: float = 0.01,
    max_batch: int = 64,
) -> Edit:
    """Compute (not apply) the edit that makes `vlm` give each request's new answer.

    `layers`: edit layers of the default stack, or "traced" (from `trace`, a `vt.patch` result
    with site "mlp" on the requests' samples, else computed with `trace_windows`). `preserve`:
    ordinary inputs whose keys estimate the covariance C (never the edited samples).
    `span`: the constraint whose last token is the key. The rest are the hyperparameters of
    the module docstring. Returns an unapplied `Edit`.
    """
    requests = [(sample, str(answer)) for sample, answer in requests]
    if not requests:
        raise EditError("no requests: give (sample, new answer) pairs, e.g. [(sample, 'avalor')].")
    if not preserve:
        raise EditError(
            "no `preserve` samples: the covariance C of ordinary keys keeps the layer's other "
            "input-output pairs; give held-out questions of the kind the model usually sees."
        )
    parts = Parts.of(vlm)
    evidence: dict[str, Any] = {}
    if isinstance(layers, str):
        if layers != "traced":
            raise EditError(f"layers={layers!r}: give layer indices, e.g. (2, 3), or 'traced'.")
        if trace is None:
            trace = trace_for_edit(vlm, [s for s, _ in requests], span=span, windows=trace_windows)
        chosen, evidence = traced_layers(trace, [s for s, _ in requests], span=span, n_layers=parts.n_layers)
    else:
        chosen = tuple(sorted({int(x) for x in layers}))
        bad = [x for x in chosen if not 0 <= x < parts.n_layers]
        if not chosen or bad:
            raise EditError(f"layers {tuple(layers)}: give one or more of 0..{parts.n_layers - 1}.")
    rows = [_encode_request(vlm, sample, answer, span) for sample, answer in requests]
    covariance = {
        layer: preserve_weight * c
        for layer, c in key_covariance(vlm, parts, preserve, chosen, max_batch=max_batch).items()
    }
    hyper = dict(
        steps=steps, lr=lr, kl_weight=kl_weight, weight_decay=weight_decay, clamp=clamp, stop_nll=stop_nll
    )
    targets, fits = zip(*(_target(vlm, parts, row, chosen[-1], **hyper) for row in rows), strict=True)
    z = torch.stack(targets)  # [request, hidden]
    deltas: dict[int, torch.Tensor] = {}
    originals = {layer: parts.weight(layer).detach().clone() for layer in chosen}
    try:
        for i, layer in enumerate(chosen):
            keys, hidden = _keys_and_hidden(vlm, parts, rows, layer, chosen[-1])
            residual = (z - hidden) / (len(chosen) - i)
            deltas[layer] = least_squares_update(keys, residual, covariance[layer])
            with torch.no_grad():
                weight = parts.weight(layer)
                weight.copy_((originals[layer].float() + deltas[layer].to(weight.device)).to(weight.dtype))
    finally:
        with torch.no_grad():
            for layer, original in originals.items():
                parts.weight(layer).copy_(original)
    attrs = provenance(
        vlm,
        experiment="edit",
        layers=list(chosen),
        layers_chosen="traced" if evidence else "given",
        evidence=evidence,
        span=span,
        projection=parts.projection.path,
        requests=[
            {**_identity(sample), "new_answer": answer, **fit}
            for (sample, answer), fit in zip(requests, fits, strict=True)
        ],
        hyperparameters={**hyper, "preserve_weight": preserve_weight, "preserve_samples": len(preserve)},
    )
    return Edit(vlm, deltas, attrs=attrs)


class Edit:
    """Weight deltas of an MLP output projection per layer, applied only when asked.

    `with edit:` applies them and restores the original weights on exit, exceptions included;
    `apply()` / `restore()` do the same explicitly. Restoring puts back the very tensors that
    were there (bit-exact, whatever the dtype), and refuses if something else changed them.
    """

    def __init__(
        self, vlm: VLM, deltas: Mapping[int, torch.Tensor], *, attrs: Mapping[str, Any] | None = None
    ):
        self.vlm = vlm
        self.parts = Parts.of(vlm)
        self.deltas = {int(layer): delta.detach().float().cpu() for layer, delta in sorted(deltas.items())}
        """Layer -> ΔW, float32 [out_features, in_features] (same shape as the weight)."""
        for layer, delta in self.deltas.items():
            shape = tuple(self.parts.weight(layer).shape)
            if tuple(delta.shape) != shape:
                raise EditError(f"delta of layer {layer} is {tuple(delta.shape)}; the weight is {shape}.")
        self.attrs = dict(attrs or {})
        self._originals: dict[int, torch.Tensor] = {}

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(self.deltas)

    @property
    def applied(self) -> bool:
        return bool(self._originals)

    def apply(self) -> Edit:
        """Add the deltas to the weights (the originals are kept for `restore`)."""
        if self.applied:
            raise EditError("this edit is already applied; restore() it before applying it again.")
        with torch.no_grad():
            for layer in self.deltas:
                weight = self.parts.weight(layer)
                self._originals[layer] = weight.detach().clone()
                weight.copy_(self._edited(layer))
        return self

    def restore(self) -> Edit:
        """Put the original weights back, exactly."""
        if not self.applied:
            raise EditError("this edit is not applied; nothing to restore.")
        changed = [x for x in self.deltas if not torch.equal(self.parts.weight(x), self._edited(x))]
        if changed:
            raise EditError(
                f"the weights of layers {changed} changed since this edit was applied (another edit "
                "applied on top?); restore edits in the reverse order of applying them."
            )
        with torch.no_grad():
            for layer, original in self._originals.items():
                self.parts.weight(layer).copy_(original)
        self._originals = {}
        return self

    def _edited(self, layer: int) -> torch.Tensor:
        original = self._originals[layer]
        return (original.float() + self.deltas[layer].to(original.device)).to(original.dtype)

    def __enter__(self) -> Edit:
        return self.apply()

    def __exit__(self, *exc: Any) -> None:
        self.restore()

    def to_dataset(self) -> xr.Dataset:
        """The deltas as a Dataset (dims layer, output, input) with the provenance, for `vt.save`."""
        delta = np.stack([d.numpy() for d in self.deltas.values()])
        attrs = {
            k: v if isinstance(v, str | int | float | bool) else json.dumps(v) for k, v in self.attrs.items()
        }
        ds = xr.Dataset(
            {"delta": (("layer", "output", "input"), delta)},
            coords={"layer": list(self.layers)},
            attrs={**attrs, "projection": self.parts.projection.path},
        )
        ds["delta"].attrs.update(
            description="change of the MLP output projection's weight (W_edited - W), per layer",
            units="weight units (output per unit of key)",
        )
        return ds

    @classmethod
    def from_dataset(cls, vlm: VLM, ds: xr.Dataset) -> Edit:
        """An edit read back from `to_dataset` (e.g. `vt.open_result("edit.zarr")`), unapplied."""
        deltas = {
            int(x): torch.from_numpy(np.asarray(ds["delta"].sel(layer=x).values)) for x in ds["layer"].values
        }
        return cls(vlm, deltas, attrs=dict(ds.attrs))

    def __repr__(self) -> str:
        norms = ", ".join(f"{x}: {float(d.norm()):.3g}" for x, d in self.deltas.items())
        return f"Edit(layers {self.layers}, |ΔW| {{{norms}}}, {'applied' if self.applied else 'not applied'})"


def least_squares_update(
    keys: torch.Tensor, residual: torch.Tensor, covariance: torch.Tensor
) -> torch.Tensor:
    """ΔW = R Kᵀ (C + K Kᵀ)⁻¹ for keys K [request, in], residuals R [request, out], C [in, in].

    Solved in float64; returns float32 [out, in]. Zero residuals give exactly zero.
    """
    k = keys.double().T  # [in, request]
    r = residual.double().T  # [out, request]
    system = covariance.double() + k @ k.T
    return torch.linalg.solve(system, k @ r.T).T.float()


@dataclass(frozen=True)
class Parts:
    """The modules an edit touches in one model: layers, MLP sites, output projections."""

    layers: torch.nn.ModuleList
    mlps: tuple[torch.nn.Module, ...]
    projections: tuple[torch.nn.Linear, ...]
    projection: OutputProjection

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def weight(self, layer: int) -> torch.nn.Parameter:
        return self.projections[layer].weight

    @classmethod
    def of(cls, vlm: VLM) -> Parts:
        adapter = vlm.adapter
        stack_name = adapter.default_stack
        if adapter.family in DUAL_STREAM:
            raise EditError(
                f"vt.edit refuses {adapter.family} (BLIP-style, dual-stream) models: their answer comes "
                "from a decoder cross-attending to a bidirectional question encoder, so there is no "
                "single stream in which a key at the constraint token maps to the answer. Edit an "
                f"early-fusion decoder (LLaVA, Qwen-VL, ...): families {sorted({f for f, _ in PROJECTIONS})}."
            )
        projection = PROJECTIONS.get((adapter.family, stack_name))
        if projection is None:
            raise EditError(
                f"vt.edit does not know where family {adapter.family!r} (stack {stack_name!r}) keeps its MLP "
                f"output projection; known: {sorted({f for f, _ in PROJECTIONS})}. Add an entry to "
                "vlmtrace.engine.editing.PROJECTIONS (the Linear module, relative to one layer, whose output "
                "is the 'mlp' site's output)."
            )
        stack = adapter.stacks[stack_name]
        hook = stack.sites.get(projection.site)
        if hook is None or hook.layout != "row_position" or not projection.path.startswith(hook.path + "."):
            raise EditError(
                f"family {adapter.family!r}: the projection {projection.path!r} must lie inside the "
                f"{projection.site!r} site's module ({hook}) with a [row, position, hidden] layout."
            )
        layers = module_at(vlm.model, stack.layers)
        mlps = tuple(layer.get_submodule(hook.path) for layer in layers)
        projections = []
        for index, layer in enumerate(layers):
            module = module_at(layer, projection.path)
            if not isinstance(module, torch.nn.Linear):
                raise EditError(
                    f"layer {index}'s {projection.path} is a {type(module).__name__}, not a Linear; "
                    f"this {adapter.family} checkpoint's MLP differs from vlmtrace.engine.editing's table."
                )
            projections.append(module)
        return cls(layers, mlps, tuple(projections), projection)


@dataclass(frozen=True)
class _Row:
    """One request, encoded: its inputs, the key position, the answer ids."""

    inputs: dict[str, torch.Tensor]
    key: int  # the constraint's last token
    answer: tuple[int, ...]


def _encode_request(vlm: VLM, sample: Sample, answer: str, span: str) -> _Row:
    if span not in sample.spans and span != LAST:
        raise EditError(
            f"sample {sample.id!r} has no span {span!r} (spans: {list(sample.spans)}); the key is read at "
            "the constraint's last token: mark it in Sample.spans, or pass span= one of them or 'last'."
        )
    ids = scored_answer_ids(vlm, sample.prompt, answer, whole=True)
    encoded = encode(vlm, prompt=sample.prompt, image=sample.image, spans=dict(sample.spans), answer_ids=ids)
    return _Row(encoded.inputs, encoded.prompt.positions(span)[-1], ids)


def _forward(vlm: VLM, rows: Sequence[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, list[int]]:
    """Logits [row, position, vocab] of left-padded rows, and each row's offset (padding)."""
    width = max(len(row["input_ids"]) for row in rows)
    batch = stack_rows(vlm, list(rows), {"prompt": width})
    device, dtype = vlm.device, vlm.model.dtype
    batch = {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in batch.items()}
    return vlm.adapter.forward(vlm.model, **batch), [width - len(row["input_ids"]) for row in rows]


@contextmanager
def _hooks(*pairs: tuple[torch.nn.Module, Any, bool]) -> Iterator[None]:
    """Register (module, function, pre) hooks for the duration of a block."""
    handles = [m.register_forward_pre_hook(f) if pre else m.register_forward_hook(f) for m, f, pre in pairs]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _output(value: Any) -> torch.Tensor:
    return value[0] if isinstance(value, tuple) else value


def _keep(seen: dict, name: Any):
    """A pre-hook that keeps a module's first input under `name`."""
    return lambda module, args: seen.__setitem__(name, args[0].detach())


def key_covariance(
    vlm: VLM, parts: Parts, samples: Sequence[Sample], layers: Sequence[int], *, max_batch: int = 64
) -> dict[int, torch.Tensor]:
    """mean_j k_j k_jᵀ over every token of `samples`, per layer (float64 [in, in]), unedited model."""
    sums = {layer: 0.0 for layer in layers}
    count = 0
    for start in range(0, len(samples), max_batch):
        chunk = samples[start : start + max_batch]
        rows = [vlm.adapter.encode(vlm.processor, s.prompt, s.image, None) for s in chunk]
        seen: dict[int, torch.Tensor] = {}
        hooks = [(parts.projections[x], _keep(seen, x), True) for x in layers]
        with torch.no_grad(), _hooks(*hooks):
            _, offsets = _forward(vlm, rows)
        mask = torch.zeros(seen[layers[0]].shape[:2], dtype=torch.bool)
        for i, offset in enumerate(offsets):
            mask[i, offset:] = True
        for layer in layers:
            keys = seen[layer][mask.to(seen[layer].device)].double().cpu()
            sums[layer] = sums[layer] + keys.T @ keys
        count += int(mask.sum())
    return {layer: total / count for layer, total in sums.items()}


def _keys_and_hidden(
    vlm: VLM, parts: Parts, rows: Sequence[_Row], layer: int, last: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys at `layer` [request, in] and block outputs of layer `last` [request, hidden] at the key tokens."""
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        (parts.projections[layer], lambda m, a: seen.__setitem__("key", a[0].detach()), True),
        (parts.mlps[layer], lambda m, a, o: seen.__setitem__("mlp", _output(o).detach()), False),
        (parts.layers[last], lambda m, a, o: seen.__setitem__("hidden", _output(o).detach()), False),
        (parts.projections[layer], lambda m, a, o: seen.__setitem__("proj", o.detach()), False),
    ]
    with torch.no_grad(), _hooks(*hooks):
        _, offsets = _forward(vlm, [row.inputs for row in rows])
    if not torch.equal(seen["mlp"], seen["proj"]):  # the table's claim, checked on live tensors
        raise EditError(
            f"layer {layer}: the output of {parts.projection.path} differs from the "
            f"{parts.projection.site!r} site's output, so editing it does not edit that site; "
            "fix vlmtrace.engine.editing.PROJECTIONS."
        )
    where = [(i, offset + row.key) for i, (row, offset) in enumerate(zip(rows, offsets, strict=True))]
    keys = torch.stack([seen["key"][i, p] for i, p in where]).float().cpu()
    hidden = torch.stack([seen["hidden"][i, p] for i, p in where]).float().cpu()
    return keys, hidden


def _answer_nll(logits: torch.Tensor, answer: Sequence[int]) -> torch.Tensor:
    """Mean -log P of the (teacher-forced) answer tokens at the end of one row's logits."""
    log_probs = torch.log_softmax(logits[-len(answer) :].float(), dim=-1)
    return -log_probs[torch.arange(len(answer)), torch.tensor(answer)].mean()


def _target(
    vlm: VLM,
    parts: Parts,
    row: _Row,
    layer: int,
    *,
    steps: int,
    lr: float,
    kl_weight: float,
    weight_decay: float,
    clamp: float,
    stop_nll: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """z = h + δ*: the block output of `layer` at the key token that gives the new answer."""
    seen: dict[str, torch.Tensor] = {}
    delta = torch.zeros(vlm.model.config.get_text_config().hidden_size, device=vlm.device, requires_grad=True)
    key = row.key  # one unpadded row: positions are the row's own

    def add(module, args, output):
        out = _output(output)
        seen["mlp"] = out[0, key].detach()
        edited = out.clone()
        edited[0, key] = edited[0, key] + delta.to(out.dtype)
        return (edited, *output[1:]) if isinstance(output, tuple) else edited

    def read(module, args, output):
        seen["hidden"] = _output(output)[0, key]

    optimiser = torch.optim.Adam([delta], lr=lr)
    reference = None
    with _hooks((parts.mlps[layer], add, False), (parts.layers[layer], read, False)):
        for step in range(steps + 1):
            logits = _forward(vlm, [row.inputs])[0][0]
            nll = _answer_nll(logits, row.answer)
            subject = torch.log_softmax(logits[key].float(), dim=-1)
            if reference is None:
                reference = subject.detach()
                start_nll = float(nll.detach())
            kl = torch.sum(reference.exp() * (reference - subject))
            norm = seen["mlp"].float().norm().clamp(min=1e-6)
            loss = nll + kl_weight * kl + weight_decay * delta.norm() ** 2 / norm**2
            if float(nll.detach()) < stop_nll or step == steps:
                break
            (grad,) = torch.autograd.grad(loss, [delta])
            delta.grad = grad
            optimiser.step()
            with torch.no_grad():
                delta.mul_(torch.clamp(clamp * norm / delta.norm().clamp(min=1e-12), max=1.0))
    fit = {
        "nll_before": start_nll,
        "nll_after": float(nll.detach()),
        "kl_subject": float(kl.detach()),
        "delta_norm": float(delta.detach().norm()),
    }
    return seen["hidden"].detach().float().cpu(), fit


def trace_for_edit(
    vlm: VLM,
    samples: Sequence[Sample],
    *,
    span: str,
    windows: Sequence[int] = (1, 3),
    segments: Sequence[str] | None = None,
) -> xr.Dataset:
    """The MLP trace `layers="traced"` reads: restore the MLP output at the constraint span,
    corrupting with the samples' image pairs when all have one, else replacing the span."""
    from .corruptions import ImagePair, ReplaceSpan
    from .sites import Grid
    from .sweep import patch

    corruption = ImagePair() if all(s.image_pair is not None for s in samples) else ReplaceSpan(span)
    n = vlm.shape.layers[vlm.adapter.default_stack]
    grid = Grid(
        sites=("mlp",),
        windows=tuple(w for w in windows if w <= n),
        segments=tuple(segments or (span,)),
        positions="segments",
    )
    return patch(vlm, list(samples), corruption=corruption, grid=grid, progress=False, recipe="edit")


def traced_layers(
    trace: xr.Dataset, samples: Sequence[Sample], *, span: str, n_layers: int
) -> tuple[tuple[int, ...], dict[str, Any]]:
    """The layers of the (window, centre) of largest mean MLP indirect effect at `span`, and the evidence."""
    if "mlp" not in trace:
        raise EditError(
            f"layers='traced' needs a trace with site 'mlp'; this one has {list(trace.data_vars)}. Run "
            f"vt.patch(..., grid=vt.Grid(sites=('mlp',), segments=({span!r},), positions='segments'))."
        )
    ids = [s.id for s in samples]
    missing = [i for i in ids if i not in set(trace["sample"].values.tolist())]
    if missing:
        raise EditError(
            f"the trace does not hold the edited samples {missing[:3]}: trace the same samples you edit "
            "(or leave trace=None to compute it)."
        )
    effect = (trace["mlp"] - trace["corrupt"]).sel(sample=ids)
    if "position" in effect.dims:
        effect = by_segment(effect)
    if span not in effect["segment"].values:
        raise EditError(f"the trace has no segment {span!r} (it has {list(effect['segment'].values)}).")
    effect = effect.sel(segment=span)
    mean = effect.mean("sample").transpose("window", "layer")
    w, c = np.unravel_index(int(np.nanargmax(mean.values)), mean.shape)
    window, centre = int(mean["window"][w]), int(mean["layer"][c])
    interval = bootstrap_mean(effect.sel(window=window, layer=centre))
    evidence = {
        "site": "mlp",
        "segment": span,
        "corruption": trace.attrs.get("corruption", ""),
        "samples": len(ids),
        "window": window,
        "centre": centre,
        "indirect_effect": float(interval["mean"]),
        "low": float(interval["low"]),
        "high": float(interval["high"]),
        "table": {
            str(int(x)): [round(float(v), 4) for v in mean.sel(window=x).values] for x in mean["window"]
        },
        "table_layers": [int(x) for x in mean["layer"].values],
    }
    return window_layers(centre, window, n_layers), evidence


def _identity(sample: Sample) -> dict[str, Any]:
    image = None if sample.image is None else hashlib.sha256(sample.image.tobytes()).hexdigest()[:16]
    entity = sample.meta.get("entity")
    return {
        "id": sample.id,
        "prompt": sample.prompt,
        "answer": sample.answer,
        "image": image,
        "entity": list(entity) if entity else None,
    }


SETS = ("efficacy", "generalisation", "specificity")


def evaluate(
    vlm: VLM,
    edited: Edit,
    *,
    efficacy: Sequence[Sample],
    generalisation: Sequence[Sample],
    specificity: Sequence[Sample],
    seed: int = 0,
    max_batch: int = 64,
) -> xr.Dataset:
    """Score the unedited and the edited model side by side (dims item, model).

    Each sample's `answer` is what the edited model should say: the new answer for `efficacy`
    (the edited questions) and `generalisation` (paraphrases, other images of the entity), the
    model's own answer for `specificity` (other entities, unrelated questions), which must not
    share an edited sample or entity (`check_disjoint`). `meta["probe"]` names an item's kind.
    A hit is the greedy answer being exactly the target; scores are means of hits with a
    bootstrap interval (`seed`), and `kl` is KL(unedited || edited) at the answer position.
    """
    if edited.applied:
        raise EditError("evaluate compares the unedited with the edited model: pass the edit unapplied.")
    check_disjoint(edited, specificity)
    items = [
        (name, sample)
        for name, group in zip(SETS, (efficacy, generalisation, specificity), strict=True)
        for sample in group
    ]
    if not items:
        raise EditError("nothing to evaluate: give efficacy, generalisation or specificity samples.")
    before = _score(vlm, [s for _, s in items], max_batch)
    with edited:
        after = _score(vlm, [s for _, s in items], max_batch)
    kl = [
        float(torch.sum(b["first"].exp() * (b["first"] - a["first"])))
        for b, a in zip(before, after, strict=True)
    ]
    item = ("item",)
    ds = xr.Dataset(
        {
            "p_target": (("item", "model"), [[b["p"], a["p"]] for b, a in zip(before, after, strict=True)]),
            "hit": (("item", "model"), [[b["hit"], a["hit"]] for b, a in zip(before, after, strict=True)]),
            "answer": (
                ("item", "model"),
                np.array([[b["said"], a["said"]] for b, a in zip(before, after, strict=True)], object),
            ),
            "kl": (item, kl),
        },
        coords={
            "item": np.array([f"{name}/{s.id or i}" for i, (name, s) in enumerate(items)], dtype=object),
            "model": np.array(["unedited", "edited"], dtype=object),
            "set": (item, np.array([name for name, _ in items], dtype=object)),
            "probe": (item, np.array([str(s.meta.get("probe", name)) for name, s in items], dtype=object)),
            "prompt": (item, np.array([s.prompt for _, s in items], dtype=object)),
            "target": (item, np.array([s.answer for _, s in items], dtype=object)),
        },
        attrs={
            **{
                k: v if isinstance(v, str | int | float | bool) else json.dumps(v)
                for k, v in edited.attrs.items()
            },
            "experiment": "edit_evaluation",
        },
    )
    scores = {
        name: bootstrap_mean(
            ds["hit"].where(ds["set"] == name, drop=True).astype(float), dim="item", seed=seed
        )
        for name in SETS
        if (ds["set"] == name).any()
    }
    metric = np.array(list(scores), dtype=object)
    for stat in ("mean", "low", "high"):
        suffix = "" if stat == "mean" else f"_{stat}"
        ds[f"score{suffix}"] = (("metric", "model"), np.stack([scores[m][stat].values for m in scores]))
    ds = ds.assign_coords(metric=metric)
    spec = ds["kl"].where(ds["set"] == "specificity", drop=True)
    if spec.size:
        kl_summary = bootstrap_mean(spec, dim="item", seed=seed)
        for stat in ("mean", "low", "high"):
            ds[f"specificity_kl{'' if stat == 'mean' else '_' + stat}"] = float(kl_summary[stat])
    return _described(ds)


def _described(ds: xr.Dataset) -> xr.Dataset:
    text = {
        "p_target": ("probability of the item's target answer (all its tokens)", "probability (0 to 1)"),
        "hit": ("the greedy answer is exactly the target", "boolean"),
        "answer": ("the greedy first answer token", "token"),
        "kl": ("KL(unedited || edited) of the next-token distribution at the answer", "nats"),
        "score": ("mean hit rate per metric (efficacy, generalisation, specificity)", "fraction"),
        "score_low": ("lower end of the 95% bootstrap interval of score", "fraction"),
        "score_high": ("upper end of the 95% bootstrap interval of score", "fraction"),
        "specificity_kl": ("mean KL(unedited || edited) over specificity items", "nats"),
        "specificity_kl_low": ("lower end of the 95% bootstrap interval of specificity_kl", "nats"),
        "specificity_kl_high": ("upper end of the 95% bootstrap interval of specificity_kl", "nats"),
    }
    for name, (description, units) in text.items():
        if name in ds:
            ds[name].attrs.update(description=description, units=units)
    return ds


def _score(vlm: VLM, samples: Sequence[Sample], max_batch: int) -> list[dict[str, Any]]:
    """Per sample: P(answer), whether greedy decoding gives it, the greedy token, log P at its first token."""
    out = []
    for start in range(0, len(samples), max_batch):
        chunk = samples[start : start + max_batch]
        answers = [scored_answer_ids(vlm, s.prompt, s.answer, whole=True) for s in chunk]
        rows = [
            encode(vlm, prompt=s.prompt, image=s.image, spans={}, answer_ids=a).inputs
            for s, a in zip(chunk, answers, strict=True)
        ]
        with torch.no_grad():
            logits, _ = _forward(vlm, rows)
        for row_logits, answer in zip(logits, answers, strict=True):
            log_probs = torch.log_softmax(row_logits[-len(answer) :].float(), dim=-1).cpu()
            greedy = log_probs.argmax(-1)
            out.append(
                {
                    "p": float(log_probs[torch.arange(len(answer)), torch.tensor(answer)].sum().exp()),
                    "hit": bool((greedy == torch.tensor(answer)).all()),
                    "said": vlm.tokenizer.decode([int(greedy[0])]).strip(),
                    "first": log_probs[0],
                }
            )
    return out


def check_disjoint(edited: Edit, samples: Sequence[Sample]) -> None:
    """Refuse specificity samples that repeat an edited sample (same prompt and image) or
    concern an edited entity (`Sample.meta["entity"]`, when both sides carry one)."""
    requests = edited.attrs.get("requests", [])
    requests = json.loads(requests) if isinstance(requests, str) else requests
    edited_inputs = {(r["prompt"], r["image"]) for r in requests}
    edited_entities = {tuple(r["entity"]) for r in requests if r.get("entity")}
    clashes = []
    for sample in samples:
        identity = _identity(sample)
        if (identity["prompt"], identity["image"]) in edited_inputs:
            clashes.append(f"{sample.id}: an edited question and image")
        elif identity["entity"] and tuple(identity["entity"]) in edited_entities:
            clashes.append(f"{sample.id}: edited entity {identity['entity']}")
    if clashes:
        raise EditError(
            f"{len(clashes)} specificity samples overlap the edit ({'; '.join(clashes[:3])}); specificity "
            "measures what the edit must leave alone: draw them from other entities and questions."
        )
