"""Causal tracing in a dual-stream VLM: Gaussian noise on the image, restore each state.

Palit et al., "Towards Vision-Language Mechanistic Interpretability: A Causal Tracing Tool
for BLIP" (2023).

Hypothesis. In BLIP, vision and language are processed apart until late: restoring clean
states helps only in the final layers of the question encoder and of the answer decoder.

Corruption. Gaussian noise (3 x the std of the clean image embeddings, 10 seeded draws) on
the vision encoder's output before it reaches the question encoder's cross-attention.

Intervention. Restore each (layer, token) output state of the question encoder, and each
(layer, token) state of the answer decoder, from the clean run (window 1).

Metric. P(answer | restored) - P(answer | corrupted), averaged over samples. Variables are
`encoder` (dims ... question_position) and `decoder` (... answer_position).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import xarray as xr

import vlmtrace as vt
from vlmtrace.data import synthetic_samples
from vlmtrace.options import Options
from vlmtrace.presentation import plots
from vlmtrace.presentation.progress import sweeping
from vlmtrace.presentation.report import below_floor, total_effect
from vlmtrace.presentation.titles import describe_run
from vlmtrace.recipes import Needs
from vlmtrace.results.dataset import joint_attrs
from vlmtrace.results.stats import bootstrap_mean

DESCRIPTION = (
    "Palit et al.: Gaussian noise on BLIP's image embeddings; restore every encoder and decoder state"
)
DEFAULT_MODEL = "shapes-blip"
ORGANISMS = ("shapes-blip",)
NEEDS = Needs()
FAMILY = "visual"
STACKS = {"encoder": "question_position", "decoder": "answer_position"}


def default_samples(vlm: vt.VLM, n: int, seed: int) -> list[vt.Sample]:
    return synthetic_samples(vlm, FAMILY, n, seed=seed)


def run(
    vlm: vt.VLM,
    samples: list[vt.Sample],
    *,
    scale: float = 3.0,
    noise_samples: int = 10,
    seed: int = 0,
    options: Options = Options(),
) -> xr.Dataset:
    corruption = vt.GaussianNoise("image", scale=scale, samples=noise_samples, seed=seed)
    parts = []
    for stack, position in STACKS.items():
        with sweeping(f"blip_noise: image noised, restore {stack} states, P(answer)"):
            ds = vt.patch(
                vlm,
                samples,
                corruption=corruption,
                grid=vt.Grid(sites=("block",), stack=stack),
                metric=vt.Probability(),
                **options.sweep(stack),
                recipe="blip_noise",
            )
        renamed = {
            "block": stack,
            "position": position,
            "token": f"{stack}_token",
            "label": f"{stack}_label",
            "index": f"{stack}_index",
        }
        parts.append(ds.rename(renamed))
    # Both sweeps score the same clean and noised runs, but in batches of other sizes, so their
    # `clean` / `corrupt` agree only to float rounding (~1e-7); keep the encoder sweep's.
    for name in ("clean", "corrupt"):
        if not np.allclose(parts[0][name], parts[1][name], atol=1e-5):
            raise RuntimeError(
                f"the encoder and decoder sweeps scored different {name} runs; they should agree to "
                "float rounding (same samples, noise seed and model). Please report this."
            )
    merged = xr.merge(parts, compat="override", join="outer", combine_attrs="drop_conflicts")
    return merged.assign_attrs(joint_attrs(dict(zip(STACKS, parts, strict=True))))


def effect(ds: xr.Dataset, stack: str) -> xr.DataArray:
    """Indirect effect of restoring each state, averaged over samples with a bootstrap CI."""
    return bootstrap_mean(ds[stack] - ds["corrupt"]).sel(window=1)


def figures(ds: xr.Dataset, out_dir: Path) -> list[Path]:
    paths = []
    for stack, position in STACKS.items():
        summary = effect(ds, stack)["mean"].dropna(position, how="all")
        tokens = ds[f"{stack}_token"].sel({position: summary[position]}).values  # (sample, position)
        # a position is labelled with its token only where every sample has the same token there
        labels = [
            str(column[0]) if (column == column[0]).all() else f"#{k} (varies)"
            for k, column in enumerate(tokens.T)
        ]
        summary = summary.assign_coords(token=(position, labels))
        paths.append(
            plots.heatmap(
                summary,
                path=Path(out_dir) / f"{stack}.png",
                title=f"{stack}: each state restored (window 1), mean over {ds.sizes['sample']} samples\n"
                + describe_run(ds),
                label="indirect effect, P(answer) patched - corrupted",
                total=float(total_effect(ds).mean()),
                floor=vt.Probability.gap_floor,
            )
        )
    return paths


def summary(ds: xr.Dataset) -> str:
    lines = [f"clean P = {float(ds['clean'].mean()):.3f}, noised P = {float(ds['corrupt'].mean()):.3f}"]
    floor = below_floor(ds)
    if floor is not None:  # the noise barely moved P(answer): the largest restoration is noise too
        return "\n".join([*lines, floor])
    # restoring moves P(answer) toward the clean run's: down where the noise raised it (an answer
    # the model does not give, kept with --keep-wrong), so the strongest restoration is the lowest
    toward = 1.0 if float((ds["clean"] - ds["corrupt"]).mean()) >= 0 else -1.0
    if toward < 0:
        lines.append(
            "the noise raised P(answer): restoring lowers it, so the strongest restoration is the lowest"
        )
    for stack, position in STACKS.items():
        mean = effect(ds, stack)["mean"]
        by_layer = toward * (toward * mean).max(position)
        best = int(np.nanargmax(toward * by_layer.values))
        lines.append(
            f"{stack}: strongest restoration at layer {int(mean['layer'][best])} "
            f"({float(by_layer[best]):+.3f}); per layer: "
            + ", ".join(
                f"L{int(layer)} {float(v):+.3f}" for layer, v in zip(mean["layer"], by_layer, strict=True)
            )
        )
    return "\n".join(lines)
