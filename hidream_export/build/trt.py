"""The thin TensorRT layer: carry out a `BuildPlan` with Polygraphy's Python API and record the engines.

Everything that can be decided without TensorRT is decided in `hidream_export.build.plan` (pure, tested
on CPU-only machines); this module only talks to TensorRT, imports it lazily, and delegates to Polygraphy
what Polygraphy already does (profiles, builder config, engine build, timing cache), as demoDiffusion's
earlier releases did (`CreateConfig`, `Profile`, `engine_from_network`). It builds through the Python API
rather than a `polygraphy convert` subprocess, so failures surface as exceptions with the parser's errors
instead of a CalledProcessError that only says the subprocess failed.

Per planned engine:

* build: parse the prepared ONNX (plugin function stripped) into a strongly typed network, with the
  HiDreamMoE plugin registered first (`moe.loader.ensure_plugins`), build with the plan's profiles and
  flags, save atomically (temporary file, then rename);
* weight-stripped transformer: build the STRIP_PLAN engine once into the shared store, then refit it
  with this variant's weights through the explicit name map (`build.refit.refit_name_map`, stored in the
  manifest) with `trt.Refitter`, and serialize the refitted engine with its weights into the variant;
* shared text encoders / VAE: build once into the shared store (keyed by content), hard-link (or copy)
  into each variant folder;
* write a manifest component of kind "trt_engine" with the build flags, profiles, plugin versions, the
  hashes of the ONNX it came from, and the engine's own hash.

Without TensorRT, `build_engines(..., dry_run=True)` still returns the plan; anything else raises
`TensorRTUnavailable` saying what is missing (and `hidream-export doctor` explains).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from hidream_export.build.plan import BuildPlan, EnginePlan, TrtBuildOptions, make_build_plan
from hidream_export.build.prepare import write_prepared_onnx
from hidream_export.build.refit import refit_name_map
from hidream_export.errors import BuildError, HiDreamExportError
from hidream_export.files import atomic_write, file_mode
from hidream_export.manifest import FileRecord, Manifest, OnnxComponent
from hidream_export.moe.loader import ensure_plugins, import_tensorrt

__all__ = ["BuildResult", "TrtBuildOptions", "detect_target", "build_engines", "refit_engine_bytes"]


@dataclasses.dataclass
class BuildResult:
    plan: BuildPlan
    dry_run: bool
    manifest: Manifest  # the folder's manifest, with the engine entries written by this build
    done: list[dict] = dataclasses.field(default_factory=list)  # {component, action, path, seconds}

    def to_dict(self) -> dict:
        return {"dry_run": self.dry_run, "plan": self.plan.to_dict(), "done": self.done}

    def format(self) -> str:
        lines = [self.plan.format()]
        if self.dry_run:
            lines.append("dry run: nothing built")
        for d in self.done:
            lines.append(f"  {d['action']:<6} {d['component']}: {d['path']} ({d['seconds']:.1f} s)")
        return "\n".join(lines)


# ================================================================================================
# Target detection
# ================================================================================================
def detect_target() -> dict:
    """{"trt_version", "compute_capability", "gpu_name", "reason"} of this machine (None where unknown),
    from doctor's checks (tensorrt, cuda-python or nvidia-smi). Never raises."""
    from hidream_export import doctor

    report = doctor.doctor()
    trt = report["libraries"]["tensorrt"]
    gpu = report["gpu"]
    reasons = [r for r in ((None if trt["available"] else f"TensorRT: {trt['reason']}"),
                           (None if gpu["available"] else f"GPU: {gpu['reason']}")) if r]
    return {"trt_version": trt["version"] if trt["available"] else None,
            "compute_capability": gpu.get("compute_capability") if gpu["available"] else None,
            "gpu_name": gpu.get("name") if gpu["available"] else None,
            "reason": "; ".join(reasons) or None}


# ================================================================================================
# Building
# ================================================================================================
def _logger():
    """Polygraphy's TensorRT logger: one logger for builder, runtime and refitter, as TensorRT expects."""
    from polygraphy.backend.trt import util as trt_util

    return trt_util.get_trt_logger()


