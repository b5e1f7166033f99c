"""The engine-folder contract: `manifest.json` as typed records. Torch-free (the runtime reads it).

Every writer (export, build, TensorRT build) and every reader (runtime, build plan, compare, TensorRT
backend, plugin loader) goes through the records below; no module builds or reads a manifest entry as
a hand-made dict. engines/README.md documents the JSON.

    Manifest
      format_version            FORMAT_VERSION; version 1 folders still load (see `_upgrade_v1`)
      variant                   the sampling recipe, checked against hidream_export.variants on load
      components: name -> one of
        OnnxComponent           kind "onnx": a graph, its I/O and axis ranges (text encoders, VAE)
        TransformerComponent    kind "onnx", name "transformer": + MoE lowering, size range, config, fused
                                LoRAs (LoraRecord), ...
        TokenizerComponent      kind "tokenizer"
        SchedulerComponent      kind "scheduler"
        TrtEngineComponent      kind "trt_engine": a TensorRT engine built from an ONNX component

Each record keeps the fields code reads as attributes and every other recorded fact (model widths,
export timings, ...) in `extra`, so a manifest round-trips unchanged.

Paths: every path a manifest names is relative to its folder, stays inside it (no absolute path, no
`..`, no link leading out), names a regular file and is listed with its hash. `Manifest.verify` checks
all of that before anything is opened, and `Manifest.file_path` is the one way to turn an entry's path
into a file to open.
"""

from __future__ import annotations

import dataclasses
import json
import os
import stat
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar, Iterable, Mapping

from hidream_export.errors import ManifestError
from hidream_export.files import atomic_write_json, file_record, verify_file
from hidream_export.quant.scheme import QuantRecord
from hidream_export.variants import SizeRange, Variant, get_variant

FORMAT_VERSION = 2
MANIFEST_NAME = "manifest.json"
SHARED_DIR = ".shared"  # the content-addressed store next to the variant folders (engines/.shared)
ENGINE_KIND = "trt_engine"
TRANSFORMER = "transformer"


# ---- small records ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class FileRecord:
    sha256: str
    bytes: int

    def to_dict(self) -> dict:
        return {"sha256": self.sha256, "bytes": self.bytes}

    @classmethod
    def of(cls, path: str | Path) -> "FileRecord":
        return cls(**file_record(path))


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: name, numpy dtype name, shape (ints, or named symbolic axes)."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TensorSpec":
        return cls(str(d["name"]), str(d["dtype"]), tuple(d["shape"]))


@dataclass(frozen=True)
class PluginRequirement:
    """A TensorRT plugin as the registry keys it (name, namespace, version), with how it is implemented:
    "jit" (a Python plugin registered wherever the engine runs), "aot" (kernel baked into the engine;
    needed to build only) or "library" (a compiled .so), and who needs it (for messages)."""

    name: str
    namespace: str = ""
    version: str = "1"
    implementation: str = "jit"
    needed_by: str = ""

    @property
    def plugin_id(self) -> str:
        return f"{self.namespace}::{self.name}" if self.namespace else self.name

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: "Mapping[str, Any] | PluginRequirement") -> "PluginRequirement":
        if isinstance(d, PluginRequirement):
            return d
        if not d.get("name"):
            raise ManifestError(f"plugin requirement {dict(d)} has no name")
        return cls(name=str(d["name"]), namespace=str(d.get("namespace") or ""), version=str(d.get("version") or "1"),
                   implementation=str(d.get("implementation") or "jit"), needed_by=str(d.get("needed_by") or ""))


@dataclass(frozen=True)
class SharedRef:
    """Where a shared component's files came from: its key in the store, the store's path relative to
    the variant folder, and how the files were placed (reflink, hardlink or copy)."""

    key: str
    store: str
    link: str

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class LoraRecord:
    """A LoRA in the transformer's weights: its file's name, SHA-256, and the scale it was applied with."""

    file: str
    sha256: str
    scale: float

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LoraRecord":
        return cls(str(d["file"]), str(d["sha256"]), float(d["scale"]))


# ---- components ------------------------------------------------------------------------------------

