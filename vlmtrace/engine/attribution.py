"""Attribution patching: estimate a whole patching grid from one forward and backward pass.

Exact patching runs one forward per cell; a (layer x position x head) grid of a 7B LLaVA
has ~10^5 cells. Attribution patching (Nanda 2023; Syed et al. 2023; Kramár et al. 2024,
"AtP*") replaces each patched run by its first-order Taylor expansion around the run that is
patched: restoring clean activations `a_clean` into the corrupted run changes the metric by
about `grad m(corrupted) . (a_clean - a_corrupt)`, summed over the activations the cell
restores. One backward pass gives the gradient at every site at once, so the whole grid
costs one forward and one backward per sample instead of one forward per cell:

    est = attribute(vlm, samples, corruption=ImagePair(), grid=Grid(sites=("mlp", "attn_head")))
    masks = screen(est, k=20)                     # top 20 cells per (sample, window) and site
    exact = patch(vlm, samples, ...)              # same layout: compare cell by cell
    agreement(est, exact, k=20)["mlp"]            # {"overlap": ..., "spearman": ...}

The result has exactly the layout of `vlmtrace.patch` for the same arguments (same
variables, dims, coordinates, NaN where a cell has nothing to patch), with the estimate of
the patched run's metric in each cell:

    denoise   m_corrupt + sum_cell grad m(corrupt) . (a_clean - a_corrupt)
    noise     m_clean   + sum_cell grad m(clean)   . (a_corrupt - a_clean)

A cell's sum runs over its positions (segments, "all") and over the layers of its window;
Gaussian noise with k draws averages the k estimates, as patching averages the k runs.

What the first order misses, so read the estimates as a *screen*, not a measurement:
- Saturation: where P(answer) is near 0 or 1 the gradient is small and large effects are
  underestimated (AtP*'s first failure mode); LogProb or LogitDiff are more linear.
- Windows: restoring layers l and l+1 at once cuts the path from l through l+1, but the sum
  of per-layer estimates counts it twice; wide windows of the residual stream ("block") are
  overestimated. Rank cells within one window size (`screen` and `agreement` do).
- KL: KL(clean || x) is minimal, and quadratic, at the clean run. In the "noise" direction
  its gradient there is zero (every estimate equals the clean value; `attribute` warns);
  denoising, a first order misses half the curvature. Screen with LogProb or LogitDiff.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import nnsight
import numpy as np
import torch
import xarray as xr

from ..data.sample import Sample
from ..models.adapter import Stack
from ..models.load import VLM
from ..presentation.progress import progress_bar
from ..results.dataset import Layout, describe
from .corruptions import Corruption
from .forward import SEQUENCE_FIELDS, _activation, _noise, driver, envoy_at, stack_rows
from .layouts import rows_view
from .metrics import KL, Metric, Probability
from .planning import (
    Direction,
    Plan,
    Prepared,
    baseline_edits,
    checked_stack,
    lay_out,
    warn_if_corruption_did_nothing,
    with_layer_kinds,
)
from .sites import HEAD_SITES, Cell, Grid

__all__ = [
    "AttributionWarning",
    "agreement",
    "attribute",
    "effects",
    "estimate",
    "keep_screened",
    "screen",
    "spearman",
]

Terms = dict[tuple[int, str], np.ndarray]
"""(layer, site) -> grad . delta per noise draw and aligned position: [draws, pairs(, head)]."""


class AttributionWarning(UserWarning):
    """A combination of metric and direction whose first-order estimates carry no information."""


def attribute(
    vlm: VLM,
    samples: Sequence[Sample],
    *,
    corruption: Corruption,
    grid: Grid = Grid(),
    metric: Metric = Probability(),
    direction: Direction = "denoise",
    whole_answer: bool = False,
    progress: bool = True,
) -> xr.Dataset:
    """First-order estimates of `vlmtrace.patch(...)` for every cell, in `patch`'s layout.

    One forward (clean row + corrupted rows) and one backward per sample; `attrs["experiment"]`
    is "attribution" so an estimate is never mistaken for a measurement.
    """
    stack_name, stack = checked_stack(vlm, samples, grid, direction, verb="attribute")
    if direction == "noise" and isinstance(metric, KL):
        warnings.warn(
            "KL(clean || x) has zero gradient at the clean run, so every noising estimate equals "
            "the clean value; use direction='denoise' or the LogProb / LogitDiff metric.",
            AttributionWarning,
            stacklevel=2,
        )
    plans, layout, attrs = lay_out(
        vlm,
        samples,
        stack_name,
        grid,
        corruption,
        metric,
        direction,
        whole_answer,
        "",
        {"experiment": "attribution"},
    )
    ds = with_layer_kinds(layout.empty(attrs), vlm, stack_name)
    estimate(ds, layout, plans, vlm, stack, direction=direction, metric=metric, progress=progress)
    warn_if_corruption_did_nothing(ds)
    return describe(ds.drop_vars("progress"))


def estimate(
    ds: xr.Dataset,
    layout: Layout,
    plans: Sequence[Plan],
    vlm: VLM,
    stack: Stack,
    *,
    direction: Direction,
    metric: Metric,
    indices: Sequence[int] | None = None,
    progress: bool = False,
) -> None:
    """Fill `ds` (from `layout.empty`) with estimates for the samples at `indices` (all: None).

    The engine's entry point: `patch(..., screen=k)` has its plans and layout already, and
    estimates only its own shard's samples.
    """
    chosen = range(len(plans)) if indices is None else indices
    with progress_bar(progress, f"attributing {vlm.name}") as bar:
        task = bar.add_task("samples", total=len(chosen))
        for i in chosen:
            _fill_sample(ds, layout, i, plans[i], vlm, stack, direction, metric)
            bar.advance(task, 1)


def _fill_sample(
    ds: xr.Dataset,
    layout: Layout,
    sample: int,
    sample_plan: Plan,
    vlm: VLM,
    stack: Stack,
    direction: Direction,
    metric: Metric,
) -> None:
    """Estimate every cell of one sample's work list and write it, with the baselines, to `ds`."""
    prepared, cells = sample_plan.prepared, sample_plan.cells
    pairs = sorted(sample_plan.aligned.items())  # (clean position, corrupted position), unpadded
    pair_of = {clean: n for n, (clean, _) in enumerate(pairs)}
    wanted = sorted({(layer, cells[c].site) for c in sample_plan.work for layer in cells[c].layers})
    values, terms = _gradient_terms(vlm, stack, prepared, pairs, wanted, direction, metric)
    clean, corrupt = float(values[0]), float(values[1:].mean())
    base = corrupt if direction == "denoise" else clean
    # The mean over noise draws commutes with the sums over layers and positions: take it first.
    mean_terms = {key: term.mean(0) for key, term in terms.items()}
    for c in sample_plan.work:
        cell = cells[c]
        ds[cell.site].values[layout.index(sample, cell)] = base + _cell_sum(cell, mean_terms, pair_of)
    ds["clean"].values[sample] = clean
    ds["corrupt"].values[sample] = corrupt
    ds["done"].values[sample] = True