def _network_loader(trt, onnx_path: Path, *, strongly_typed: bool, plugin_impl: str | None):
    """A Polygraphy-style network loader: () -> (builder, network, parser).

    Polygraphy's NetworkFromOnnxPath cannot set the Python-plugin preference flag, which TensorRT requires
    when a QDP has both a JIT and an AOT implementation registered; so the network is created here with the
    documented NetworkDefinitionCreationFlags (STRONGLY_TYPED, PREFER_JIT/AOT_PYTHON_PLUGINS)."""

    def load():
        builder = trt.Builder(_logger())
        flags = 0
        if strongly_typed:
            flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        if plugin_impl:
            name = "PREFER_AOT_PYTHON_PLUGINS" if plugin_impl == "aot" else "PREFER_JIT_PYTHON_PLUGINS"
            flag = getattr(trt.NetworkDefinitionCreationFlag, name, None)
            if flag is not None:  # TensorRT < 10.9 has no AOT plugins, hence no preference to state
                flags |= 1 << int(flag)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, _logger())
        if not parser.parse_from_file(str(onnx_path)):  # from the path: external weights are found next to it
            errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
            raise BuildError(f"TensorRT's ONNX parser rejected {onnx_path}:\n  " + "\n  ".join(errors))
        return builder, network, parser

    return load


def _create_config(trt, engine: EnginePlan, timing_cache: Path | None):
    from polygraphy.backend.trt import CreateConfig, PostprocessConfig, Profile

    profiles = []
    for p in engine.profiles:
        prof = Profile()
        for name, s in p.shapes.items():
            prof.add(name, min=list(s["min"]), opt=list(s["opt"]), max=list(s["max"]))
        profiles.append(prof)
    flags = engine.flags
    pools = {trt.MemoryPoolType.WORKSPACE: flags["workspace_bytes"]} if flags.get("workspace_bytes") else None
    config = CreateConfig(profiles=profiles, builder_optimization_level=flags["opt_level"], memory_pool_limits=pools,
                          refittable=flags["refit"] is True, strip_plan=bool(flags["weight_stripped"]),
                          load_timing_cache=str(timing_cache) if timing_cache and timing_cache.exists() else None)
    if flags["refit"] == "identical":
        def refit_identical(builder, network, cfg):
            cfg.set_flag(trt.BuilderFlag.REFIT_IDENTICAL)

        config = PostprocessConfig(config, refit_identical)
    return config


def _build_bytes(trt, engine: EnginePlan, onnx_path: Path, timing_cache: Path | None) -> bytes:
    from polygraphy.backend.trt import engine_bytes_from_network

    network = _network_loader(trt, onnx_path, strongly_typed=engine.flags["strongly_typed"],
                              plugin_impl=engine.flags.get("plugin_impl"))
    config = _create_config(trt, engine, timing_cache)
    if timing_cache is not None:
        timing_cache.parent.mkdir(parents=True, exist_ok=True)
    data = engine_bytes_from_network(network, config=config,
                                     save_timing_cache=str(timing_cache) if timing_cache else None)
    if data is None:
        raise BuildError(f"TensorRT failed to build the {engine.component} engine (see the log above)")
    return bytes(data)


def _link(src: Path, dst: Path) -> None:
    """Put the shared file at dst: a hard link where the file system allows, else a copy (atomically)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.link")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
        os.chmod(tmp, file_mode())
    os.replace(tmp, dst)


# ================================================================================================
# Refit with an explicit name map
# ================================================================================================
def _trt_dtype(trt, onnx_type: int):
    from onnx import TensorProto

    table = {TensorProto.FLOAT: "float32", TensorProto.FLOAT16: "float16", TensorProto.BFLOAT16: "bfloat16",
             TensorProto.INT32: "int32", TensorProto.INT64: "int64", TensorProto.INT8: "int8",
             TensorProto.UINT8: "uint8", TensorProto.BOOL: "bool"}
    if onnx_type not in table:
        raise BuildError(f"initializer element type {onnx_type} cannot be refit")
    return getattr(trt, table[onnx_type])


def _initializer_views(onnx_path: Path, names: Sequence[str]) -> dict[str, tuple[int, Any, int]]:
    """(ONNX element type, numpy buffer, element count) per initializer, zero-copy for external data
    (a read-only memory map of the weights file), so refitting a 34 GB transformer needs no second copy."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path), load_external_data=False)
    wanted = set(names)
    maps: dict[str, Any] = {}
    out = {}
    for init in model.graph.initializer:
        if init.name not in wanted:
            continue
        count = 1
        for d in init.dims:
            count *= d
        if init.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in init.external_data}
            file = onnx_path.parent / info["location"]
            if str(file) not in maps:
                maps[str(file)] = np.memmap(file, dtype=np.uint8, mode="r")
            offset = int(info.get("offset", 0))
            length = int(info.get("length", maps[str(file)].size - offset))
            out[init.name] = (init.data_type, maps[str(file)][offset:offset + length], count)
        else:
            arr = numpy_helper.to_array(init)
            if arr.dtype.kind == "V" or arr.dtype.name == "bfloat16":
                arr = arr.view(np.uint16)
            out[init.name] = (init.data_type, np.ascontiguousarray(arr), count)
    missing = wanted - set(out)
    if missing:
        raise BuildError(f"{onnx_path}: no initializers {sorted(missing)[:5]} for the refit")
    return out