def _pop(d: dict, name: str, default: Any = None) -> Any:
    return d.pop(name) if name in d else default


def _AS_IS(value):
    return value


def _codec(from_json, to_json, default=None, factory=None):
    """A record field stored in JSON through a converter each way (plain JSON values need none)."""
    meta = {"from_json": from_json, "to_json": to_json}
    return field(default_factory=factory, metadata=meta) if factory else field(default=default, metadata=meta)


def _spec_list():
    return _codec(lambda items: [TensorSpec.from_dict(i) for i in items], lambda v: [s.to_dict() for s in v],
                  factory=list)


@dataclass
class Component:
    """Fields every component has. `path` is the file the component is loaded from; `files` lists every
    file of the component with its hash (`path` among them)."""

    KIND: ClassVar[str] = ""
    path: str
    files: dict[str, FileRecord]
    source: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)
    shared: SharedRef | None = None
    extra: dict = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return self.KIND

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"kind": self.kind, "path": self.path,
                               "files": {k: v.to_dict() for k, v in self.files.items()}}
        for name, _, to_json in self._all_typed():
            value = getattr(self, name)
            if value is not None:
                out[name] = to_json(value)
        out.update(self.extra)
        if self.source:
            out["source"] = dict(self.source)
        if self.versions:
            out["versions"] = dict(self.versions)
        if self.shared is not None:
            out["shared"] = self.shared.to_dict()
        return out

    @classmethod
    def _all_typed(cls) -> list[tuple]:
        """(name, from_json, to_json) of every kind-specific field, from the fields' metadata (plain JSON
        values by default)."""
        return [(f.name, f.metadata.get("from_json", _AS_IS), f.metadata.get("to_json", _AS_IS))
                for f in dataclasses.fields(cls) if f.name not in _BASE_FIELDS]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "") -> "Component":
        d = dict(data)
        try:
            d.pop("kind", None)
            kwargs = {
                "path": str(d.pop("path")),
                "files": {str(k): FileRecord(str(v["sha256"]), int(v["bytes"])) for k, v in d.pop("files").items()},
                "source": dict(_pop(d, "source", {}) or {}),
                "versions": dict(_pop(d, "versions", {}) or {}),
            }
            shared = _pop(d, "shared")
            kwargs["shared"] = SharedRef(**shared) if shared else None
            for name, from_json, _ in cls._all_typed():
                if name in d:
                    kwargs[name] = from_json(d.pop(name))
            return cls(**kwargs, extra=d)
        except ManifestError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ManifestError(f"{where or 'manifest'}: malformed {cls.KIND or 'component'} entry "
                                f"({type(exc).__name__}: {exc})") from None




@dataclass
class OnnxComponent(Component):
    KIND: ClassVar[str] = "onnx"
    dtype: str | None = None
    inputs: list[TensorSpec] = _spec_list()
    outputs: list[TensorSpec] = _spec_list()
    axes: dict[str, tuple[int, int]] = _codec(  # symbolic axis -> (min, max)
        lambda d: {str(k): (int(v[0]), int(v[1])) for k, v in d.items()},
        lambda d: {k: list(r) for k, r in d.items()}, factory=dict)
    # Quantized linear weights (hidream_export.quant): scheme, format, policy; None when all are in `dtype`.
    quant: QuantRecord | None = _codec(QuantRecord.from_dict, QuantRecord.to_dict)

    def input(self, name: str) -> TensorSpec | None:
        return next((s for s in self.inputs if s.name == name), None)

    @property
    def fixed_batch(self) -> int | None:
        """The static batch the graph was exported with (an int first dim), or None when it is symbolic."""
        shape = self.inputs[0].shape if self.inputs else ()
        return shape[0] if shape and isinstance(shape[0], int) else None


