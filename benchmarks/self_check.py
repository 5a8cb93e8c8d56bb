"""What the per-sweep self-check costs: forwards counted, and a whole sweep timed with it on and off.

Every `vt.patch` checks, on its first chunk, that the batched clean and corrupted rows equal
plain unbatched forwards of the same inputs (`vlmtrace.engine.invariants.verify_baselines`). That is
two extra forwards per sweep, whatever its size; this script counts them (exactly, by counting
calls of the language model's first layer per row) and times sweeps of a realistic grid with
`verify=True` and `verify=False`, best of `--repeats` runs each, in one process.

    python -m benchmarks.self_check                       # shapes-llava, 8 samples, MLP+attn windows 1-3
    python -m benchmarks.self_check --samples 4 --repeats 5

The last line is `self_check extra_forwards=<n> overhead=<ratio - 1>` (overhead of the whole
sweep, in wall-clock time on this machine).
"""

from __future__ import annotations

import argparse
import time

import torch

import vlmtrace as vt
from vlmtrace.data.scenes import make_samples


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


def best_time(vlm: vt.VLM, samples, verify: bool, repeats: int) -> float:
    times = []
    for _ in range(repeats):
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
    on, off = count_forwards(vlm, samples, True), count_forwards(vlm, samples, False)
    t_on, t_off = best_time(vlm, samples, True, args.repeats), best_time(vlm, samples, False, args.repeats)
    print(f"model {args.model}, {args.samples} samples, grid mlp+attn x windows 1,3 x every position")
    print(f"forwards: {on} with the self-check, {off} without")
    print(f"best of {args.repeats}: {t_on:.3f} s with, {t_off:.3f} s without")
    print(f"self_check extra_forwards={on - off} overhead={t_on / t_off - 1:.3f}")


if __name__ == "__main__":
    main()
