"""What the per-sweep self-check costs: forwards counted, and whole sweeps timed with it on and off.

Every `vt.patch` checks its first forward's most padded sample against the model's own forward of
the same prompt and image (`vlmtrace.engine.native`: the processor and `generate`, one token), and
every later forward's baseline rows against the sample's first (`vlmtrace.engine.self_check`).
The engine runs no forward of its own for this: the baseline rows are in every forward anyway,
and the trace reads back a few log-probabilities of them. The model's own forward runs once per
distinct input in a process (two: clean and corrupted side), so it costs a single sweep in a
fresh process ("cold") and nothing in a process that sweeps the same samples again ("warm").

This script counts forwards through the language model (calls of its first layer, per row:
engine forwards and the model's own forwards alike) and times sweeps of a realistic grid with
`verify=True` and `verify=False`, best of `--repeats` runs each, in one process, cold (the kept
native answers dropped before each sweep) and warm.

    python -m benchmarks.self_check                       # shapes-llava, 8 samples, MLP+attn windows 1-3
    python -m benchmarks.self_check --samples 4 --repeats 5

The last line is `self_check extra_forwards=<n> cold_overhead=<ratio - 1> warm_overhead=<ratio - 1>`
(overheads of the whole sweep, in wall-clock time on this machine; the target is < 0.05).
"""

from __future__ import annotations

import argparse
import time

import torch

import vlmtrace as vt
from vlmtrace.data.scenes import make_samples
from vlmtrace.engine import native


def sweep(vlm: vt.VLM, samples, verify: bool):
    return vt.patch(
        vlm,
        samples,
        corruption=vt.ImagePair(),
        grid=vt.Grid(sites=("mlp", "attn"), windows=(1, 3)),
        verify=verify,
        progress=False,
    )


def count_forwards(vlm: vt.VLM, samples, verify: bool) -> int:
    """Forwards through the language model (calls of its first layer)."""
    calls = []
    layer = vlm.model.get_submodule(vlm.adapter.stacks["lm"].layers)[0]
    handle = layer.register_forward_hook(lambda *_: calls.append(1))
    try:
        sweep(vlm, samples, verify)
    finally:
        handle.remove()
    return len(calls)


def best_time(vlm: vt.VLM, samples, verify: bool, repeats: int, *, cold: bool) -> float:
    """Best wall-clock time of a sweep; `cold` drops the kept native answers first, as a fresh
    process would have none."""
    times = []
    for _ in range(repeats):
        if cold:
            native.forget(vlm)
        start = time.perf_counter()
        sweep(vlm, samples, verify)
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="shapes-llava")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    vlm = vt.load(args.model)
    samples = make_samples("multi", args.samples, seed=0, split="test")
    native.forget(vlm)
    on, off = count_forwards(vlm, samples, True), count_forwards(vlm, samples, False)
    warm = count_forwards(vlm, samples, True)
    t_off = best_time(vlm, samples, False, args.repeats, cold=True)
    t_cold = best_time(vlm, samples, True, args.repeats, cold=True)
    t_warm = best_time(vlm, samples, True, args.repeats, cold=False)
    print(f"model {args.model}, {args.samples} samples, grid mlp+attn x windows 1,3 x every position")
    print(f"forwards: {on} with the self-check in a fresh process, {warm} when repeated, {off} without")
    print(f"best of {args.repeats}: {t_cold:.3f} s cold, {t_warm:.3f} s warm, {t_off:.3f} s without")
    print(
        f"self_check extra_forwards={on - off} cold_overhead={t_cold / t_off - 1:.3f} "
        f"warm_overhead={t_warm / t_off - 1:.3f}"
    )


if __name__ == "__main__":
    main()
