"""The closed-form weight updates: MEMIT's covariance-weighted least squares, MultEdit's ridge.

Both solve for a change ΔW of one layer's output projection W that moves the edited keys'
outputs by residuals R (one column per key) and disturbs little else:

    MEMIT   min_Δ |Δ K - R|² + (preserve_weight / N) Σ_j |Δ k_j|²   over ordinary keys k_j
            ΔW = R Kᵀ (C + K Kᵀ)⁻¹,   C = preserve_weight * mean_j k_j k_jᵀ   (`key_covariance`)
    MultEdit min_W' |W' K - V|² + ridge |W' - W|²      (Basu et al.'s own code, no covariance)
            ΔW = R Kᵀ (ridge I + K Kᵀ)⁻¹,   R = V - W K

so they differ only in what stands for "everything else": the measured second moment of the
layer's keys, or a multiple of the identity (every direction equally). `least_squares_update`
is checked against `torch.linalg.lstsq` in the tests. `keys_at` reads the keys (the projection's
input) and the block output of a later layer at each row's key position.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from ...data.sample import Sample
from ...models.load import VLM
from ..weights import weights_state
from .contexts import Row
from .parts import EditError, Parts, chunks, forward_rows, hooks, output_of


def least_squares_update(
    keys: torch.Tensor, residual: torch.Tensor, covariance: torch.Tensor
) -> torch.Tensor:
    """ΔW = R Kᵀ (C + K Kᵀ)⁻¹ for keys K [key, in], residuals R [key, out], C [in, in].

    Solved in float64; returns float32 [out, in]. Zero residuals give exactly zero.
    """
    k = keys.double().T  # [in, key]
    r = residual.double().T  # [out, key]
    system = covariance.double() + k @ k.T
    return torch.linalg.solve(system, k @ r.T).T.float()


def ridge_update(keys: torch.Tensor, residual: torch.Tensor, ridge: float) -> torch.Tensor:
    """MultEdit's ΔW = R Kᵀ (ridge I + K Kᵀ)⁻¹ (the least-squares update with C = ridge I)."""
    if not ridge > 0:
        raise EditError(f"ridge must be > 0 (Basu et al. use 0.01); got {ridge!r}.")
    return least_squares_update(keys, residual, ridge * torch.eye(keys.shape[1], dtype=torch.float64))


def key_covariance(
    vlm: VLM, parts: Parts, samples: Sequence[Sample], layers: Sequence[int], *, max_batch: int = 64
) -> dict[int, torch.Tensor]:
    """mean_j k_j k_jᵀ over every token of `samples`, per layer (float64 [in, in]), unedited model."""
    sums = {layer: 0.0 for layer in layers}
    count = 0
    for chunk in chunks(list(samples), max_batch):
        rows = [vlm.adapter.encode(vlm.processor, s.prompt, s.image, None) for s in chunk]
        seen: dict[int, torch.Tensor] = {}
        keep = [(parts.projections[x], _keep_input(seen, x), True) for x in layers]
        with torch.no_grad(), hooks(*keep):
            _, offsets = forward_rows(vlm, rows)
        mask = torch.zeros(seen[layers[0]].shape[:2], dtype=torch.bool)
        for i, offset in enumerate(offsets):
            mask[i, offset:] = True
        for layer in layers:
            keys = seen[layer][mask.to(seen[layer].device)].double().cpu()
            sums[layer] = sums[layer] + keys.T @ keys
        count += int(mask.sum())
    return {layer: total / count for layer, total in sums.items()}


def parameter_layout(model: torch.nn.Module) -> tuple[tuple[int, str, str], ...]:
    """Where each parameter's data lives, and as what: a cast (`.half()`), a move or a parameter
    replaced (`load_state_dict(assign=True)`) changes it without counting as an in-place write."""
    return tuple((p.data_ptr(), str(p.dtype), str(p.device)) for p in model.parameters())


