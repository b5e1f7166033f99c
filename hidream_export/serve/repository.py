"""A standard Triton model repository for engine folders: config.pbtxt and a Python-backend model.py per model.

    REPO/
      fast/
        config.pbtxt     backend "python", the wire contract (protocol.py), dynamic batching, instance_group,
                         the model's settings as parameters (engine folder, backend, batching ...)
        1/model.py       imports hidream_export.serve.triton_model.TritonPythonModel
        engine/          the engine folder itself, with --copy (else config.pbtxt names its path)

The official Triton container serves it as it is (`tritonserver --model-repository REPO`) once its
Python has hidream-export installed; `hidream-export serve` writes the same repository into a
workspace and runs it on the `tritonserver` that PyTriton ships. `ModelSettings` is the one record of
what config.pbtxt's parameters say, written here and read back by triton_model.py. Torch-free.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

from hidream_export.errors import ManifestError, RequestError
from hidream_export.files import atomic_write, remove_tree, staged_dir, swap_dir
from hidream_export.manifest import MANIFEST_NAME, Manifest
from hidream_export.serve import protocol
from hidream_export.serve.batching import BATCHING_MODES

__all__ = ["INSTANCE_KINDS", "ModelSettings", "RepositoryModel", "RepositoryOptions", "config_pbtxt",
           "model_names", "write_repository"]

INSTANCE_KINDS = ("gpu", "cpu")
ENGINE_SUBDIR = "engine"  # where --copy puts the engine folder, inside the model's folder
LORA_SUBDIR = "loras"  # where --copy puts the --lora-dir files, inside the model's folder
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # a Triton model name that is also a safe folder name


@dataclass(frozen=True)
class ModelSettings:
    """How one served model loads its engine folder: config.pbtxt's `parameters`, typed."""

    engine_dir: str  # absolute, or relative to the model's folder in the repository
    backend: str = "ort"  # ort | trt
    providers: tuple[str, ...] = ()  # onnxruntime providers; empty: CUDA on a GPU instance, else CPU
    threads: int = 0  # onnxruntime intra-op threads; 0: its default
    verify: bool = True  # SHA-256 of every file at load
    batching: str = "auto"  # BATCHING_MODES
    scheduler_flavour: str = "diffusers"
    io_binding: bool = True  # ort: the sampling loop's tensors stay on the instance's GPU
    lora_dir: str = ""  # LoRA files requests may name (absolute, or relative to the model's folder); "": none

    def __post_init__(self) -> None:
        if self.batching not in BATCHING_MODES:
            raise RequestError(f"--batching {self.batching!r} is not one of {list(BATCHING_MODES)}")
        if isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 0:
            raise RequestError(f"--threads must be an integer >= 0, got {self.threads!r}")

    def to_parameters(self) -> dict[str, str]:
        """As config.pbtxt parameters (Triton's parameters are strings)."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = ",".join(value) if isinstance(value, tuple) else json.dumps(value) if isinstance(
                value, bool) else str(value)
        return out

    @classmethod
    def from_parameters(cls, parameters: Mapping[str, Any], model_dir: str | Path) -> "ModelSettings":
        """From the model config's parameters as Triton hands them over ({key: {"string_value": ...}});
        a relative engine_dir is resolved against the model's folder."""
        raw = {k: (v.get("string_value") if isinstance(v, Mapping) else v) for k, v in parameters.items()}
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(raw) - set(known))
        if unknown:
            raise ManifestError(f"{model_dir}/config.pbtxt: unknown parameters {unknown}; expected {sorted(known)}")
        if "engine_dir" not in raw:
            raise ManifestError(f"{model_dir}/config.pbtxt: no engine_dir parameter")
        values: dict[str, Any] = {}
        for name, text in raw.items():
            if name == "providers":
                values[name] = tuple(p for p in str(text).split(",") if p)
            elif name == "threads":
                values[name] = _int(text, name, model_dir)
            elif name in ("verify", "io_binding"):
                values[name] = str(text).lower() == "true"
            else:
                values[name] = str(text)
        for name in ("engine_dir", "lora_dir"):
            if values.get(name):
                path = Path(values[name])
                values[name] = str(path if path.is_absolute() else Path(model_dir) / path)
        return cls(**values)


