"""Peak memory per row of a sweep's forward on LLaVA-1.5-7B's shapes, against the estimate that sizes chunks.

`vt.patch(..., max_memory=B)` cuts a sample's cells into forwards of as many rows as B bytes of
activations hold, by `vlmtrace.engine.sweep.row_bytes`; a forward that runs out of memory anyway
is retried at half its rows (`OutOfMemoryWarning`). A user choosing B for a 7B model wants to know
two things this benchmark measures: what one row really costs, and whether the retry keeps the
values.

    python -m benchmarks.chunk_memory                    # CPU: 2 decoder + 2 CLIP layers, ~3 min
    python -m benchmarks.chunk_memory --layers 4         # a second depth: a row's peak must not grow
    python -m benchmarks.chunk_memory --device cuda --layers 32 --vision-layers 24   # a GPU

Model: LLaVA-1.5-7B's shapes in bfloat16 with random weights (`vlmtrace.models.build.build_llava`):
Llama layers of d=4096, 32 heads, MLP 11008; CLIP ViT-L/14-336 layers (d=1024, 16 heads, MLP
4096, 576 image tokens); `--layers` and `--vision-layers` of each. A forward without a KV cache
holds one layer's activations at a time, so a row's peak does not depend on the depth (run two
depths to see it). The vocabulary is word-level (66 words): a sweep keeps only the answer
position's logits, where a 32000-word head would add 125 KiB a row. Attention is eager, as
`vt.load` loads models (`--attn sdpa` for the other).

Measured: for each `--rows` r, a sweep whose one forward holds r rows (the clean and corrupted
rows and r - 2 attention-head cells at the last position, `vt.patch`'s defaults otherwise, its
self-check included: two one-row forwards, smaller than r rows); its peak memory above what was
in use before it (CUDA: `torch.cuda.max_memory_allocated`; CPU: the CPU allocator's live bytes,
recorded by `torch.profiler`). The bytes per row are the slope of the
least-squares line through (r, peak); its intercept is what a forward costs besides its rows.
The estimate is `row_bytes` at the sample's width; the chunk sizes are those `max_memory` budgets
give by the estimate and by the measured line.

The out-of-memory retry: the same sweep with 16 rows per forward in a process allowed about 12
rows' memory (CPU: an address-space limit, `RLIMIT_AS`, so the allocator itself fails; CUDA:
`torch.cuda.set_per_process_memory_fraction`), against the sweep at 4 rows per forward with no
limit: the retries are counted and the values compared.

Last line: `chunk_memory per_row_mib=<measured> estimate_mib=<e> estimate_over_measured=<r>
oom_retries=<n> oom_values_equal=<bool>`, led by the device, dtype and depth it came from.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import resource
import time
import warnings
from collections.abc import Iterator

import numpy as np
import torch

import vlmtrace as vt
from vlmtrace.data import synthetic_samples
from vlmtrace.data.scenes import VOCABULARY
from vlmtrace.engine.sweep import OutOfMemoryWarning, row_bytes
from vlmtrace.models.build import build_llava, word_tokenizer

MIB = 2**20


def build(args: argparse.Namespace) -> vt.VLM:
    """LLaVA-1.5-7B's layer shapes, `args.layers` of the decoder and `args.vision_layers` of CLIP."""
    model, processor = build_llava(
        word_tokenizer(VOCABULARY),
        image_size=336,
        patch_size=14,
        vision_layers=args.vision_layers,
        hidden=4096,
        layers=args.layers,
        heads=32,
        mlp=11008,
        vision_hidden=1024,
        vision_heads=16,
        vision_mlp=4096,
        vision_feature_layer=-2 if args.vision_layers > 1 else -1,
        max_positions=4096,
        attn_implementation=args.attn,
        device=args.device,
        dtype=torch.bfloat16,
    )
    return vt.wrap(model, processor, name="llava-1.5-7b-shaped")