def refit_engine_bytes(trt, stripped: bytes, onnx_path: Path, name_map: Mapping[str, str]) -> tuple[bytes, dict]:
    """Deserialize a refittable (e.g. weight-stripped) engine, set every engine weight from `onnx_path`'s
    initializers through `name_map` (initializer -> engine weight name), refit, and serialize the engine
    WITH its weights (and still refittable where TensorRT supports INCLUDE_REFIT).

    Returns (engine bytes, {"refit_weights": n, "not_refittable": [initializers the engine has no
    refittable weight for]}). The second list matters: those initializers were folded into the engine at
    build time (STRIP_PLAN keeps non-refittable weights), so a refit with OTHER weights would silently keep
    the build's values for them."""
    logger = _logger()
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(stripped)
    if engine is None:
        raise BuildError("could not deserialize the weight-stripped engine for the refit (plugins registered?)")
    refitter = trt.Refitter(engine, logger)
    inverse = {engine_name: init for init, engine_name in name_map.items()}
    wanted = list(refitter.get_all_weights())
    unknown = [w for w in wanted if w not in inverse]
    if unknown:
        raise BuildError(f"{len(unknown)} engine weights have no ONNX initializer in the refit name map, e.g. "
                         f"{unknown[:5]}; rebuild instead of refitting")
    views = _initializer_views(onnx_path, [inverse[w] for w in wanted])
    for w in wanted:
        onnx_type, buf, count = views[inverse[w]]
        if not refitter.set_named_weights(w, trt.Weights(_trt_dtype(trt, onnx_type), buf.ctypes.data, count)):
            raise BuildError(f"refit: TensorRT rejected weight {w!r} (from initializer {inverse[w]!r}; wrong size?)")
    missing = list(refitter.get_missing_weights())
    if missing:
        raise BuildError(f"refit: TensorRT still needs weights {missing[:5]} ({len(missing)} in all)")
    if not refitter.refit_cuda_engine():
        raise BuildError("refit: refit_cuda_engine() failed (see the TensorRT log)")
    config = engine.create_serialization_config()
    config.clear_flag(trt.SerializationFlag.EXCLUDE_WEIGHTS)
    if hasattr(trt.SerializationFlag, "INCLUDE_REFIT"):
        config.set_flag(trt.SerializationFlag.INCLUDE_REFIT)
    data = engine.serialize_with_config(config)
    del views  # the memory maps must outlive refit_cuda_engine(); release them only now
    engine_names = set(wanted)
    not_refittable = sorted(init for init, name in name_map.items() if name not in engine_names)
    return bytes(data), {"refit_weights": len(wanted), "not_refittable": not_refittable}


# ================================================================================================
# Orchestration
# ================================================================================================
def _engine_entry(plan: BuildPlan, engine: EnginePlan, folder: Path, onnx_entry: OnnxComponent, seconds: float,
                  refit: dict | None = None):
    files = {engine.output: FileRecord.of(folder / engine.output)}
    return engine.engine_component(plan, files, onnx_entry, seconds, refit)


