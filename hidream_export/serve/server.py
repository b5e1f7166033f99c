"""`hidream-export serve`: engine folders on NVIDIA Triton Inference Server, from PyTriton's distribution.

`serve(ServeOptions(...))` writes the same model repository `triton-repo` writes (one Python-backend
model per engine folder, repository.py) into a workspace and runs the `tritonserver` binary that
PyTriton ships, with PyTriton's Python backend and the stub built for this Python, prepared as PyTriton
prepares them. The models run in Triton's own Python-backend stub processes, so each request gets its
own answer (PyTriton's bound callables answer a whole batch with one error), and their per-stage
metrics land on Triton's Prometheus endpoint next to Triton's.

- KServe v2 over HTTP and gRPC, Prometheus metrics, on --http-port/--grpc-port/--metrics-port.
- Ready (GET /v2/health/ready) only once every model has verified and loaded its folder.
- SIGTERM or SIGINT: Triton stops taking requests, finishes those in flight (up to --exit-timeout),
  unloads the models and exits; then so does this command. If this process dies, the kernel stops
  the server too (parent-death signal).
- The model-control API is off (models load at start and stay), and the shared-memory, trace and
  logging APIs need a header nobody is told, so a client can only infer and read health, metadata and
  statistics.
- The stub links the system's libpython; an interpreter installed elsewhere (pyenv, a venv built on
  one) needs its own lib folder first on LD_LIBRARY_PATH, or the stub fails in multiprocessing
  ("'_thread.RLock' object has no attribute '_recursion_count'"): `stub_environment` puts it there.
"""

from __future__ import annotations

import ctypes
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

from hidream_export.errors import MissingDependency, RequestError, ServeError
from hidream_export.serve.repository import ModelSettings, RepositoryModel, RepositoryOptions, write_repository

__all__ = ["ServeOptions", "ServerInfo", "libs_dir", "prepare_server", "serve", "stub_environment",
           "tritonserver_dist"]

# After --exit-timeout, Triton itself gives up on requests in flight; this is how much longer it may take
# to unload the models and exit before it is killed.
_UNLOAD_GRACE_S = 30.0


@dataclass(frozen=True)
class ServeOptions:
    folders: tuple[Path, ...]
    names: tuple[str, ...] = ()
    settings: ModelSettings = ModelSettings("")  # engine_dir is set per folder
    instances: int = 1
    kind: str = "cpu"  # cpu | gpu (one instance group per GPU Triton sees, or --gpus)
    gpus: tuple[int, ...] = ()
    max_queue_delay_ms: float = 10.0
    host: str = "0.0.0.0"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    exit_timeout_s: int = 60  # how long requests in flight may take to finish after SIGTERM
    log_verbose: int = 0
    workspace: Path | None = None  # where the repository and the server binaries go (default: a temp folder)


@dataclass(frozen=True)
class ServerInfo:
    """What a started server serves, and where."""

    models: list[RepositoryModel]
    http: str
    grpc: str
    metrics: str
    pid: int


def tritonserver_dist() -> Path:
    """PyTriton's `tritonserver` distribution (bin/, backends/, caches/, python_backend_stubs/)."""
    try:
        import pytriton
    except ImportError:
        raise MissingDependency("nvidia-pytriton is not installed; `serve` needs the serve extra: "
                                "pip install \"hidream-export[serve]\"") from None
    dist = Path(pytriton.__file__).parent / "tritonserver"
    if not (dist / "bin" / "tritonserver").is_file():
        raise MissingDependency(f"{dist}: no tritonserver binary in this nvidia-pytriton install")
    return dist


def libs_dir(dist: Path) -> Path:
    """The shared libraries the wheel bundles beside the package (auditwheel's <dist>.libs)."""
    return dist.parent.parent / "nvidia_pytriton.libs"


def prepare_server(dist: Path, where: Path) -> Path:
    """A copy of the distribution with this Python's backend stub in backends/python (as PyTriton does:
    the backend looks for `triton_python_backend_stub` beside itself)."""
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise MissingDependency(f"{dist}: no Python-backend stub for Python {version}")
    target = where / "tritonserver"
    shutil.copytree(dist, target, ignore=shutil.ignore_patterns("python_backend_stubs", "__pycache__"))
    shutil.copy2(stub, target / "backends" / "python" / "triton_python_backend_stub")
    return target


def stub_environment(env: Mapping[str, str], libs: Path | None = None) -> dict[str, str]:
    """`env` for tritonserver and its Python stubs: this interpreter's lib folder first on
    LD_LIBRARY_PATH (then the wheel's bundled libraries), and its bin folder first on PATH, where the
    stub's embedded Python looks for the interpreter whose packages (this venv's) it uses."""
    out = dict(env)
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    paths = [p for p in out.get("LD_LIBRARY_PATH", "").split(":") if p]
    first = [libdir] if libdir and Path(libdir).is_dir() else []
    extra = [str(libs)] if libs is not None else []
    out["LD_LIBRARY_PATH"] = ":".join(dict.fromkeys(first + paths + extra))
    out["PATH"] = ":".join(dict.fromkeys([str(Path(sys.exec_prefix) / "bin"),
                                          *[p for p in out.get("PATH", "").split(":") if p]]))
    return out