class Peak:
    """Peak memory during a block, above what was in use when it began (bytes).

    CUDA: the caching allocator's own count. CPU: the CPU allocator's live bytes at each
    allocation, as `torch.profiler` records them with `profile_memory=True`: exact, where the
    process's RSS also counts what malloc keeps after a free (it grew with depth here, the
    live bytes did not).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.bytes = 0

    @contextlib.contextmanager
    def measuring(self) -> Iterator[Peak]:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            before = torch.cuda.memory_allocated(self.device)
            yield self
            torch.cuda.synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device) - before
            return
        from torch._C._profiler import _EventType
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
            yield self
        events, allocations = list(profiler.profiler.kineto_results.experimental_event_tree()), []
        while events:
            event = events.pop()
            events.extend(event.children)
            if event.tag == _EventType.Allocation:
                fields = event.extra_fields
                allocations.append((event.start_time_ns, fields.total_allocated, fields.alloc_size))
        allocations.sort()
        before = allocations[0][1] - allocations[0][2]
        self.bytes = max(total for _, total, _ in allocations) - before


def sweep(vlm: vt.VLM, sample: vt.Sample, cells: int, max_batch: int) -> tuple[np.ndarray, int]:
    """`cells` head cells at the last position, `max_batch` rows per forward: values, retries."""
    grid = vt.Grid(sites=("attn_head",), layers=(0,), heads=tuple(range(cells)), segments=("last",))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", OutOfMemoryWarning)
        ds = vt.patch(
            vlm, [sample], corruption=vt.ReplaceSpan("visual"), grid=grid, max_batch=max_batch, progress=False
        )
    retries = sum(issubclass(w.category, OutOfMemoryWarning) for w in caught)
    return ds["attn_head"].values, retries


@contextlib.contextmanager
def memory_limited_to(extra: float, device: torch.device) -> Iterator[None]:
    """Allow about `extra` bytes more than is in use now: the allocator fails past it."""
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        used = torch.cuda.memory_allocated(device)
        torch.cuda.set_per_process_memory_fraction(min(1.0, (used + extra) / total), device)
        try:
            yield
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0, device)
            torch.cuda.empty_cache()
        return
    import psutil

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (psutil.Process().memory_info().vms + int(extra), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (2 on CPU, 32 on CUDA)")
    parser.add_argument("--vision-layers", type=int, default=None, help="CLIP layers (2 on CPU, 24 on CUDA)")
    parser.add_argument("--attn", default="eager", choices=("eager", "sdpa"))
    parser.add_argument("--rows", default="4,8,12", help="rows per forward to measure (each >= 3)")
    parser.add_argument("--budgets", default="20,40,60", help="max_memory budgets in GB for the chunk table")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    gpu = args.device.startswith("cuda")
    args.layers = args.layers or (32 if gpu else 2)
    args.vision_layers = args.vision_layers or (24 if gpu else 2)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    started = time.perf_counter()
    vlm = build(args)
    sample = synthetic_samples(vlm, "multi", 1)[0]
    width = vlm.processor(text=sample.prompt, images=sample.image, return_tensors="pt")["input_ids"].shape[-1]
    config = vlm.model.config.text_config
    estimate = row_bytes(config, width, element=2, logits=len(vlm.tokenizer(sample.answer).input_ids))
    print(
        f"{args.device}, bfloat16, LLaVA-1.5-7B's shapes, {args.layers} decoder + {args.vision_layers} CLIP "
        f"layers, attention {args.attn}; sample {sample.prompt!r} -> {sample.answer!r}, width {width} "
        f"({time.perf_counter() - started:.0f} s to build)",
        flush=True,
    )
    sweep(vlm, sample, 1, 3)  # warm-up: first-call allocations are not a row's

    rows = [int(r) for r in args.rows.split(",")]
    peaks = []
    print(f"\n{'rows':>5} {'peak MiB':>9} {'seconds':>8}")
    for r in rows:
        clock = time.perf_counter()
        with Peak(device).measuring() as peak:
            sweep(vlm, sample, r - 2, r)
        peaks.append(peak.bytes)
        print(f"{r:>5} {peak.bytes / MIB:>9.0f} {time.perf_counter() - clock:>8.1f}", flush=True)
    slope, intercept = np.polyfit(rows, peaks, 1)
    print(
        f"\nmeasured: {slope / MIB:.1f} MiB per row + {intercept / MIB:.0f} MiB per forward; "
        f"estimate (row_bytes): {estimate / MIB:.1f} MiB per row, {estimate / slope:.2f} x measured"
    )
    print(f"\n{'max_memory':>10} {'rows by the estimate':>21} {'rows the measured line fits':>28}")
    for gb in (float(b) for b in args.budgets.split(",")):
        print(f"{gb:>8.0f}GB {int(gb * 1e9 // estimate):>21} {int((gb * 1e9 - intercept) // slope):>28}")

    reference, _ = sweep(vlm, sample, 14, 4)
    allowed = intercept + 12 * slope  # 16 rows do not fit; the address space also holds malloc's slack
    try:
        with memory_limited_to(allowed, device):
            limited, retries = sweep(vlm, sample, 14, 16)
    except RuntimeError as error:  # even a forward of one cell did not fit
        print(f"\nout of memory: the sweep stopped: {str(error).splitlines()[0][:200]}")
        limited, retries = np.full_like(reference, np.nan), -1
    equal = bool(np.array_equal(reference, limited, equal_nan=True))
    print(
        f"\nout of memory: 16 rows per forward with about {allowed / MIB:.0f} MiB allowed: {retries} "
        f"retr{'y' if retries == 1 else 'ies'}; values equal to 4 rows per forward unlimited: {equal} "
        f"(max |difference| {np.nanmax(np.abs(reference - limited)) if retries >= 0 else float('nan'):.3g})"
    )
    print(
        f"\n{args.device} bfloat16 layers={args.layers}: chunk_memory per_row_mib={slope / MIB:.1f} "
        f"estimate_mib={estimate / MIB:.1f} estimate_over_measured={estimate / slope:.2f} "
        f"oom_retries={retries} oom_values_equal={equal}"
    )


if __name__ == "__main__":
    main()