def _cell_sum(cell: Cell, terms: Terms, pair_of: dict[int, int]) -> float:
    """The first-order change of one cell: its terms over its layers and aligned positions."""
    index = [pair_of[p] for p in cell.positions if p in pair_of]
    total = 0.0
    for layer in cell.layers:
        term = terms[(layer, cell.site)][index]
        total += float((term[:, cell.head] if cell.head is not None else term).sum())
    return total


def _gradient_terms(
    vlm: VLM,
    stack: Stack,
    prepared: Prepared,
    pairs: list[tuple[int, int]],
    wanted: list[tuple[int, str]],
    direction: Direction,
    metric: Metric,
) -> tuple[torch.Tensor, Terms]:
    """One forward of the clean and corrupted rows and one backward of their metrics.

    Returns the metric of each row (clean, then one per noise draw) and, for every wanted
    (layer, site), `grad . delta` at every aligned position pair, reduced over features
    (per head for head sites) inside the trace, so only small arrays leave it.

    Gradients come from nnsight's backward trace (`with values.sum().backward():`, reading
    `.grad` of the activations captured in the forward, latest first). Rows of a batch do not
    interact, so the gradient of the summed metrics at a row is that row's own gradient.
    """
    k = prepared.pair.samples
    inputs = ["clean"] + ["corrupt"] * k
    edits = baseline_edits(vlm, prepared, inputs, [0, *range(k)])
    batch = stack_rows(vlm, prepared.rows(inputs), prepared.widths)
    pad_clean, pad_corrupt = prepared.pad("clean", stack.sequence), prepared.pad("corrupt", stack.sequence)
    clean_at = torch.tensor([clean + pad_clean for clean, _ in pairs], dtype=torch.long)
    corrupt_at = torch.tensor([corrupt + pad_corrupt for _, corrupt in pairs], dtype=torch.long)
    n_heads = vlm.shape.heads[next(name for name, s in vlm.adapter.stacks.items() if s is stack)]
    answer_slice = prepared.answer_slice(vlm)
    answer, foil = prepared.answer, prepared.foil
    envoy = vlm.envoy
    layers = envoy_at(envoy, stack.layers)
    by_layer = {layer: [site for lay, site in wanted if lay == layer] for layer, _ in wanted}
    rows, width = batch[SEQUENCE_FIELDS[stack.sequence][0]].shape
    prompt_width = batch["input_ids"].shape[1]
    with torch.enable_grad(), _activation_gradients_only(vlm.model):
        with envoy.trace(fn=driver(vlm), **batch) as tracer:
            if edits.noise is not None:
                _noise(edits.noise, _activation(envoy, edits.noise.hook), rows, prompt_width)
            if wanted:
                first = layers[0].input
                if not first.requires_grad:
                    first.requires_grad_(True)  # weights are frozen: the graph starts at the stack
            captured = []  # (key, activation), in the order the model runs them
            for layer in sorted(by_layer):
                for site, hook in stack.sites.items():
                    if site in by_layer[layer]:
                        captured.append(((layer, site), hook, _activation(layers[layer], hook)))
            logits = tracer.result[:, answer_slice]
            # A detached copy of the clean row as row 0: metrics that score against the clean run
            # (KL) then treat it as a constant, so each row's gradient is that of its own score.
            reference = torch.cat([logits[:1].detach(), logits])
            foil_ids = None if foil is None else foil.to(logits.device)
            scored = metric(reference, answer.to(logits.device), foil_ids)[1:]
            values = scored.detach().float().cpu().save()
            terms = nnsight.save({})
            if captured:
                with scored.sum().backward():
                    for key, hook, live in reversed(captured):  # autograd reaches them latest first
                        name = hook.path or "<layer>"
                        activation = rows_view(live, hook.layout, rows=rows, width=width, hook=name)
                        grad = rows_view(live.grad, hook.layout, rows=rows, width=width, hook=name)
                        if direction == "denoise":  # gradient at the corrupted rows, towards clean
                            delta = activation[:1, clean_at] - activation[1:, corrupt_at]
                            product = grad[1:, corrupt_at].float() * delta.float()
                        else:  # gradient at the clean row, towards each corrupted draw
                            delta = activation[1:, corrupt_at] - activation[:1, clean_at]
                            product = grad[:1, clean_at].float() * delta.float()
                        if key[1] in HEAD_SITES:
                            product = product.view(*product.shape[:-1], n_heads, -1)
                        terms[key] = product.sum(-1).detach().cpu()
    return values, {key: term.numpy() for key, term in terms.items()}


