"""Soak `vlmtrace serve` with 30 concurrent clients on loopback: latency and memory.

    OMP_NUM_THREADS=1 python benchmarks/serve_soak.py [--clients 30] [--rounds 5]

Starts one server (tiny LLaVA saved to a temporary folder, generated key, --max-queue
sized for the clients) and runs `clients` threads that each submit `rounds` hand-written
traces and wait for their logits, checking every result against a local run. Bounded: each
client stops after its rounds, and the whole run after `--deadline` seconds. Prints a
Markdown section with request latency percentiles, busy replies, the server's and its model
process's peak resident memory (from /proc), and that every result was right.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))

from conftest import WORDS, random_image  # noqa: E402
from served import Server  # noqa: E402

import vlmtrace as vt  # noqa: E402
from vlmtrace.engine.forward import driver  # noqa: E402
from vlmtrace.models.build import build_llava, word_tokenizer  # noqa: E402
from vlmtrace.remote import backend  # noqa: E402


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        found += [int(c) for c in text]
    return found


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--deadline", type=float, default=600.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="serve-soak-"))
    model, processor = build_llava(word_tokenizer(WORDS), layers=3, seed=1)
    model.save_pretrained(root / "llava")
    processor.save_pretrained(root / "llava")
    vlm = vt.load(str(root / "llava"))
    key_file = root / "key"
    server = Server(
        [str(root / "llava")],
        root / "log",
        args=("--key-file", str(key_file), "--max-queue", str(args.clients), "--max-runtime", "60"),
    ).wait_ready()
    key = key_file.read_text().strip()
    row = vlm.adapter.encode(
        vlm.processor, "<image> which city did this shape represent in year 2006 ?", random_image(0)
    )
    batch = {name: value[None] for name, value in row.items()}
    with torch.no_grad():
        expected = driver(vlm)(**batch)
    latencies, wrong, errors, peak = [], [0], [], {"server": 0, "model": 0}
    stop = time.monotonic() + args.deadline
    lock = threading.Lock()

    def client(index: int) -> None:
        mode = "stream" if index % 2 else "poll"
        for _ in range(args.rounds):
            if time.monotonic() > stop:
                return
            remote = backend(vlm, host=server.url, api_key=key, mode=mode, poll_interval=0.05, timeout=300)
            started = time.perf_counter()
            try:
                with vlm.envoy.trace(fn=driver(vlm), backend=remote, **batch) as tracer:
                    logits = tracer.result.save()
                result = logits
            except Exception as error:  # counted and reported, never hidden
                with lock:
                    errors.append(f"{type(error).__name__}: {error}"[:200])
                continue
            with lock:
                latencies.append(time.perf_counter() - started)
                wrong[0] += int(not torch.equal(result, expected))

    def watch() -> None:
        while any(t.is_alive() for t in threads):
            try:
                peak["server"] = max(peak["server"], rss_kib(server.process.pid))
                for child in children(server.process.pid):
                    peak["model"] = max(peak["model"], rss_kib(child))
            except (FileNotFoundError, ProcessLookupError):
                pass
            time.sleep(0.2)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    watcher = threading.Thread(target=watch)
    watcher.start()
    for thread in threads:
        thread.join()
    watcher.join()
    elapsed = time.perf_counter() - began
    after = rss_kib(server.process.pid)
    pending = httpx.get(f"{server.url}/ping").status_code
    server.stop()
    log = (root / "log").read_text()
    q = (
        statistics.quantiles(latencies, n=100, method="inclusive")
        if len(latencies) > 1
        else [float("nan")] * 99
    )
    print(f"### serve soak: {args.clients} clients x {args.rounds} traces, loopback, tiny LLaVA, 1 thread\n")
    print("| measure | value |\n| --- | --- |")
    print(f"| requests answered | {len(latencies)} of {args.clients * args.rounds} in {elapsed:.1f} s |")
    print(f"| wrong results | {wrong[0]} |")
    print(f"| errors | {len(errors)} {sorted(set(errors))[:3]} |")
    print(
        f"| latency p50 / p90 / p99 / max | {q[49]:.2f} / {q[89]:.2f} / {q[98]:.2f} / "
        f"{max(latencies):.2f} s |"
    )
    print(f"| server RSS peak / after | {peak['server'] / 1024:.0f} / {after / 1024:.0f} MiB |")
    print(f"| model process RSS peak | {peak['model'] / 1024:.0f} MiB |")
    print(f"| key or result token in the log | {'YES' if key in log or '/result/' in log else 'no'} |")
    print(f"| server alive at the end | {'yes' if pending == 200 else 'no'} |")


if __name__ == "__main__":
    main()
