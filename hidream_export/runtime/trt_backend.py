"""`TrtBackend`: run the TensorRT engines of an engine folder behind the runtime's Session protocol.

Torch-free, like the rest of the runtime: device memory, copies, the stream, CUDA graphs and events go
through cuda-python's runtime API (`cuda.bindings.runtime`, or the older `cuda.cudart`), the pattern of
demoDiffusion's `Engine` minus its torch buffers. Importing this module needs neither TensorRT nor
cuda-python; constructing a TrtBackend without them raises BackendUnavailable saying what is missing
(`hidream-export doctor` has the details).

What a Session does:

* before deserializing, registers every plugin the engine's manifest entry lists (moe.loader), and
  refuses an engine built for another TensorRT version or GPU with a message saying to rebuild;
* one CUDA stream per session; device buffers allocated once per distinct set of input shapes and reused;
* `execute_async_v3` on that stream; for engines whose profiles are all static, the execution is captured
  once into a CUDA graph and replayed (not for engines with a Python (JIT) plugin: its Triton launches and
  torch allocations are not safe to capture);
* per-stage timing with CUDA events recorded on the same stream (host->device, compute, device->host),
  kept in `session.timings` (the demo records its events on stream 0 while engines run elsewhere).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from hidream_export.errors import BackendUnavailable, EngineMismatch, ManifestError, TensorRTUnavailable
from hidream_export.manifest import Component, Manifest, TrtEngineComponent
from hidream_export.runtime.backends import Backend

__all__ = ["TrtBackend", "TrtSession", "EngineMismatch"]

_HINT = ("TensorRT engines need TensorRT and cuda-python on a machine with an NVIDIA GPU (pip install "
         "'hidream-export[gpu]'); `hidream-export doctor` shows what is missing; use backend='ort' to run the ONNX "
         "models instead")


def _import_cudart():
    for name in ("cuda.bindings.runtime", "cuda.cudart"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise BackendUnavailable(f"cuda-python is not installed (pip install cuda-python). {_HINT}")


def _check(cudart, result, what: str):
    """cuda-python returns (error, *values): raise on error, return the value(s)."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != cudart.cudaError_t.cudaSuccess:
        _, name = cudart.cudaGetErrorName(err)
        raise RuntimeError(f"CUDA error in {what}: {name.decode() if isinstance(name, bytes) else name}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def _handle(obj) -> int:
    """A cuda-python handle (stream, event) as the integer TensorRT's Python API takes."""
    try:
        return int(obj)
    except TypeError:
        return int(obj.getPtr())


def _numpy_dtype(trt, dtype):
    if dtype == trt.bfloat16:
        try:
            import ml_dtypes
        except ImportError:
            raise BackendUnavailable("this engine takes or returns bfloat16 tensors, which numpy cannot hold; "
                                     "pip install ml_dtypes") from None
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(trt.nptype(dtype))


def _trt_weight_type(trt, dtype: np.dtype):
    names = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16"}
    if dtype.name not in names:
        raise EngineMismatch(f"cannot refit a {dtype} weight")
    return getattr(trt, names[dtype.name])


class _BufferSet:
    """Device and host buffers for one set of input shapes, plus a CUDA graph once captured."""

    def __init__(self):
        self.device: dict[str, int] = {}
        self.nbytes: dict[str, int] = {}
        self.host_out: dict[str, np.ndarray] = {}
        self.graph = None
        self.graph_exec = None
        self.warm = False


class TrtSession:
    """One deserialized engine with its execution context, stream, buffers and timings.

    Not thread-safe (a TensorRT execution context is not): the backend says so (thread_safe = False)."""

    def __init__(self, trt, cudart, engine, path: Path, entry: TrtEngineComponent, *, cuda_graphs: bool):
        self._trt, self._cudart = trt, cudart
        self.engine = engine
        self.path = path
        self.entry = entry
        self.context = engine.create_execution_context()
        if self.context is None:
            raise RuntimeError(f"{path}: could not create an execution context (out of device memory?)")
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        mode = trt.TensorIOMode
        self.input_names = [n for n in names if engine.get_tensor_mode(n) == mode.INPUT]
        self.output_names = [n for n in names if engine.get_tensor_mode(n) == mode.OUTPUT]
        self.dtypes = {n: _numpy_dtype(trt, engine.get_tensor_dtype(n)) for n in names}
        self.stream = _check(cudart, cudart.cudaStreamCreate(), "cudaStreamCreate")
        self._events = [_check(cudart, cudart.cudaEventCreate(), "cudaEventCreate") for _ in range(4)]
        self._buffers: dict[tuple, _BufferSet] = {}
        self._active: tuple | None = None
        profiles = self.entry.profiles or []
        self._profiles = profiles
        static = bool(profiles) and all(all(s["min"] == s["max"] for s in p["shapes"].values()) for p in profiles)
        jit_plugin = any(p.implementation == "jit" for p in self.entry.plugins)
        self.uses_cuda_graphs = bool(cuda_graphs and static and not jit_plugin)
        self.timings: list[dict[str, float]] = []

    def __repr__(self) -> str:
        return f"TrtSession({self.path}, inputs={self.input_names}, outputs={self.output_names})"

    # -- buffers ------------------------------------------------------------------------------------
    def _profile_for(self, shapes: Mapping[str, tuple]) -> int:
        """The first profile whose ranges hold these shapes (static profiles come after the dynamic one, so
        prefer an exact static match)."""
        best = None
        for index, p in enumerate(self._profiles):
            fits = all(name in p["shapes"] and all(lo <= d <= hi for d, lo, hi in
                                                   zip(shape, p["shapes"][name]["min"], p["shapes"][name]["max"]))
                       for name, shape in shapes.items())
            if not fits:
                continue
            exact = all(list(shape) == p["shapes"][name]["min"] == p["shapes"][name]["max"] for name, shape in shapes.items())
            if exact:
                return index
            best = index if best is None else best
        if best is None and self._profiles:
            raise ValueError(f"{self.path}: input shapes {dict(shapes)} are outside every optimization profile of this "
                             "engine; rebuild it with a wider size range")
        return best or 0

    def _allocate(self, key: tuple, shapes: Mapping[str, tuple]) -> _BufferSet:
        cudart = self._cudart
        profile = self._profile_for(shapes)
        if profile != self.context.active_optimization_profile:
            self.context.set_optimization_profile_async(profile, _handle(self.stream))
        for name, shape in shapes.items():
            if not self.context.set_input_shape(name, shape):
                raise ValueError(f"{self.path}: TensorRT rejected shape {shape} for input {name!r}")
        bufs = _BufferSet()
        for name in self.input_names + self.output_names:
            shape = tuple(shapes[name]) if name in shapes else tuple(self.context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise RuntimeError(f"{self.path}: output {name!r} has a data-dependent shape {shape}; not supported")
            nbytes = max(1, int(np.prod(shape, dtype=np.int64)) * self.dtypes[name].itemsize)
            bufs.device[name] = _check(cudart, cudart.cudaMalloc(nbytes), f"cudaMalloc({nbytes}) for {name}")
            bufs.nbytes[name] = nbytes
            if name in self.output_names:
                bufs.host_out[name] = np.empty(shape, dtype=self.dtypes[name])
        self._buffers[key] = bufs
        return bufs

    def _activate(self, key: tuple, shapes: Mapping[str, tuple]) -> _BufferSet:
        bufs = self._buffers.get(key)
        if bufs is None:
            bufs = self._allocate(key, shapes)
        elif self._active != key:
            profile = self._profile_for(shapes)
            if profile != self.context.active_optimization_profile:
                self.context.set_optimization_profile_async(profile, _handle(self.stream))
            for name, shape in shapes.items():
                self.context.set_input_shape(name, shape)
        if self._active != key:
            for name, ptr in bufs.device.items():
                self.context.set_tensor_address(name, int(ptr))
            self._active = key
        return bufs

    # -- run ----------------------------------------------------------------------------------------
    def _execute(self, bufs: _BufferSet) -> None:
        cudart, stream = self._cudart, self.stream
        if not self.uses_cuda_graphs:
            if not self.context.execute_async_v3(_handle(stream)):
                raise RuntimeError(f"{self.path}: execute_async_v3 failed (see the TensorRT log)")
            return
        if bufs.graph_exec is None:
            if not bufs.warm:  # TensorRT may allocate lazily on the first run after a shape change
                if not self.context.execute_async_v3(_handle(stream)):
                    raise RuntimeError(f"{self.path}: execute_async_v3 failed (see the TensorRT log)")
                bufs.warm = True
                return
            mode = cudart.cudaStreamCaptureMode.cudaStreamCaptureModeGlobal
            _check(cudart, cudart.cudaStreamBeginCapture(stream, mode), "cudaStreamBeginCapture")
            ok = self.context.execute_async_v3(_handle(stream))
            graph = _check(cudart, cudart.cudaStreamEndCapture(stream), "cudaStreamEndCapture")
            if not ok:
                raise RuntimeError(f"{self.path}: execute_async_v3 failed during CUDA graph capture")
            bufs.graph = graph
            bufs.graph_exec = _check(cudart, cudart.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")
        _check(cudart, cudart.cudaGraphLaunch(bufs.graph_exec, stream), "cudaGraphLaunch")

    def run(self, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
        missing = [n for n in self.input_names if n not in feeds]
        extra = [n for n in feeds if n not in self.input_names]
        if missing or extra:
            raise ValueError(f"{self.path}: inputs {self.input_names} expected; missing {missing}, unexpected {extra}")
        cudart, stream = self._cudart, self.stream
        arrays = {n: np.ascontiguousarray(feeds[n], dtype=self.dtypes[n]) for n in self.input_names}
        shapes = {n: tuple(a.shape) for n, a in arrays.items()}
        key = tuple(sorted(shapes.items()))
        bufs = self._activate(key, shapes)
        h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        e0, e1, e2, e3 = self._events
        _check(cudart, cudart.cudaEventRecord(e0, stream), "cudaEventRecord")
        for name, arr in arrays.items():
            if arr.nbytes:
                _check(cudart, cudart.cudaMemcpyAsync(bufs.device[name], arr.ctypes.data, arr.nbytes, h2d, stream),
                       f"copy of {name} to the device")
        _check(cudart, cudart.cudaEventRecord(e1, stream), "cudaEventRecord")
        self._execute(bufs)
        _check(cudart, cudart.cudaEventRecord(e2, stream), "cudaEventRecord")
        for name, host in bufs.host_out.items():
            if host.nbytes:
                _check(cudart, cudart.cudaMemcpyAsync(host.ctypes.data, bufs.device[name], host.nbytes, d2h, stream),
                       f"copy of {name} to the host")
        _check(cudart, cudart.cudaEventRecord(e3, stream), "cudaEventRecord")
        _check(cudart, cudart.cudaStreamSynchronize(stream), "cudaStreamSynchronize")
        elapsed = lambda a, b: float(_check(cudart, cudart.cudaEventElapsedTime(a, b), "cudaEventElapsedTime"))  # noqa: E731
        self.timings.append({"h2d_ms": elapsed(e0, e1), "compute_ms": elapsed(e1, e2), "d2h_ms": elapsed(e2, e3)})
        return {name: host.copy() for name, host in bufs.host_out.items()}

    def refit(self, values: Mapping[str, np.ndarray], logger) -> None:
        """Set these initializers' values (ONNX initializer name -> array of the engine's weight dtype)
        through the build's refit name map and refit the engine in place (LoRAs at load time). Captured
        CUDA graphs are dropped: they are captured again on the next run."""
        from hidream_export.runtime.lora import engine_refit_weights

        trt = self._trt
        weights = engine_refit_weights(self.entry, values, str(self.path))
        refitter = trt.Refitter(self.engine, logger)
        for name, array in weights.items():
            if not refitter.set_named_weights(name, trt.Weights(_trt_weight_type(trt, array.dtype), array.ctypes.data,
                                                                array.size)):
                raise EngineMismatch(f"{self.path}: TensorRT rejected refit weight {name!r} {array.dtype}"
                                     f"{list(array.shape)}")
        missing = list(refitter.get_missing_weights())
        if missing:
            raise EngineMismatch(f"{self.path}: the refit also needs weights {missing[:3]} ({len(missing)} in all)")
        if not refitter.refit_cuda_engine():
            raise EngineMismatch(f"{self.path}: refit_cuda_engine() failed (see the TensorRT log)")
        del weights  # TensorRT copies the weights during refit_cuda_engine(); the arrays may go now
        for bufs in self._buffers.values():
            if bufs.graph_exec is not None:
                self._cudart.cudaGraphExecDestroy(bufs.graph_exec)
                self._cudart.cudaGraphDestroy(bufs.graph)
                bufs.graph = bufs.graph_exec = None
                bufs.warm = False

    def close(self) -> None:
        """Free device buffers, graphs, events and the stream (also done at garbage collection)."""
        cudart = self._cudart
        for bufs in self._buffers.values():
            if bufs.graph_exec is not None:
                cudart.cudaGraphExecDestroy(bufs.graph_exec)
                cudart.cudaGraphDestroy(bufs.graph)
            for ptr in bufs.device.values():
                cudart.cudaFree(ptr)
        self._buffers.clear()
        self._active = None
        for ev in self._events:
            cudart.cudaEventDestroy(ev)
        self._events = []
        if self.stream is not None:
            cudart.cudaStreamDestroy(self.stream)
            self.stream = None

    def __del__(self):  # pragma: no cover - best effort
        try:
            if self._events or self._buffers:
                self.close()
        except Exception:  # noqa: BLE001
            pass


class TrtBackend(Backend):
    """The "trt" runtime backend: loads a folder's "trt_engine" components (see engines/README.md).

    device: CUDA device index. cuda_graphs: replay static-shape engines as CUDA graphs. Raises
    BackendUnavailable at construction when TensorRT or cuda-python cannot be imported, or no GPU exists."""

    name = "trt"
    thread_safe = False

    def __init__(self, device: int = 0, cuda_graphs: bool = True):
        from hidream_export.moe.loader import import_tensorrt

        try:
            self._trt = import_tensorrt("the TensorRT runtime backend (backend='trt')")
        except TensorRTUnavailable as exc:
            raise BackendUnavailable(str(exc)) from None
        self._cudart = _import_cudart()
        cudart = self._cudart
        count = _check(cudart, cudart.cudaGetDeviceCount(), "cudaGetDeviceCount")
        if not count or device >= count:
            raise BackendUnavailable(f"no CUDA device {device} (found {count}). {_HINT}")
        _check(cudart, cudart.cudaSetDevice(device), "cudaSetDevice")
        props = _check(cudart, cudart.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
        self.device = device
        self.compute_capability = f"{props.major}{props.minor}"
        self.gpu_name = (props.name.decode() if isinstance(props.name, bytes) else str(props.name)).strip("\x00 ")
        self.cuda_graphs = cuda_graphs
        self._logger = self._trt.Logger(self._trt.Logger.WARNING)
        self._runtime = self._trt.Runtime(self._logger)

    def describe(self) -> str:
        return (f"trt {self._trt.__version__} ({self.gpu_name}, sm{self.compute_capability}, "
                f"CUDA graphs {'on' if self.cuda_graphs else 'off'})")

    def component_key(self, manifest: Manifest, name: str) -> str:
        """The trt_engine entry for logical component `name` ("<name>_trt", or any entry engine_for it)."""
        found = manifest.engine_for(name)
        if found is None:
            raise ManifestError(f"no TensorRT engine for component {name!r} in this folder (has "
                                f"{sorted(manifest.components)}); build them with `hidream-export build ... --trt`, "
                                "or use --backend ort")
        return found[0]

    def _check_entry(self, entry: Component, path: Path) -> None:
        if not isinstance(entry, TrtEngineComponent):
            raise ManifestError(f"the trt backend runs kind 'trt_engine' components, not {entry.kind!r} ({path})")
        built_trt, built_cc = entry.tensorrt_version, str(entry.compute_capability)
        problems = []
        if built_trt and built_trt != self._trt.__version__:
            problems.append(f"TensorRT {built_trt} (this is {self._trt.__version__})")
        if built_cc and built_cc != self.compute_capability:
            problems.append(f"sm{built_cc} (this GPU is {self.gpu_name}, sm{self.compute_capability})")
        if problems:
            raise EngineMismatch(f"{path} was built for {' and '.join(problems)}; TensorRT engines do not move between "
                                 "versions or GPUs: rebuild with `hidream-export build ... --trt` on this machine")

    def load(self, path: Path, entry: Component, *, initializers: Mapping[str, np.ndarray] | None = None
             ) -> TrtSession:
        from hidream_export.moe.loader import ensure_plugins, requirements_of
        from hidream_export.runtime.lora import engine_refit_weights

        self._check_entry(entry, path)
        if initializers:  # refused before the engine is deserialized
            engine_refit_weights(entry, initializers, str(path))
        ensure_plugins(requirements_of(entry, needed_by=str(path)), phase="runtime")
        engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise EngineMismatch(f"{path}: TensorRT could not deserialize the engine (see the TensorRT log above)")
        session = TrtSession(self._trt, self._cudart, engine, path, entry, cuda_graphs=self.cuda_graphs)
        if initializers:
            session.refit(initializers, self._logger)
        return session

    def update_initializers(self, session: TrtSession, path: Path, entry: Component,
                            initializers: Mapping[str, np.ndarray], restore: Mapping[str, np.ndarray]) -> TrtSession:
        """Refit in place: the new values, and the folder's own for weights only the previous set changed."""
        session.refit({**restore, **initializers}, self._logger)
        return session
