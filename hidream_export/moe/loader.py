"""Make every TensorRT plugin a graph or engine needs present in TensorRT's plugin registry, or say why not.

Used by the engine build (before the ONNX parser meets a `hidream::HiDreamMoE` node) and by the runtime
(before an engine is deserialized). The failure this prevents is the one users hit most with plugins: an
engine that meets a missing creator at deserialization, where TensorRT only logs "Cannot find plugin" and
returns None. Here the check happens first, and the error names the plugin, its version,
who needs it and how to get it.

Where plugins come from, in order:

1. Plugin libraries listed in the environment variable HIDREAM_PLUGIN_PATH (os.pathsep-separated .so
   files, e.g. a compiled C++ IPluginV3 build of HiDreamMoE), loaded with ctypes like Polygraphy's
   `--plugins` (the library registers its creators statically when loaded).
2. Our Python plugin (`hidream_export.moe.trt_plugin.register_plugin()`), for `hidream::HiDreamMoE`
   when no library provides it. It needs tensorrt, torch and triton (pip install 'hidream-export[gpu,kernels]').

AOT plugins are different at runtime: their kernel is inside the engine, so nothing needs registering to
deserialize it (requirements with implementation "aot" are skipped at runtime, not at build).

Torch-free at import: the runtime imports this module.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from hidream_export.errors import MissingPluginError, TensorRTUnavailable
from hidream_export.manifest import Component, PluginRequirement, TransformerComponent, TrtEngineComponent

from . import schema

__all__ = [
    "PLUGIN_PATH_ENV", "INSTALL_HINT", "import_tensorrt", "tensorrt_unavailable_reason", "requirements_of",
    "requirements_from_onnx", "plugin_library_paths", "ensure_plugins", "is_registered", "is_ours",
]

PLUGIN_PATH_ENV = "HIDREAM_PLUGIN_PATH"
INSTALL_HINT = ("pip install 'hidream-export[gpu,kernels]' on a machine with an NVIDIA GPU (TensorRT, Triton and "
                "PyTorch for the Python plugin)")


def tensorrt_unavailable_reason() -> str | None:
    """None when `import tensorrt` works, else why not (one line)."""
    try:
        import tensorrt  # noqa: F401
    except ImportError as exc:
        return f"{type(exc).__name__}: {exc}"
    except Exception as exc:  # noqa: BLE001 - a broken install (missing libnvinfer, CUDA mismatch) raises others
        return f"import tensorrt failed: {type(exc).__name__}: {exc}"
    return None


def import_tensorrt(purpose: str = "this"):
    """`import tensorrt`, or TensorRTUnavailable saying that TensorRT is not installed, what needed it and
    how to get it. The one place the message lives (build, runtime and doctor use it)."""
    reason = tensorrt_unavailable_reason()
    if reason is not None:
        raise TensorRTUnavailable(
            f"TensorRT is not installed or not importable here ({reason}); {purpose} needs it. Install it with "
            f"{INSTALL_HINT}; `hidream-export doctor` shows what this machine has. Without TensorRT, use the "
            "ONNX Runtime backend (--backend ort).")
    import tensorrt

    return tensorrt


# ================================================================================================
# What is required
# ================================================================================================
def is_ours(req: PluginRequirement) -> bool:
    """Whether hidream-export itself provides the plugin (the Python HiDreamMoE plugin)."""
    return (req.name, req.namespace) == (schema.OP_TYPE, schema.PLUGIN_NAMESPACE)


def requirements_of(component: Component, needed_by: str = "") -> list[PluginRequirement]:
    """Plugins a manifest component needs: a TensorRT engine's `plugins`, or the `plugin` a transformer
    exported with the `plugin` MoE lowering records."""
    label = needed_by or component.path
    if isinstance(component, TrtEngineComponent):
        found = list(component.plugins)
    elif isinstance(component, TransformerComponent) and component.plugin is not None:
        found = [component.plugin]
    else:
        found = []
    return [r if r.needed_by else PluginRequirement(r.name, r.namespace, r.version, r.implementation, label)
            for r in found]


def requirements_from_onnx(model_or_path, needed_by: str = "") -> list[PluginRequirement]:
    """Plugins an ONNX graph needs, by the rule of TensorRT's fallback plugin importer: a node with a
    `plugin_namespace`/`plugin_version` attribute, or in a custom domain without a model-local function,
    is looked up in the registry as (op_type, plugin_version or "1", plugin_namespace or the domain).
    External data is never read."""
    import onnx

    if isinstance(model_or_path, onnx.ModelProto):
        model, label = model_or_path, needed_by or "<in-memory model>"
    else:
        model = onnx.load(str(model_or_path), load_external_data=False)
        label = needed_by or str(model_or_path)
    functions = {(f.domain, f.name) for f in model.functions}
    standard = {"", "ai.onnx", "ai.onnx.ml"}
    seen: dict[tuple, PluginRequirement] = {}

    def visit(nodes) -> None:
        for node in nodes:
            attrs = {a.name: a for a in node.attribute}
            explicit = "plugin_namespace" in attrs or "plugin_version" in attrs
            custom = node.domain not in standard and (node.domain, node.op_type) not in functions
            if explicit or custom:
                ns = attrs["plugin_namespace"].s.decode() if "plugin_namespace" in attrs else node.domain
                ver = attrs["plugin_version"].s.decode() if "plugin_version" in attrs else "1"
                req = PluginRequirement(node.op_type, ns, ver, needed_by=label)
                seen.setdefault((req.name, req.namespace, req.version), req)
            for a in node.attribute:  # subgraphs (If/Loop/Scan)
                if a.g is not None and a.g.node:
                    visit(a.g.node)
                for g in a.graphs:
                    visit(g.node)

    visit(model.graph.node)
    for f in model.functions:
        visit(f.node)
    return list(seen.values())


# ================================================================================================
# Registry access
# ================================================================================================
def _find_creator(registry, req: PluginRequirement):
    """TensorRT >= 10: IPluginRegistry.get_creator(name, version, namespace) (V1 and V3 creators);
    older: get_plugin_creator. None when absent."""
    for method in ("get_creator", "get_plugin_creator"):
        fn = getattr(registry, method, None)
        if fn is None:
            continue
        try:
            return fn(req.name, req.version, req.namespace)
        except Exception:  # noqa: BLE001 - some versions raise instead of returning None
            return None
    raise TypeError(f"{type(registry).__name__} is not a TensorRT plugin registry (no get_creator)")


def _registered_ids(registry) -> list[str]:
    """'namespace::name vversion' of every creator, for error messages (best effort)."""
    creators = []
    for attr in ("all_creators", "plugin_creator_list"):
        creators = list(getattr(registry, attr, None) or [])
        if creators:
            break
    out = []
    for c in creators:
        name = getattr(c, "name", None) or getattr(c, "plugin_name", "?")
        ns = getattr(c, "plugin_namespace", "") or ""
        ver = getattr(c, "plugin_version", "?")
        out.append(f"{ns + '::' if ns else ''}{name} v{ver}")
    return sorted(out)


def is_registered(req: Mapping[str, Any] | PluginRequirement, registry=None) -> bool:
    """Whether TensorRT's registry (or `registry`) has a creator for the requirement."""
    if registry is None:
        registry = import_tensorrt("checking TensorRT plugins").get_plugin_registry()
    return _find_creator(registry, PluginRequirement.from_dict(req)) is not None