@dataclass(frozen=True, eq=False)
class KeyCovariance:
    """MEMIT's statistics of ordinary keys, measured once and reused by many `vt.edit` calls.

    Measuring them is a forward over every `preserve` sample, often the most expensive part of a
    small edit; a study that computes many edits of the same model (methods, layers, batches)
    measures them once with `measure_key_covariance` and passes them as `edit(covariance=...)`.
    They belong to one state of one loaded model: `edit` refuses them for another model object
    (even one of the same name), for parameters cast, moved or replaced, for weights written in
    place since (an applied edit), and for layers they do not hold.
    """

    layers: Mapping[int, torch.Tensor]
    """Layer -> mean k kᵀ over every token of the samples (float64 [in, in])."""
    samples: int
    """How many samples they average over (the edit's attrs record it as `preserve_samples`)."""
    model: str
    """The name of the model they were measured on (`VLM.name`), for the error message."""
    weights: int
    """`weights.weights_state` of the model when measured: any parameter written since changes it,
    unless an `Edit` restored exactly the weights these were measured on."""
    measured_on: weakref.ref = field(repr=False)
    """The very model object they were measured on."""
    layout: tuple[tuple[int, str, str], ...] = field(repr=False)
    """`parameter_layout` of that model when measured."""

    def checked(self, vlm: VLM, layers: Sequence[int]) -> dict[int, torch.Tensor]:
        """The covariance of each of `layers`, or an error naming why these statistics do not apply."""
        if self.measured_on() is not vlm.model:
            raise EditError(
                f"the key covariance was measured on another model object ({self.model!r}), not on "
                f"this {vlm.name!r}; measure it on the model you edit."
            )
        if self.layout != parameter_layout(vlm.model) or self.weights != weights_state(vlm.model):
            raise EditError(
                "the model's weights were written, cast, moved or replaced since its key covariance was "
                "measured (an applied edit, or a write no Edit.restore undid); measure it again with "
                "measure_key_covariance on the model as it is now."
            )
        missing = [layer for layer in layers if layer not in self.layers]
        if missing:
            raise EditError(
                f"the key covariance holds layers {sorted(self.layers)}, not {missing}; measure it for every "
                "layer the edits will use."
            )
        return {layer: self.layers[layer] for layer in layers}


def measure_key_covariance(
    vlm: VLM, preserve: Sequence[Sample], layers: Sequence[int], *, max_batch: int = 64
) -> KeyCovariance:
    """MEMIT's key covariance of `layers` over `preserve`, for `edit(covariance=...)`."""
    if not preserve:
        raise EditError("no preserve samples: give held-out questions of the kind the model usually sees.")
    parts = Parts.of(vlm)
    chosen = parts.check_layers(layers)
    return KeyCovariance(
        layers=key_covariance(vlm, parts, preserve, chosen, max_batch=max_batch),
        samples=len(preserve),
        model=vlm.name,
        weights=weights_state(vlm.model),
        measured_on=weakref.ref(vlm.model),
        layout=parameter_layout(vlm.model),
    )


def _keep_input(seen: dict, name: int):
    return lambda module, args: seen.__setitem__(name, args[0].detach())


def keys_at(
    vlm: VLM, parts: Parts, rows: Sequence[Row], layer: int, last: int, *, max_batch: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys at `layer` [row, in] and block outputs of layer `last` [row, hidden] at each row's key.

    Also checks, on the live tensors, that the projection's output is the `mlp` site's output
    (the table's claim that editing the projection edits that site).
    """
    keys, hidden = [], []
    for group in chunks(list(rows), max_batch):
        seen: dict[str, torch.Tensor] = {}
        watch = _watch(parts, layer, last, seen)
        with torch.no_grad(), hooks(*watch):
            _, offsets = forward_rows(vlm, [row.inputs for row in group])
        if not torch.equal(seen["mlp"], seen["proj"]):
            raise EditError(
                f"layer {layer}: the output of {parts.projection.path} differs from the "
                f"{parts.projection.site!r} site's output, so editing it does not edit that site; "
                "fix vlmtrace.engine.editing.parts.PROJECTIONS."
            )
        at = torch.tensor([offset + row.key for row, offset in zip(group, offsets, strict=True)])
        index = torch.arange(len(group))
        keys.append(seen["key"][index, at.to(seen["key"].device)].float().cpu())
        hidden.append(seen["hidden"][index, at.to(seen["hidden"].device)].float().cpu())
    return torch.cat(keys), torch.cat(hidden)


def _watch(parts: Parts, layer: int, last: int, seen: dict[str, torch.Tensor]) -> list:
    """Hooks keeping the projection's input and output, the MLP's output and layer `last`'s output."""

    def keep(name: str, pre: bool = False):
        if pre:
            return lambda module, args: seen.__setitem__(name, args[0].detach())
        return lambda module, args, output: seen.__setitem__(name, output_of(output).detach())

    return [
        (parts.projections[layer], keep("key", pre=True), True),
        (parts.mlps[layer], keep("mlp"), False),
        (parts.layers[last], keep("hidden"), False),
        (parts.projections[layer], keep("proj"), False),
    ]
