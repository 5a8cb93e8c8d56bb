"""Does integrating gradients at each layer, not at the inputs, rank the block cells better?

`vt.attribute(method="ig")` runs its path through the embeddings (EAP-IG-inputs, Hanna et al.
2024). Sparse-feature-circuit work (Marks et al. 2024) integrates at each layer instead: layer
l's output is moved from the corrupted run's to the clean run's at every position at once, in
`steps` points, the rest of the model runs as it is, and a cell's score is the path's mean
gradient at that position times clean - corrupt. Everything above layer l is then computed
exactly along the path; only layer l's own share is linear. `benchmarks/screen.py` found that no
estimator of `attribution.METHODS` ranks shapes-blip's block cells under STR with the logit
difference (worst material top-5 overlap 0.68-0.70); this measures whether that variant does,
before anyone builds it into the engine.

    python -m benchmarks.screen_layer_ig                    # every organism, ~2 min on 2 cores
    python -m benchmarks.screen_layer_ig --models shapes-blip --steps 4,16

For each organism, corruption (STR, SIP) and metric (P(answer), logit difference): exact
patching (`vt.patch`), `atp` and `ig` (`vt.attribute`, 16 path points), and layer IG with each
of `--steps`, all at the block site, window 1, every layer x every non-special position, 8
samples; each scored by `agreement(estimate, exact, 5)`: the material top-5 overlap and the
Spearman correlation, averaged over samples. Layer IG is computed here in plain torch (forward
hooks on each layer, `torch.autograd.grad`); its one-point version (`steps` = 1, the gradient at
the corrupted run) is atp, which the script checks against the engine's atp (to 1e-3).
"""

from __future__ import annotations

import argparse
import warnings

import numpy as np
import torch
import xarray as xr

import vlmtrace as vt
from benchmarks.screen import CORRUPTIONS, METRICS, ORGANISMS, samples_for
from vlmtrace.engine.attribution import AttributionWarning
from vlmtrace.engine.forward import stack_rows
from vlmtrace.engine.planning import prepare
from vlmtrace.engine.screening import agreement
from vlmtrace.models.adapter import module_at


def stream(output) -> torch.Tensor:
    """A decoder layer's residual stream (layers return a tuple whose first item is it)."""
    return output[0] if isinstance(output, tuple) else output


def replaced(output, value: torch.Tensor):
    return (value, *output[1:]) if isinstance(output, tuple) else value


def layer_ig(vlm: vt.VLM, sample: vt.Sample, corruption, metric, steps: int) -> tuple[np.ndarray, float]:
    """Per (layer, prompt position): corrupt metric + mean path gradient . (clean - corrupt), and
    the corrupted run's metric. One forward and backward per layer, one row per path point."""
    prepared = prepare(vlm, sample, corruption, metric, False)
    sides = prepared.rows(["clean", "corrupt"])
    if any(len(side["input_ids"]) != len(sides[0]["input_ids"]) for side in sides):
        raise SystemExit(
            f"{sample.id}: clean and corrupted prompts differ in length; positions would not pair."
        )
    stack = vlm.adapter.stacks[vlm.adapter.default_stack]
    block = stack.sites["block"]
    if (block.path, block.side, block.layout) != ("", "output", "row_position"):
        raise SystemExit(
            f"{vlm.name}: the block site is {block}, not each layer's [row, position, hidden] output."
        )
    layers = module_at(vlm.model, stack.layers)
    answer_slice = prepared.answer_slice(vlm)

    def score(batch: dict) -> torch.Tensor:
        logits = vlm.adapter.forward(vlm.model, **batch)
        return metric(logits[:, answer_slice], prepared.answer, prepared.foil)

    outputs: dict[int, torch.Tensor] = {}
    keep = [
        layer.register_forward_hook(lambda m, a, out, i=i: outputs.__setitem__(i, stream(out).detach()))
        for i, layer in enumerate(layers)
    ]
    try:
        with torch.no_grad():
            base = score(stack_rows(vlm, sides, prepared.widths))
    finally:
        for handle in keep:
            handle.remove()
    alphas = torch.tensor([0.0] if steps == 1 else [(j + 0.5) / steps for j in range(steps)])
    path_batch = stack_rows(vlm, prepared.rows(["corrupt"] * len(alphas)), prepared.widths)
    estimates = np.empty((len(layers), outputs[0].shape[1]))
    for i, layer in enumerate(layers):
        clean, corrupt = outputs[i][0], outputs[i][1]
        points = (corrupt + alphas.view(-1, 1, 1) * (clean - corrupt)).requires_grad_(True)
        handle = layer.register_forward_hook(lambda m, a, out, points=points: replaced(out, points))
        try:
            with torch.enable_grad():
                (gradient,) = torch.autograd.grad(score(path_batch).sum(), [points])
        finally:
            handle.remove()
        estimates[i] = (gradient.mean(0) * (clean - corrupt)).sum(-1).numpy()
    return estimates, float(base[1])


