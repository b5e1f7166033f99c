"""Export the HiDream-I1 transformer to ONNX: `export_transformer()` and `hidream-export export`.

Output: OUT/transformer/model.onnx with its weights always in external data (model.onnx.data), so a
34 GB model and a tiny one take the same path, and OUT/manifest.json recording what was done.

- One file serves every batch, square and non-square size in the range (the model has no shape-
  dependent control flow, see hidream_export/model/transformer.py); text length is fixed at 128.
- The MoE lowering is one of hidream_export.model.lowerings. Routing stays in standard ops (MatMul ->
  Softmax -> TopK), or inside ONNX Runtime's MoE node for `ort`, and is computed from the inputs: nothing
  of the sample input's routing is baked in. The target (export/targets.py) says which runtime the rest
  of the graph is shaped for.
- Streaming (default): traced on fake tensors block by block (blockwise.py), weights streamed from the
  checkpoint (streaming.py); resumable. Plain (`streaming=False`): the usual load-then-export recipe.
- LoRAs (`--lora FILE[:SCALE]`, hidream_export.lora) are fused into the weights as they are written: each
  adapted weight gets its delta added in float32 before the one cast to the export dtype, piece by piece
  on the streaming path. The manifest records them, and another set of LoRAs is another export.
- Clean-up: the onnxscript optimizer, ONNX shape inference (into a new file, renamed) and the
  path-based `onnx.checker`.
- Safety: `--out` is locked for the run, must not be or hold the checkpoint, and must be empty or an
  engine folder; the finished folder is renamed into place, and the manifest written last.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from hidream_export.errors import ExportError
from hidream_export.export.common import (DATA_NAME, ONNX_NAME, check_opset, model_errors, own_version,
                                          settings_key)
from hidream_export.export.spec import ExportSpec, dynamic_shapes, sample_inputs
from hidream_export.export.targets import resolve_target
from hidream_export.files import (LOCK_NAME, folder_lock, remove_tree, replace_file, sha256_files, staged_dir,
                                  swap_dir)
from hidream_export.lora import EXPORT_NUMPY_DTYPES, LoraSet, load_loras
from hidream_export.manifest import (MANIFEST_NAME, FileRecord, Manifest, PluginRequirement, TensorSpec,
                                     TransformerComponent)
from hidream_export.model.lowerings import EXPORT_LOWERINGS
from hidream_export.quant.scheme import QuantScheme
from hidream_export.signature import (EXPORT_DTYPES, INPUT_NAMES, MAX_IMAGES_PER_PROMPT, OUTPUT_NAMES, batch_range,
                                      resolve_size_range)
from hidream_export.variants import Variant, get_variant

PARTIAL_PREFIX = ".transformer.partial-"


@dataclass
class ExportResult:
    """What `export_transformer` did: "exported", "reused" (same checkpoint and settings, files intact)
    or "planned" (dry run: `plan` says what a real run would do)."""

    out_dir: Path
    action: str
    component: TransformerComponent | None = None
    plan: "ExportPlan | None" = None

    @property
    def reused(self) -> bool:
        return self.action == "reused"


@dataclass
class ExportPlan:
    """What an export will write, from the config alone (no tracing, no weights). Exact for the weights
    and the initializer count; the graph protobuf is estimated."""

    out_dir: Path
    action: str  # "export", "replace" (other settings, --force) or "reuse"
    files: dict[str, int]
    initializers: int
    checkpoint_tensors: int
    dtype: str

    @property
    def bytes(self) -> int:
        return sum(self.files.values())

    def format(self) -> str:
        verb = {"reuse": "would reuse (up to date)", "replace": "would replace", "export": "would write"}[self.action]
        lines = [f"{verb} in {self.out_dir}:"]
        for name, size in self.files.items():
            approx = "~" if name.endswith(ONNX_NAME) else ""
            lines.append(f"  {name:<32} {approx}{size / 2**20:,.1f} MiB")
        lines.append(f"  dtype {self.dtype}, {self.initializers} weights ({self.checkpoint_tensors} from the "
                     f"checkpoint, {self.initializers - self.checkpoint_tensors} computed), plus the graph's small "
                     f"constants")
        lines.append(f"  {MANIFEST_NAME} ({'unchanged' if self.action == 'reuse' else 'updated'})")
        return "\n".join(lines)


# ---- checks before anything is written ----------------------------------------------------------------

def check_variant_matches_checkpoint(checkpoint: Path, variant: Variant) -> None:
    """A model folder ships its scheduler config; refuse to export it as another variant."""
    import json

    path = checkpoint / "scheduler" / "scheduler_config.json"
    if not checkpoint.is_dir() or not path.is_file():
        return
    try:
        cfg = json.loads(path.read_text())
        cls = cfg.get("_class_name")
        shift = cfg.get("flow_shift", cfg.get("shift"))
        shift = None if shift is None else float(shift)
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        raise ExportError(f"{path}: unreadable scheduler config ({exc})") from None
    if cls != variant.diffusers_scheduler or (shift is not None and shift != variant.shift):
        raise ExportError(
            f"{checkpoint} does not look like HiDream-I1-{variant.name.capitalize()}: its {path.relative_to(checkpoint)} "
            f"has {cls} with shift {shift}, but --variant {variant.name} uses {variant.diffusers_scheduler} "
            f"with shift {variant.shift}")


def check_out_dir(out_dir: Path, sources: list[Path], create: bool = True) -> None:
    """--out must not be a checkpoint folder, lie inside one, or contain one (an export would replace the
    user's files), and must be empty, new, or an engine folder (one with our manifest): `--force` does not
    override either rule, since it only ever replaces what hidream-export wrote."""
    out = Path(os.path.realpath(out_dir))
    for src in sources:
        src = Path(os.path.realpath(src))
        if out == src or src in out.parents or out in src.parents:
            raise ExportError(f"--out {out_dir} overlaps the input {src}; write engine folders somewhere else "
                              f"(default engines/VARIANT)")
    if out_dir.is_symlink() or (out_dir.exists() and not out_dir.is_dir()):
        raise ExportError(f"--out {out_dir} is not a folder")
    if out_dir.is_dir() and not (out_dir / MANIFEST_NAME).exists():
        # What a run killed before its first manifest leaves: the lock, partial exports, and a finished
        # transformer/ (swapped in, manifest not yet written) holding only the two files an export writes.
        finished = out_dir / "transformer"
        ours = {LOCK_NAME} | ({"transformer"} if finished.is_dir() and not finished.is_symlink() and
                              {p.name for p in finished.iterdir()} <= {ONNX_NAME, DATA_NAME} else set())
        others = sorted(p.name for p in out_dir.iterdir() if p.name not in ours and not p.name.startswith(PARTIAL_PREFIX))
        if others:
            raise ExportError(f"--out {out_dir} is not empty and holds no {MANIFEST_NAME} (it has {', '.join(others[:3])}"
                              f"{', ...' if len(others) > 3 else ''}); give an empty or new folder, or an engine "
                              f"folder to update")
    if not create:
        return
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise ExportError(f"--out {out_dir}: not writable ({exc.strerror or exc})") from None


def _manifest_for(out_dir: Path, variant: Variant, checkpoint_hash: str, settings: dict, force: bool
                  ) -> tuple[Manifest, TransformerComponent | None]:
    """The folder's manifest to update (a new one if it has none), and its transformer entry if that came
    from this checkpoint. Another variant, checkpoint or settings are refused unless `force`."""
    manifest = Manifest.read(out_dir, required=False)
    if manifest is None:
        return Manifest(variant), None
    if manifest.variant.name != variant.name:
        if not force:
            raise ExportError(f"--out {out_dir} holds a {manifest.variant.name!r} export; refusing to add a "
                              f"{variant.name!r} transformer (use another --out, or --force to replace it)")
        return Manifest(variant), None
    prior = manifest.transformer
    if prior is None:
        return manifest, None
    prior_hash = prior.source.get("checkpoint_sha256")
    if prior_hash and prior_hash != checkpoint_hash and not force:
        raise ExportError(
            f"--out {out_dir} holds an export of another checkpoint (sha256 {prior_hash[:12]}..., this one is "
            f"{checkpoint_hash[:12]}...); use another --out, or --force to replace it")
    recorded = prior.extra.get("settings")
    if isinstance(recorded, dict) and recorded != settings and not force:
        changed = ", ".join(f"{k} {recorded.get(k)!r} -> {settings.get(k)!r}" for k in sorted(settings)
                            if recorded.get(k) != settings.get(k))
        raise ExportError(f"--out {out_dir} holds a transformer exported with other settings ({changed}); use "
                          f"another --out, or --force to replace it")
    return manifest, prior


def _intact(out_dir: Path, manifest: Manifest) -> bool:
    try:
        manifest.verify(out_dir, ["transformer"], check_hashes=True)
    except ExportError:
        return False
    except Exception:  # noqa: BLE001 - ManifestError: any doubt means export again
        return False
    return True


def plan_transformer_export(config, dtype: str, moe: str, out_dir: Path, action: str = "export",
                            quant: QuantScheme | None = None) -> ExportPlan:
    """The files, sizes and initializer count an export writes (see ExportPlan)."""
    from hidream_export.model.checkpoint import expected_shapes
    from hidream_export.quant.export import weight_bytes

    shapes = expected_shapes(config)
    computed = 4  # cos/sin tables of the two spatial axes
    weights = weight_bytes(shapes, dtype, quant)
    if moe == "ort":  # each MoE layer's 3E expert tensors become two stacks (fc1, fc2): same bytes
        stacked = [k for k in shapes if ".experts." in k]
        shapes = {k: v for k, v in shapes.items() if k not in stacked}
        computed += 2 * len(stacked) // (3 * config.num_routed_experts)
    # Measured (blockwise graph, no node metadata): 0.3 MB for the tiny preset, 0.6 MB for 12 blocks,
    # 2.9-3.2 MB for the real 48.
    graph_estimate = 256 * 2**10 + config.num_blocks * 48 * 2**10
    return ExportPlan(out_dir, action, {f"transformer/{ONNX_NAME}": graph_estimate, f"transformer/{DATA_NAME}": weights},
                      len(shapes) + computed, len(shapes), dtype)


def checkpoint_loras(ckpt, loras: "Sequence | LoraSet") -> LoraSet:
    """`loras` read (unless already a LoraSet) and each checked against the checkpoint's weights, from
    its headers; CheckpointInputError naming the file and keys on the first that does not fit."""
    lora_set = loras if isinstance(loras, LoraSet) else load_loras(loras)
    lora_set.check({k: e.shape for k, e in ckpt.entries.items()}, f"the checkpoint {ckpt.root}")
    return lora_set


def _check_disk(out_dir: Path, needed: int) -> None:
    free = shutil.disk_usage(out_dir).free
    if free < needed * 1.05 + 64 * 2**20:
        raise ExportError(f"--out {out_dir}: not enough disk space: the export writes about {needed / 2**30:.2f} GiB, "
                          f"{free / 2**30:.2f} GiB free")


def _partial_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


# ---- the export ------------------------------------------------------------------------------------------

def export_transformer(checkpoint: str | Path, variant: "str | Variant", out_dir: str | Path | None = None, *,
                       moe: str = "gather", target: str | None = None, dtype: str = "fp32",
                       opset: int | None = None, min_size=None, max_size=None, opt_size=None, config=None,
                       max_images: int = MAX_IMAGES_PER_PROMPT, force: bool = False, streaming: bool = True,
                       loras: Sequence = (), dry_run: bool = False, quiet: bool = True, verbose: bool = False,
                       quant: str | None = None, quant_block: int | None = None,
                       calibration: str | Path | None = None, ort_accuracy_level: int | None = None) -> ExportResult:
    """Export a checkpoint's transformer for `variant` into OUT/transformer and OUT/manifest.json.

    target: "tensorrt" or "onnxruntime" (hidream_export.export.targets; default: onnxruntime for --moe ort,
    else tensorrt). streaming=True (default) traces without weights and streams them from the checkpoint
    (memory: the graph plus one 8 MiB piece); streaming=False exports a loaded model (the usual recipe; kept for
    contrast). An up-to-date export with the same settings is reused (unless force); an interrupted
    streaming export resumes. With dry_run, nothing is written and `result.plan` says what would be.

    loras: LoRAs fused into the weights (`--lora FILE[:SCALE]`: paths, (path, scale) pairs or
    hidream_export.lora.LoraRequest), each checked against the checkpoint before anything is written;
    another set of LoRAs (by content and scale) is another export. With quant, the fused weights are what
    is quantized.
    quant ("int8", "int4", "fp8"), quant_block, calibration (fp8's amax.json) and ort_accuracy_level (the
    MatMulNBits compute ONNX Runtime uses): see hidream_export.quant.
    """
    from hidream_export.model.checkpoint import check_keys, expected_shapes, locate_checkpoint
    from hidream_export.quant import export as quant_export

    v = get_variant(variant)
    if moe not in EXPORT_LOWERINGS:
        raise ExportError(f"--moe {moe!r} is not one of {EXPORT_LOWERINGS}")
    if dtype not in EXPORT_DTYPES:
        raise ExportError(f"--dtype {dtype!r} is not one of {EXPORT_DTYPES}")
    target, opset = resolve_target(target, moe, None if opset is None else check_opset(opset))
    checkpoint = Path(checkpoint)
    out_dir = Path(out_dir) if out_dir else v.default_out_dir
    with model_errors():
        ckpt = locate_checkpoint(checkpoint, config)
        check_keys(ckpt)  # both paths: missing/extra/wrong-shaped keys before any tracing or writing
    check_variant_matches_checkpoint(checkpoint, v)
    lora_set = checkpoint_loras(ckpt, loras)
    cfg = ckpt.config
    q, opset = quant_export.resolve(quant, quant_block, calibration, shapes=expected_shapes(cfg), moe=moe,
                                    opset=opset, streaming=streaming, ort_accuracy_level=ort_accuracy_level)
    opset = check_opset(opset)
    spec = ExportSpec(cfg, v, resolve_size_range(v, cfg, min_size, max_size, opt_size),
                      batch_range(v, max_images), dtype, opset, moe, target, q.scheme if q else None)
    settings = {**spec.to_key(), "streaming": streaming}
    if lora_set:  # only then, so exports without LoRAs keep their settings key
        settings["loras"] = lora_set.identity()
    sources = ckpt.files + ([ckpt.config_file] if ckpt.config_file else [])
    checkpoint_hash = None
    if q and q.calibration:  # before anything is written: ranges measured on another checkpoint are refused
        checkpoint_hash = sha256_files(sources)
        q.calibration.check_checkpoint(checkpoint_hash)
    check_out_dir(out_dir, [checkpoint if checkpoint.is_dir() else checkpoint.parent], create=not dry_run)
    if dry_run:
        action = "export"
        if Manifest.read(out_dir, required=False) is not None:
            checkpoint_hash = checkpoint_hash or sha256_files(sources)
            key = settings_key(**settings, checkpoint=checkpoint_hash, version=own_version(), torch=_torch_version())
            manifest, prior = _manifest_for(out_dir, v, checkpoint_hash, settings, force)
            if prior is not None:
                action = "reuse" if not force and prior.settings_key == key and _intact(out_dir, manifest) else "replace"
        return ExportResult(out_dir, "planned", plan=plan_transformer_export(cfg, dtype, moe, out_dir, action,
                                                                              spec.quant))
    with folder_lock(out_dir):
        checkpoint_hash = checkpoint_hash or sha256_files(sources)
        key = settings_key(**settings, checkpoint=checkpoint_hash, version=own_version(), torch=_torch_version())
        manifest, prior = _manifest_for(out_dir, v, checkpoint_hash, settings, force)
        if prior is not None and not force and prior.settings_key == key and _intact(out_dir, manifest):
            return ExportResult(out_dir, "reused", prior)
        _remove_stale_partials(out_dir, keep=None if force else key)
        partial = out_dir / f"{PARTIAL_PREFIX}{key}"
        plan = plan_transformer_export(cfg, dtype, moe, out_dir, quant=spec.quant)
        _check_disk(out_dir, plan.bytes - _partial_bytes(partial))

        t0 = time.perf_counter()
        if streaming:
            partial.mkdir(exist_ok=True)
            os.chmod(partial, 0o777 & ~_umask())
            tmp = partial
        else:
            tmp = staged_dir(out_dir, "transformer")
        try:
            if streaming:
                initializer_map = _export_streaming(ckpt, tmp, spec, key, quiet, lora_set, q)
            else:
                initializer_map = _export_plain(checkpoint, ckpt, config, tmp, spec, verbose, lora_set)
            initializers = _finish_graph(tmp)
            seconds = time.perf_counter() - t0
            files = {f"transformer/{name}": FileRecord.of(tmp / name) for name in (ONNX_NAME, DATA_NAME)}
            swap_dir(tmp, out_dir / "transformer")
        except KeyboardInterrupt:
            if not streaming:  # a streaming export keeps its partial folder to resume
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        component = _component(spec, files, initializers, initializer_map, streaming, key, settings, checkpoint,
                               checkpoint_hash, seconds, q)
        component.loras = lora_set.records()
        manifest.variant = v
        manifest.components["transformer"] = component
        manifest.write(out_dir)
        return ExportResult(out_dir, "exported", component)


def _umask() -> int:
    from hidream_export.files import umask

    return umask()


def _torch_version() -> str:
    import torch

    return torch.__version__


def _remove_stale_partials(out_dir: Path, keep: str | None) -> None:
    """Partial exports with other settings can never be resumed: remove them (all of them with --force)."""
    for p in out_dir.glob(f"{PARTIAL_PREFIX}*"):
        if keep is None or p.name != f"{PARTIAL_PREFIX}{keep}":
            remove_tree(p)


def _finish_graph(tmp: Path) -> int:
    """Shape inference into a new file renamed over model.onnx (a kill leaves the old graph or the new one,
    never an empty file), then the path-based checker. Returns the initializer count."""
    import onnx

    onnx_path = tmp / ONNX_NAME
    inferred = tmp / f".{ONNX_NAME}.inferred"
    inferred.unlink(missing_ok=True)  # left by a run killed during shape inference
    extra = sorted(p.name for p in tmp.iterdir() if p.name not in (ONNX_NAME, DATA_NAME, "progress.json"))
    if extra:
        raise ExportError(f"unexpected files {extra} next to the exported model (expected [{DATA_NAME!r}])")
    onnx.shape_inference.infer_shapes_path(str(onnx_path), str(inferred))
    replace_file(inferred, onnx_path)
    onnx.checker.check_model(str(onnx_path))
    (tmp / "progress.json").unlink(missing_ok=True)
    return len(onnx.load(str(onnx_path), load_external_data=False).graph.initializer)


def _component(spec: ExportSpec, files, initializers: int, initializer_map: dict, streaming: bool, key: str,
               settings: dict, checkpoint: Path, checkpoint_hash: str, seconds: float, q=None) -> TransformerComponent:
    import onnx
    import onnxruntime
    import torch

    from hidream_export.quant.export import record

    sig = spec.signature
    plugin = None
    if spec.moe == "plugin":
        from hidream_export.moe import schema

        plugin = PluginRequirement(schema.OP_TYPE, schema.PLUGIN_NAMESPACE, schema.PLUGIN_VERSION)
    return TransformerComponent(
        path=f"transformer/{ONNX_NAME}", files=files,
        source={"checkpoint": str(checkpoint.resolve()), "checkpoint_sha256": checkpoint_hash},
        versions={"torch": torch.__version__, "onnx": onnx.__version__, "hidream_export": own_version()},
        dtype=spec.dtype,
        inputs=[TensorSpec(t.name, t.dtype, t.shape) for t in sig.inputs],
        outputs=[TensorSpec(t.name, t.dtype, t.shape) for t in sig.outputs],
        axes=dict(sig.axes), moe_lowering=spec.moe, target=spec.target, opset=spec.opset,
        batch_multiple=sig.batch_multiple,
        size_range=sig.size_range, max_seq=sig.max_seq, config=spec.config.to_dict(), initializers=initializers,
        initializer_map=initializer_map, streaming=streaming, settings_key=key, plugin=plugin,
        quant=record(q, initializer_map, onnxruntime.__version__) if q else None,
        extra={"settings": settings,
               "cleanup": ["onnxscript optimizer (constant folding, dead-node removal)", "onnx shape inference",
                           "onnx.checker (path-based)"],
               "export_seconds": round(seconds, 2)})


def _export_plain(checkpoint: Path, ckpt, config, tmp: Path, spec: ExportSpec, verbose: bool, lora_set: LoraSet
                  ) -> dict:
    """The usual recipe: load the model, export it with its weights, let the exporter fold constants."""
    import torch

    from hidream_export.model.checkpoint import iter_tensors, load_transformer

    translation = spec.translation_table()
    with model_errors():
        model = load_transformer(checkpoint, dtype=spec.torch_dtype, moe_lowering=spec.moe, config=config,
                                 rope_dtype="float32", rope_max_positions=spec.max_positions)
    # LoRA targets are read again in float32 and fused before the one cast, as the streaming path does.
    with torch.no_grad():
        for name, base in iter_tensors(ckpt, torch.float32, keys=lora_set.keys):
            model.get_parameter(name).copy_(torch.from_numpy(lora_set.fused(name, base.numpy())))
    with torch.no_grad():
        program = torch.onnx.export(
            model, sample_inputs(spec), dynamo=True, dynamic_shapes=dynamic_shapes(spec),
            input_names=list(INPUT_NAMES), output_names=list(OUTPUT_NAMES), opset_version=spec.opset,
            optimize=True, custom_translation_table=translation, verbose=verbose)
    if spec.moe == "plugin":
        from hidream_export.moe import onnx_node

        onnx_node.attach_function(program.model, spec.opset)
    program.save(tmp / ONNX_NAME, external_data=True)
    names = list(program.model.graph.initializers)
    keys = set(model.state_dict())
    # Folded constants (e.g. transposed weights) get generated names: only same-named ones map back.
    return {n: n for n in names if n in keys}


def _export_streaming(ckpt, tmp: Path, spec: ExportSpec, key: str, quiet: bool, lora_set: LoraSet, q=None) -> dict:
    """Trace block by block on fake tensors (blockwise.py), write the graph with external references,
    stream the weights; resume a previous run with the same key when its files check out."""
    import torch

    from hidream_export.export import blockwise, streaming
    from hidream_export.model.checkpoint import read_tensor_chunks
    from hidream_export.model.embeddings import RopeTables
    from hidream_export.quant.export import initializer_source, source_key

    fused_weight = _fused_weights(spec)
    onnx_path, data_path, journal = tmp / ONNX_NAME, tmp / DATA_NAME, tmp / streaming.JOURNAL
    slots, start = streaming.resume_point(onnx_path, data_path, journal, key)
    if slots is None:
        for p in tmp.iterdir():
            remove_tree(p)
        slots = blockwise.export_graph(spec, onnx_path, DATA_NAME)
        fused = {s.name: fused_weight(s.name) for s in slots if fused_weight(s.name) is not None}
        unknown = [s.name for s in slots if source_key(s.name) not in ckpt.entries and s.name not in fused
                   and not s.name.startswith("rope.")]
        if unknown:
            raise ExportError(f"traced graph has initializers with no source in the checkpoint: {unknown[:5]}")
        sources = {k for f in fused.values() for keys in f.sources for k in keys}
        unused = sorted(set(ckpt.entries) - {source_key(s.name) for s in slots} - sources)
        if unused:  # a weight the graph never reads: the export would silently drop part of the model
            raise ExportError(f"{len(unused)} checkpoint tensors have no place in the traced graph: {unused[:5]}")
        start = 0
        streaming.write_journal(journal, {"key": key, "graph_done": True, "done": 0, "total": len(slots)})
    rope = RopeTables(spec.config.axes_dims_rope, spec.max_positions, "float32")
    tdtype = spec.torch_dtype

    def pieces(entry, dtype=tdtype, chunk_bytes: int | None = None):
        with open(entry.file, "rb") as fh:
            yield from read_tensor_chunks(fh, entry, dtype, *([chunk_bytes] if chunk_bytes else []))

    def float32_values(entry, chunk_bytes: int | None = None):
        for piece in pieces(entry, torch.float32, chunk_bytes):
            yield np.frombuffer(piece, dtype=np.float32)

    lora_keys = set(lora_set.keys)
    out_dtype = EXPORT_NUMPY_DTYPES[spec.dtype]

    def float32_weight(name: str):
        # Quantized from float32 whatever the export dtype (a bf16 checkpoint's values exactly), LoRAs fused first.
        entry = ckpt.entries[name]
        if name in lora_keys:
            return entry.shape, lora_set.fuse_pieces(name, entry.shape, float32_values(entry), np.float32)
        return entry.shape, pieces(entry, torch.float32)

    quantized = None
    if q is not None:
        from hidream_export.quant.weights import QuantFetch

        quantized = QuantFetch(q.scheme, spec.dtype, float32_weight, lambda module: f"{module}.weight", q.calibration)

    def weight_pieces(key: str, rows: int | None = None):
        """Checkpoint weight `key` in the export dtype, its LoRA delta added (in float32, one cast) if a LoRA
        changes it; with `rows`, in blocks of that many whole rows (else ~8 MiB pieces)."""
        entry = ckpt.entries[key]
        if key not in lora_keys:
            return pieces(entry, tdtype, rows and rows * _row_bytes(entry, tdtype))
        values = float32_values(entry, rows and rows * _row_bytes(entry, torch.float32))
        return lora_set.fuse_pieces(key, entry.shape, values, out_dtype)

    def fused_pieces(sources):
        for keys in sources:  # one expert after the other
            if len(keys) == 1:
                yield from weight_pieces(keys[0])
                continue
            a, b = (ckpt.entries[k] for k in keys)
            if a.shape != b.shape or len(a.shape) != 2:
                raise ExportError(f"{a.key} {a.shape} and {b.key} {b.shape}: expected two matrices of one shape to "
                                  f"interleave")
            rows = _interleave_rows(a, b)
            yield from _interleaved(weight_pieces(keys[0], rows), weight_pieces(keys[1], rows), rows, a.shape[1],
                                    tdtype)

    def fetch(name: str):
        if quantized is not None and (found := quantized(name)) is not None:
            return streaming.TensorPieces(found[0], [found[1]])
        if name.startswith("rope."):
            return getattr(rope, name.split(".", 1)[1]).to(torch.float32)
        fused = fused_weight(name)
        if fused is not None:  # (E, parts * rows, cols) from each expert's (rows, cols) tensors
            rows, cols = ckpt.entries[fused.sources[0][0]].shape
            shape = (len(fused.sources), len(fused.sources[0]) * rows, cols)
            return streaming.TensorPieces(shape, fused_pieces(fused.sources))
        # In pieces: the largest tensor (150 MiB in the real model) is never held whole, so peak memory
        # does not grow with the model's widths either.
        return streaming.TensorPieces(ckpt.entries[name].shape, weight_pieces(name))

    streaming.stream_weights(data_path, slots, fetch, journal, start=start, quiet=quiet,
                             journal_base={"key": key, "graph_done": True})
    return {s.name: (s.name if s.name in ckpt.entries else
                     initializer_source(s.name, spec.quant) or f"computed:{s.name}") for s in slots}


def _fused_weights(spec: ExportSpec):
    """name -> FusedWeight (or None) for the lowering's weights that no checkpoint tensor holds as they are:
    the `ort` lowering's fc1/fc2 stacks."""
    if spec.moe != "ort":
        return lambda name: None
    from hidream_export.moe import ort_layout

    return lambda name: ort_layout.fused_weight(name, spec.config.num_routed_experts)


def _row_bytes(entry, dtype) -> int:
    """Bytes per row as `read_tensor_chunks` counts them reading `entry` as `dtype`: a chunk of k times
    this is exactly k whole rows."""
    from hidream_export.model.checkpoint import DTYPES

    return entry.shape[-1] * max(DTYPES[entry.dtype].itemsize, dtype.itemsize)


def _interleave_rows(a, b, chunk_bytes: int = 4 * 2**20) -> int:
    """Rows of each of two tensors interleaved at a time: blocks of about `chunk_bytes` however they are read
    (float32 for a weight a LoRA changes), so memory is two blocks and their interleaving, never a whole
    tensor."""
    import torch

    return max(1, chunk_bytes // max(_row_bytes(a, torch.float32), _row_bytes(b, torch.float32)))


def _interleaved(pieces_a, pieces_b, rows: int, cols: int, dtype):
    """The bytes of `swiglu_fused_rows(A, B)` from two tensors' bytes in `dtype`, given as blocks of the same
    whole rows, into one reused buffer. Each piece is a view of that buffer: consume it before asking for
    the next one."""
    import torch

    from hidream_export.export.streaming import tensor_bytes
    from hidream_export.model.moe import swiglu_fused_rows

    fused = torch.empty(rows, 2, cols, dtype=dtype)
    for pa, pb in zip(pieces_a, pieces_b, strict=True):
        rows_a = torch.frombuffer(pa, dtype=dtype).view(-1, cols)
        rows_b = torch.frombuffer(pb, dtype=dtype).view(-1, cols)
        yield tensor_bytes(swiglu_fused_rows(rows_a, rows_b, out=fused[:len(rows_a)]))