@contextmanager
def _activation_gradients_only(model: torch.nn.Module) -> Iterator[None]:
    """Freeze the weights for one backward, restoring their flags after.

    Only gradients of activations are wanted. With trainable weights, backward would also
    compute and keep a gradient per parameter (as large as the model: 14 GB for a 7B LLaVA)
    and leave it in `param.grad`; frozen, it computes none, and the trace instead makes the
    stack's input require grad so the graph starts there.
    """
    flags = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
    for parameter, _ in flags:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)


def site_variables(ds: xr.Dataset) -> list[str]:
    """The per-site variables of a patching or attribution result (those with a layer dim)."""
    return [str(name) for name, var in ds.data_vars.items() if "layer" in var.dims]


def effects(ds: xr.Dataset, site: str) -> xr.DataArray:
    """A site's cells minus the run they patch: m_patched - m_corrupt (denoise) or - m_clean."""
    direction = ds.attrs.get("direction")
    if direction not in ("denoise", "noise"):
        raise ValueError(
            f"the result's `direction` attr is {direction!r}, not 'denoise' or 'noise'; pass a "
            "Dataset returned by attribute() or patch() (attrs do not survive xarray arithmetic)."
        )
    return ds[site] - ds["corrupt" if direction == "denoise" else "clean"]


def _grouped(da: xr.DataArray) -> tuple[np.ndarray, tuple[str, ...]]:
    """Values as [sample, window, cells]: one group per (sample, window), cells flattened."""
    rest = [d for d in da.dims if d not in ("sample", "window")]
    ordered = da.transpose("sample", "window", *rest)
    return ordered.values.reshape(da.sizes["sample"], da.sizes["window"], -1), tuple(ordered.dims)