def _do_engine(trt, plan: BuildPlan, engine: EnginePlan, folder: Path, onnx_entry: OnnxComponent):
    """Carry out one engine's action; return its manifest entry."""
    t0 = time.perf_counter()
    source = folder / engine.onnx_path
    parse_path = source
    if engine.prepared_onnx:
        parse_path = write_prepared_onnx(source, folder / engine.prepared_onnx)
    out = folder / engine.output
    store = folder / engine.store_path if engine.store_path else None
    cache = folder / plan.timing_cache if plan.timing_cache else None
    extra: dict = {}
    stripped = engine.flags["weight_stripped"]
    if engine.action == "link":
        _link(store, out)
    elif stripped:
        # The stripped engine still holds every weight TensorRT could not make refittable (folded at build
        # time), with the values of the variant that built it: remember which weights those were.
        meta_path = store.with_name(store.name + ".json")
        if engine.action == "build" or not store.exists() or not meta_path.exists():
            atomic_write(store, _build_bytes(trt, engine, parse_path, cache))
            atomic_write(meta_path, json.dumps({"weights_sha256": engine.weights_sha256,
                                                 "onnx": str(source.resolve())}).encode())
        built_with = json.loads(meta_path.read_text()).get("weights_sha256")
        name_map = refit_name_map(parse_path)
        data, info = refit_engine_bytes(trt, store.read_bytes(), source, name_map)
        extra["refit"] = {"name_map": name_map, "from": engine.onnx_path, "stripped_engine": engine.store_path, **info}
        if info["not_refittable"] and built_with != engine.weights_sha256:
            # Refitting another variant's stripped engine would keep its folded weights: build our own.
            own = dataclasses.replace(engine, flags={**engine.flags, "weight_stripped": False})
            data = _build_bytes(trt, own, parse_path, cache)
            extra["refit"]["fallback"] = (f"{len(info['not_refittable'])} initializers are not refittable in this engine "
                                          f"(e.g. {info['not_refittable'][:3]}); built this variant's engine directly")
        atomic_write(out, data)
    elif engine.shared:
        atomic_write(store, _build_bytes(trt, engine, parse_path, cache))
        _link(store, out)
    else:
        atomic_write(out, _build_bytes(trt, engine, parse_path, cache))
        if engine.flags["refit"]:
            extra["refit"] = {"name_map": refit_name_map(parse_path), "from": engine.onnx_path}
    return _engine_entry(plan, engine, folder, onnx_entry, time.perf_counter() - t0, extra.get("refit"))


def build_engines(folder: str | Path, manifest: Manifest | None = None, *, options: TrtBuildOptions | None = None,
                  dry_run: bool = False) -> BuildResult:
    """Plan (and unless dry_run, build) the TensorRT engines of a variant folder; record them in its manifest.

    manifest: the folder's manifest if the caller has it (default: read FOLDER/manifest.json); the updated
    one is `result.manifest`. The options' trt_version / compute_capability / gpu_name default to this
    machine's. A dry run works anywhere (unknown values show as "unknown"); a real build needs TensorRT
    and a GPU and raises TensorRTUnavailable otherwise."""
    folder = Path(folder)
    options = options or TrtBuildOptions()
    manifest = manifest if manifest is not None else Manifest.read(folder)
    target = detect_target() if (options.trt_version is None or options.compute_capability is None) else {}
    if not dry_run:
        trt = import_tensorrt("building TensorRT engines (hidream-export build --trt)")
        if options.compute_capability is None and target.get("compute_capability") is None:
            raise BuildError(f"no CUDA GPU found to build for ({target.get('reason')}); `hidream-export doctor` explains")
    trt_version = options.trt_version or target.get("trt_version") or "unknown"
    cc = options.compute_capability or target.get("compute_capability") or "unknown"
    plan = make_build_plan(manifest, folder, options, trt_version=trt_version, compute_capability=cc,
                           gpu_name=options.gpu_name or target.get("gpu_name"))
    if "unknown" in (trt_version, plan.compute_capability):
        plan.notes.insert(0, f"no TensorRT/GPU detected here ({target.get('reason')}); file names show 'unknown'. "
                             "Pass --trt-version and --compute-capability to plan for another machine")
    if options.force:
        for e in plan.engines:
            e.action, e.reasons = "build", ["forced"]
    result = BuildResult(plan=plan, dry_run=dry_run, manifest=manifest)
    if dry_run or plan.up_to_date:
        return result

    ensure_plugins(plan.plugins, phase="build", aot=options.plugin_impl == "aot")
    for engine in plan.engines:
        if engine.action == "reuse":
            continue
        onnx_entry = manifest.components[engine.component]
        try:
            entry = _do_engine(trt, plan, engine, folder, onnx_entry)
        except HiDreamExportError:
            raise
        except Exception as exc:  # noqa: BLE001 - name the engine in whatever TensorRT/Polygraphy raised
            raise BuildError(f"{engine.action} of the {engine.component} engine ({engine.output}) failed: "
                             f"{type(exc).__name__}: {exc}") from exc
        previous = manifest.components.get(engine.key)
        manifest.components[engine.key] = entry
        manifest.write(folder)  # record progress engine by engine
        if previous is not None and previous.path != entry.path:
            (folder / previous.path).unlink(missing_ok=True)  # the engine for the old GPU/TensorRT it replaced
        result.done.append({"component": engine.component, "action": engine.action, "path": engine.output,
                            "seconds": entry.extra["build_seconds"]})
    return result
