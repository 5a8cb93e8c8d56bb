"""An edit as weight deltas: applied only when asked, restored exactly, saved with provenance.

Editing a model in place makes every later number depend on whether an edit happened to be
applied. `Edit` keeps the change apart from the model: `with edit:` applies it for a block,
`apply()` / `restore()` do the same explicitly, and restoring puts back the very tensors that
were there (bit-exact, whatever the dtype). Both drop the model's own answers that sweeps keep
for their self-check (`vlmtrace.engine.native`), which were computed with the other weights.
`to_dataset` / `from_dataset` round-trip the deltas
and the provenance through zarr.

    with edit:
        ...                                   # the edited model
    vt.save(edit.to_dataset(), "edit.zarr")
    again = Edit.from_dataset(vlm, vt.open_result("edit.zarr"))
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import xarray as xr

from ...models.load import VLM
from ..native import forget
from ..weights import restored, weights_state
from .parts import EditError, Parts


class Edit:
    """Weight deltas of an MLP output projection per layer, applied only when asked.

    `attrs` is the provenance (method, layers and the trace evidence behind them, contexts,
    hyperparameters, each request and its fit); nested values stay Python objects here and are
    written as JSON by `to_dataset` (`attr` reads either form).
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
        self._states = (0, 0)
        """`weights_state` of the model before and after `apply` wrote the deltas."""

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(self.deltas)

    @property
    def applied(self) -> bool:
        return bool(self._originals)

    def attr(self, name: str, default: Any = None) -> Any:
        """A provenance field as a Python object (JSON text, as read back from a store, is parsed)."""
        value = self.attrs.get(name, default)
        if isinstance(value, str) and value[:1] in "[{":
            return json.loads(value)
        return value

    def apply(self) -> Edit:
        """Add the deltas to the weights (the originals are kept for `restore`)."""
        if self.applied:
            raise EditError("this edit is already applied; restore() it before applying it again.")
        before = weights_state(self.vlm.model)
        with torch.no_grad():
            for layer in self.deltas:
                weight = self.parts.weight(layer)
                self._originals[layer] = weight.detach().clone()
                weight.copy_(self._edited(layer))
        self._states = (before, weights_state(self.vlm.model))
        forget(self.vlm)  # the model's own answers kept for the self-check are the unedited model's
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
        before, applied = self._states
        untouched = weights_state(self.vlm.model) == applied  # nothing else left written meanwhile
        with torch.no_grad():
            for layer, original in self._originals.items():
                self.parts.weight(layer).copy_(original)
        if untouched:
            restored(self.vlm.model, before)
        self._originals = {}
        forget(self.vlm)
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
        ds = xr.Dataset(
            {"delta": (("layer", "output", "input"), delta)},
            coords={"layer": list(self.layers)},
            attrs={**attrs_for_store(self.attrs), "projection": self.parts.projection.path},
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
        method = self.attr("method", "memit")
        state = "applied" if self.applied else "not applied"
        return f"Edit({method}, layers {self.layers}, |ΔW| {{{norms}}}, {state})"


def attrs_for_store(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """Scalars as they are, anything nested as JSON text (zarr attrs must be plain)."""
    return {k: v if isinstance(v, str | int | float | bool) else json.dumps(v) for k, v in attrs.items()}
