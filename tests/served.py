"""`vlmtrace serve` as a subprocess on 127.0.0.1, for tests and benchmarks.

    server = Server([model_dir], log_path, api_key="k").wait_ready()
    ...; server.stop()

The server's output goes to a log file, which tests read (a key or token must never be in it).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

START_TIMEOUT = 180.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    """`vlmtrace serve MODELS --port P --device cpu ARGS`; `api_key` goes in by NDIF_API_KEY."""

    def __init__(
        self, models: list[str], log: Path, *, api_key: str | None = None, args: tuple[str, ...] = ()
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        env = {k: v for k, v in os.environ.items() if k != "NDIF_API_KEY"}
        env["OMP_NUM_THREADS"] = "1"
        if api_key:
            env["NDIF_API_KEY"] = api_key  # read by --api-key's envvar; kept out of `ps`
        command = "from vlmtrace.cli import app; app()"
        argv = [sys.executable, "-c", command, "serve", *models, "--port", str(self.port)]
        with open(log, "w") as out:
            self.process = subprocess.Popen(
                [*argv, "--device", "cpu", *args], stdout=out, stderr=subprocess.STDOUT, env=env
            )

    def wait_ready(self) -> Server:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited:\n{self.log.read_text()}")
            try:
                if httpx.get(f"{self.url}/ping", timeout=1.0).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"the server did not start in {START_TIMEOUT} s:\n{self.log.read_text()}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