@dataclass
class TransformerComponent(OnnxComponent):
    moe_lowering: str = ""
    # The runtime the graph is shaped for (hidream_export/export/targets.py): "tensorrt" (standard ops the
    # TensorRT parser reads; also every folder written before the field existed) or "onnxruntime".
    target: str = "tensorrt"
    opset: int | None = None
    batch_multiple: int = 1
    size_range: SizeRange | None = _codec(SizeRange.from_dict, SizeRange.to_dict)
    max_seq: int | None = None
    config: dict = field(default_factory=dict)  # the transformer's diffusers config.json
    initializers: int | None = None
    initializer_map: dict[str, str] = field(default_factory=dict)  # ONNX initializer -> checkpoint key
    streaming: bool | None = None
    settings_key: str | None = None
    # The TensorRT plugin its MoE nodes need (`plugin` lowering); who needs it is said at load time.
    plugin: PluginRequirement | None = _codec(
        PluginRequirement.from_dict, lambda v: {k: x for k, x in v.to_dict().items() if k != "needed_by"})
    # LoRAs fused into the exported weights at build time, in the order they were added.
    loras: list[LoraRecord] = _codec(lambda v: [LoraRecord.from_dict(x) for x in v], lambda v: [x.to_dict() for x in v],
                                     factory=list)

    @property
    def batch_range(self) -> tuple[int, int]:
        lo, hi = self.axes.get("batch", (1, 2**31 - 1))
        return int(lo), int(hi)


@dataclass
class TokenizerComponent(Component):
    KIND: ClassVar[str] = "tokenizer"
    max_length: int = 128
    padding: dict = field(default_factory=dict)  # pad_id, pad_token, direction, length
    truncation: bool = True
    truncation_side: str = "right"
    uses_attention_mask: bool = False


@dataclass
class SchedulerComponent(Component):
    KIND: ClassVar[str] = "scheduler"
    class_name: str | None = None


@dataclass
class TrtEngineComponent(Component):
    KIND: ClassVar[str] = ENGINE_KIND
    engine_for: str = ""
    dtype: str | None = None
    inputs: list[TensorSpec] = _spec_list()
    outputs: list[TensorSpec] = _spec_list()
    tensorrt_version: str | None = None
    compute_capability: str | None = None
    gpu_name: str | None = None
    plan_version: int | None = None
    store_path: str | None = None
    flags: dict = field(default_factory=dict)
    profiles: list[dict] = field(default_factory=list)
    plugins: list[PluginRequirement] = _codec(lambda v: [PluginRequirement.from_dict(p) for p in v],
                                              lambda v: [p.to_dict() for p in v], factory=list)
    content_key: str | None = None
    refit: dict | None = None  # name map and what the refit did, for weight-stripped/refittable engines


_BASE_FIELDS = {f.name for f in dataclasses.fields(Component)}
_KINDS: dict[str, type[Component]] = {c.KIND: c for c in (OnnxComponent, TokenizerComponent, SchedulerComponent,
                                                            TrtEngineComponent)}


def component_from_dict(name: str, data: Mapping[str, Any], where: str = "") -> Component:
    """The typed record for manifest component `name`."""
    if not isinstance(data, Mapping):
        raise ManifestError(f"{where}: component {name!r} is not a JSON object")
    kind = data.get("kind", "onnx")
    if name == TRANSFORMER and kind == "onnx":
        return TransformerComponent.from_dict(data, f"{where}: component {name!r}")
    if kind not in _KINDS:
        raise ManifestError(f"{where}: component {name!r} has unknown kind {kind!r} (known: {sorted(_KINDS)})")
    return _KINDS[kind].from_dict(data, f"{where}: component {name!r}")


# ---- engine names ----------------------------------------------------------------------------------

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
        if major.isdigit() and minor.isdigit():
            return f"{int(major)}{int(minor)}"
    if not text.isdigit():
        raise ManifestError(f"compute capability {cc!r} is not like 9.0, (9, 0) or sm90")
    return str(int(text))


def engine_key(component: str) -> str:
    """Manifest key of a component's TensorRT engine entry (kind "trt_engine")."""
    return f"{component}_trt"


def engine_file_name(component: str, trt_version: str, compute_capability, *, stripped: bool = False) -> str:
    """`transformer.trt11.1.0.sm90.plan` (`transformer.stripped.trt...` for a weight-stripped engine)."""
    sm = normalize_compute_capability(compute_capability)
    return f"{component}{'.stripped' if stripped else ''}.trt{trt_version}.sm{sm}.plan"


# ---- the manifest ----------------------------------------------------------------------------------

