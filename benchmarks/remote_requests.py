"""How many requests does a remote recipe send, and what does a round trip cost?

A remote sweep used to send one request per forward: `vlmtrace recipe multi_constraint
--n-samples 4 --remote` sent 101-108 of them to `vlmtrace serve`, each a round trip of 1-6 s
on a loaded 2-core box (and on NDIF, a place in the queue). Forwards now travel in groups, one
nnsight session per request, sized to the backend's `request_seconds`
(`vlmtrace.engine.grouping`). This runs recipes on a shipped organism three ways, in one
process, against one `vlmtrace serve` subprocess on 127.0.0.1:

    local        no server
    per forward  remote, `request_seconds` ~0: one forward per request (the old behaviour)
    grouped      remote, the default `request_seconds` (60 s)

and prints, per recipe, the requests the server received (counted from its log) and the wall
time of each way. The three results must be identical (values and coordinates) before
anything is printed.

    python -m benchmarks.remote_requests                       # shapes-llava, 4 samples
    python -m benchmarks.remote_requests --recipes multi_constraint --n-samples 8

The server runs on the same 2 cores as the client, so remote wall times here include the
server's compute competing with the client's; what grouping saves is the per-request cost.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import vlmtrace as vt
from vlmtrace.options import Options
from vlmtrace.remote import backend

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from served import Server  # noqa: E402

RECIPES = ("multi_constraint", "visual_constraint", "notice", "information_flow")
KEY = "benchmark-key"


def requests_in(log: Path, model: str) -> int:
    """Requests the server has received for `model` so far (one log line each)."""
    return len(re.findall(rf"request \w+ for {re.escape(model)}:", log.read_text()))


def timed_run(recipe, vlm: vt.VLM, samples: list[vt.Sample], options: Options):
    started = time.perf_counter()
    result = recipe.run(vlm, samples, options=options)
    return result, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="shapes-llava", help="a shipped organism")
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--n-samples", type=int, default=4)
    args = parser.parse_args()
    os.environ["NDIF_API_KEY"] = KEY
    vlm = vt.load(args.model)
    log = Path(tempfile.mkdtemp()) / "serve.log"
    server = Server([args.model], log, api_key=KEY).wait_ready()
    rows = []
    try:
        for name in args.recipes.split(","):
            recipe = importlib.import_module(f"recipes.{name}")
            samples = recipe.default_samples(vlm, args.n_samples, 0)
            local, local_s = timed_run(recipe, vlm, samples, Options(progress=False))
            results = {}
            for way, seconds in (("per forward", 1e-9), ("grouped", 60.0)):
                before = requests_in(log, args.model)
                remote = backend(vlm, host=server.url, request_seconds=seconds)
                ds, wall = timed_run(recipe, vlm, samples, Options(progress=False, backend=remote))
                if not ds.drop_attrs().identical(local.drop_attrs()):
                    raise SystemExit(f"{name}: the {way} remote result differs from the local one")
                results[way] = (requests_in(log, args.model) - before, wall)
            rows.append((name, local_s, results))
            print(f"{name}: done", file=sys.stderr)
    finally:
        server.stop()
    print(f"model: {args.model}, {args.n_samples} samples; server: vlmtrace serve on 127.0.0.1, same cores")
    print(f"load average: {os.getloadavg()[0]:.1f}")
    header = ("recipe", "requests before", "requests now", "local s", "before s", "now s")
    print("{:18} {:>16} {:>13} {:>8} {:>9} {:>7}".format(*header))
    for name, local_s, results in rows:
        (n_before, s_before), (n_now, s_now) = results["per forward"], results["grouped"]
        print(f"{name:18} {n_before:16d} {n_now:13d} {local_s:8.1f} {s_before:9.1f} {s_now:7.1f}")
    worst = max(results["grouped"][0] / max(results["per forward"][0], 1) for _, _, results in rows)
    print(f"remote_requests worst_ratio={worst:.3f} (requests now / before, over recipes)")


if __name__ == "__main__":
    main()
