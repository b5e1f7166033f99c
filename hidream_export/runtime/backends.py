"""Execution backends: the one place that knows how an exported graph is run.

The pipeline only needs "feed named numpy arrays, get named numpy arrays back", so a backend is a tiny
protocol:

    backend = get_backend("ort", providers=["CPUExecutionProvider"], threads=2)
    key = backend.component_key(manifest, "transformer")   # which manifest entry this backend runs
    session = backend.load(manifest.file_path(folder, key), manifest.components[key])
    outputs = session.run({"hidden_states": x, ...})      # -> {"sample": array}

``"ort"`` (onnxruntime, any execution provider) lives here. ``"trt"`` is provided by
``hidream_export.runtime.trt_backend`` (class ``TrtBackend``), imported only when asked for, so the
runtime works on machines without TensorRT, and asking for it there fails with a message saying what to
do instead. Nothing here imports torch; onnxruntime itself is imported when an ``OrtBackend`` is made,
which keeps ``import hidream_export.runtime`` fast.
"""

from __future__ import annotations

import abc
import ctypes
import importlib
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, runtime_checkable

import numpy as np

from hidream_export.errors import BackendUnavailable, ManifestError, RequestError
from hidream_export.manifest import Component, Manifest, OnnxComponent
from hidream_export.runtime.device import (ORT_ELEMENT_NAMES, Device, DeviceArray, bfloat16_dtype, device_for,
                                           numpy_dtype)
from hidream_export.runtime.ort_kernels import check_providers, provider_names

# `--provider` names: the provider lists they stand for, most preferred first.
PROVIDER_SHORTHANDS = {"cuda": ("CUDAExecutionProvider", "CPUExecutionProvider"), "cpu": ("CPUExecutionProvider",)}

__all__ = ["PROVIDER_SHORTHANDS", 
    "Backend",
    "BackendUnavailable",
    "OrtBackend",
    "OrtSession",
    "Session",
    "available_backends",
    "get_backend",
    "register_backend",
]


@runtime_checkable
class Session(Protocol):
    """One loaded graph. ``run`` returns every output by name, as numpy arrays on the host."""

    input_names: list[str]
    output_names: list[str]

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...


class Backend(abc.ABC):
    """Base class of the backends: loads manifest components into Sessions.

    ``thread_safe`` says whether two threads may call ``run`` on the same Session at once (ORT: yes;
    a TensorRT execution context: no). The pipeline serialises its calls when a backend says no.
    """

    name: str = ""
    thread_safe: bool = True

    def component_key(self, manifest: Manifest, name: str) -> str:
        """The manifest component that implements logical component ``name`` for this backend.

        ONNX backends run the ONNX component of that name. A backend with its own artefacts (the
        TensorRT engines, manifest kind ``trt_engine``) overrides this to pick its entry, so the
        pipeline verifies and loads exactly the files that will run.
        """
        return name

    @abc.abstractmethod
    def load(self, path: Path, entry: Component, *, initializers: Mapping[str, np.ndarray] | None = None) -> Session:
        """A session for one manifest component: `entry`, whose file is `path` (resolved and confined to
        its folder by `Manifest.file_path`). `initializers` (ONNX initializer name -> value) replace those
        weights of the graph in this session only (LoRAs applied at load time; the files are unchanged)."""

    def update_initializers(self, session: Session, path: Path, entry: Component,
                            initializers: Mapping[str, np.ndarray],
                            restore: Mapping[str, np.ndarray]) -> Session:
        """The session for `entry` running with `initializers` in place of the graph's own, after `session`
        ran with another set; `restore` has the files' values of initializers that set replaced and this one
        does not. Default: a new session (onnxruntime fixes weights when a session is made); TensorRT refits
        the engine in place instead."""
        return self.load(path, entry, initializers=initializers) if initializers else self.load(path, entry)

    def describe(self) -> str:
        """One line for reports: which backend, with which settings."""
        return self.name


# --- onnxruntime ------------------------------------------------------------------------------------

_ONNX_BFLOAT16 = 16  # TensorProto.BFLOAT16, without importing onnx


