"""The TensorRT build plan: which engines to build, from what, with which profiles and flags, and why.

`make_build_plan()` is a pure function of the manifest (plus, optionally, a file-existence check): it
never imports TensorRT, so `hidream-export build --trt --dry-run` works anywhere, and every decision is
unit-tested on machines without a GPU. `hidream_export.build.trt` executes the plan.

Per engine the plan lists:

* the source ONNX (path + sha256 from the manifest; graph and weights hashed separately, because a
  weights-only change can be refit instead of rebuilt), and for the transformer of a `plugin` export
  the prepared copy the parser reads (model-local HiDreamMoE function removed, see
  `strip_plugin_functions`);
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
  then refit per variant with that variant's weights through an explicit name map (`refit_name_map`),
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
from typing import Any, Callable, Iterable, Mapping, Sequence

from hidream_export.plugins import schema
from hidream_export.variants import RECOMMENDED_SIZES, VAE_SCALE, SizeRange

__all__ = [
    "PLAN_VERSION", "ENGINE_KIND", "PREPARED_ONNX_NAME", "SHARED_DIR", "MAX_IMAGES",
    "BuildPlanError", "Profile", "EnginePlan", "BuildPlan",
    "make_build_plan", "engine_key", "engine_file_name", "normalize_compute_capability",
    "strip_plugin_functions", "plugin_functions", "write_prepared_onnx",
    "refit_name_map", "refit_sources",
]

PLAN_VERSION = 1  # bump when the meaning of an engine entry's fields changes (forces rebuilds)
ENGINE_KIND = "trt_engine"
PREPARED_ONNX_NAME = "model.trt.onnx"
SHARED_DIR = ".shared"  # next to the variant folders, as for the shared ONNX components (engines/README.md)
MAX_IMAGES = 4  # images per prompt the engines serve (export.transformer.MAX_IMAGES_PER_PROMPT)
TRANSFORMER = "transformer"
REFIT_MODES = (False, True, "identical")

# Text encoders and the VAE are identical across Full/Dev/Fast: their engines are keyed by content and
# shared. Their batch covers every variant (Full feeds negative+positive prompts: 2 per image).
SHARED_COMPONENTS = ("clip_l", "clip_g", "t5", "llama", "vae_decoder")
_DEFAULT_BATCH = {"vae_decoder": (1, 1, MAX_IMAGES)}
_ENCODER_BATCH = (1, 1, 2 * MAX_IMAGES)


class BuildPlanError(ValueError):
    """The manifest does not allow a plan (no ONNX components, an axis without a range, bad options)."""


# ================================================================================================
# Small helpers
# ================================================================================================
def normalize_compute_capability(cc) -> str:
    """'90' from 9.0, '9.0', (9, 0), 'sm90', 'sm_90', 90 or '90' (12.0 -> '120'); 'unknown' stays."""
    if isinstance(cc, (tuple, list)):
        major, minor = (int(v) for v in cc)
        return f"{major}{minor}"
    if isinstance(cc, float):
        cc = f"{cc:.1f}"
    text = str(cc).strip().lower().removeprefix("sm").removeprefix("_")
    if text == "unknown":  # a dry run on a machine without a GPU
        return text
    if "." in text:
        major, minor = text.split(".", 1)
        return f"{int(major)}{int(minor)}"
    if not text.isdigit():
        raise BuildPlanError(f"compute capability {cc!r} is not like 9.0, (9, 0) or sm90")
    return str(int(text))


def engine_key(component: str) -> str:
    """Manifest key of a component's TensorRT engine entry (kind "trt_engine")."""
    return f"{component}_trt"


def engine_file_name(component: str, trt_version: str, compute_capability, *, stripped: bool = False) -> str:
    """`transformer.trt11.1.0.sm90.plan` (`transformer.stripped.trt...` for a weight-stripped engine)."""
    sm = normalize_compute_capability(compute_capability)
    return f"{component}{'.stripped' if stripped else ''}.trt{trt_version}.sm{sm}.plan"


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _onnx_hashes(entry: Mapping[str, Any]) -> tuple[str, str]:
    """(graph sha256, weights sha256) from a component's manifest "files": the model.onnx file itself,
    and one hash over the other files (external data), in name order."""
    files = entry.get("files") or {}
    path = entry.get("path")
    if path not in files:
        raise BuildPlanError(f"component {path!r}: its ONNX file has no sha256 in the manifest 'files'")
    graph = files[path]["sha256"]
    others = sorted((name, info["sha256"]) for name, info in files.items() if name != path)
    weights = _digest(others) if others else _digest([])
    return graph, weights


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