def plugin_library_paths(env: Mapping[str, str] | None = None) -> list[Path]:
    """The plugin libraries named by HIDREAM_PLUGIN_PATH (os.pathsep-separated), in order."""
    value = (os.environ if env is None else env).get(PLUGIN_PATH_ENV, "")
    return [Path(p) for p in value.split(os.pathsep) if p.strip()]


_LOADED_LIBRARIES: dict[str, Any] = {}


def _load_library(path: Path) -> None:
    """Load a plugin library once per process. RTLD_GLOBAL so its creators' symbols stay reachable;
    the library registers its creators when loaded (REGISTER_TENSORRT_PLUGIN), as with Polygraphy --plugins."""
    key = str(path.resolve())
    if key in _LOADED_LIBRARIES:
        return
    if not path.is_file():
        raise MissingPluginError(f"{PLUGIN_PATH_ENV} names {path}, which does not exist")
    try:
        _LOADED_LIBRARIES[key] = ctypes.CDLL(key, mode=getattr(ctypes, "RTLD_GLOBAL", 0))
    except OSError as exc:
        raise MissingPluginError(f"cannot load plugin library {path} (from {PLUGIN_PATH_ENV}): {exc}") from exc


def ensure_plugins(required: Iterable[Mapping[str, Any] | PluginRequirement], *, phase: str = "runtime",
                   registry=None, plugin_paths: Sequence[str | Path] | None = None,
                   register_python=None, aot: bool = False) -> list[dict]:
    """Make sure every required plugin is registered with TensorRT; return what was done per plugin.

    phase: "build" (before parsing ONNX: every plugin, AOT ones included) or "runtime" (before
    deserializing: AOT plugins are inside the engine and skipped). registry: TensorRT's registry by default
    (tests pass a stand-in with get_creator). plugin_paths: libraries to load (default HIDREAM_PLUGIN_PATH).
    register_python: a callable registering our Python plugin (default trt_plugin.register_plugin);
    aot: register its AOT implementation too (build of an AOT engine).

    Raises MissingPluginError naming each missing plugin, its version, who needs it, what was tried and
    how to get it; TensorRTUnavailable when TensorRT itself is missing."""
    if phase not in ("build", "runtime"):
        raise ValueError(f"phase must be 'build' or 'runtime', got {phase!r}")
    reqs = [PluginRequirement.from_dict(r) for r in required]
    if phase == "runtime":
        reqs = [r for r in reqs if r.implementation != "aot"]
    if not reqs:
        return []
    if registry is None:
        registry = import_tensorrt("loading TensorRT plugins").get_plugin_registry()

    paths = [Path(p) for p in plugin_paths] if plugin_paths is not None else plugin_library_paths()
    for path in paths:
        _load_library(path)

    status: list[dict] = []
    tried: dict[str, str] = {}
    for req in reqs:
        found = _find_creator(registry, req) is not None
        # Building an AOT engine needs our Python plugin's aot_impl even if its creator is already there
        # (registered earlier for JIT); registration is idempotent. A library from HIDREAM_PLUGIN_PATH wins.
        add_aot = aot and is_ours(req) and not paths
        if found and not add_aot:
            status.append({**req.to_dict(), "source": "library" if paths else "already registered"})
            continue
        if is_ours(req) and req.version == schema.PLUGIN_VERSION:
            try:
                if register_python is None:
                    from .trt_plugin import register_plugin

                    register_plugin(jit=True, aot=aot)
                else:
                    register_python()
            except ImportError as exc:  # PluginRegistrationError, no torch/triton, ...
                tried[req.plugin_id] = f"the Python plugin could not be registered: {exc}"
            else:
                if _find_creator(registry, req) is not None:
                    status.append({**req.to_dict(), "source": "python (hidream_export.moe.trt_plugin)"})
                    continue
                tried[req.plugin_id] = "the Python plugin was registered but the registry still lacks it"
        status.append({**req.to_dict(), "source": None})

    missing = [PluginRequirement.from_dict({k: v for k, v in s.items() if k != "source"})
               for s in status if s["source"] is None]
    if missing:
        raise MissingPluginError(_missing_message(missing, tried, paths, registry))
    return status