def variant_record(variant: Variant) -> dict:
    return {"name": variant.name, "steps": variant.steps, "guidance_scale": variant.guidance_scale,
            "shift": variant.shift, "scheduler": variant.scheduler, "diffusers_scheduler": variant.diffusers_scheduler,
            "timestep_dtype": variant.timestep_dtype, "cfg_batch_factor": variant.cfg_batch_factor}


def _variant_from_dict(data: Any, where: str) -> Variant:
    """The recorded recipe must be the one hidream_export.variants defines for that name: a folder is run
    with the recipe it was exported for, never a silently different one."""
    if not isinstance(data, Mapping) or "name" not in data:
        raise ManifestError(f"{where}: no variant block with a name")
    try:
        variant = get_variant(str(data["name"]))
    except ValueError as exc:
        raise ManifestError(f"{where}: {exc}") from None
    expected = variant_record(variant)
    for key, want in expected.items():
        if key in data and data[key] != want:
            raise ManifestError(f"{where}: variant {variant.name!r} records {key}={data[key]!r}, but this "
                                f"hidream-export's {variant.name} recipe has {key}={want!r}; rebuild the folder with "
                                f"this version")
    return variant


@dataclass
class Manifest:
    variant: Variant
    components: dict[str, Component] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    # -- (de)serialisation ---------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"format_version": FORMAT_VERSION, "variant": variant_record(self.variant),
                "components": {name: comp.to_dict() for name, comp in self.components.items()}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = MANIFEST_NAME) -> "Manifest":
        if not isinstance(data, Mapping):
            raise ManifestError(f"{where}: not a JSON object")
        version = data.get("format_version")
        if not isinstance(version, int) or isinstance(version, bool):
            raise ManifestError(f"{where}: no integer format_version")
        if version > FORMAT_VERSION:
            raise ManifestError(f"{where}: manifest format {version} is newer than this hidream-export understands "
                                f"({FORMAT_VERSION}); upgrade hidream-export")
        if version < 1:
            raise ManifestError(f"{where}: manifest format {version} is not one this hidream-export reads; rebuild "
                                f"the folder")
        if version == 1:
            data = _upgrade_v1(data)
        variant = _variant_from_dict(data.get("variant"), where)
        comps = data.get("components") or {}
        if not isinstance(comps, Mapping):
            raise ManifestError(f"{where}: components is not a JSON object")
        return cls(variant, {str(n): component_from_dict(str(n), c, where) for n, c in comps.items()}, version)

    @classmethod
    def read(cls, folder: str | Path, required: bool = True) -> "Manifest | None":
        folder = Path(folder)
        path = folder / MANIFEST_NAME
        if not path.exists():
            if required:
                raise ManifestError(f"{folder}: no {MANIFEST_NAME}; build the folder with `hidream-export build` "
                                    f"or `export`")
            return None
        if not path.is_file():
            raise ManifestError(f"{path}: not a regular file")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ManifestError(f"{path}: unreadable manifest ({exc})") from None
        return cls.from_dict(data, str(path))

    def write(self, folder: str | Path) -> Path:
        """Atomically (a crash leaves the previous manifest intact), with normal permissions."""
        return atomic_write_json(Path(folder) / MANIFEST_NAME, self.to_dict())

    # -- access ---------------------------------------------------------------------------------------
    def component(self, name: str, kind: type[Component] | None = None, folder: str | Path | None = None) -> Component:
        comp = self.components.get(name)
        where = f"{Path(folder) / MANIFEST_NAME}" if folder else MANIFEST_NAME
        if comp is None:
            raise ManifestError(f"{where}: no component {name!r} (has {sorted(self.components)})")
        if kind is not None and not isinstance(comp, kind):
            raise ManifestError(f"{where}: component {name!r} is kind {comp.kind!r}, expected {kind.KIND!r}")
        return comp

    @property
    def transformer(self) -> TransformerComponent | None:
        comp = self.components.get(TRANSFORMER)
        return comp if isinstance(comp, TransformerComponent) else None

    def engine_for(self, name: str) -> tuple[str, TrtEngineComponent] | None:
        """The TensorRT engine entry built from ONNX component `name`: "<name>_trt", or any engine_for it."""
        key = engine_key(name)
        comp = self.components.get(key)
        if isinstance(comp, TrtEngineComponent):
            return key, comp
        for k, c in self.components.items():
            if isinstance(c, TrtEngineComponent) and c.engine_for == name:
                return k, c
        return None

    # -- files ----------------------------------------------------------------------------------------
    def verify(self, folder: str | Path, names: Iterable[str], *, check_hashes: bool = True) -> None:
        """Check the named components' files: confined to `folder`, regular files, with their recorded
        sizes and (unless check_hashes is False) SHA-256, and the component's `path` among them. Hashing
        runs in parallel (hashlib releases the GIL); the first failure in `names` order is raised."""
        folder = Path(folder)
        names = list(dict.fromkeys(names))
        jobs = []
        for name in names:
            comp = self.component(name, folder=folder)
            if comp.path not in comp.files:
                raise ManifestError(f"{folder / MANIFEST_NAME}: component {name!r} loads {comp.path!r}, which its "
                                    f"files do not list with a hash")
            for rel, rec in comp.files.items():
                jobs.append((name, confined_path(folder, rel, f"component {name!r}"), rec))

        def check(job) -> None:
            name, path, rec = job
            verify_file(path, rec.sha256, rec.bytes, check_hash=check_hashes,
                        what=f"component {name!r} of {folder / MANIFEST_NAME}")

        if not jobs:
            return
        with ThreadPoolExecutor(max_workers=min(8, len(jobs))) as pool:
            list(pool.map(check, jobs))

    def file_path(self, folder: str | Path, name: str, rel: str | None = None) -> Path:
        """The file of component `name` (its `path`, or `rel`, which must be one of its listed files),
        confined to `folder`."""
        comp = self.component(name, folder=folder)
        rel = comp.path if rel is None else rel
        if rel not in comp.files:
            raise ManifestError(f"{Path(folder) / MANIFEST_NAME}: component {name!r} refers to {rel!r}, which its "
                                f"files do not list with a hash")
        return confined_path(folder, rel, f"component {name!r}")


