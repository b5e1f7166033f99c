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
    dtype = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}[dtype]  # tensor dtypes, numpy names
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
    def side(name: str, lo: int, hi: int):
        # A fixed side (min == max) stays static: torch.export rejects a Dim with min == max.
        return None if lo == hi else cell * Dim(name, min=lo // SIZE_MULTIPLE, max=hi // SIZE_MULTIPLE)

    h = side("latent_height_16px", size_range.min[1], size_range.max[1])
    w = side("latent_width_16px", size_range.min[0], size_range.max[0])
    if batch.min == batch.max:
        b = None  # a fixed batch (one image per prompt): nothing to make dynamic
    elif batch.multiple > 1:
        b = batch.multiple * Dim("images", min=batch.min // batch.multiple, max=batch.max // batch.multiple)
    else:
        b = Dim("batch", min=batch.min, max=batch.max)
    def axes(spec: dict) -> dict:
        return {k: v for k, v in spec.items() if v is not None}

    return (axes({0: b, 2: h, 3: w}), axes({0: b}), axes({0: b}), axes({1: b}), axes({0: b}))


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


def _settings_key(**settings) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def plan_transformer_export(cfg, dtype: str) -> dict:
    """What an export will write, from the config alone (no tracing, no weights): for --dry-run and the
    disk-space check. Exact for the weights; the graph protobuf is estimated."""
    import math

    from hidream_export.model.checkpoint import expected_shapes

    itemsize = {"fp32": 4, "fp16": 2, "bf16": 2}[dtype]
    shapes = expected_shapes(cfg)
    n_rope = 4  # cos/sin tables of the two spatial axes
    weights = sum(math.prod(s) for s in shapes.values()) * itemsize
    # Measured (blockwise graph, no node metadata): 0.6 MB for 12 blocks, 2.9-3.2 MB for the real 48.
    graph_estimate = 512 * 2**10 + cfg.num_blocks * 64 * 2**10
    return {"files": {f"transformer/{ONNX_NAME}": graph_estimate, f"transformer/{DATA_NAME}": weights},
            "initializers": len(shapes) + n_rope, "checkpoint_tensors": len(shapes), "dtype": dtype,
            "bytes": weights + graph_estimate}


def format_plan(plan: dict, out_dir: Path) -> str:
    lines = [f"would write into {out_dir}:"]
    for name, size in plan["files"].items():
        approx = "~" if name.endswith(ONNX_NAME) else ""
        lines.append(f"  {name:<32} {approx}{size / 2**20:,.1f} MiB")
    lines.append(f"  dtype {plan['dtype']}, {plan['initializers']} initializers "
                 f"({plan['checkpoint_tensors']} from the checkpoint, {plan['initializers'] - plan['checkpoint_tensors']} computed)")
    lines.append("  manifest.json (updated)")
    return "\n".join(lines)


def _check_disk(out_dir: Path, needed: int) -> None:
    free = shutil.disk_usage(out_dir).free
    if free < needed * 1.05 + 64 * 2**20:
        raise ExportError(f"--out {out_dir}: not enough disk space: the export writes about {needed / 2**30:.2f} GiB, "
                          f"{free / 2**30:.2f} GiB free")


def export_transformer(checkpoint: str | Path, variant: str, out_dir: str | Path | None = None, *,
                       moe: str = "gather", dtype: str = "fp32", opset: int | None = None,
                       min_size=None, max_size=None, opt_size=None, config=None,
                       max_images: int = MAX_IMAGES_PER_PROMPT, force: bool = False, streaming: bool = True,
                       dry_run: bool = False, quiet: bool = True, verbose: bool = False) -> dict:
    """Export a checkpoint's transformer for `variant`; return the manifest's transformer entry.

    streaming=True (default) traces without weights and streams them from the checkpoint (memory: the
    graph plus one tensor); streaming=False exports a loaded model (the usual recipe; kept for contrast).
    An up-to-date export with the same settings is reused (unless force); an interrupted streaming export
    resumes.
    With dry_run, nothing is written and the plan is returned under "plan".
    """
    import onnx
    import torch

    from hidream_export.model.checkpoint import CheckpointError, check_keys, locate_checkpoint

    v = get_variant(variant)
    if moe not in EXPORT_LOWERINGS:
        raise ExportError(f"--moe {moe!r} is not one of {EXPORT_LOWERINGS}")
    tdtype = torch_dtype(dtype)
    opset = opset or DEFAULT_OPSET
    checkpoint = Path(checkpoint)
    out_dir = Path(out_dir) if out_dir else Path("engines") / v.name
    try:
        ckpt = locate_checkpoint(checkpoint, config)
        check_keys(ckpt)  # both paths: missing/extra/wrong-shaped keys before any tracing or writing
    except CheckpointError as exc:
        raise ExportError(f"checkpoint failed to load: {exc}") from None
    check_variant_matches_checkpoint(checkpoint, v)
    cfg = ckpt.config
    size_range = resolve_size_range(v, cfg, min_size, max_size, opt_size)
    batch = batch_range(v, max_images)
    plan = plan_transformer_export(cfg, dtype)
    if dry_run:
        return {"plan": plan, "text": format_plan(plan, out_dir)}
    hashed = ckpt.files + ([ckpt.config_file] if ckpt.config_file else [])
    checkpoint_hash = sha256_files(hashed)
    manifest = _check_out_dir(out_dir, v, checkpoint_hash, force)
    key = _settings_key(variant=v.name, moe=moe, dtype=dtype, opset=opset, size_range=size_range.to_dict(),
                        batch=batch.to_dict(), streaming=streaming, checkpoint=checkpoint_hash,
                        version=_own_version(), torch=torch.__version__)
    prior = manifest.get("components", {}).get("transformer")
    if prior and not force and prior.get("settings_key") == key and _files_intact(out_dir, prior):
        return {**prior, "reused": True}
    _check_disk(out_dir, plan["bytes"])

    torch_lowering, translation = moe, None
    if moe == "plugin":
        from hidream_export.export import moe_plugin

        torch_lowering, translation = moe_plugin.TORCH_LOWERING, moe_plugin.translation_table()
    max_positions = max(max(size_range.max) // SIZE_MULTIPLE, 2 * max(cfg.max_resolution) // cfg.patch_size)
    t0 = time.perf_counter()
    export_args = dict(cfg=cfg, variant=v, size_range=size_range, batch=batch, tdtype=tdtype, opset=opset,
                       torch_lowering=torch_lowering, translation=translation, max_positions=max_positions)
    if streaming:
        tmp = out_dir / f".transformer.partial-{key}"
        tmp.mkdir(exist_ok=True)
    else:
        tmp = Path(tempfile.mkdtemp(prefix=".transformer.", dir=out_dir))
    try:
        onnx_path = tmp / ONNX_NAME
        if streaming:
            initializer_map = _export_streaming(ckpt, tmp, quiet=quiet, key=key, moe=moe, **export_args)
        else:
            initializer_map = _export_plain(ckpt, tmp, config=config, checkpoint=checkpoint, moe=moe, verbose=verbose,
                                            **export_args)
        data_files = sorted(p.name for p in tmp.iterdir() if p.name not in (ONNX_NAME, "progress.json"))
        if data_files != [DATA_NAME]:
            raise ExportError(f"unexpected files {data_files} next to the exported model (expected [{DATA_NAME!r}])")
        onnx.shape_inference.infer_shapes_path(str(onnx_path), str(onnx_path))
        onnx.checker.check_model(str(onnx_path))
        (tmp / "progress.json").unlink(missing_ok=True)
        export_seconds = time.perf_counter() - t0
        files = file_hashes(tmp, [ONNX_NAME, DATA_NAME])
        _replace_dir(tmp, out_dir / "transformer")
    except KeyboardInterrupt:
        raise  # a streaming export keeps its partial folder to resume; a plain one is cleaned below
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if not streaming and tmp.exists() and tmp.parent == out_dir and tmp.name.startswith(".transformer."):
            shutil.rmtree(tmp, ignore_errors=True)

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
        "initializer_map": initializer_map,
        "streaming": streaming,
        "settings_key": key,
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


def _files_intact(folder: Path, entry: dict) -> bool:
    from hidream_export.manifest import sha256_file

    for rel, info in entry.get("files", {}).items():
        path = folder / rel
        if not path.exists() or path.stat().st_size != info["bytes"] or sha256_file(path) != info["sha256"]:
            return False
    return True


def _export_plain(ckpt, tmp: Path, *, cfg, variant, size_range, batch, tdtype, opset, torch_lowering, translation,
                  max_positions, config, checkpoint, moe, verbose) -> dict:
    """The usual recipe: load the model, export it with its weights, let the exporter fold constants."""
    import torch

    from hidream_export.model.checkpoint import CheckpointError, load_transformer

    try:
        model = load_transformer(checkpoint, dtype=tdtype, moe_lowering=torch_lowering, config=config,
                                 rope_dtype="float32", rope_max_positions=max_positions)
    except CheckpointError as exc:
        raise ExportError(f"checkpoint failed to load: {exc}") from None
    args = sample_inputs(cfg, variant, size_range, batch, tdtype)
    with torch.no_grad():
        program = torch.onnx.export(
            model, args, dynamo=True, dynamic_shapes=dynamic_shapes(cfg, size_range, batch),
            input_names=list(INPUT_NAMES), output_names=list(OUTPUT_NAMES), opset_version=opset, optimize=True,
            custom_translation_table=translation, verbose=verbose)
    if moe == "plugin":
        from hidream_export.export import moe_plugin

        moe_plugin.attach_function(program.model, opset)
    program.save(tmp / ONNX_NAME, external_data=True)
    names = list(program.model.graph.initializers)
    # Folded constants (e.g. transposed weights) get generated names: only same-named ones map back.
    return {n: n for n in names if n in ckpt.entries}


def _export_streaming(ckpt, tmp: Path, *, cfg, variant, size_range, batch, tdtype, opset, torch_lowering,
                      translation, max_positions, quiet, key, moe) -> dict:
    """Trace block by block on fake tensors (export/blockwise.py), write the graph with external references,
    stream the weights (resuming if possible)."""
    import torch

    from hidream_export.export import streaming
    from hidream_export.model.checkpoint import read_tensor_chunks
    from hidream_export.model.embeddings import RopeTables

    onnx_path, data_path, journal = tmp / ONNX_NAME, tmp / DATA_NAME, tmp / streaming.JOURNAL
    state = streaming.read_journal(journal)
    if onnx_path.exists() and state.get("key") == key and state.get("graph_done"):
        slots = streaming.slots_from_saved(onnx_path)
        start = int(state.get("done", 0))
    else:
        for p in tmp.iterdir():
            p.unlink()
        from hidream_export.export import blockwise

        slots = blockwise.export_graph(cfg, onnx_path, DATA_NAME, variant=variant, size_range=size_range, batch=batch,
                                       tdtype=tdtype, opset=opset, torch_lowering=torch_lowering,
                                       translation=translation, max_positions=max_positions,
                                       moe_plugin_opset=opset if moe == "plugin" else None)
        unknown = [s.name for s in slots if s.name not in ckpt.entries and not s.name.startswith("rope.")]
        if unknown:
            raise ExportError(f"traced graph has initializers with no source in the checkpoint: {unknown[:5]}")
        unused = sorted(set(ckpt.entries) - {s.name for s in slots})
        if unused:  # a weight the graph never reads: the export would silently drop part of the model
            raise ExportError(f"{len(unused)} checkpoint tensors have no place in the traced graph: {unused[:5]}")
        start = 0
        streaming._write_journal(journal, {"key": key, "graph_done": True, "done": 0, "total": len(slots)})
    rope = RopeTables(cfg.axes_dims_rope, max_positions, "float32")

    def pieces(entry):
        with open(entry.file, "rb") as fh:
            yield from read_tensor_chunks(fh, entry, tdtype)

    def fetch(name: str):
        if name.startswith("rope."):
            return getattr(rope, name.split(".", 1)[1]).to(torch.float32)
        # In pieces: the largest tensor (150 MiB in the real model) is never held whole, so peak memory
        # does not grow with the model's widths either.
        entry = ckpt.entries[name]
        return streaming.TensorPieces(entry.shape, pieces(entry))

    streaming.stream_weights(data_path, slots, fetch, journal, start=start, quiet=quiet,
                             journal_base={"key": key, "graph_done": True})
    return {s.name: (s.name if s.name in ckpt.entries else f"computed:{s.name}") for s in slots}


def _own_version() -> str:
    from hidream_export import __version__

    return __version__