def _missing_message(missing: list[PluginRequirement], tried: Mapping[str, str], paths: list[Path],
                     registry) -> str:
    lines = []
    for req in missing:
        need = f" (needed by {req.needed_by})" if req.needed_by else ""
        lines.append(f"TensorRT plugin {req.plugin_id} version {req.version} is not registered{need}.")
        if req.plugin_id in tried:
            lines.append(f"  tried: {tried[req.plugin_id]}")
        elif not is_ours(req):
            lines.append("  this is not a hidream-export plugin: load the library that provides it")
        elif req.version != schema.PLUGIN_VERSION:
            lines.append(f"  this hidream-export provides version {schema.PLUGIN_VERSION}; rebuild the engine with "
                         "this version, or install the hidream-export that built it")
    lines.append("  plugin libraries loaded from " + PLUGIN_PATH_ENV + ": "
                 + (", ".join(str(p) for p in paths) if paths else "none (variable unset)"))
    known = _registered_ids(registry)
    namespaces = {r.namespace for r in missing}
    same_ns = [k for k in known if any(k.startswith(f"{ns}::") for ns in namespaces if ns)]
    lines.append(f"  registry holds {len(known)} creators" + (f"; in the same namespace: {', '.join(same_ns)}"
                                                               if same_ns else ""))
    lines.append(f"To get it: {INSTALL_HINT}, or set {PLUGIN_PATH_ENV}=/path/to/libplugin.so (several separated "
                 f"by '{os.pathsep}') to load a compiled plugin library. An engine that needs a plugin must never "
                 "be deserialized without it.")
    return "\n".join(lines)
