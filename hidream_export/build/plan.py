"""The TensorRT build plan: which engines to build, from what, with which profiles and flags, and why.

`make_build_plan()` is a pure function of the manifest (plus, optionally, a file-existence check): it
never imports TensorRT, so `hidream-export build --trt --dry-run` works anywhere, and every decision is
unit-tested on machines without a GPU. `hidream_export.build.trt` executes the plan.

Per engine the plan lists:

* the source ONNX (path + sha256 from the manifest; graph and weights hashed separately, because a
  weights-only change can be refit instead of rebuilt), and for the transformer of a `plugin` export
  the prepared copy the parser reads (model-local HiDreamMoE function removed, see build/prepare.py);
* the output file, whose name carries the TensorRT version and the GPU's compute capability
  (`transformer.trt11.1.0.sm90.plan`), so engines for different GPUs or TensorRT versions never collide;
* strongly typed networks (the ONNX carries the precision; no fp16/bf16 builder flags), builder
  optimization level (demoDiffusion's default 3), workspace limit, timing cache (one per TensorRT
  version and GPU: the demo warns against sharing caches across GPU targets);
* optimization profiles per variant: transformer batch from its axes with the CFG batch multiple
  (Full: 2..8, opt 2; Dev/Fast: 1..4, opt 1), latent height/width from the exported size range with opt
  at the range's opt (1024x1024 for the real model), text length 128, the Llama stack's first dim fixed;
  optional static profiles at the recommended sizes (variants.RECOMMENDED_SIZES within range);
* the transformer as a weight-stripped refittable engine built once per GPU and graph (shared store),
  then refit per variant with that variant's weights through an explicit name map (build/refit.py),
  never by hashing weights;
* text encoders and VAE in the shared store keyed by a content hash (same ONNX + profile + flags +
  TensorRT + GPU -> same file), linked into each variant folder;
* whether each engine is up to date (reuse) or must be built / refit / linked, and why (missing,
  different TensorRT, different GPU, different plugin, different ONNX, different weights, different flags).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping

from hidream_export.errors import BuildPlanError, ManifestError
from hidream_export.export.targets import TENSORRT
from hidream_export.manifest import (SHARED_DIR, TRANSFORMER, Manifest, OnnxComponent, PluginRequirement,
                                     TransformerComponent, TrtEngineComponent, engine_file_name, engine_key,
                                     normalize_compute_capability)
from hidream_export.signature import MAX_TEXT_BATCH, MAX_VAE_BATCH
from hidream_export.variants import RECOMMENDED_SIZES, VAE_SCALE, SizeRange

__all__ = ["PLAN_VERSION", "PREPARED_ONNX_NAME", "TrtBuildOptions", "Profile", "EnginePlan", "BuildPlan",
           "make_build_plan", "compute_capability_name"]

PLAN_VERSION = 1  # bump when the meaning of an engine entry's fields changes (forces rebuilds)
PREPARED_ONNX_NAME = "model.trt.onnx"
REFIT_MODES = (False, True, "identical")
PLUGIN_IMPLS = ("jit", "aot")

# Text encoders and the VAE are identical across Full/Dev/Fast: their engines are keyed by content and
# shared. Their batch covers every variant (Full feeds negative+positive prompts: 2 per image).
SHARED_COMPONENTS = ("clip_l", "clip_g", "t5", "llama", "vae_decoder")
_DEFAULT_BATCH = {"vae_decoder": (1, 1, MAX_VAE_BATCH)}
_ENCODER_BATCH = (1, 1, MAX_TEXT_BATCH)


@dataclasses.dataclass(frozen=True)
class TrtBuildOptions:
    """How `build --trt` builds engines (every field a CLI flag of the same name).

    trt_version / compute_capability / gpu_name: plan for this machine (None: the one detected here).
    refit: False, True (BuilderFlag.REFIT: refit with other weights, e.g. another variant's) or "identical"
    (REFIT_IDENTICAL: refit only with the build weights); applies to the transformer, as does
    weight_stripped (STRIP_PLAN: the shared engine holds no weights). timing_cache: "auto" (the shared
    store, one file per TensorRT version and GPU), a path, or None. plugin_impl: "jit" or "aot"
    implementation of the HiDreamMoE plugin. components: restrict to these. force: rebuild everything."""

    trt_version: str | None = None
    compute_capability: str | None = None
    gpu_name: str | None = None
    static_sizes: bool = False
    refit: bool | str = True
    weight_stripped: bool = True
    opt_level: int = 3
    workspace_gib: float | None = None
    timing_cache: str | None = "auto"
    plugin_impl: str = "jit"
    components: tuple[str, ...] | None = None
    force: bool = False

    def __post_init__(self) -> None:
        if self.refit not in REFIT_MODES:
            raise BuildPlanError(f"--refit must be one of {REFIT_MODES}, got {self.refit!r}")
        if self.weight_stripped and not self.refit:
            raise BuildPlanError("a weight-stripped engine must be refittable (--refit true or identical, or "
                                 "--no-weight-stripped)")
        if self.plugin_impl not in PLUGIN_IMPLS:
            raise BuildPlanError(f"--plugin-impl must be one of {PLUGIN_IMPLS}, got {self.plugin_impl!r}")
        if isinstance(self.opt_level, bool) or not isinstance(self.opt_level, int) or not 0 <= self.opt_level <= 5:
            raise BuildPlanError(f"--opt-level must be an integer 0..5, got {self.opt_level!r}")
        if self.workspace_gib is not None and not self.workspace_gib > 0:
            raise BuildPlanError(f"--workspace-gib must be positive, got {self.workspace_gib!r}")


def compute_capability_name(cc) -> str:
    """normalize_compute_capability with the plan's error (a bad --compute-capability)."""
    try:
        return normalize_compute_capability(cc)
    except ManifestError as exc:
        raise BuildPlanError(f"--compute-capability: {exc}") from None


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _onnx_hashes(name: str, entry: OnnxComponent) -> tuple[str, str]:
    """(graph sha256, weights sha256) from a component's manifest files: the model.onnx file itself,
    and one hash over the other files (external data), in name order."""
    if entry.path not in entry.files:
        raise BuildPlanError(f"component {name!r}: its ONNX file {entry.path} has no sha256 in the manifest 'files'")
    graph = entry.files[entry.path].sha256
    others = sorted((n, rec.sha256) for n, rec in entry.files.items() if n != entry.path)
    return graph, _digest(others)


# ================================================================================================
# Profiles
# ================================================================================================
@dataclasses.dataclass(frozen=True)
class Profile:
    """One TensorRT optimization profile: per input, min/opt/max shapes (Polygraphy `Profile().add`)."""

    name: str
    shapes: Mapping[str, Mapping[str, tuple[int, ...]]]

    @property
    def is_static(self) -> bool:
        return all(s["min"] == s["opt"] == s["max"] for s in self.shapes.values())

    def to_dict(self) -> dict:
        return {"name": self.name, "shapes": {k: {m: list(v[m]) for m in ("min", "opt", "max")}
                                              for k, v in self.shapes.items()}}

    def describe(self) -> str:
        parts = []
        for name, s in self.shapes.items():
            if s["min"] == s["max"]:
                parts.append(f"{name} {list(s['opt'])}")
            else:
                parts.append(f"{name} {list(s['min'])}/{list(s['opt'])}/{list(s['max'])}")
        return "; ".join(parts)


def _size_range(entry: OnnxComponent, transformer: TransformerComponent | None) -> SizeRange | None:
    for source in (entry, transformer):
        if isinstance(source, TransformerComponent) and source.size_range is not None:
            return source.size_range
    return None


def _axis_ranges(component: str, entry: OnnxComponent, transformer: TransformerComponent | None
                 ) -> dict[str, tuple[int, int, int]]:
    """(min, opt, max) per named axis of a component's inputs.

    Ranges come from the entry's "axes" ([min, max]), else the transformer's (latent axes), else the
    defaults above (batch of encoders and VAE). Opt: the transformer's batch at its batch multiple (one
    image: 2 for Full's CFG pair, 1 for Dev/Fast), other batches 1, latents at the size range's opt."""
    axes: dict[str, tuple[int, int, int]] = {}
    size_range = _size_range(entry, transformer)
    latent_opt = {}
    if size_range is not None:
        latent_opt = {"latent_height": size_range.opt[1] // VAE_SCALE, "latent_width": size_range.opt[0] // VAE_SCALE}
    sources = [entry.axes]
    if transformer is not None and transformer is not entry:
        sources.append({k: v for k, v in transformer.axes.items() if k != "batch"})
    for source in sources:
        for name, value in source.items():
            if name in axes:
                continue
            lo, hi = int(value[0]), int(value[1])
            if name == "batch":
                opt = entry.batch_multiple if isinstance(entry, TransformerComponent) else lo
            else:
                opt = latent_opt.get(name, lo)
            axes[name] = (lo, min(max(opt, lo), hi), hi)
    if "batch" not in axes:
        axes["batch"] = _DEFAULT_BATCH.get(component, _ENCODER_BATCH)
    return axes


def _input_shapes(component: str, entry: OnnxComponent, axes: Mapping[str, tuple[int, int, int]]
                  ) -> dict[str, dict[str, tuple[int, ...]]]:
    shapes = {}
    for spec in entry.inputs:
        mins, opts, maxs = [], [], []
        for dim in spec.shape:
            if isinstance(dim, int):
                lo = opt = hi = dim
            elif dim in axes:
                lo, opt, hi = axes[dim]
            else:
                raise BuildPlanError(f"component {component!r}: input {spec.name!r} has axis {dim!r} with no range "
                                     f"in the manifest (known: {sorted(axes)})")
            mins.append(lo), opts.append(opt), maxs.append(hi)
        shapes[spec.name] = {"min": tuple(mins), "opt": tuple(opts), "max": tuple(maxs)}
    if not shapes:
        raise BuildPlanError(f"component {component!r} lists no inputs in the manifest; cannot build a profile")
    return shapes


def _profiles(component: str, entry: OnnxComponent, transformer: TransformerComponent | None,
              static_sizes: bool) -> list[Profile]:
    axes = _axis_ranges(component, entry, transformer)
    profiles = [Profile("dynamic", _input_shapes(component, entry, axes))]
    has_latents = "latent_height" in axes and "latent_width" in axes
    if static_sizes and has_latents:
        size_range = _size_range(entry, transformer)
        batch = axes["batch"][1]
        for width, height in RECOMMENDED_SIZES:
            if size_range is None:
                break
            if not size_range.contains(width, height):
                continue
            fixed = dict(axes, batch=(batch,) * 3, latent_height=(height // VAE_SCALE,) * 3,
                         latent_width=(width // VAE_SCALE,) * 3)
            profiles.append(Profile(f"static {width}x{height}", _input_shapes(component, entry, fixed)))
    return profiles


# ================================================================================================
# The plan
# ================================================================================================
@dataclasses.dataclass
class EnginePlan:
    """How one TensorRT engine is made, and whether it has to be."""

    component: str  # the ONNX component it runs
    key: str  # its manifest entry ("<component>_trt")
    onnx_path: str  # relative to the variant folder
    onnx_sha256: str
    weights_sha256: str
    prepared_onnx: str | None  # the copy the parser reads (None: the ONNX itself)
    output: str  # engine file, relative to the variant folder
    shared: bool  # built once into the shared store and linked into variant folders
    store_path: str | None  # where the shared (or weight-stripped) engine lives, relative to the folder
    flags: dict
    profiles: list[Profile]
    plugins: list[PluginRequirement]
    content_key: str
    action: str = "build"  # "reuse" | "build" | "refit" | "link"
    reasons: list[str] = dataclasses.field(default_factory=list)

    @property
    def up_to_date(self) -> bool:
        return self.action == "reuse"

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["profiles"] = [p.to_dict() for p in self.profiles]
        d["plugins"] = [p.to_dict() for p in self.plugins]
        return d

    def engine_component(self, plan: "BuildPlan", files: dict, onnx_entry: OnnxComponent, seconds: float,
                         refit: dict | None = None) -> TrtEngineComponent:
        """The manifest record of this engine once built: how it was made (compared by the next plan)."""
        return TrtEngineComponent(
            path=self.output, files=files,
            source={"component": self.component, "onnx": self.onnx_path, "onnx_sha256": self.onnx_sha256,
                    "weights_sha256": self.weights_sha256, "prepared_onnx": self.prepared_onnx},
            engine_for=self.component, dtype=onnx_entry.dtype, inputs=list(onnx_entry.inputs),
            outputs=list(onnx_entry.outputs), tensorrt_version=plan.trt_version,
            compute_capability=plan.compute_capability, gpu_name=plan.gpu_name, plan_version=PLAN_VERSION,
            store_path=self.store_path, flags=dict(self.flags), profiles=[p.to_dict() for p in self.profiles],
            plugins=list(self.plugins), content_key=self.content_key, refit=refit,
            extra={"build_seconds": round(seconds, 2)})


@dataclasses.dataclass
class BuildPlan:
    folder: str
    trt_version: str
    compute_capability: str  # "90"
    gpu_name: str | None
    timing_cache: str | None  # relative to the folder
    engines: list[EnginePlan]
    plugins: list[PluginRequirement]
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def to_build(self) -> list[EnginePlan]:
        return [e for e in self.engines if e.action != "reuse"]

    @property
    def up_to_date(self) -> bool:
        return not self.to_build

    def engine(self, component: str) -> EnginePlan:
        for e in self.engines:
            if e.component == component:
                return e
        raise KeyError(f"no engine planned for component {component!r}")

    def to_dict(self) -> dict:
        return {"plan_version": PLAN_VERSION, "folder": self.folder, "tensorrt_version": self.trt_version,
                "compute_capability": self.compute_capability, "gpu_name": self.gpu_name,
                "timing_cache": self.timing_cache, "plugins": [p.to_dict() for p in self.plugins], "notes": self.notes,
                "engines": [e.to_dict() for e in self.engines]}

    def format(self) -> str:
        gpu = ("GPU unknown" if self.compute_capability == "unknown" else f"sm{self.compute_capability}") + (
            f" ({self.gpu_name})" if self.gpu_name else "")
        lines = [f"TensorRT build plan for {self.folder}: TensorRT {self.trt_version}, {gpu}",
                 f"  timing cache: {self.timing_cache or 'none'}"]
        if self.plugins:
            lines.append("  plugins: " + ", ".join(f"{p.plugin_id} v{p.version} ({p.implementation})"
                                                   for p in self.plugins))
        width = max(len(e.component) for e in self.engines)
        for e in self.engines:
            lines.append(f"  {e.component:<{width}}  {e.action:<6}  {'; '.join(e.reasons) or 'up to date'}")
            src = f"{e.onnx_path} (sha256 {e.onnx_sha256[:12]})"
            if e.prepared_onnx:
                src += f" -> {e.prepared_onnx} (plugin function removed)"
            lines.append(f"  {'':<{width}}    onnx:    {src}")
            where = f"{e.output}" + (f"  [store: {e.store_path}]" if e.store_path else "")
            lines.append(f"  {'':<{width}}    engine:  {where}")
            lines.append(f"  {'':<{width}}    flags:   {_describe_flags(e.flags)}")
            for p in e.profiles:
                lines.append(f"  {'':<{width}}    profile {p.name}: {p.describe()}")
        for note in self.notes:
            lines.append(f"  note: {note}")
        todo = len(self.to_build)
        lines.append(f"  {todo} of {len(self.engines)} engines to build/refit/link" if todo else "  all engines up to date")
        return "\n".join(lines)


# FP8 tensor-core GEMMs start with Ada (8.9); INT4/INT8 weight-only dequantizes into the float GEMM anywhere.
FP8_MIN_SM = 89


def _check_quant(component: str, scheme: str, cc: str) -> None:
    if scheme == "fp8" and cc.isdigit() and int(cc) < FP8_MIN_SM:
        raise BuildPlanError(f"component {component!r} is FP8 (e4m3 Q/DQ): TensorRT runs FP8 GEMMs on compute "
                             f"capability 8.9 or newer (Ada, Hopper), this plan is for sm{cc}; export without "
                             f"--quant fp8 for this GPU")


def _describe_flags(flags: Mapping) -> str:
    parts = ["strongly typed" if flags.get("strongly_typed") else "weakly typed"]
    if flags.get("quant"):
        parts.append(f"{flags['quant']} Q/DQ from the ONNX")
    if flags.get("refit"):
        parts.append("refit identical" if flags["refit"] == "identical" else "refittable")
    if flags.get("weight_stripped"):
        parts.append("weight-stripped")
    parts.append(f"opt level {flags.get('opt_level')}")
    ws = flags.get("workspace_bytes")
    parts.append(f"workspace {ws / 2**30:g} GiB" if ws else "workspace unlimited")
    if flags.get("plugin_impl"):
        parts.append(f"plugin {flags['plugin_impl']}")
    return ", ".join(parts)


def _plugin_requirements(entry: OnnxComponent, plugin_impl: str) -> list[PluginRequirement]:
    if not isinstance(entry, TransformerComponent) or entry.plugin is None:
        return []
    p = entry.plugin
    return [PluginRequirement(p.name, p.namespace, p.version, plugin_impl)]


def _compare(prev: TrtEngineComponent, plan: EnginePlan, trt_version: str, cc: str, folder: Path,
             exists: Callable[[Path], bool]) -> tuple[list[str], bool]:
    """Reasons the recorded engine does not fit the plan, and whether the ONLY difference is the weights."""
    reasons = []
    prev_trt, prev_cc = prev.tensorrt_version, prev.compute_capability
    if prev_trt != trt_version:
        reasons.append(f"different TensorRT: built with {prev_trt}, this is {trt_version}")
    if prev_cc != cc:
        was = f"sm{prev_cc}" + (f" ({prev.gpu_name})" if prev.gpu_name else "")
        reasons.append(f"different GPU: built for {was}, this is sm{cc}")
    prev_plugins = {(p.name, p.namespace): p.version for p in prev.plugins}
    now_plugins = {(p.name, p.namespace): p.version for p in plan.plugins}
    if prev_plugins != now_plugins:
        was = ", ".join(f"{n}::{k} v{v}" for (k, n), v in sorted(prev_plugins.items())) or "none"
        now = ", ".join(f"{n}::{k} v{v}" for (k, n), v in sorted(now_plugins.items())) or "none"
        reasons.append(f"different plugin: built with {was}, now {now}")
    src = prev.source
    if src.get("onnx_sha256") != plan.onnx_sha256:
        reasons.append(f"different ONNX: graph sha256 {str(src.get('onnx_sha256'))[:12]} -> {plan.onnx_sha256[:12]}")
    changed = sorted(k for k in set(plan.flags) | set(prev.flags) if plan.flags.get(k) != prev.flags.get(k))
    if changed:
        reasons.append("different flags: " + ", ".join(f"{k} {prev.flags.get(k)!r} -> {plan.flags.get(k)!r}"
                                                        for k in changed))
    if prev.profiles != [p.to_dict() for p in plan.profiles]:
        reasons.append("different flags: optimization profiles changed")
    if prev.plan_version != PLAN_VERSION:
        reasons.append(f"different flags: engine entry format {prev.plan_version} -> {PLAN_VERSION}")
    weights_only = not reasons
    if src.get("weights_sha256") != plan.weights_sha256:
        reasons.append(f"different weights: sha256 {str(src.get('weights_sha256'))[:12]} -> {plan.weights_sha256[:12]}")
    else:
        weights_only = False
    if prev.path and not exists(folder / prev.path):
        reasons.append(f"missing: engine file {prev.path} not found")
        weights_only = False
    return reasons, weights_only


def make_build_plan(manifest: "Manifest | Mapping[str, Any]", folder: str | Path,
                    options: TrtBuildOptions | None = None, *, trt_version: str | None = None,
                    compute_capability=None, gpu_name: str | None = None,
                    exists: Callable[[Path], bool] = os.path.exists) -> BuildPlan:
    """The TensorRT build plan for one variant folder (see the module docstring and TrtBuildOptions).

    trt_version / compute_capability / gpu_name: the machine that will build (default: the options'),
    compute capability in any form normalize_compute_capability accepts. exists: file-existence check
    (injectable for tests; the plan does nothing else with the disk)."""
    options = options or TrtBuildOptions()
    if not isinstance(manifest, Manifest):
        manifest = Manifest.from_dict(manifest, f"{folder}/manifest.json")
    trt_version = trt_version or options.trt_version
    compute_capability = compute_capability or options.compute_capability
    gpu_name = gpu_name or options.gpu_name
    if trt_version is None or compute_capability is None:
        raise BuildPlanError("the plan needs a TensorRT version and a GPU compute capability (--trt-version, "
                             "--compute-capability; detected on a machine that has them)")
    refit, weight_stripped, plugin_impl = options.refit, options.weight_stripped, options.plugin_impl
    folder = Path(folder)
    cc = compute_capability_name(compute_capability)
    trt_version = str(trt_version)
    comps = manifest.components
    onnx_names = [n for n, e in comps.items() if isinstance(e, OnnxComponent) and e.path.endswith(".onnx")]
    if options.components is not None:
        unknown = [c for c in options.components if c not in onnx_names]
        if unknown:
            raise BuildPlanError(f"--engines: no ONNX component {unknown} in {folder}/manifest.json (has "
                                 f"{sorted(onnx_names)})")
        onnx_names = [n for n in onnx_names if n in options.components]
    if not onnx_names:
        raise BuildPlanError(f"{folder}/manifest.json lists no ONNX components to build engines from")
    transformer = manifest.transformer
    if transformer is not None and TRANSFORMER in onnx_names and transformer.target != TENSORRT:
        raise BuildPlanError(f"{folder}/manifest.json: the transformer is an {transformer.target} graph "
                             f"(moe_lowering {transformer.moe_lowering}), not a TensorRT one; export it with --target "
                             f"{TENSORRT}, or leave it out with --engines")
    store = Path("..") / SHARED_DIR
    workspace = int(options.workspace_gib * 2**30) if options.workspace_gib else None
    notes = []

    engines = []
    for name in onnx_names:
        entry = comps[name]
        graph_sha, weights_sha = _onnx_hashes(name, entry)
        plugins = _plugin_requirements(entry, plugin_impl)
        is_transformer = name == TRANSFORMER
        flags = {"strongly_typed": True, "refit": refit if is_transformer else False,
                 "weight_stripped": bool(weight_stripped and is_transformer), "opt_level": int(options.opt_level),
                 "workspace_bytes": workspace, "plugin_impl": plugin_impl if plugins else None,
                 "static_sizes": bool(options.static_sizes)}
        if entry.quant is not None:  # only then, so unquantized engines keep their content keys
            _check_quant(name, entry.quant.scheme, cc)
            flags["quant"] = entry.quant.scheme
        profiles = _profiles(name, entry, transformer, options.static_sizes)
        prepared = None
        if plugins or getattr(entry, "moe_lowering", None) == "plugin":
            prepared = str(Path(entry.path).with_name(PREPARED_ONNX_NAME))
        shared = name in SHARED_COMPONENTS
        # Content key: everything the engine bytes depend on. A shared stripped transformer engine does
        # not depend on the weights (refit supplies them), unless refit must be identical to them.
        keyed_weights = None if (flags["weight_stripped"] and refit is True) else weights_sha
        content = {"component": name, "graph": graph_sha, "weights": keyed_weights, "flags": flags,
                   "profiles": [p.to_dict() for p in profiles], "plugins": [p.to_dict() for p in plugins],
                   "trt": trt_version, "sm": cc,
                   "plan_version": PLAN_VERSION}
        content_key = _digest(content)
        output = str(Path(entry.path).parent / engine_file_name(name, trt_version, cc))
        store_path = None
        if shared:
            store_path = str(store / content_key[:16] / engine_file_name(name, trt_version, cc))
        elif flags["weight_stripped"]:
            store_path = str(store / content_key[:16] / engine_file_name(name, trt_version, cc, stripped=True))
        plan = EnginePlan(component=name, key=engine_key(name), onnx_path=entry.path, onnx_sha256=graph_sha,
                          weights_sha256=weights_sha, prepared_onnx=prepared, output=output, shared=shared,
                          store_path=store_path, flags=flags, profiles=profiles, plugins=plugins,
                          content_key=content_key)
        prev = comps.get(plan.key)
        _decide(plan, prev if isinstance(prev, TrtEngineComponent) else None, trt_version, cc, folder, exists, refit)
        engines.append(plan)

    if any(e.flags["refit"] for e in engines):
        notes.append("TensorRT 11.3's release notes list a known issue: BuilderFlag.REFIT may drop a GEMM bias "
                     "(REFIT_IDENTICAL does not); compare refit engines against the golden outputs "
                     "(tools/gpu_check.sh does)")
    if transformer is not None and TRANSFORMER in onnx_names and transformer.moe_lowering in ("gather", "dense"):
        notes.append(f"the transformer was exported with --moe {transformer.moe_lowering}: "
                     + ("data-dependent shapes (NonZero/ScatterND) that TensorRT builds slowly and fuses poorly"
                        if transformer.moe_lowering == "gather" else "every expert on every token")
                     + "; --moe plugin is the lowering made for TensorRT (one HiDreamMoE plugin node per layer)")
    if any(e.flags.get("quant") == "fp8" for e in engines):
        notes.append("FP8 engine: the ONNX carries e4m3 Q/DQ, so the strongly typed network runs those matmuls as FP8 "
                     "GEMMs (compute capability 8.9+: Ada, Hopper); no precision flag is involved")
    if plugin_impl == "aot" and any(e.plugins for e in engines):
        notes.append("AOT plugin: a single-launch kernel that recomputes the expert gate/up products per output "
                     "tile (exact, slower than the JIT pipeline); the engine then needs no Python at runtime")
    if options.timing_cache == "auto":
        cache = str(store / f"timing_cache.trt{trt_version}.sm{cc}.cache")
    else:
        cache = None if options.timing_cache is None else str(options.timing_cache)
    plugins_all = []
    for e in engines:
        for p in e.plugins:
            if p not in plugins_all:
                plugins_all.append(p)
    return BuildPlan(folder=str(folder), trt_version=trt_version, compute_capability=cc, gpu_name=gpu_name,
                     timing_cache=cache, engines=engines, plugins=plugins_all, notes=notes)


def _decide(plan: EnginePlan, prev: TrtEngineComponent | None, trt_version: str, cc: str, folder: Path,
            exists: Callable[[Path], bool], refit) -> None:
    """Fill plan.action / plan.reasons from the recorded entry and what the shared store already holds."""
    in_store = plan.store_path is not None and exists(folder / plan.store_path)
    stripped_shared = plan.flags["weight_stripped"] and refit is True
    if prev is None:
        if plan.shared and in_store:
            plan.action, plan.reasons = "link", ["missing here; the shared store has it (same content key)"]
        elif stripped_shared and in_store:
            plan.action = "refit"
            plan.reasons = ["missing: the weight-stripped engine for this graph exists in the shared store; refit it "
                            "with this variant's weights"]
        else:
            plan.action, plan.reasons = "build", ["missing: no engine in the manifest"]
        return
    reasons, weights_only = _compare(prev, plan, trt_version, cc, folder, exists)
    if not reasons:
        plan.action, plan.reasons = "reuse", []
    elif weights_only and stripped_shared and in_store:
        plan.action, plan.reasons = "refit", reasons
    elif plan.shared and in_store:
        plan.action, plan.reasons = "link", reasons + ["the shared store has the matching engine"]
    elif stripped_shared and in_store:
        plan.action, plan.reasons = "refit", reasons + ["the shared weight-stripped engine matches; refit only"]
    else:
        plan.action, plan.reasons = "build", reasons
