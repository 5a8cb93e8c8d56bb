"""Gaussian noise vs symmetric token replacement, under three metrics, side by side.

Zhang & Nanda, "Towards Best Practices of Activation Patching in Language Models: Metrics
and Methods" (2024).

Hypothesis. The corruption and the metric change what patching finds: Gaussian noise (GN)
pushes the corrupted run out of distribution and can produce illusory localisation, while
symmetric token replacement (STR) keeps it in distribution; probability saturates where
logit difference does not; KL needs no answer at all.

Corruption. (a) GN: 3 x std noise on the visual-constraint phrase's token embeddings (5
seeded draws, ROME); (b) STR: the phrase replaced by one of the same token count; with
`Options(inpaint=...)` (CLI `--inpaint`) also (c) the seed's "SIP with generative models": the
selected object's region inpainted (`vt.InpaintPair`, OpenCV or a diffusers pipeline).

Intervention. Restore the clean residual stream (block output) at every (text token, layer).

Metric. Probability, logit difference (answer vs the corrupted side's answer) and KL to the
clean distribution, each normalised: (m_patched - m_corrupt) / (m_clean - m_corrupt). The
result has dims `corruption` and `metric`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import xarray as xr

import vlmtrace as vt
from vlmtrace.data import synthetic_samples
from vlmtrace.engine.inpainting import as_inpainting, inpainting_record
from vlmtrace.options import Options
from vlmtrace.presentation import plots
from vlmtrace.presentation.progress import sweeping
from vlmtrace.presentation.titles import describe_run
from vlmtrace.recipes import Needs
from vlmtrace.results.dataset import combine
from vlmtrace.results.stats import bootstrap_mean, by_segment

DESCRIPTION = (
    "Zhang & Nanda: Gaussian noise vs symmetric token replacement, scored by probability, logit diff, KL"
)
DEFAULT_MODEL = "shapes-llava"
ORGANISMS = ("shapes-llava", "shapes-blip", "shapes-qwen")
NEEDS = Needs(replacements=("visual",), foil=True)  # logit_diff: answer vs the corrupted side's
FAMILY = "fact"
INPAINTS = True  # Options.inpaint adds the seed's SIP with generative models
METRICS = {"probability": vt.Probability(), "logit_diff": vt.LogitDiff(), "kl": vt.KL()}


def default_samples(vlm: vt.VLM, n: int, seed: int) -> list[vt.Sample]:
    return synthetic_samples(vlm, FAMILY, n, seed=seed)


def run(
    vlm: vt.VLM,
    samples: list[vt.Sample],
    *,
    seed: int = 0,
    options: Options = Options(),
) -> xr.Dataset:
    corruptions = {
        "gaussian_noise": vt.GaussianNoise("visual", scale=3.0, samples=5, seed=seed),
        "str": vt.SymmetricTokenReplacement("visual"),
    }
    if options.inpaint:  # the seed's third column: SIP with generative models (the object region inpainted)
        corruptions["inpaint"] = as_inpainting(options.inpaint, seed=seed)
    grid = vt.Grid(sites=("block",), skip=("image",))
    by_corruption = {}
    for name, corruption in corruptions.items():
        by_metric = {}
        for metric_name, metric in METRICS.items():
            with sweeping(f"gn_vs_str: {name}, restore block outputs, {metric_name}"):
                by_metric[metric_name] = vt.patch(
                    vlm,
                    samples,
                    corruption=corruption,
                    grid=grid,
                    metric=metric,
                    **options.sweep(f"{name}.{metric_name}"),
                    recipe="gn_vs_str",
                )
        by_corruption[name] = combine(by_metric, dim="metric")
    ds = combine(by_corruption, dim="corruption")
    ds["normalised"] = vt.normalised(ds, "block")
    ds["normalised"].attrs |= {  # beside its gap floor (`vt.normalised`)
        "description": "normalised effect of restoring the block output: "
        "(patched - corrupt) / (clean - corrupt)",
        "units": "fraction of the clean-corrupted gap (0 = corrupted, 1 = clean)",
    }
    if "inpaint" in corruptions:
        record = inpainting_record(corruptions["inpaint"], samples)
        ds = xr.merge([ds, record.drop_vars(["image_height", "image_width"])], combine_attrs="override")
        ds.attrs["inpainting"] = record.attrs["inpainting"]
    return ds


def maps(ds: xr.Dataset) -> xr.DataArray:
    """Normalised effect by (corruption, metric, layer, segment), averaged over samples."""
    return bootstrap_mean(by_segment(ds["normalised"].sel(window=1)))["mean"]


def figures(ds: xr.Dataset, out_dir: Path) -> list[Path]:
    summary = maps(ds)
    paths = []
    n = ds.sizes["sample"]
    for corruption in summary["corruption"].values:
        part = ds.sel(corruption=corruption)
        counts = vt.above_floor(part).sum("sample")  # samples with a gap above the metric's floor
        over = ", ".join(f"{m}: {int(counts.sel(metric=m))} of {n}" for m in counts["metric"].values)
        paths.append(
            plots.window_panels(
                summary.sel(corruption=corruption),
                by="metric",
                path=Path(out_dir) / f"{corruption}.png",
                title=f"block output restored (window 1), mean over the samples whose gap is above the "
                f"metric's floor ({over}), by metric\n" + describe_run(part),
                label="normalised effect (0 = corrupted, 1 = clean)",
                total=1.0,  # normalised: 1 is the whole clean - corrupted gap
            )
        )
    return paths


def summary(ds: xr.Dataset) -> str:
    mean = maps(ds)
    lines = []
    for metric in mean["metric"].values:
        gn = mean.sel(corruption="gaussian_noise", metric=metric).values.ravel()
        st = mean.sel(corruption="str", metric=metric).values.ravel()
        keep = np.isfinite(gn) & np.isfinite(st)
        r = float(np.corrcoef(gn[keep], st[keep])[0, 1]) if keep.sum() > 2 else float("nan")
        peaks = []
        for corruption, values in (("GN", gn), ("STR", st)):
            cell = mean.sel(corruption="str", metric=metric)
            if not np.isfinite(
                values
            ).any():  # every sample's gap below the metric's floor: nothing to normalise
                peaks.append(f"{corruption} no finite normalised effect (no gap above {metric}'s floor)")
                continue
            layer, segment = np.unravel_index(int(np.nanargmax(values)), cell.shape)
            peaks.append(f"{corruption} peak L{int(cell['layer'][layer])}/{cell['segment'].values[segment]}")
        line = f"{metric}: GN vs STR map correlation r={r:+.2f}; " + ", ".join(peaks)
        if "inpaint" in mean["corruption"].values:
            inpainted = mean.sel(corruption="inpaint", metric=metric).values.ravel()
            both = np.isfinite(inpainted) & np.isfinite(st)
            r_inpaint = (
                float(np.corrcoef(inpainted[both], st[both])[0, 1]) if both.sum() > 2 else float("nan")
            )
            line += f"; inpainting vs STR r={r_inpaint:+.2f}"
        lines.append(line)
    return "\n".join(lines)