def _int(text: Any, name: str, model_dir: Any) -> int:
    try:
        return int(text)
    except (TypeError, ValueError):
        raise ManifestError(f"{model_dir}/config.pbtxt: parameter {name} must be an integer, got {text!r}") from None


@dataclass(frozen=True)
class RepositoryOptions:
    """What `hidream-export triton-repo` (and `serve`) writes."""

    folders: tuple[Path, ...]
    out: Path
    names: tuple[str, ...] = ()  # one per folder; default each folder's variant
    settings: ModelSettings = ModelSettings("")  # engine_dir is filled in per folder
    instances: int = 1  # per GPU (kind gpu), or in all (kind cpu)
    kind: str = "gpu"
    gpus: tuple[int, ...] = ()  # GPU ids; empty: every GPU Triton sees
    max_queue_delay_ms: float = 10.0
    copy: bool = False  # copy the engine folders into the repository instead of naming their paths
    force: bool = False  # replace an existing --out


@dataclass(frozen=True)
class RepositoryModel:
    name: str
    folder: Path  # the engine folder it serves
    max_batch_size: int  # requests per execution: the images one transformer batch holds with the recipe
    folder_bytes: int  # every file the manifest lists: what each instance loads, a floor for its memory


def model_names(folders: Sequence[Path], names: Sequence[str] = ()) -> list[tuple[str, Manifest]]:
    """(model name, manifest) per engine folder: its variant unless named; one line naming the folder or
    --name when a folder has no readable manifest or two models would share a name."""
    if names and len(names) != len(folders):
        raise RequestError(f"--name given {len(names)} time(s) for {len(folders)} folder(s); give one per folder or none")
    out: list[tuple[str, Manifest]] = []
    for k, folder in enumerate(folders):
        manifest = Manifest.read(folder)
        if manifest.transformer is None:
            raise ManifestError(f"{folder / MANIFEST_NAME}: no transformer component; is this an engine folder?")
        name = names[k] if names else manifest.variant.name
        if not _NAME.match(name):
            raise RequestError(f"--name {name!r}: a model name is letters, digits, '_', '.', '-' (not first)")
        if name in [n for n, _ in out]:
            raise RequestError(f"two folders would both serve as model {name!r}; give each a --name")
        out.append((name, manifest))
    return out


