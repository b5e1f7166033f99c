"""Export the HiDream-I1 transformer to ONNX: `export_transformer()` and `hidream-export export`.

Output: DIR/transformer/model.onnx with its weights always in external data (model.onnx.data), so a
34 GB model and a tiny one take the same path, and DIR/manifest.json recording what was done.

- Dynamo exporter with dynamic batch, latent height and width (text length fixed at 128). The model has
  no shape-dependent control flow (see model/transformer.py), so one file serves every square and
  non-square size in the range, with the official padding behaviour.
- MoE lowering `dense`, `gather` or `plugin` (model/moe.py, export/moe_plugin.py). Routing stays in
  standard ops (MatMul -> Softmax -> TopK) and is computed from the inputs: nothing of the sample input's
  routing is baked in (tests prove it).
- Clean-up: the onnxscript optimizer (constant folding, dead-node removal) that torch.onnx runs, then ONNX
  shape inference and `onnx.checker` on the saved file (path-based, so external data is fine).
- Everything is written to a temporary folder next to the destination and renamed into place.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from hidream_export.manifest import (file_hashes, new_manifest, read_manifest, sha256_files,
                                     write_json_atomic)
from hidream_export.variants import (SIZE_MULTIPLE, TEXT_LENGTH, VAE_SCALE, SizeRange, Variant, get_variant,
                                     parse_size, size_range_for)

INPUT_NAMES = ("hidden_states", "timesteps", "encoder_hidden_states_t5", "encoder_hidden_states_llama3", "pooled_embeds")
OUTPUT_NAMES = ("sample",)
EXPORT_LOWERINGS = ("dense", "gather", "plugin")
EXPORT_DTYPES = ("fp32", "fp16", "bf16")
DEFAULT_OPSET = 20
MAX_IMAGES_PER_PROMPT = 4
ONNX_NAME = "model.onnx"
DATA_NAME = "model.onnx.data"


class ExportError(ValueError):
    """An export that cannot proceed; the message names the file, flag or value at fault."""


def torch_dtype(name: str):
    import torch

    try:
        return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]
    except KeyError:
        raise ExportError(f"--dtype {name!r} is not one of {EXPORT_DTYPES}") from None


@dataclasses.dataclass(frozen=True)
class BatchRange:
    min: int
    max: int
    multiple: int  # Full feeds [negative, positive] pairs

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def batch_range(variant: Variant, max_images: int = MAX_IMAGES_PER_PROMPT) -> BatchRange:
    f = variant.cfg_batch_factor
    return BatchRange(f, f * max_images, f)


def resolve_size_range(variant: Variant, config, min_size=None, max_size=None, opt_size=None) -> SizeRange:
    base = size_range_for(variant, config.max_resolution)
    def pick(value, default):
        return parse_size(value) if isinstance(value, str) else (tuple(value) if value else default)
    try:
        return SizeRange(pick(min_size, base.min), pick(max_size, base.max), pick(opt_size, base.opt))
    except ValueError as exc:
        raise ExportError(f"size range: {exc}") from None


def check_variant_matches_checkpoint(checkpoint: Path, variant: Variant) -> None:
    """A model folder ships its scheduler config; refuse to export it as another variant."""
    path = checkpoint / "scheduler" / "scheduler_config.json"
    if not checkpoint.is_dir() or not path.exists():
        return
    cfg = json.loads(path.read_text())
    cls = cfg.get("_class_name")
    shift = cfg.get("flow_shift", cfg.get("shift"))
    if cls != variant.diffusers_scheduler or (shift is not None and float(shift) != variant.shift):
        raise ExportError(
            f"{checkpoint} does not look like HiDream-I1-{variant.name.capitalize()}: its {path.relative_to(checkpoint)} "
            f"has {cls} with shift {shift}, but --variant {variant.name} uses {variant.diffusers_scheduler} "
            f"with shift {variant.shift}")


def transformer_io(config, variant: Variant, size_range: SizeRange, batch: BatchRange, dtype: str) -> dict:
    """Input/output names, dtypes, shapes (symbolic axes named) and ranges, as recorded in the manifest."""
    lat = lambda px: px // VAE_SCALE  # noqa: E731
    axes = {
        "batch": [batch.min, batch.max],
        "latent_height": [lat(size_range.min[1]), lat(size_range.max[1])],
        "latent_width": [lat(size_range.min[0]), lat(size_range.max[0])],
    }
    t_dtype = variant.timestep_dtype
    return {
        "inputs": [
            {"name": "hidden_states", "dtype": dtype, "shape": ["batch", config.in_channels, "latent_height", "latent_width"]},
            {"name": "timesteps", "dtype": t_dtype, "shape": ["batch"]},
            {"name": "encoder_hidden_states_t5", "dtype": dtype, "shape": ["batch", TEXT_LENGTH, config.t5_dim]},
            {"name": "encoder_hidden_states_llama3", "dtype": dtype,
             "shape": [config.num_llama_layers, "batch", TEXT_LENGTH, config.llama_dim]},
            {"name": "pooled_embeds", "dtype": dtype, "shape": ["batch", config.text_emb_dim]},
        ],
        "outputs": [
            {"name": "sample", "dtype": dtype, "shape": ["batch", config.out_channels, "latent_height", "latent_width"]},
        ],
        "axes": axes,
        "batch_multiple": batch.multiple,
        "size_range": size_range.to_dict(),
        "max_seq": config.max_seq,
    }


def sample_inputs(config, variant: Variant, size_range: SizeRange, batch: BatchRange, dtype, seed: int = 0):
    """Trace inputs: batch 2 images' worth (dims of size 0/1 would be specialised), a non-square size near
    the optimum (square is not special in the graph, but tracing a generic case costs nothing)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    b = min(2 * batch.multiple, batch.max)
    w, h = size_range.opt
    if h - SIZE_MULTIPLE >= size_range.min[1]:
        h -= SIZE_MULTIPLE
    elif h + SIZE_MULTIPLE <= size_range.max[1]:
        h += SIZE_MULTIPLE
    t = torch.rand(b, generator=g) * 1000
    return (
        torch.randn(b, config.in_channels, h // VAE_SCALE, w // VAE_SCALE, generator=g).to(dtype),
        t.long() if variant.timestep_dtype == "int64" else t,
        torch.randn(b, TEXT_LENGTH, config.t5_dim, generator=g).to(dtype),
        torch.randn(config.num_llama_layers, b, TEXT_LENGTH, config.llama_dim, generator=g).to(dtype),
        torch.randn(b, config.text_emb_dim, generator=g).to(dtype),
    )


def dynamic_shapes(config, size_range: SizeRange, batch: BatchRange):
    from torch.export import Dim

    cell = SIZE_MULTIPLE // VAE_SCALE  # latent cells per 16 px (= patch size 2)
    # Height/width in units of 16 px, so the latent is always a whole number of patches.
    h = Dim("latent_height_16px", min=size_range.min[1] // SIZE_MULTIPLE, max=size_range.max[1] // SIZE_MULTIPLE)
    w = Dim("latent_width_16px", min=size_range.min[0] // SIZE_MULTIPLE, max=size_range.max[0] // SIZE_MULTIPLE)
    if batch.min == batch.max:
        b = None  # a fixed batch (one image per prompt): nothing to make dynamic
    elif batch.multiple > 1:
        b = batch.multiple * Dim("images", min=batch.min // batch.multiple, max=batch.max // batch.multiple)
    else:
        b = Dim("batch", min=batch.min, max=batch.max)
    def axes(spec: dict) -> dict:
        return {k: v for k, v in spec.items() if v is not None}

    return (axes({0: b, 2: cell * h, 3: cell * w}), axes({0: b}), axes({0: b}), axes({1: b}), axes({0: b}))


def _check_out_dir(out_dir: Path, variant: Variant, checkpoint_hash: str, force: bool) -> dict:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=out_dir, prefix=".write-test-", delete=True)
        probe.close()
    except OSError as exc:
        raise ExportError(f"--out {out_dir}: not writable ({exc.strerror or exc})") from None
    manifest = read_manifest(out_dir, required=False)
    if manifest is None:
        return new_manifest(variant.to_dict())
    have = manifest.get("variant", {}).get("name")
    if have != variant.name and not force:
        raise ExportError(f"--out {out_dir} holds a {have!r} export; refusing to add a {variant.name!r} transformer "
                          f"(use another --out, or --force to replace it)")
    prior = manifest.get("components", {}).get("transformer", {}).get("source", {}).get("checkpoint_sha256")
    if prior and prior != checkpoint_hash and not force:
        raise ExportError(
            f"--out {out_dir} holds an export of another checkpoint (sha256 {prior[:12]}..., this one is "
            f"{checkpoint_hash[:12]}...); use another --out, or --force to replace it")
    if force and have != variant.name:
        manifest = new_manifest(variant.to_dict())
    manifest["variant"] = variant.to_dict()
    return manifest


def _replace_dir(src: Path, dst: Path) -> None:
    """Move a finished folder into place; the old one is removed only once the new one is there."""
    old = dst.with_name(f".{dst.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if dst.exists():
        os.replace(dst, old)
    os.replace(src, dst)
    if old.exists():
        shutil.rmtree(old)


def export_transformer(checkpoint: str | Path, variant: str, out_dir: str | Path | None = None, *,
                       moe: str = "gather", dtype: str = "fp32", opset: int | None = None,
                       min_size=None, max_size=None, opt_size=None, config=None,
                       max_images: int = MAX_IMAGES_PER_PROMPT, force: bool = False, verbose: bool = False) -> dict:
    """Export a checkpoint's transformer for `variant`; return the manifest's transformer entry."""
    import onnx
    import torch

    from hidream_export.model.checkpoint import CheckpointError, load_transformer, locate_checkpoint

    v = get_variant(variant)
    if moe not in EXPORT_LOWERINGS:
        raise ExportError(f"--moe {moe!r} is not one of {EXPORT_LOWERINGS}")
    tdtype = torch_dtype(dtype)
    opset = opset or DEFAULT_OPSET
    checkpoint = Path(checkpoint)
    out_dir = Path(out_dir) if out_dir else Path("engines") / v.name
    try:
        ckpt = locate_checkpoint(checkpoint, config)
    except CheckpointError as exc:
        raise ExportError(f"checkpoint failed to load: {exc}") from None
    check_variant_matches_checkpoint(checkpoint, v)
    cfg = ckpt.config
    size_range = resolve_size_range(v, cfg, min_size, max_size, opt_size)
    batch = batch_range(v, max_images)
    hashed = ckpt.files + ([ckpt.config_file] if ckpt.config_file else [])
    checkpoint_hash = sha256_files(hashed)
    manifest = _check_out_dir(out_dir, v, checkpoint_hash, force)

    torch_lowering, translation = moe, None
    if moe == "plugin":
        from hidream_export.export import moe_plugin

        torch_lowering, translation = moe_plugin.TORCH_LOWERING, moe_plugin.translation_table()
    t0 = time.perf_counter()
    max_positions = max(size_range.max) // SIZE_MULTIPLE
    try:
        model = load_transformer(checkpoint, dtype=tdtype, moe_lowering=torch_lowering, config=config,
                                 rope_dtype="float32",
                                 rope_max_positions=max(max_positions, 2 * max(cfg.max_resolution) // cfg.patch_size))
    except CheckpointError as exc:
        raise ExportError(f"checkpoint failed to load: {exc}") from None
    args = sample_inputs(cfg, v, size_range, batch, tdtype)
    shapes = dynamic_shapes(cfg, size_range, batch)

    tmp = Path(tempfile.mkdtemp(prefix=".transformer.", dir=out_dir))
    try:
        with torch.no_grad():
            program = torch.onnx.export(
                model, args, dynamo=True, dynamic_shapes=shapes, input_names=list(INPUT_NAMES),
                output_names=list(OUTPUT_NAMES), opset_version=opset, optimize=True,
                custom_translation_table=translation, verbose=verbose)
        if moe == "plugin":
            moe_plugin.attach_function(program.model, opset)
        onnx_path = tmp / ONNX_NAME
        program.save(onnx_path, external_data=True)
        data_files = sorted(p.name for p in tmp.iterdir() if p.name != ONNX_NAME)
        if data_files != [DATA_NAME]:
            # torch.onnx names the data file after the model; keep the contract explicit.
            raise ExportError(f"unexpected external data files {data_files} (expected [{DATA_NAME!r}])")
        onnx.shape_inference.infer_shapes_path(str(onnx_path), str(onnx_path))
        onnx.checker.check_model(str(onnx_path))
        export_seconds = time.perf_counter() - t0
        files = file_hashes(tmp, [ONNX_NAME, DATA_NAME])
        _replace_dir(tmp, out_dir / "transformer")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    model_proto = onnx.load(str(out_dir / "transformer" / ONNX_NAME), load_external_data=False)
    entry = {
        "kind": "onnx",
        "path": f"transformer/{ONNX_NAME}",
        "files": {f"transformer/{k}": v_ for k, v_ in files.items()},
        "dtype": dtype,
        "moe_lowering": moe,
        "opset": opset,
        **transformer_io(cfg, v, size_range, batch, dtype),
        "config": cfg.to_dict(),
        "initializers": len(model_proto.graph.initializer),
        "source": {"checkpoint": str(checkpoint.resolve()), "checkpoint_sha256": checkpoint_hash},
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "hidream_export": _own_version()},
        "cleanup": ["onnxscript optimizer (constant folding, dead-node removal)", "onnx shape inference",
                    "onnx.checker (path-based)"],
        "export_seconds": round(export_seconds, 2),
    }
    if moe == "plugin":
        from hidream_export.plugins import schema

        entry["plugin"] = {"op_type": schema.OP_TYPE, "domain": schema.DOMAIN, "namespace": schema.PLUGIN_NAMESPACE,
                           "version": schema.PLUGIN_VERSION}
    manifest["components"]["transformer"] = entry
    write_json_atomic(out_dir / "manifest.json", manifest)
    return entry


def _own_version() -> str:
    from hidream_export import __version__

    return __version__
