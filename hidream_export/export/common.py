"""What every exporter shares: file names, the opset, dtypes, versions, the model-error boundary, and
the ONNX writer the text encoders and the VAE use (`export_onnx`). The transformer has its own
block-by-block writer (blockwise.py, streaming.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import shutil
import tempfile
from pathlib import Path

from hidream_export.errors import CheckpointInputError, ExportError

log = logging.getLogger(__name__)

DEFAULT_OPSET = 20
MIN_OPSET, MAX_OPSET = 18, 23  # the dynamo exporter's range with torch 2.13 / onnxscript 0.7
ONNX_NAME = "model.onnx"
DATA_NAME = "model.onnx.data"
EXPORTERS = ("auto", "dynamo", "torchscript")

# Files a transformers/diffusers model folder loads its weights from (top level only: a Meta-Llama download
# also carries original/consolidated.*.pth, which from_pretrained never reads).
_WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "diffusion_pytorch_model*.bin",
                    "*.bin.index.json")




def check_opset(opset: int | None) -> int:
    """--opset, or DEFAULT_OPSET; ExportError outside what the exporter writes."""
    if opset is None:
        return DEFAULT_OPSET
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExportError(f"--opset {opset!r} is not supported; use {MIN_OPSET}..{MAX_OPSET} (default {DEFAULT_OPSET})")
    return opset


def torch_dtype(name: str):
    import torch

    try:
        return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]
    except KeyError:
        raise ExportError(f"--dtype {name!r} is not one of ('fp32', 'fp16', 'bf16')") from None


def own_version() -> str:
    from hidream_export import __version__

    return __version__


def settings_key(**settings) -> str:
    """A short stable hash of export settings: an export with another key is another export."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


@contextlib.contextmanager
def model_errors():
    """Turn the reference model's own errors (a bad checkpoint or config) into the toolchain's
    CheckpointInputError: the model imports nothing of the toolchain, so the boundary is here."""
    from hidream_export.model.checkpoint import CheckpointError
    from hidream_export.model.config import ConfigError

    try:
        yield
    except (CheckpointError, ConfigError) as exc:
        raise CheckpointInputError(str(exc)) from None


def model_source_files(folder: Path, what: str = "model") -> list[Path]:
    """The files `from_pretrained` reads from a model folder: config.json and the weights.

    These (and only these) key the shared store, so a folder's tokenizer files or a stray README do not
    force a re-export. Raises ExportError naming the folder when config or weights are missing."""
    folder = Path(folder)
    config = folder / "config.json"
    if not config.is_file():
        raise ExportError(f"{folder}: no config.json for the {what}")
    weights = sorted({p for pattern in _WEIGHT_PATTERNS for p in folder.glob(pattern) if p.is_file()})
    if not weights:
        raise ExportError(f"{folder}: no weights for the {what} (expected *.safetensors or pytorch_model*.bin)")
    return [config, *weights]


# ---- the ONNX writer of the text encoders and the VAE ------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Axis:
    """A dynamic input dimension: its name in the ONNX graph and manifest, and its [min, max]."""

    name: str
    min: int
    max: int


def export_onnx(module, args: tuple, out_dir: Path, *, input_names: list[str], output_names: list[str],
                dynamic: list[dict[int, Axis]], opset: int = DEFAULT_OPSET, exporter: str = "auto") -> dict:
    """Export `module(*args)` to out_dir/model.onnx + model.onnx.data; return how it was done.

    `dynamic[i]` maps input i's dynamic axes to `Axis`es (the same Axis name on several inputs is one
    dimension). exporter "auto" tries dynamo and falls back to the TorchScript exporter, recording why; the
    returned dict has `exporter`, `opset` and, after a fallback, `exporter_fallback`."""
    import torch

    if exporter not in EXPORTERS:
        raise ExportError(f"--exporter {exporter!r} is not one of {EXPORTERS}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if any(out_dir.iterdir()):  # it is cleared between attempts: never touch files that are not ours
        raise ExportError(f"{out_dir}: not empty; export into a fresh folder")
    onnx_path = out_dir / ONNX_NAME
    info: dict = {"opset": opset}
    errors = []
    for kind in (("dynamo", "torchscript") if exporter == "auto" else (exporter,)):
        clear_dir(out_dir)
        try:
            with torch.no_grad():
                if kind == "dynamo":
                    _export_dynamo(module, args, onnx_path, input_names, output_names, dynamic, opset)
                else:
                    _export_torchscript(module, args, onnx_path, input_names, output_names, dynamic, opset)
        except Exception as exc:  # noqa: BLE001 - a failing exporter is reported, then the next one tried
            line = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            errors.append(f"{kind}: {line}")
            if kind == "dynamo" and exporter == "auto":
                log.warning("dynamo export failed (%s); retrying with the TorchScript exporter", line)
            continue
        info["exporter"] = kind
        if errors:
            info["exporter_fallback"] = errors[0]
        break
    else:
        clear_dir(out_dir)
        raise ExportError(f"ONNX export failed: {'; '.join(errors)}")
    _single_data_file(out_dir)
    check_saved(onnx_path)
    return info


def _export_dynamo(module, args, onnx_path: Path, input_names, output_names, dynamic, opset) -> None:
    import torch
    from torch.export import Dim

    dims: dict[str, object] = {}

    def dim(axis: Axis):
        if axis.name not in dims:
            dims[axis.name] = Dim(axis.name, min=axis.min, max=axis.max)
        return dims[axis.name]

    shapes = tuple({i: dim(a) for i, a in spec.items()} for spec in dynamic)
    program = torch.onnx.export(module, args, dynamo=True, dynamic_shapes=shapes, input_names=input_names,
                                output_names=output_names, opset_version=opset, optimize=True, verbose=False)
    program.save(str(onnx_path), external_data=True)


def _export_torchscript(module, args, onnx_path: Path, input_names, output_names, dynamic, opset) -> None:
    import torch

    axes = {name: {i: a.name for i, a in spec.items()} for name, spec in zip(input_names, dynamic)}
    torch.onnx.export(module, args, str(onnx_path), dynamo=False, input_names=input_names,
                      output_names=output_names, dynamic_axes=axes, opset_version=opset, external_data=True,
                      do_constant_folding=True)


def _single_data_file(out_dir: Path) -> None:
    """Leave exactly model.onnx + model.onnx.data: the TorchScript exporter keeps small models inline and
    large ones as one file per tensor; the contract wants one data file, always."""
    import onnx

    names = sorted(p.name for p in out_dir.iterdir())
    if names == sorted([ONNX_NAME, DATA_NAME]):
        return
    onnx_path = out_dir / ONNX_NAME
    model = onnx.load(str(onnx_path), load_external_data=True)
    scratch = Path(tempfile.mkdtemp(prefix=".resave.", dir=out_dir.parent))
    try:
        onnx.save_model(model, str(scratch / ONNX_NAME), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=DATA_NAME, size_threshold=0)
        del model
        clear_dir(out_dir)
        for p in scratch.iterdir():
            shutil.move(str(p), out_dir / p.name)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if not (out_dir / DATA_NAME).exists():  # a model without weights still gets its (empty) data file
        (out_dir / DATA_NAME).write_bytes(b"")


def check_saved(onnx_path: Path) -> None:
    """Shape inference (value_info for later tools) and the path-based checker (external data aware)."""
    import onnx

    onnx.shape_inference.infer_shapes_path(str(onnx_path), str(onnx_path))
    onnx.checker.check_model(str(onnx_path))


def clear_dir(folder: Path) -> None:
    for p in folder.iterdir():
        shutil.rmtree(p) if p.is_dir() else p.unlink()