def write_repository(options: RepositoryOptions) -> list[RepositoryModel]:
    """Write the repository (staged beside --out and swapped in whole)."""
    if options.kind not in INSTANCE_KINDS:
        raise RequestError(f"--kind {options.kind!r} is not one of {list(INSTANCE_KINDS)}")
    if isinstance(options.instances, bool) or not isinstance(options.instances, int) or options.instances < 1:
        raise RequestError(f"--instances must be an integer >= 1, got {options.instances!r}")
    if not options.max_queue_delay_ms >= 0:
        raise RequestError(f"--max-queue-delay-ms must be >= 0, got {options.max_queue_delay_ms!r}")
    out = Path(options.out)
    if out.exists() and not options.force and (not out.is_dir() or any(out.iterdir())):
        raise RequestError(f"--out {out} exists and is not empty; pass --force to replace it")
    folders = [Path(f).resolve() for f in options.folders]
    named = model_names(folders, options.names)

    stage = staged_dir(out.resolve().parent, out.name)
    models = []
    try:
        for (name, manifest), folder in zip(named, folders):
            model_dir = stage / name
            (model_dir / "1").mkdir(parents=True)
            engine_dir = str(folder)
            if options.copy:
                _copy_engine(folder, manifest, model_dir / ENGINE_SUBDIR)
                engine_dir = ENGINE_SUBDIR
            lora_dir = str(Path(options.settings.lora_dir).resolve()) if options.settings.lora_dir else ""
            if options.copy and lora_dir:  # the LoRA files travel with the model, like its engine folder
                _copy_loras(Path(lora_dir), model_dir / LORA_SUBDIR)
                lora_dir = LORA_SUBDIR
            settings = dataclasses.replace(options.settings, engine_dir=engine_dir, lora_dir=lora_dir)
            rows = manifest.transformer.batch_range[1]
            size = sum(r.bytes for c in manifest.components.values() for r in c.files.values())
            model = RepositoryModel(name, folder, max(1, rows // manifest.variant.cfg_batch_factor), size)
            atomic_write(model_dir / "config.pbtxt", config_pbtxt(model, settings, options))
            atomic_write(model_dir / "1" / "model.py", _model_py(model, manifest))
            models.append(model)
        swap_dir(stage, out)
    except BaseException:
        remove_tree(stage)
        raise
    return models


def _copy_loras(folder: Path, dst: Path) -> None:
    """The folder's .safetensors files (the only ones a request can name)."""
    if not folder.is_dir():
        raise RequestError(f"--lora-dir {folder}: not a folder")
    dst.mkdir(parents=True)
    for path in sorted(folder.glob("*.safetensors")):
        shutil.copyfile(path, dst / path.name)


def _copy_engine(folder: Path, manifest: Manifest, dst: Path) -> None:
    """The files the manifest lists, and the manifest (nothing else the folder may hold)."""
    manifest.verify(folder, manifest.components, check_hashes=False)
    for component in manifest.components.values():
        for rel in component.files:
            target = dst / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(folder / rel, target)
    shutil.copyfile(folder / MANIFEST_NAME, dst / MANIFEST_NAME)


def config_pbtxt(model: RepositoryModel, settings: ModelSettings, options: RepositoryOptions) -> str:
    """The model's config.pbtxt (Triton's text protobuf format)."""
    def tensor(t: protocol.WireTensor) -> str:
        optional = " optional: true" if t.optional else ""
        return f'  {{ name: "{t.name}" data_type: {t.config_type} dims: [ {", ".join(map(str, t.dims))} ]{optional} }}'

    gpus = f" gpus: [ {', '.join(map(str, options.gpus))} ]" if options.kind == "gpu" and options.gpus else ""
    delay = int(round(options.max_queue_delay_ms * 1000))
    params = ",\n".join(f'  {{ key: "{k}" value: {{ string_value: {json.dumps(v)} }} }}'
                        for k, v in settings.to_parameters().items())
    return "\n".join([
        f"# HiDream-I1 {model.name}: written by `hidream-export triton-repo`; see hidream_export/serve/protocol.py",
        f'name: "{model.name}"',
        'backend: "python"',
        f"max_batch_size: {model.max_batch_size}",
        "input [", ",\n".join(tensor(t) for t in protocol.INPUTS), "]",
        "output [", ",\n".join(tensor(t) for t in protocol.OUTPUTS), "]",
        f"dynamic_batching {{ max_queue_delay_microseconds: {delay} }}",
        f"instance_group [ {{ count: {options.instances} kind: KIND_{options.kind.upper()}{gpus} }} ]",
        "parameters [", params, "]", ""])


def _model_py(model: RepositoryModel, manifest: Manifest) -> str:
    return (f'"""Triton Python-backend model {model.name!r}: HiDream-I1 {manifest.variant.name} from an engine folder.\n\n'
            "Written by `hidream-export triton-repo`. The settings are config.pbtxt's parameters; the code is\n"
            "hidream_export.serve.triton_model, so the server's Python needs hidream-export installed.\n"
            '"""\n\n'
            "from hidream_export.serve.triton_model import TritonPythonModel  # noqa: F401\n")