def confined_path(folder: str | Path, rel: str, what: str = "") -> Path:
    """`folder/rel` for a manifest-relative path, refusing absolute paths, `..` and links that lead out
    of `folder` (a manifest never makes the runtime read outside its folder)."""
    folder = Path(folder)
    where = f" ({what})" if what else ""
    if not isinstance(rel, str) or not rel or "\\" in rel or "\0" in rel:
        raise ManifestError(f"{folder / MANIFEST_NAME}: invalid path {rel!r}{where}")
    pure = PurePosixPath(rel)
    if pure.is_absolute() or ".." in pure.parts or rel.startswith("~"):
        raise ManifestError(f"{folder / MANIFEST_NAME}: path {rel!r}{where} leaves the folder; manifest paths are "
                            f"relative and stay inside it")
    path = folder.joinpath(*pure.parts)
    root = os.path.realpath(folder)
    real = os.path.realpath(path)
    if os.path.commonpath([root, real]) != root:
        raise ManifestError(f"{path}: a link that leads out of {folder}{where}; manifest paths stay inside the folder")
    return path


def is_regular_file(path: Path) -> bool:
    try:
        return stat.S_ISREG(path.stat().st_mode)
    except OSError:
        return False


def _upgrade_v1(data: Mapping[str, Any]) -> dict:
    """Format 1 -> 2: the variant block carried the real model's size range (the transformer entry has
    the exported one: dropped), and a transformer's plugin was spelled op_type/domain (now name/namespace,
    as engine entries spell it)."""
    out = json.loads(json.dumps(data))
    (out.get("variant") or {}).pop("size_range", None)
    transformer = (out.get("components") or {}).get(TRANSFORMER) or {}
    plugin = transformer.get("plugin")
    if isinstance(plugin, dict) and "op_type" in plugin:
        transformer["plugin"] = {"name": plugin["op_type"], "namespace": plugin.get("namespace", plugin.get("domain", "")),
                                 "version": str(plugin.get("version", "1")), "implementation": "jit"}
    return out