class OrtSession:
    """An onnxruntime InferenceSession behind the Session protocol.

    Feeds are cast to the dtype each graph input declares (so callers can keep float32 latents for an
    fp16 model) and checked by name, so a mismatch between the manifest and the graph reads as an error
    naming the input rather than onnxruntime's generic one. ``InferenceSession.run`` is thread-safe.
    """

    def __init__(self, session: Any, path: str | Path, keep: Any = None):
        self._session = session
        self.path = Path(path)
        self._keep = keep  # replacement initializers' buffers: onnxruntime may use them in place
        inputs, outputs = session.get_inputs(), session.get_outputs()
        self.input_names = [i.name for i in inputs]
        self.output_names = [o.name for o in outputs]
        self.input_types = {i.name: i.type for i in inputs}
        self.input_shapes = {i.name: list(i.shape) for i in inputs}
        self.output_types = {o.name: o.type for o in outputs}
        self._needs_ortvalues = any(t == "tensor(bfloat16)" for t in [*self.input_types.values(),
                                                                      *self.output_types.values()])

    def __repr__(self) -> str:
        return f"OrtSession({self.path}, inputs={self.input_names}, outputs={self.output_names})"

    def _check_names(self, feeds: Mapping[str, Any]) -> None:
        missing = [n for n in self.input_names if n not in feeds]
        extra = [n for n in feeds if n not in self.input_types]
        if missing or extra:
            raise ManifestError(f"{self.path}: inputs {self.input_names} expected; missing {missing}, "
                                f"unexpected {extra}")

    def _feed(self, name: str, value: Any) -> np.ndarray:
        kind = ORT_ELEMENT_NAMES.get(self.input_types[name])
        if kind is None:  # an exotic type: let onnxruntime judge the array as given
            return np.ascontiguousarray(value)
        return np.ascontiguousarray(value, dtype=numpy_dtype(kind))

    def run(self, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
        self._check_names(feeds)
        arrays = {name: self._feed(name, value) for name, value in feeds.items()}
        if not self._needs_ortvalues:
            return dict(zip(self.output_names, self._session.run(self.output_names, arrays)))
        return self._run_with_ortvalues(arrays)

    def run_bound(self, feeds: Mapping[str, Any], device: Any) -> dict[str, Any]:
        """``run`` with inputs and outputs on ``device`` (a runtime.device.Device): DeviceArrays (or host
        arrays, uploaded) in, DeviceArrays out, cast on the device to the dtypes the graph declares, so an
        fp16/bf16 graph is fed without a host round trip."""
        self._check_names(feeds)
        binding = self._session.io_binding()
        for name, value in feeds.items():
            kind = ORT_ELEMENT_NAMES.get(self.input_types[name])
            if kind is None:
                raise ManifestError(f"{self.path}: input {name!r} has type {self.input_types[name]}, which the "
                                    f"I/O-bound loop cannot feed")
            if not isinstance(value, DeviceArray):
                value = device.upload(np.asarray(value))
            binding.bind_ortvalue_input(name, value.astype(numpy_dtype(kind), copy=False).value)
        for name in self.output_names:
            binding.bind_output(name, device.device_type, device.device_id)
        self._session.run_with_iobinding(binding)
        return {name: device.wrap(value) for name, value in zip(self.output_names, binding.get_outputs())}

    def _run_with_ortvalues(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """bfloat16 path: onnxruntime's numpy bridge has no bfloat16, so inputs go in as OrtValues
        built from the raw 16-bit words and bfloat16 outputs are copied out of their buffers."""
        import onnxruntime as ort

        values = {}
        for name, arr in arrays.items():
            if arr.dtype.name == "bfloat16":
                values[name] = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(arr.view(np.uint16), _ONNX_BFLOAT16)
            else:
                values[name] = ort.OrtValue.ortvalue_from_numpy(arr)
        results = self._session.run_with_ort_values(self.output_names, values)
        out = {}
        for name, value in zip(self.output_names, results):
            if value.data_type() == "tensor(bfloat16)":
                out[name] = _copy_bfloat16(value)
            else:
                out[name] = value.numpy()
        return out


def _copy_bfloat16(value: Any) -> np.ndarray:
    """A host bfloat16 OrtValue as an ml_dtypes array (a copy: the OrtValue owns its buffer)."""
    shape = tuple(value.shape())
    n = int(np.prod(shape, dtype=np.int64))
    words = np.empty(n, dtype=np.uint16)
    if n:
        ctypes.memmove(words.ctypes.data, value.data_ptr(), 2 * n)
    return words.view(bfloat16_dtype()).reshape(shape)


class OrtBackend(Backend):
    """onnxruntime with a list of execution providers.

    ``providers=None`` picks CUDA when this onnxruntime has it, else CPU (never the TensorRT EP by
    default: it builds engines on first use, for minutes; ask for it explicitly). ``threads`` sets the
    intra-op thread count (None: onnxruntime's default, one per physical core).
    """

    name = "ort"
    thread_safe = True
    _DEFAULT_ORDER = ("CUDAExecutionProvider", "CPUExecutionProvider")

    def __init__(self, providers: list[Any] | tuple[Any, ...] | None = None, threads: int | None = None,
                 log_severity: int = 3):
        try:
            import onnxruntime as ort
        except ImportError:
            raise BackendUnavailable("onnxruntime is not installed (pip install onnxruntime)") from None
        self._ort = ort
        available = ort.get_available_providers()
        if providers is None:
            providers = [p for p in self._DEFAULT_ORDER if p in available]
        else:
            providers = list(providers)
            names = provider_names(providers)
            unknown = [n for n in names if n not in available]
            if "CUDAExecutionProvider" in unknown:
                raise BackendUnavailable(
                    f"the CUDA provider is not in this onnxruntime {ort.__version__} (it has {available}): install "
                    f"onnxruntime-gpu in its place (pip uninstall onnxruntime && pip install onnxruntime-gpu) on a "
                    f"machine with an NVIDIA driver and CUDA 12, or run with --provider cpu")
            if unknown:
                raise BackendUnavailable(f"onnxruntime {ort.__version__} here has no {unknown}; "
                                         f"available providers: {available}")
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 0):
            raise RequestError(f"--threads must be a non-negative integer (0: onnxruntime's default), got {threads!r}")
        self.providers = providers
        self.threads = threads
        self.log_severity = log_severity

    def describe(self) -> str:
        names = provider_names(self.providers)
        threads = "" if self.threads is None else f", {self.threads} threads"
        return f"ort {self._ort.__version__} ({', '.join(names)}{threads})"

    def session_options(self) -> Any:
        opts = self._ort.SessionOptions()
        opts.log_severity_level = self.log_severity
        opts.graph_optimization_level = self._ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self.threads:
            opts.intra_op_num_threads = self.threads
        return opts

    def device(self) -> Device:
        """Where this backend's sessions keep I/O-bound tensors: the first provider's device."""
        return device_for(self._ort, self.providers)

    def load(self, path: Path, entry: Component, *, initializers: Mapping[str, np.ndarray] | None = None
             ) -> OrtSession:
        if not isinstance(entry, OnnxComponent):
            raise ManifestError(f"the ort backend runs ONNX components, not kind {entry.kind!r} ({path})")
        check_providers(entry, self.providers, str(path))  # before a session: one line, not INVALID_GRAPH
        options = self.session_options()
        for key, value in (entry.quant.ort_session_config() if entry.quant else {}).items():
            options.add_session_config_entry(key, value)  # e.g. the MatMulNBits compute the export chose
        values = [self._ortvalue(v) for v in (initializers or {}).values()]
        if values:  # external-data initializers only (every exported transformer weight is one)
            options.add_external_initializers(list(initializers), values)
        # From the path (not bytes), so onnxruntime finds the external weights next to the model.
        try:
            session = self._ort.InferenceSession(str(path), sess_options=options, providers=self.providers)
        except Exception as exc:  # noqa: BLE001 - onnxruntime's InvalidProtobuf/Fail/... on a damaged graph
            raise ManifestError(f"{path}: onnxruntime cannot load it ({type(exc).__name__}: "
                                f"{' '.join(str(exc).split())[:300]})") from None
        return OrtSession(session, path, keep=values or None)

    def _ortvalue(self, array: np.ndarray) -> Any:
        array = np.ascontiguousarray(array)
        if array.dtype.name == "bfloat16":  # no numpy bfloat16 in onnxruntime's bridge: the raw 16-bit words
            return self._ort.OrtValue.ortvalue_from_numpy_with_onnx_type(array.view(np.uint16), _ONNX_BFLOAT16)
        return self._ort.OrtValue.ortvalue_from_numpy(array)


# --- registry -----------------------------------------------------------------------------------------

# name -> a Backend factory, or "module:attribute" imported on first use (so optional backends cost
# nothing, and a missing library only matters to whoever asks for that backend).
_REGISTRY: dict[str, Callable[..., Backend] | str] = {
    "ort": OrtBackend,
    "trt": "hidream_export.runtime.trt_backend:TrtBackend",
}

_INSTALL_HINTS = {
    "trt": ("TensorRT is not installed or not usable here (pip install 'hidream-export[gpu]' on a machine "
            "with an NVIDIA GPU); use backend='ort' (--backend ort) to run the ONNX models instead"),
}


def register_backend(name: str, factory: Callable[..., Backend] | str) -> None:
    """Add or replace a backend: a callable returning a Backend, or a lazy "module:attribute"."""
    _REGISTRY[name] = factory


def available_backends() -> list[str]:
    """Registered backend names (registered, not necessarily installed)."""
    return sorted(_REGISTRY)


def _resolve(name: str) -> Callable[..., Backend]:
    factory = _REGISTRY[name]
    if not isinstance(factory, str):
        return factory
    module_name, _, attr = factory.partition(":")
    hint = _INSTALL_HINTS.get(name, f"backend {name!r} is not available here; use backend='ort'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise BackendUnavailable(f"{hint} ({type(exc).__name__}: {exc})") from exc
    try:
        return getattr(module, attr)
    except AttributeError:
        raise BackendUnavailable(f"{hint} ({module_name} has no {attr})") from None


def get_backend(name: str | Backend = "ort", **options: Any) -> Backend:
    """A backend by name ("ort", "trt", ...) built with ``options`` (None values are dropped, so
    callers can pass through optional CLI settings); a Backend instance is returned as it is."""
    if isinstance(name, Backend):
        if any(v is not None for v in options.values()):
            raise ValueError("pass backend options when naming a backend, not with a Backend instance")
        return name
    if not isinstance(name, str) or name not in _REGISTRY:
        raise RequestError(f"--backend {name!r} is not one of {available_backends()}")
    factory = _resolve(name)
    try:
        return factory(**{k: v for k, v in options.items() if v is not None})
    except ImportError as exc:  # a backend that imports its library lazily, in its constructor
        raise BackendUnavailable(f"{_INSTALL_HINTS.get(name, name)} ({exc})") from exc
