"""`vt.edit`: compute the weight change that makes a VLM give new answers, at the traced layers.

Two methods, side by side:

- `method="memit"` (ROME / MEMIT, over many contexts). For each request, the key is read at
  the key position (`span`'s last token, or the last token) of every context: the request, other
  images of the entity, paraphrases, model-generated text prefixes (`Contexts`). One value δ is
  optimised over all of them with the KL term (`values`), giving each context a target
  z_c = h_c + δ at the last edit layer L. Then, for each edit layer l from the lowest, with the
  updates below it in place, the remaining residual is shared among the layers left,

      r_c = (z_c - h_c^L) / (edit layers from l on),     ΔW^l = R Kᵀ (C^l + K Kᵀ)⁻¹

  with C^l = preserve_weight * mean_j k_j k_jᵀ over every token of `preserve` (the unedited
  model's ordinary keys). `keys="each"` puts every context's key in K with its own residual
  (the least-squares objective summed over contexts); `keys="mean"` puts one averaged key and
  residual per request in K (ROME's averaged key).
- `method="multedit"` (Basu et al., MultEdit): one key, the request's own input at the
  constraint token (`span="visual"`), a value optimised for the first answer token with no KL,
  and a ridge step at one layer, ΔW = R Kᵀ (ridge I + K Kᵀ)⁻¹, with no covariance.

    edit = vt.edit(vlm, requests, layers="traced", preserve=ordinary, span="last",
                   contexts=Contexts(images=8, paraphrases=4))
    baseline = vt.edit(vlm, requests, layers="traced", method="multedit", span="visual")

`layers="traced"` reads the layers from an MLP trace of the requests' samples (`layers.py`). The
edit is returned unapplied (`deltas.Edit`); its `attrs` hold the method, the layers and the
trace evidence, the contexts asked for and used per request, every hyperparameter and each
request's fit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
import xarray as xr

from ...data.edit_case import EditRequest, identity
from ...data.sample import Sample
from ...models.load import VLM
from ...results.dataset import provenance
from ..corruptions import Corruption
from ..weights import restored, weights_state
from .contexts import SINGLE, Contexts, Row, as_request, request_rows
from .deltas import Edit
from .layers import trace_for_edit, traced_layers
from .parts import EditError, Parts
from .updates import KeyCovariance, key_covariance, keys_at, least_squares_update, ridge_update
from .values import ValueFit, optimise_value

Method = Literal["memit", "multedit"]
METHODS = ("memit", "multedit")


def edit(
    vlm: VLM,
    requests: Sequence[EditRequest | tuple[Sample, str]],
    *,
    layers: Sequence[int] | Literal["traced"],
    preserve: Sequence[Sample] = (),
    covariance: KeyCovariance | None = None,
    method: Method = "memit",
    span: str = "last",
    contexts: Contexts | None = None,
    keys: Literal["each", "mean"] = "each",
    trace: xr.Dataset | None = None,
    trace_windows: Sequence[int] = (1, 3),
    trace_corruption: Corruption | None = None,
    preserve_weight: float = 1000.0,
    ridge: float = 0.01,
    steps: int = 25,
    lr: float = 0.5,
    kl_weight: float = 0.0625,
    weight_decay: float = 0.01,
    clamp: float = 4.0,
    stop_nll: float = 0.01,
    max_batch: int = 64,
) -> Edit:
    """Compute (not apply) the edit that makes `vlm` give each request's new answer.

    `requests`: `EditRequest`s (with their contexts) or (sample, new answer) pairs. `layers`:
    edit layers of the default stack, or "traced" (from `trace`, a `vt.patch` result with site
    "mlp" on the requests' samples, else computed with `trace_windows` and `trace_corruption`).
    `span`: where the key is read, a span's last token or "last". `contexts`: how many of each
    context source MEMIT uses (default `Contexts()`; MultEdit takes none). `preserve`: ordinary
    inputs whose keys give MEMIT's covariance (never the edited samples); or `covariance`, the
    same statistics measured beforehand (`measure_key_covariance`), for many edits of one model.
    The rest are the hyperparameters of the module docstring. Returns an unapplied `Edit`.
    """
    if method not in METHODS:
        raise EditError(f"method={method!r}: choose 'memit' (ROME/MEMIT over contexts) or 'multedit'.")
    if keys not in ("each", "mean"):
        raise EditError(f"keys={keys!r}: choose 'each' (every context's key) or 'mean' (ROME's average).")
    asked = [as_request(r) for r in requests]
    if not asked:
        raise EditError("no requests: give (sample, new answer) pairs, e.g. [(sample, 'avalor')].")
    multedit = method == "multedit"
    if multedit and contexts not in (None, SINGLE):
        raise EditError(
            "method='multedit' keys on the request's own input only (Basu et al.); drop contexts= or "
            "use method='memit'."
        )
    if not multedit and not preserve and covariance is None:
        raise EditError(
            "no `preserve` samples: MEMIT's covariance C of ordinary keys keeps the layer's other "
            "input-output pairs; give held-out questions of the kind the model usually sees."
        )
    if preserve and covariance is not None:
        raise EditError("give `preserve` or its measured `covariance`, not both.")
    if multedit and covariance is not None:
        raise EditError("method='multedit' uses no covariance (a ridge step); drop covariance=.")
    used = SINGLE if multedit else (contexts if contexts is not None else Contexts())
    parts = Parts.of(vlm)
    chosen, evidence = _layers(
        vlm, parts, asked, layers, span, trace, trace_windows, trace_corruption, multedit
    )
    if multedit and len(chosen) != 1:
        raise EditError(
            f"method='multedit' edits one layer (Basu et al.); got layers {chosen}. Pass layers=(l,) "
            "or trace with windows=(1,)."
        )
    # checked before any value is optimised, so statistics that do not apply cost nothing
    measured = None if covariance is None else covariance.checked(vlm, chosen)
    fit = ValueFit(
        steps=steps,
        lr=lr,
        kl_weight=0.0 if multedit else kl_weight,
        weight_decay=weight_decay,
        clamp=clamp,
        stop_nll=stop_nll,
        first_token=multedit,
    )
    encoded = [request_rows(vlm, r, used, span=span, first_token=multedit) for r in asked]
    fits, targets = [], []
    for rows in encoded:
        kl_rows = rows.essence or (rows.edit if span != "last" and fit.kl_weight else ())
        delta, record = optimise_value(vlm, parts, chosen[-1], rows.edit, kl_rows, fit, max_batch=max_batch)
        record["kl_rows"] = "essence" if rows.essence else "contexts" if kl_rows else "none"
        _, hidden = keys_at(vlm, parts, rows.edit, chosen[-1], chosen[-1], max_batch=max_batch)
        targets.append(hidden + delta)  # z_c = h_c + δ, one row per context
        fits.append(record)
    if multedit:
        deltas = {chosen[0]: _multedit_update(vlm, parts, encoded, targets, chosen[0], ridge, max_batch)}
    else:
        if measured is None:
            measured = key_covariance(vlm, parts, preserve, chosen, max_batch=max_batch)
        deltas = _memit_updates(
            vlm, parts, encoded, targets, chosen, measured, preserve_weight, keys, max_batch
        )
    hyper: dict[str, Any] = fit.describe()
    if multedit:
        hyper["ridge"] = ridge
    else:
        samples = len(preserve) if covariance is None else covariance.samples
        hyper.update(preserve_weight=preserve_weight, preserve_samples=samples, keys=keys)
    attrs = {
        **provenance(vlm, experiment="edit"),
        "method": method,
        "layers": list(chosen),
        "layers_chosen": "traced" if evidence else "given",
        "evidence": evidence,
        "span": span,
        "projection": parts.projection.path,
        "contexts": used.describe(),
        "hyperparameters": hyper,
        "requests": [
            {**identity(r.sample), "new_answer": r.new_answer, "contexts": rows.record, **record}
            for r, rows, record in zip(asked, encoded, fits, strict=True)
        ],
    }
    return Edit(vlm, deltas, attrs=attrs)


def _layers(
    vlm: VLM,
    parts: Parts,
    requests: Sequence[EditRequest],
    layers: Sequence[int] | str,
    span: str,
    trace: xr.Dataset | None,
    windows: Sequence[int],
    corruption: Corruption | None,
    multedit: bool,
) -> tuple[tuple[int, ...], dict[str, Any]]:
    if not isinstance(layers, str):
        return parts.check_layers(layers), {}
    if layers != "traced":
        raise EditError(f"layers={layers!r}: give layer indices, e.g. (2, 3), or 'traced'.")
    samples = [r.sample for r in requests]
    windows = (1,) if multedit else tuple(windows)
    if trace is None:
        trace = trace_for_edit(vlm, samples, span=span, windows=windows, corruption=corruption)
    return traced_layers(
        trace, samples, span=span, n_layers=parts.n_layers, windows=(1,) if multedit else None
    )


def _memit_updates(
    vlm: VLM,
    parts: Parts,
    encoded: Sequence[Any],
    targets: Sequence[torch.Tensor],
    layers: tuple[int, ...],
    covariance: dict[int, torch.Tensor],
    preserve_weight: float,
    keys: str,
    max_batch: int,
) -> dict[int, torch.Tensor]:
    """MEMIT's spread: each layer, lowest first, takes its share of every context's residual."""
    rows: list[Row] = [row for request in encoded for row in request.edit]
    owner = torch.tensor([i for i, request in enumerate(encoded) for _ in request.edit])
    z = torch.cat(list(targets))
    originals = {layer: parts.weight(layer).detach().clone() for layer in layers}
    before = weights_state(vlm.model)
    deltas: dict[int, torch.Tensor] = {}
    try:
        for i, layer in enumerate(layers):
            k, hidden = keys_at(vlm, parts, rows, layer, layers[-1], max_batch=max_batch)
            residual = (z - hidden) / (len(layers) - i)
            if keys == "mean":
                k = torch.stack([k[owner == j].mean(0) for j in range(len(encoded))])
                residual = torch.stack([residual[owner == j].mean(0) for j in range(len(encoded))])
            deltas[layer] = least_squares_update(k, residual, preserve_weight * covariance[layer])
            with torch.no_grad():
                weight = parts.weight(layer)
                weight.copy_((originals[layer].float() + deltas[layer].to(weight.device)).to(weight.dtype))
    finally:
        with torch.no_grad():
            for layer, original in originals.items():
                parts.weight(layer).copy_(original)
        restored(vlm.model, before)  # the weights it wrote on the way are the originals again
    return deltas


def _multedit_update(
    vlm: VLM,
    parts: Parts,
    encoded: Sequence[Any],
    targets: Sequence[torch.Tensor],
    layer: int,
    ridge: float,
    max_batch: int,
) -> torch.Tensor:
    """Basu et al.'s ridge step: every request's single key moved to its target, no covariance."""
    rows = [request.edit[0] for request in encoded]
    k, hidden = keys_at(vlm, parts, rows, layer, layer, max_batch=max_batch)
    z = torch.stack([target[0] for target in targets])
    return ridge_update(k, z - hidden, ridge)
