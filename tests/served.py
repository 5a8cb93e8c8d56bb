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
        self.models, self.log, self.args = models, log, args
        self.env = {k: v for k, v in os.environ.items() if k != "NDIF_API_KEY"}
        self.env["OMP_NUM_THREADS"] = "1"
        if api_key:
            self.env["NDIF_API_KEY"] = api_key  # read by --api-key's envvar; kept out of `ps`
        self.start()

    def start(self) -> None:
        """On a port free a moment ago: another process may take it first (`wait_ready` retries)."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = "from vlmtrace.cli import app; app()"
        argv = [sys.executable, "-c", command, "serve", *self.models, "--port", str(self.port)]
        with open(self.log, "w") as out:
            self.process = subprocess.Popen(
                [*argv, "--device", "cpu", *self.args], stdout=out, stderr=subprocess.STDOUT, env=self.env
            )

    def wait_ready(self, port_tries: int = 3) -> Server:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                said = self.log.read_text()
                # the port was taken between `free_port` and the bind: uvicorn says so, or serve's check
                taken = "address already in use" in said.lower() or " is in use (" in said
                if taken and port_tries > 1:
                    self.start()
                    return self.wait_ready(port_tries - 1)
                raise RuntimeError(f"the server exited:\n{said}")
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
