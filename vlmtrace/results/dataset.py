"""Results as labelled xarray Datasets, stored on zarr with their provenance.

A causal trace is a labelled array: a value per (sample, window, layer, position[, head]).
Keeping the labels (layer ids, token strings, segment names) next to the numbers is what
lets a researcher write `ds["mlp"].sel(window=6).groupby("label")` instead of remembering
which axis was which, and lets a store written today be read in a year.

Dimension vocabulary, used everywhere in vlmtrace:

    sample     one per Sample (coordinate: Sample.id)
    window     window size in layers
    layer      the window's centre layer
    head       attention head (head sites only)
    position   k-th position covered by the grid (per-sample coordinates `token`, `label`
               and `index`: token string, segment label, index in the prompt)
    segment    a whole segment, when the grid patches segments

Data variables: one per site kind (the patched runs' metric), plus `clean` and `corrupt`
(per sample). Attrs record the model, corruption, metric, direction, grid and versions;
zarr attrs must be JSON, so structured attrs are stored as JSON strings. Every data variable
of a saved store carries `description` and `units` attrs (`describe`).

Format. `save` writes zarr format 2 with consolidated metadata: every zarr reader (Python,
JavaScript, Julia, R) opens it, and plain `xr.open_zarr(path)` neither warns nor lists the
folder. Strings are kept as Python objects (variable-length UTF-8) in memory and in sweep
stores, because zarr format 3 has no specification yet for fixed-width numpy strings.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import xarray as xr

from .store import StoreError, check_replaceable, checked_path, path_lock, read_store, write_whole

if TYPE_CHECKING:
    from ..data.sample import Sample
    from ..engine.corruptions import Corruption
    from ..engine.metrics import Metric
    from ..engine.positions import Segments
    from ..engine.sites import Cell, Grid
    from ..models.load import VLM


def versions() -> dict[str, str]:
    """Versions of the packages that determine a result."""
    import nnsight
    import torch
    import transformers

    from .. import __version__

    return {
        "vlmtrace": __version__,
        "nnsight": nnsight.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def provenance(vlm: VLM, **fields: Any) -> dict[str, Any]:
    """Attrs every result carries: what model, what experiment, which software."""
    attrs = {
        "model": vlm.name,
        "model_revision": vlm.revision or "",
        "model_family": vlm.adapter.family,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **{f"version_{k}": v for k, v in versions().items()},
    }
    for key, value in fields.items():
        attrs[key] = value if isinstance(value, str | int | float | bool) else json.dumps(value)
    return attrs


def sample_ids(samples: list[Sample]) -> np.ndarray:
    """The `sample` coordinate: Sample.id, made unique (strings as objects: see Format)."""
    ids = [sample.id or f"sample{i}" for i, sample in enumerate(samples)]
    if len(set(ids)) != len(ids):  # duplicate ids would make `sel(sample=...)` ambiguous
        ids = [f"{sid}#{i}" for i, sid in enumerate(ids)]
    return np.array(ids, dtype=object)


def strings(dims: str | tuple[str, ...], values: Any) -> xr.Variable:
    """A variable of Python strings, as objects (see Format).

    Built with xarray's `fastpath`, which takes the array as it is: otherwise xarray sends every
    object array through pandas to look for dates, which these never hold, and on a one-sample
    sweep that look was 40 % of laying out the result (`benchmarks/sweep_speed.py`).
    """
    return xr.Variable(dims, np.asarray(values, dtype=object), fastpath=True)


class Layout:
    """Where every cell of every sample lives in the result arrays.

    Built before any forward runs (from the samples' segments and cells), so the whole result
    can be laid out up front: in memory, or as an empty zarr store that chunks fill in.
    """

    def __init__(
        self,
        samples: list[Sample],
        segments: list[Segments],
        cells: list[list[Cell]],
        grid: Grid,
        unpaired: list[dict[int, str]] | None = None,
        layer_kinds: Sequence[str] = (),
    ):
        from ..engine.sites import HEAD_SITES

        self.grid = grid
        self.samples = samples
        self.segments = segments
        self.unpaired = unpaired if unpaired is not None else [{} for _ in samples]
        """Per sample, clean position -> why no corrupted position pairs with it."""
        self.layer_kinds = tuple(layer_kinds)
        """The module class of every layer of the stack (`ModelShape.layer_kinds`), or empty."""
        self.windows = list(grid.windows)
        self.layers = sorted({cell.layer for row in cells for cell in row})
        self.heads = sorted({cell.head for row in cells for cell in row if cell.head is not None})
        self.by_token = grid.positions == "tokens"
        if self.by_token:
            self.keys: list[Any] = list(range(max(len(grid.selected(s)) for s in segments)))
        else:
            self.keys = list(dict.fromkeys(cell.key for row in cells for cell in row))
        self.place = "position" if self.by_token else "segment"
        # where each coordinate value sits (`index` runs once per cell of a sweep)
        self._window, self._layer, self._head, self._key = (
            {value: i for i, value in enumerate(values)}
            for values in (self.windows, self.layers, self.heads, self.keys)
        )
        self.head_sites = HEAD_SITES
        if not self.keys or not self.layers:
            from ..engine.sites import GridError

            chosen = list(grid.segments) if grid.segments is not None else "all"
            raise GridError(
                f"the grid selects no {self.place if not self.keys else 'layer'} of any sample (segments "
                f"{chosen}, skipping {list(grid.skip)}), so the result would be empty. Skip fewer "
                "segments, or choose segments the prompts hold."
            )

    def dims(self, site: str) -> list[str]:
        head = ["head"] if site in self.head_sites else []
        return ["sample", "window", "layer", *head, self.place]

    def index(self, sample: int, cell: Cell) -> tuple[int, ...]:
        """Array index of a cell of one sample, in its site's variable."""
        window, layer, key = self._window[cell.window], self._layer[cell.layer], self._key[cell.key]
        if cell.head is None:
            return (sample, window, layer, key)
        return (sample, window, layer, self._head[cell.head], key)

    def empty(self, attrs: dict[str, Any]) -> xr.Dataset:
        """NaN-filled result with every coordinate, plus `progress` and `done` per sample."""
        n = len(self.samples)
        sizes = {
            "sample": n,
            "window": len(self.windows),
            "layer": len(self.layers),
            "head": len(self.heads),
            self.place: len(self.keys),
        }
        data_vars: dict[str, Any] = {
            site: (self.dims(site), np.full([sizes[d] for d in self.dims(site)], np.nan))
            for site in self.grid.sites
        }
        data_vars["clean"] = (["sample"], np.full(n, np.nan))
        data_vars["corrupt"] = (["sample"], np.full(n, np.nan))
        data_vars["progress"] = (["sample"], np.zeros(n, dtype=np.int64))
        data_vars["done"] = (["sample"], np.zeros(n, dtype=bool))
        coords: dict[str, Any] = {
            "sample": strings("sample", sample_ids(self.samples)),
            "window": self.windows,
            "layer": self.layers,
            self.place: np.array(self.keys) if self.by_token else strings(self.place, self.keys),
        }
        if self.heads:
            coords["head"] = self.heads
        if self.layer_kinds:
            # Mllama interleaves self- and cross-attention layers: a NaN cell there means "no such
            # site", not "no effect"
            coords["layer_kind"] = strings("layer", [self.layer_kinds[layer] for layer in self.layers])
        if self.by_token:
            coords.update(position_coords(self.segments, self.grid, len(self.keys)))
        coords["unpaired"] = strings(("sample", self.place), self.unpaired_reasons())
        return xr.Dataset(data_vars, coords=coords, attrs=attrs)

    def unpaired_reasons(self) -> np.ndarray:
        """Per (sample, position or segment): why some of its clean positions have no corrupted
        partner (`vlmtrace.engine.alignment`), "" where every position pairs. Such a position is
        never patched: a token cell is NaN, a segment cell patches the others."""
        reasons = np.full((len(self.samples), len(self.keys)), "", dtype=object)  # objects: see Format
        for s, (sample_segments, unpaired) in enumerate(zip(self.segments, self.unpaired, strict=True)):
            if not unpaired:
                continue
            chosen = self.grid.selected(sample_segments)
            if self.by_token:
                for k, p in enumerate(chosen):
                    reasons[s, k] = unpaired.get(p, "")
                continue
            for key, positions in self.grid.keys(sample_segments):
                missing = [p for p in positions if p in unpaired]
                if missing:
                    why = unpaired[missing[0]]
                    reasons[s, self.keys.index(key)] = f"{len(missing)} of {len(positions)} unpaired: {why}"
        return reasons


def patching_attrs(
    vlm: VLM,
    *,
    grid: Grid,
    stack: str,
    corruption: Corruption,
    metric: Metric,
    direction: str,
    whole_answer: bool,
    recipe: str,
) -> dict[str, Any]:
    """Provenance of a patching result."""
    return provenance(
        vlm,
        recipe=recipe,
        experiment="patch",
        stack=stack,
        corruption=corruption.describe(),
        metric=metric.name,
        direction=direction,
        whole_answer=whole_answer,
        grid={k: (list(v) if isinstance(v, tuple | list) else v) for k, v in asdict(grid).items()},
    )


def position_coords(segments: list[Segments], grid: Grid, width: int) -> dict[str, Any]:
    """Per-sample token strings, segment labels and prompt indices of grid positions."""
    tokens = np.full((len(segments), width), "", dtype=object)
    labels = np.full((len(segments), width), "", dtype=object)
    index = np.full((len(segments), width), -1)
    for s, sample_segments in enumerate(segments):
        for k, p in enumerate(grid.selected(sample_segments)):
            tokens[s, k] = sample_segments.tokens[p]
            labels[s, k] = sample_segments.labels[p]
            index[s, k] = p
    dims = ("sample", "position")
    return {"token": strings(dims, tokens), "label": strings(dims, labels), "index": (dims, index)}


METRIC_UNITS = {
    "probability": "probability (0 to 1)",
    "log_prob": "nats (log probability)",
    "logit_diff": "logits (answer minus foil)",
    "kl": "nats (KL divergence from the clean run)",
}
SITE_VARIABLES = (
    "resid_pre",
    "block",
    "attn",
    "mlp",
    "cross_attn",
    "attn_head",
    "cross_attn_head",
    "encoder",
    "decoder",
)


def metric_units(ds: xr.Dataset) -> str:
    """Units of the metric a result holds; per coordinate when a `metric` dim mixes them."""
    if "metric" in ds.dims:
        return "; ".join(f"{m}: {METRIC_UNITS.get(str(m), str(m))}" for m in ds["metric"].values)
    metric = str(ds.attrs.get("metric", ""))
    return METRIC_UNITS.get(metric, metric or "as the metric")


def describe(ds: xr.Dataset) -> xr.Dataset:
    """Give every data variable `description` and `units` attrs (those it lacks), in place.

    Engine variables (site traces, clean, corrupt, done, knockout) are described here;
    a recipe describes the variables it derives. A variable nobody described is an error, so
    a store never leaves a reader guessing.
    """
    units = metric_units(ds)
    noising = ds.attrs.get("direction") == "noise"
    run, restored = ("clean", "patched in from the corrupted run") if noising else ("corrupted", "restored")
    known = {
        "clean": ("metric of the clean run (no corruption, no patch)", units),
        "corrupt": ("metric of the corrupted run (no patch)", units),
        "done": ("True once every cell of the sample has been computed", "boolean"),
        "knockout": ("metric with attention from the block's keys to its queries cut over the window", units),
    }
    for site in SITE_VARIABLES:
        what = "the residual entering the layer" if site == "resid_pre" else f"the {site} output"
        known[site] = (
            f"metric of the {run} run with {what} {restored} at one cell "
            "(window of layers centred on `layer`, at the position, segment or head)",
            units,
        )
    missing = []
    for name in ds.data_vars:  # the Variables themselves (a DataArray per name costs more than this)
        var = ds.variables[name]
        description, unit = known.get(str(name), (None, None))
        if description is not None:
            var.attrs.setdefault("description", description)
            var.attrs.setdefault("units", unit)
        if "description" not in var.attrs or "units" not in var.attrs:
            missing.append(str(name))
    if missing:
        raise ValueError(
            f"data variables {missing} have no description/units attrs; set "
            "ds[name].attrs['description'] and ds[name].attrs['units'] before saving."
        )
    return ds


def save(ds: xr.Dataset, path: str | Path, *, overwrite: bool = False) -> Path:
    """Write a Dataset to a zarr store; refuses to replace an existing store unless asked.

    The store is zarr format 2 with consolidated metadata (see Format), and every data
    variable is described (`describe`). `overwrite` replaces only a store vlmtrace wrote:
    a folder of the user's, a plain file or a foreign zarr store is refused and left as it
    is. A path a running sweep holds is refused (`vlmtrace.results.lock`).
    """

    path = checked_path(path)
    ds = describe(ds.copy())
    for variable in ds.variables.values():
        variable.encoding = {}  # a sweep store's zarr-3 codecs do not apply to format 2
    # one writer per path; the store appears complete or not at all (`vlmtrace.results.store`)
    with path_lock(path, purpose="saving a result"):
        if os.path.lexists(path):
            check_replaceable(path)  # only a store vlmtrace wrote (or an empty folder) is replaced
            if not overwrite:
                raise StoreError(
                    f"{path} already exists; pass overwrite=True (CLI: --overwrite) to replace it."
                )
        write_whole(ds, path, replace=overwrite, zarr_format=2, consolidated=True)
    return path


def open_result(path: str | Path) -> xr.Dataset:
    """Read a store written by `save` (or a sweep's store), loaded into memory.

    A missing, truncated or altered chunk file (every chunk's checksum is verified) is a
    StoreError naming the file (`vlmtrace.results.store`).
    """

    return read_store(path)


def combine(datasets: dict[str, xr.Dataset], *, dim: str) -> xr.Dataset:
    """Stack results of several conditions (corruptions, constraints, metrics) along `dim`.

    Each condition's own attrs (its corruption, metric, config hash) are kept under
    `conditions`, since xarray would otherwise keep only the attrs all conditions share. The
    combined result is `created` when its last condition was, and its `config_hash` is a
    hash of the conditions' hashes.
    """
    names = list(datasets)
    combined = xr.concat([datasets[n] for n in names], dim=dim, combine_attrs="drop_conflicts")
    combined = combined.assign_coords({dim: np.array(names, dtype=object)})
    combined.attrs.update(joint_attrs(datasets))
    return combined


def joint_attrs(datasets: dict[str, xr.Dataset]) -> dict[str, Any]:
    """Attrs of a result built from several: each part's own under `conditions`, and the
    `created` time (the last part's) and `config_hash` (of the parts' hashes) of the whole."""
    import hashlib

    kept = ("corruption", "metric", "direction", "grid", "config_hash", "created")
    conditions = {n: {k: v for k, v in ds.attrs.items() if k in kept} for n, ds in datasets.items()}
    attrs: dict[str, Any] = {"conditions": json.dumps(conditions)}
    created = [c["created"] for c in conditions.values() if "created" in c]
    if created:
        attrs["created"] = max(created)  # ISO 8601 in UTC: text order is time order
    hashes = [f"{n}={c['config_hash']}" for n, c in conditions.items() if "config_hash" in c]
    if hashes:
        attrs["config_hash"] = hashlib.sha256(";".join(hashes).encode()).hexdigest()[:16]
    return attrs


def assemble(ds: xr.Dataset, path: str | Path, *, overwrite: bool = False) -> bool:
    """Save a sharded run's final result exactly once; True if this call wrote it.

    Every shard of a recipe that finds all samples done may call this: the first to take the
    lock writes the store (`vlmtrace.results.dataset.save`), and the others find it there with equal
    values and return False (their result is already saved). A store with other values is
    refused as `save` refuses it, unless `overwrite`.
    """
    path = checked_path(path)
    with path_lock(path, purpose="assembling a result"):
        if path.exists() and not overwrite:
            try:
                there = read_store(path)
            except StoreError:
                there = None
            if there is not None and there.drop_attrs().equals(ds.drop_attrs()):
                return False
        save(ds, path, overwrite=overwrite)  # re-enters the lock held here
    return True


# --- reading, with damage named by path ----------------------------------------------------