def _top(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest finite values (fewer if fewer are finite), largest first."""
    finite = np.flatnonzero(np.isfinite(values))
    order = np.argsort(-values[finite], kind="stable")
    return finite[order[:k]]


def screen(estimates: xr.Dataset, k: int) -> dict[str, xr.DataArray]:
    """The k cells of largest estimated |effect| per sample and window size, per site.

    The effect is the estimate minus the run being patched (`corrupt` for denoise, `clean`
    for noise), taken in absolute value: negative effects matter as much as positive ones.
    Ranking is within one window size because wider windows sum more layers (see the module
    docstring).
    Returns a boolean mask per site with that site's dims and coordinates; cells without an
    estimate (NaN) are never selected. `patch(..., screen=k)` runs exactly these cells.
    """
    if k < 1:
        raise ValueError(f"screen needs k >= 1 cells per sample and window, got {k}.")
    masks = {}
    for site in site_variables(estimates):
        magnitude = abs(effects(estimates, site))
        grouped, dims = _grouped(magnitude)
        chosen = np.zeros(grouped.shape, dtype=bool)
        for s in range(grouped.shape[0]):
            for w in range(grouped.shape[1]):
                chosen[s, w, _top(grouped[s, w], k)] = True
        shape = [magnitude.sizes[d] for d in dims]
        mask = xr.DataArray(chosen.reshape(shape), dims=dims, coords=magnitude.transpose(*dims).coords)
        masks[site] = mask.transpose(*estimates[site].dims).rename(site)
    return masks


def keep_screened(
    sample_plan: Plan, layout: Layout, sample: int, masks: dict[str, xr.DataArray]
) -> list[int]:
    """`sample_plan.work` restricted to the cells `screen` selected (what `patch(..., screen=k)` runs)."""
    cells = sample_plan.cells
    return [c for c in sample_plan.work if bool(masks[cells[c].site].values[layout.index(sample, cells[c])])]


def _ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1 of `values`, ties given their average rank (as Spearman's rho needs)."""
    order = np.argsort(values, kind="stable")
    rank = np.empty(len(values))
    rank[order] = np.arange(len(values))
    _, tie, count = np.unique(values, return_inverse=True, return_counts=True)
    return (np.bincount(tie, weights=rank) / count)[tie]


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rank correlation; NaN when either side is constant or has < 2 values."""
    if len(x) < 2:
        return float("nan")
    rx, ry = _ranks(np.asarray(x, dtype=float)), _ranks(np.asarray(y, dtype=float))
    rx, ry = rx - rx.mean(), ry - ry.mean()
    norm = np.sqrt((rx**2).sum() * (ry**2).sum())
    return float((rx * ry).sum() / norm) if norm > 0 else float("nan")


def agreement(estimates: xr.Dataset, exact: xr.Dataset, k: int) -> dict[str, dict[str, float]]:
    """How well attribution ranks cells compared with exact patching, per site.

    For each (sample, window) group of cells that both results have: `overlap`, the share of
    exact patching's top-k cells by |effect| that the screen also picks (what `screen` would
    keep), and `spearman`, the rank correlation of the signed effects over all cells. Both
    are averaged over groups (NaN groups, e.g. constant effects, are skipped); `groups`
    counts the groups.
    """
    report = {}
    for site in site_variables(estimates):
        if site not in exact or exact[site].dims != estimates[site].dims:
            raise ValueError(
                f"site {site!r} is laid out differently in the two results; compare an "
                "attribution with a patch(...) run on the same samples, corruption and grid."
            )
        guess, _ = _grouped(effects(estimates, site))
        truth, _ = _grouped(effects(exact, site))
        overlaps, correlations = [], []
        for s in range(guess.shape[0]):
            for w in range(guess.shape[1]):
                both = np.isfinite(guess[s, w]) & np.isfinite(truth[s, w])
                g, t = guess[s, w][both], truth[s, w][both]
                if len(g) == 0:
                    continue
                top = min(k, len(g))
                shared = set(_top(np.abs(g), top)) & set(_top(np.abs(t), top))
                overlaps.append(len(shared) / top)
                correlations.append(spearman(g, t))
        report[site] = {
            "overlap": float(np.mean(overlaps)) if overlaps else float("nan"),
            "spearman": float(np.nanmean(correlations)) if np.isfinite(correlations).any() else float("nan"),
            "groups": len(overlaps),
        }
    return report


def describe_agreement(report: dict[str, dict[str, float]], k: int) -> str:
    """One line per site, for benchmarks and logs."""
    return "\n".join(
        f"{site:>16}: top-{k} overlap {r['overlap']:.2f}, Spearman {r['spearman']:.2f} ({r['groups']} groups)"
        for site, r in report.items()
    )