def _server_args(server: Path, repository: Path, options: ServeOptions) -> list[str]:
    admin = f"shared-memory,trace,logging:hidream-admin={secrets.token_urlsafe(24)}"
    return [str(server / "bin" / "tritonserver"),
            f"--model-repository={repository}",
            f"--backend-directory={server / 'backends'}",
            f"--cache-directory={server / 'caches'}",
            f"--http-address={options.host}", f"--http-port={options.http_port}",
            f"--grpc-address={options.host}", f"--grpc-port={options.grpc_port}",
            f"--metrics-address={options.host}", f"--metrics-port={options.metrics_port}",
            "--model-control-mode=none", "--strict-readiness=true", "--exit-on-error=true",
            f"--exit-timeout-secs={options.exit_timeout_s}", f"--log-verbose={options.log_verbose}",
            f"--http-restricted-api={admin}", f"--grpc-restricted-protocol={admin}"]


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it when this process dies (Linux prctl PR_SET_PDEATHSIG)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def _local(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host


def _is_ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def serve(options: ServeOptions, on_ready: Callable[[ServerInfo], None] | None = None,
          stop: threading.Event | None = None) -> None:
    """Serve until SIGTERM/SIGINT (or `stop` is set), then drain and return. `on_ready` is called once
    every model is loaded. ServeError when the server exits by itself (its log says why)."""
    for name in ("http_port", "grpc_port", "metrics_port"):
        port = getattr(options, name)
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise RequestError(f"--{name.replace('_', '-')} must be a port number 1..65535, got {port!r}")
    if len({options.http_port, options.grpc_port, options.metrics_port}) != 3:
        raise RequestError("--http-port, --grpc-port and --metrics-port must differ")
    if isinstance(options.exit_timeout_s, bool) or not isinstance(options.exit_timeout_s, int) \
            or options.exit_timeout_s < 0:
        raise RequestError(f"--exit-timeout must be an integer number of seconds >= 0, got {options.exit_timeout_s!r}")
    dist = tritonserver_dist()
    own_workspace = options.workspace is None
    workspace = Path(tempfile.mkdtemp(prefix="hidream-serve-")) if own_workspace else Path(options.workspace)
    stop = stop or threading.Event()
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        handlers = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        models = write_repository(RepositoryOptions(
            folders=tuple(options.folders), out=workspace / "models", names=tuple(options.names),
            settings=options.settings, instances=options.instances, kind=options.kind, gpus=tuple(options.gpus),
            max_queue_delay_ms=options.max_queue_delay_ms, force=True))
        server = prepare_server(dist, workspace)
        process = subprocess.Popen(_server_args(server, workspace / "models", options),
                                   env=stub_environment(os.environ, libs_dir(dist)), start_new_session=True,
                                   preexec_fn=_die_with_parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        log = _LogRelay(process)
        host = _local(options.host)
        info = ServerInfo(models, f"http://{host}:{options.http_port}", f"grpc://{host}:{options.grpc_port}",
                          f"http://{host}:{options.metrics_port}/metrics", process.pid)
        try:
            _run(process, info, stop, on_ready, log)
        finally:
            _shut_down(process, options.exit_timeout_s + _UNLOAD_GRACE_S)
            log.thread.join(timeout=10)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        if own_workspace:
            shutil.rmtree(workspace, ignore_errors=True)


class _LogRelay:
    """Copies tritonserver's output (its log and the stubs') to this process's stdout, and keeps the
    first model-load failure, so the one-line error can say why the server would not start."""

    _FAILED = re.compile(r'"failed to load (.*?)(?:\\n|"$)')

    def __init__(self, process: subprocess.Popen):
        self.failure: str | None = None
        self.thread = threading.Thread(target=self._relay, args=(process.stdout,), name="tritonserver-log",
                                       daemon=True)
        self.thread.start()

    def _relay(self, stream) -> None:
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", errors="replace")
            sys.stdout.write(line)
            sys.stdout.flush()
            match = self._FAILED.search(line.rstrip())
            if match and self.failure is None:
                self.failure = match.group(1)
        stream.close()


def _run(process: subprocess.Popen, info: ServerInfo, stop: threading.Event,
         on_ready: Callable[[ServerInfo], None] | None, log: _LogRelay) -> None:
    ready = False
    while not stop.is_set():
        code = process.poll()
        if code is not None:
            log.thread.join(timeout=10)
            if log.failure is not None:
                raise ServeError(f"tritonserver could not load model {log.failure}")
            state = "serving" if ready else "starting"
            raise ServeError(f"tritonserver exited with code {code} while {state}; its log above says why")
        if not ready and _is_ready(info.http):
            ready = True
            if on_ready is not None:
                on_ready(info)
        stop.wait(0.2 if not ready else 0.5)


def _shut_down(process: subprocess.Popen, timeout_s: float) -> None:
    """SIGTERM: Triton refuses new requests, waits for those in flight, unloads and exits."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    if process.poll() is None:
        process.kill()
        process.wait()
