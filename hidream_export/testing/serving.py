"""`hidream-export serve` as a child process on loopback ports, for tests and tools/bench_serve.py.

Every wait is bounded: the server must be ready within `startup_s`, and `stop()` sends SIGTERM and
waits at most `timeout_s` before killing it. The server's output goes to a log file, whose tail is
in every error.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

__all__ = ["LocalServer", "free_ports", "local_server", "metric_values", "wait_ready"]


def free_ports(n: int) -> list[int]:
    """`n` distinct TCP ports free on 127.0.0.1 right now (the OS picks them)."""
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@dataclass
class LocalServer:
    process: subprocess.Popen
    http: str  # http://127.0.0.1:PORT
    grpc: str
    metrics: str  # http://127.0.0.1:PORT/metrics
    log: Path

    def log_tail(self, lines: int = 40) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout_s: float = 90.0) -> int:
        """SIGTERM, then wait (bounded); the exit code (killed: -9)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)
        return self.process.returncode


def wait_ready(server: LocalServer, startup_s: float) -> None:
    deadline = time.monotonic() + startup_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"the server exited with {server.process.returncode}:\n{server.log_tail()}")
        try:
            with urllib.request.urlopen(f"{server.http}/v2/health/ready", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    raise TimeoutError(f"the server was not ready after {startup_s} s:\n{server.log_tail()}")


@contextlib.contextmanager
def local_server(folders: Sequence[Path], args: Sequence[str] = (), *, log: Path, startup_s: float = 180.0,
                 stop_s: float = 90.0) -> Iterator[LocalServer]:
    """`hidream-export serve FOLDERS ARGS` on 127.0.0.1 and three free ports, ready; stopped on exit."""
    http, grpc, metrics = free_ports(3)
    cmd = [sys.executable, "-m", "hidream_export.cli", "serve", *map(str, folders), "--host", "127.0.0.1",
           "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics), *args]
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ))
    server = LocalServer(process, f"http://127.0.0.1:{http}", f"grpc://127.0.0.1:{grpc}",
                         f"http://127.0.0.1:{metrics}/metrics", log)
    try:
        wait_ready(server, startup_s)
        yield server
    finally:
        server.stop(stop_s)


def metric_values(url: str, name: str) -> dict[str, float]:
    """Prometheus samples of one metric: the label text ('{model="fast",...}') -> value."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            key, _, value = line.rpartition(" ")
            out[key[len(name):]] = float(value)
    return out