def layer_ig_dataset(vlm, samples, corruption, metric, exact: xr.Dataset, steps: int) -> xr.Dataset:
    """Layer IG in the exact result's layout (its `index` coordinate maps grid to prompt positions)."""
    estimate = exact[["block", "clean", "corrupt"]].copy(deep=True)
    layer_of = {int(layer): k for k, layer in enumerate(exact["layer"].values)}
    for s, sample in enumerate(samples):
        values, corrupt = layer_ig(vlm, sample, corruption, metric, steps)
        for k, position in enumerate(exact["index"].values[s]):
            if position >= 0:
                for layer, row in layer_of.items():
                    estimate["block"][s, 0, row, k] = corrupt + values[layer, int(position)]
    return estimate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(ORGANISMS))
    parser.add_argument("--steps", default="4,16", help="layer-IG path points, comma-separated")
    parser.add_argument("--samples", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore", AttributionWarning)
    steps = [int(n) for n in args.steps.split(",")]
    print(
        "model          corr metric      "
        + "  ".join(f"{m:>12}" for m in ["atp", "ig16", *[f"layer-ig{n}" for n in steps]])
    )
    for name in args.models.split(","):
        vlm = vt.load(name)
        samples = samples_for(vlm, args.samples, False)
        grid = vt.Grid(sites=("block",), windows=(1,), skip=("special",))
        for corruption_name, corruption in CORRUPTIONS.items():
            for metric_name, metric in METRICS.items():
                common = dict(corruption=corruption(), grid=grid, metric=metric(), progress=False)
                exact = vt.patch(vlm, samples, verify=False, max_batch=128, **common)
                estimates = {
                    "atp": vt.attribute(vlm, samples, method="atp", **common),
                    "ig16": vt.attribute(vlm, samples, method="ig", steps=16, **common),
                }
                one_point = layer_ig_dataset(vlm, samples, corruption(), metric(), exact, 1)
                differs = float(
                    np.nanmax(np.abs(one_point["block"].values - estimates["atp"]["block"].values))
                )
                if differs > 1e-3:
                    raise SystemExit(
                        f"{name} {corruption_name} {metric_name}: 1-point layer IG is not atp: {differs:.2g}"
                    )
                for n in steps:
                    estimates[f"layer-ig{n}"] = layer_ig_dataset(
                        vlm, samples, corruption(), metric(), exact, n
                    )
                cells = []
                for estimate in estimates.values():
                    report = agreement(estimate, exact[["block", "clean", "corrupt"]], 5)["block"]
                    cells.append(f"{report['material_overlap']:.2f} ({report['spearman']:+.2f})")
                print(
                    f"{name:14} {corruption_name:4} {metric_name:10}  "
                    + "  ".join(f"{c:>12}" for c in cells),
                    flush=True,
                )


if __name__ == "__main__":
    main()