def _size_range(entry: Mapping, transformer: Mapping | None, manifest: Mapping) -> SizeRange | None:
    for source in (entry, transformer or {}, manifest.get("variant", {})):
        if source.get("size_range"):
            return SizeRange.from_dict(source["size_range"])
    return None


def _axis_ranges(component: str, entry: Mapping, transformer: Mapping | None, manifest: Mapping
                 ) -> dict[str, tuple[int, int, int]]:
    """(min, opt, max) per named axis of a component's inputs.

    Ranges come from the entry's "axes" ([min, max]), else the transformer's (latent axes), else the
    defaults above (batch of encoders and VAE). Opt: the transformer's batch at its batch multiple (one
    image: 2 for Full's CFG pair, 1 for Dev/Fast), other batches 1, latents at the size range's opt."""
    axes: dict[str, tuple[int, int, int]] = {}
    size_range = _size_range(entry, transformer, manifest)
    latent_opt = {}
    if size_range is not None:
        latent_opt = {"latent_height": size_range.opt[1] // VAE_SCALE, "latent_width": size_range.opt[0] // VAE_SCALE}
    sources = [entry.get("axes") or {}]
    if transformer is not None and transformer is not entry:
        sources.append({k: v for k, v in (transformer.get("axes") or {}).items() if k != "batch"})
    for source in sources:
        for name, value in source.items():
            if name in axes:
                continue
            lo, hi = int(value[0]), int(value[1])
            if name == "batch":
                opt = int(entry.get("batch_multiple", lo)) if component == TRANSFORMER else lo
            else:
                opt = latent_opt.get(name, lo)
            axes[name] = (lo, min(max(opt, lo), hi), hi)
    if "batch" not in axes:
        axes["batch"] = _DEFAULT_BATCH.get(component, _ENCODER_BATCH)
    return axes


def _input_shapes(component: str, entry: Mapping, axes: Mapping[str, tuple[int, int, int]]
                  ) -> dict[str, dict[str, tuple[int, ...]]]:
    shapes = {}
    for spec in entry.get("inputs") or []:
        mins, opts, maxs = [], [], []
        for dim in spec["shape"]:
            if isinstance(dim, int):
                lo = opt = hi = dim
            elif dim in axes:
                lo, opt, hi = axes[dim]
            else:
                raise BuildPlanError(f"component {component!r}: input {spec['name']!r} has axis {dim!r} with no range "
                                     f"in the manifest (known: {sorted(axes)})")
            mins.append(lo), opts.append(opt), maxs.append(hi)
        shapes[spec["name"]] = {"min": tuple(mins), "opt": tuple(opts), "max": tuple(maxs)}
    if not shapes:
        raise BuildPlanError(f"component {component!r} lists no inputs in the manifest; cannot build a profile")
    return shapes


def _profiles(component: str, entry: Mapping, transformer: Mapping | None, manifest: Mapping,
              static_sizes: bool) -> list[Profile]:
    axes = _axis_ranges(component, entry, transformer, manifest)
    profiles = [Profile("dynamic", _input_shapes(component, entry, axes))]
    has_latents = "latent_height" in axes and "latent_width" in axes
    if static_sizes and has_latents:
        size_range = _size_range(entry, transformer, manifest)
        batch = axes["batch"][1]
        for width, height in RECOMMENDED_SIZES:
            if size_range is None:
                break
            if not (size_range.min[0] <= width <= size_range.max[0] and size_range.min[1] <= height <= size_range.max[1]):
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
    plugins: list[dict]
    content_key: str
    action: str = "build"  # "reuse" | "build" | "refit" | "link"
    reasons: list[str] = dataclasses.field(default_factory=list)

    @property
    def up_to_date(self) -> bool:
        return self.action == "reuse"

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["profiles"] = [p.to_dict() for p in self.profiles]
        return d

    def manifest_fields(self) -> dict:
        """What the engine entry records about how it was made (compared by the next plan)."""
        return {"flags": self.flags, "profiles": [p.to_dict() for p in self.profiles],
                "plugins": self.plugins, "content_key": self.content_key,
                "source": {"component": self.component, "onnx": self.onnx_path, "onnx_sha256": self.onnx_sha256,
                           "weights_sha256": self.weights_sha256, "prepared_onnx": self.prepared_onnx}}


@dataclasses.dataclass
class BuildPlan:
    folder: str
    trt_version: str
    compute_capability: str  # "90"
    gpu_name: str | None
    timing_cache: str | None  # relative to the folder
    engines: list[EnginePlan]
    plugins: list[dict]
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
                "timing_cache": self.timing_cache, "plugins": self.plugins, "notes": self.notes,
                "engines": [e.to_dict() for e in self.engines]}

    def format(self) -> str:
        gpu = ("GPU unknown" if self.compute_capability == "unknown" else f"sm{self.compute_capability}") + (
            f" ({self.gpu_name})" if self.gpu_name else "")
        lines = [f"TensorRT build plan for {self.folder}: TensorRT {self.trt_version}, {gpu}",
                 f"  timing cache: {self.timing_cache or 'none'}"]
        if self.plugins:
            lines.append("  plugins: " + ", ".join(f"{p['namespace']}::{p['name']} v{p['version']} ({p['implementation']})"
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


def _describe_flags(flags: Mapping) -> str:
    parts = ["strongly typed" if flags.get("strongly_typed") else "weakly typed"]
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


def _plugin_requirements(entry: Mapping, plugin_impl: str) -> list[dict]:
    plugin = entry.get("plugin")
    if not plugin:
        return []
    return [{"name": plugin.get("op_type", plugin.get("name")), "namespace": plugin.get("namespace", ""),
             "version": str(plugin.get("version", "1")), "implementation": plugin_impl}]


def _compare(prev: Mapping, plan: EnginePlan, trt_version: str, cc: str, folder: Path,
             exists: Callable[[Path], bool]) -> tuple[list[str], bool]:
    """Reasons the recorded engine does not fit the plan, and whether the ONLY difference is the weights."""
    reasons = []
    prev_trt, prev_cc = prev.get("tensorrt_version"), prev.get("compute_capability")
    if prev_trt != trt_version:
        reasons.append(f"different TensorRT: built with {prev_trt}, this is {trt_version}")
    if prev_cc != cc:
        was = f"sm{prev_cc}" + (f" ({prev['gpu_name']})" if prev.get("gpu_name") else "")
        reasons.append(f"different GPU: built for {was}, this is sm{cc}")
    prev_plugins = {(p["name"], p.get("namespace", "")): str(p.get("version")) for p in prev.get("plugins", [])}
    now_plugins = {(p["name"], p["namespace"]): str(p["version"]) for p in plan.plugins}
    if prev_plugins != now_plugins:
        was = ", ".join(f"{n}::{k} v{v}" for (k, n), v in sorted(prev_plugins.items())) or "none"
        now = ", ".join(f"{n}::{k} v{v}" for (k, n), v in sorted(now_plugins.items())) or "none"
        reasons.append(f"different plugin: built with {was}, now {now}")
    src = prev.get("source", {})
    if src.get("onnx_sha256") != plan.onnx_sha256:
        reasons.append(f"different ONNX: graph sha256 {str(src.get('onnx_sha256'))[:12]} -> {plan.onnx_sha256[:12]}")
    changed = sorted(k for k in set(plan.flags) | set(prev.get("flags", {}))
                     if plan.flags.get(k) != prev.get("flags", {}).get(k))
    if changed:
        reasons.append("different flags: " + ", ".join(f"{k} {prev.get('flags', {}).get(k)!r} -> {plan.flags.get(k)!r}"
                                                        for k in changed))
    if prev.get("profiles") != [p.to_dict() for p in plan.profiles]:
        reasons.append("different flags: optimization profiles changed")
    if prev.get("plan_version") != PLAN_VERSION:
        reasons.append(f"different flags: engine entry format {prev.get('plan_version')} -> {PLAN_VERSION}")
    weights_only = not reasons
    if src.get("weights_sha256") != plan.weights_sha256:
        reasons.append(f"different weights: sha256 {str(src.get('weights_sha256'))[:12]} -> {plan.weights_sha256[:12]}")
    else:
        weights_only = False
    if prev.get("path") and not exists(folder / prev["path"]):
        reasons.append(f"missing: engine file {prev['path']} not found")
        weights_only = False
    return reasons, weights_only


def make_build_plan(manifest: Mapping[str, Any], folder: str | Path, *, trt_version: str, compute_capability,
                    gpu_name: str | None = None, static_sizes: bool = False, refit: bool | str = True,
                    weight_stripped: bool = True, opt_level: int = 3, workspace_gib: float | None = None,
                    timing_cache: str | Path | None = "auto", plugin_impl: str = "jit",
                    components: Sequence[str] | None = None,
                    exists: Callable[[Path], bool] = os.path.exists) -> BuildPlan:
    """The TensorRT build plan for one variant folder (see the module docstring).

    trt_version / compute_capability / gpu_name: the machine that will build (compute capability in any
    form normalize_compute_capability accepts). refit: False, True (BuilderFlag.REFIT: refit with other
    weights, e.g. another variant's) or "identical" (REFIT_IDENTICAL: refit only with the build weights);
    applies to the transformer, as does weight_stripped (STRIP_PLAN: the shared engine holds no weights).
    timing_cache: "auto" (the shared store, one file per TensorRT version and GPU), a path, or None.
    plugin_impl: "jit" or "aot" implementation of the HiDreamMoE plugin. components: restrict to these.
    exists: file-existence check (injectable for tests; the plan does nothing else with the disk)."""
    if refit not in REFIT_MODES:
        raise BuildPlanError(f"refit must be one of {REFIT_MODES}, got {refit!r}")
    if weight_stripped and not refit:
        raise BuildPlanError("a weight-stripped engine must be refittable (refit=True or 'identical')")
    if plugin_impl not in ("jit", "aot"):
        raise BuildPlanError(f"plugin_impl must be 'jit' or 'aot', got {plugin_impl!r}")
    if not 0 <= int(opt_level) <= 5:
        raise BuildPlanError(f"builder optimization level must be 0..5, got {opt_level}")
    folder = Path(folder)
    cc = normalize_compute_capability(compute_capability)
    trt_version = str(trt_version)
    comps = manifest.get("components") or {}
    onnx_names = [n for n, e in comps.items() if e.get("kind", "onnx") == "onnx" and str(e.get("path", "")).endswith(".onnx")]
    if components is not None:
        unknown = [c for c in components if c not in onnx_names]
        if unknown:
            raise BuildPlanError(f"no ONNX component {unknown} in {folder}/manifest.json (has {sorted(onnx_names)})")
        onnx_names = [n for n in onnx_names if n in components]
    if not onnx_names:
        raise BuildPlanError(f"{folder}/manifest.json lists no ONNX components to build engines from")
    transformer = comps.get(TRANSFORMER)
    store = Path("..") / SHARED_DIR
    workspace = int(workspace_gib * 2**30) if workspace_gib else None
    notes = []

    engines = []
    for name in onnx_names:
        entry = comps[name]
        graph_sha, weights_sha = _onnx_hashes(entry)
        plugins = _plugin_requirements(entry, plugin_impl)
        is_transformer = name == TRANSFORMER
        flags = {"strongly_typed": True, "refit": refit if is_transformer else False,
                 "weight_stripped": bool(weight_stripped and is_transformer), "opt_level": int(opt_level),
                 "workspace_bytes": workspace, "plugin_impl": plugin_impl if plugins else None,
                 "static_sizes": bool(static_sizes)}
        profiles = _profiles(name, entry, transformer, manifest, static_sizes)
        prepared = None
        if plugins or entry.get("moe_lowering") == "plugin":
            prepared = str(Path(entry["path"]).with_name(PREPARED_ONNX_NAME))
        shared = name in SHARED_COMPONENTS
        # Content key: everything the engine bytes depend on. A shared stripped transformer engine does
        # not depend on the weights (refit supplies them), unless refit must be identical to them.
        keyed_weights = None if (flags["weight_stripped"] and refit is True) else weights_sha
        content = {"component": name, "graph": graph_sha, "weights": keyed_weights, "flags": flags,
                   "profiles": [p.to_dict() for p in profiles], "plugins": plugins, "trt": trt_version, "sm": cc,
                   "plan_version": PLAN_VERSION}
        content_key = _digest(content)
        output = str(Path(entry["path"]).parent / engine_file_name(name, trt_version, cc))
        store_path = None
        if shared:
            store_path = str(store / content_key[:16] / engine_file_name(name, trt_version, cc))
        elif flags["weight_stripped"]:
            store_path = str(store / content_key[:16] / engine_file_name(name, trt_version, cc, stripped=True))
        plan = EnginePlan(component=name, key=engine_key(name), onnx_path=entry["path"], onnx_sha256=graph_sha,
                          weights_sha256=weights_sha, prepared_onnx=prepared, output=output, shared=shared,
                          store_path=store_path, flags=flags, profiles=profiles, plugins=plugins,
                          content_key=content_key)
        _decide(plan, comps.get(plan.key), trt_version, cc, folder, exists, refit)
        engines.append(plan)

    if any(e.flags["refit"] for e in engines):
        notes.append("TensorRT 11.3's release notes list a known issue: BuilderFlag.REFIT may drop a GEMM bias "
                     "(REFIT_IDENTICAL does not); compare refit engines against the golden outputs "
                     "(tools/gpu_check.sh does)")
    if plugin_impl == "aot" and any(e.plugins for e in engines):
        notes.append("AOT plugin: a single-launch kernel that recomputes the expert gate/up products per output "
                     "tile (exact, slower than the JIT pipeline); the engine then needs no Python at runtime")
    if timing_cache == "auto":
        cache = str(store / f"timing_cache.trt{trt_version}.sm{cc}.cache")
    else:
        cache = None if timing_cache is None else str(timing_cache)
    plugins_all = []
    for e in engines:
        for p in e.plugins:
            if p not in plugins_all:
                plugins_all.append(p)
    return BuildPlan(folder=str(folder), trt_version=trt_version, compute_capability=cc, gpu_name=gpu_name,
                     timing_cache=cache, engines=engines, plugins=plugins_all, notes=notes)


def _decide(plan: EnginePlan, prev: Mapping | None, trt_version: str, cc: str, folder: Path,
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


# ================================================================================================
# ONNX preparation for the TensorRT parser
# ================================================================================================
def plugin_functions(model, plugins: Iterable[tuple[str, str]] | None = None) -> list[tuple[str, str]]:
    """(domain, name) of the model-local functions that shadow a plugin op: functions named like a node
    op that TensorRT implements as a plugin (by default hidream::HiDreamMoE) and actually used as such."""
    targets = set(plugins) if plugins is not None else {(schema.DOMAIN, schema.OP_TYPE)}
    used = {(n.domain, n.op_type) for n in model.graph.node}
    return [(f.domain, f.name) for f in model.functions if (f.domain, f.name) in targets and (f.domain, f.name) in used]


def strip_plugin_functions(model, plugins: Iterable[tuple[str, str]] | None = None):
    """A copy of `model` without the model-local functions that shadow plugin ops.

    The `plugin` export carries a HiDreamMoE function so ONNX Runtime can run the file; TensorRT's parser
    imports a node through a local function of the same name unless a plugin is registered, and whether it
    prefers the plugin is version-dependent. Removing the function leaves the parser one way: the plugin
    (or a clear "Plugin not found"). Nodes, attributes, opset imports and external-data references are
    untouched, so the copy reads the same weights file. Never reads external data."""
    out = type(model)()
    out.CopyFrom(model)
    drop = set(plugin_functions(model, plugins))
    kept = [f for f in out.functions if (f.domain, f.name) not in drop]
    del out.functions[:]
    out.functions.extend(kept)
    return out


def write_prepared_onnx(src: str | Path, dst: str | Path | None = None,
                        plugins: Iterable[tuple[str, str]] | None = None) -> Path:
    """Write the parser's copy of `src` (plugin functions stripped) next to it, atomically; return its path.
    The copy must stay in the same folder: its initializers point at the same external data file."""
    import tempfile

    import onnx

    src = Path(src)
    dst = Path(dst) if dst is not None else src.with_name(PREPARED_ONNX_NAME)
    if dst.parent.resolve() != src.parent.resolve():
        raise BuildPlanError(f"{dst}: the prepared ONNX must sit next to {src} to find its external data")
    model = strip_plugin_functions(onnx.load(str(src), load_external_data=False), plugins)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", dir=dst.parent)
    os.close(fd)
    try:
        onnx.save(model, tmp)
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dst


# ================================================================================================
# Refit name map
# ================================================================================================
def _load_graph(onnx_path):
    import onnx

    if isinstance(onnx_path, onnx.ModelProto):
        return onnx_path
    return onnx.load(str(onnx_path), load_external_data=False)


def refit_name_map(onnx_path) -> dict[str, str]:
    """ONNX initializer name -> TensorRT engine weight name, explicitly (no hash matching).

    TensorRT's ONNX parser names every weight after its initializer (INetworkDefinition.setWeightsName,
    per the TensorRT refit docs), so the map is the identity over the graph's initializers. It is written
    out anyway, into the engine's manifest entry, so a refit is a lookup that fails loudly on a name the
    engine does not know, and so the stacked MoE weights (generated names such as `stack_2`) stay
    traceable through `refit_sources`. Reads the graph only, never the external data."""
    model = _load_graph(onnx_path)
    return {init.name: init.name for init in model.graph.initializer}


def _moe_scope(node) -> str | None:
    """The model path of a HiDreamMoE node's MoE module (e.g. double_stream_blocks.0.block.ff_i), from the
    name scopes the torch exporter records in the node's metadata."""
    meta = {p.key: p.value for p in node.metadata_props}
    scopes = meta.get("pkg.torch.onnx.name_scopes")
    if not scopes:
        return None
    try:
        names = json.loads(scopes.replace("'", '"'))
    except json.JSONDecodeError:
        return None
    names = [n for n in names if n]
    # [..., 'double_stream_blocks.1.block.ff_i', 'moe_experts_1']: the op call's scope is numbered per call
    if len(names) >= 2 and names[-1].split(".")[-1].rstrip("0123456789").rstrip("_") == "moe_experts":
        return names[-2]
    return None


def refit_sources(onnx_path, initializer_map: Mapping[str, str] | None = None) -> dict[str, dict]:
    """Where each initializer's values come from, for refits from a checkpoint rather than an export.

    {"checkpoint": key} for a checkpoint tensor (initializer_map: the export's initializer -> checkpoint
    key map, identity by default), {"stack": [keys], "transpose": true, "role": "gate|up|down"} for the
    stacked expert weights of a HiDreamMoE node (gate = w1^T, up = w3^T, down = w2^T stacked over
    experts, the TRT_MoE layout of schema.py), {"computed": true} otherwise (e.g. RoPE tables)."""
    model = _load_graph(onnx_path)
    names = {init.name for init in model.graph.initializer}
    sources: dict[str, dict] = {}
    roles = {3: ("gate", "w1"), 4: ("up", "w3"), 5: ("down", "w2")}
    for node in model.graph.node:
        if (node.domain, node.op_type) != (schema.DOMAIN, schema.OP_TYPE):
            continue
        scope = _moe_scope(node)
        num_experts = next((a.i for a in node.attribute if a.name == "num_experts"), None)
        for index, (role, weight) in roles.items():
            if index < len(node.input) and node.input[index] in names and scope and num_experts:
                sources[node.input[index]] = {
                    "stack": [f"{scope}.experts.{e}.{weight}.weight" for e in range(num_experts)],
                    "transpose": True, "role": role}
    mapping = dict(initializer_map or {})
    for name in names:
        if name in sources:
            continue
        key = mapping.get(name, name)
        if (isinstance(key, str) and key.startswith("computed:")) or name.startswith("rope."):
            sources[name] = {"computed": True}
        elif initializer_map is None or name in mapping:
            sources[name] = {"checkpoint": key}
        else:
            sources[name] = {"computed": True}
    return dict(sorted(sources.items()))
