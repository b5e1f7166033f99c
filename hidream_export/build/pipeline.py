"""`build_pipeline()`: one self-contained engine folder per variant (the contract is engines/README.md).

    engines/<variant>/
      manifest.json                 written last
      transformer/                  export_transformer (the variant's own)
      clip_l/ clip_g/ t5/ llama/    text encoders          \
      vae_decoder/                  latent -> [0, 1] image  > the shared store's files (reflink/hard link/copy)
      tokenizers/<name>/            tokenizer.json         /
      scheduler/                    copied from the checkpoint
    engines/.shared/<key>/          one export per distinct source + settings, shared by the variants

Why a shared store: HiDream-I1 Full, Dev and Fast differ only in the transformer (and the scheduler
config); their CLIP-L/CLIP-G/T5/VAE files are identical and the user passes the same Llama to all three.
Exporting them is the slow, memory-hungry part after the transformer (Llama and T5 are 8 B and 4.7 B
parameters), so each is exported once, under a key that changes whenever anything that could change the
result changes: sha256 over the source component's files (config + weights, or tokenizer files), the export
settings, and the hidream_export version. Variant folders get the files as reflinks (copy-on-write clones)
where the file system has them, else copies, so each folder stays self-contained and movable. Hard links
(`link="hardlink"`) keep one copy on disk, but recent onnx (`onnx.load`, `onnx.checker`, so Polygraphy)
refuses external data with several links, so they are opt-in for folders only onnxruntime/TensorRT read.

Crash safety, so that no later run (or the runtime) mistakes a partial result for a complete one:
- every export goes to a temporary folder (`.<name>.*.tmp`) renamed into place only when complete;
  a store entry is complete iff its folder exists under its key (its component.json is written inside
  the temporary folder before the rename), and it is re-verified against its hashes before reuse;
- variant folders are swapped in whole (old folder aside, new one renamed in, old one removed);
- manifest.json is rewritten atomically, last; while components are being swapped, their entries are
  first taken out of it, so the manifest only ever lists files that match their recorded hashes.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Callable, Sequence

from hidream_export.errors import ExportError, HiDreamExportError, one_line
from hidream_export.export import encoders as encoders_mod
from hidream_export.export import tokenizers as tokenizers_mod
from hidream_export.export import vae as vae_mod
from hidream_export.export.common import (DATA_NAME, DEFAULT_OPSET, EXPORTERS, ONNX_NAME, check_opset, model_errors,
                                          model_source_files, own_version)
from hidream_export.export.targets import TENSORRT, resolve_target
from hidream_export.export.transformer import check_out_dir, checkpoint_loras, export_transformer
from hidream_export.files import (atomic_write_json, file_record, folder_lock, read_json_object, remove_tree, sha256_file,
                                  sha256_files, staged_dir, swap_dir)
from hidream_export.manifest import (SHARED_DIR, Component, FileRecord, Manifest, SchedulerComponent, SharedRef,
                                     component_from_dict)
from hidream_export.signature import EXPORT_DTYPES, MAX_TEXT_BATCH, MAX_VAE_BATCH
from hidream_export.variants import TEXT_LENGTH, Variant, get_variant

log = logging.getLogger(__name__)

__all__ = ["build_pipeline", "plan_shared_components", "resolve_llama", "SharedComponent",
           "STORE_META", "DEFAULT_LLAMA_SUBDIR"]

STORE_META = "component.json"  # inside a store entry: key, settings, file hashes, manifest fields
STORE_FORMAT = 1
# Where a model folder may keep its Llama (hidream_export.testing.model_folder.LLAMA_SUBDIR writes it there).
DEFAULT_LLAMA_SUBDIR = "llama"
SCHEDULER_FILE = "scheduler/scheduler_config.json"
LINK_MODES = ("auto", "reflink", "hardlink", "copy")  # how variant folders get the shared store's files
# The checkpoint subfolders every HiDream-I1 model folder has besides the transformer (for messages).
CHECKPOINT_SUBFOLDERS = ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2",
                         "tokenizer_3", "vae")


@dataclasses.dataclass
class SharedComponent:
    """A component that is the same for every variant: where it comes from and how it is made."""

    name: str  # manifest component name
    folder: str  # folder in the variant folder, e.g. "clip_l" or "tokenizers/clip_l"
    main_file: str  # the file `path` points to
    files: tuple[str, ...]  # everything the folder holds
    source: Path  # the source folder (checkpoint subfolder or the Llama folder)
    source_files: list[Path]
    settings: dict  # export settings: part of the key
    produce: Callable[[Path], dict]  # writes `files` into an empty folder, returns the manifest fields
    check: Callable[[], object]  # reads the source's config/tokenizer: fails fast, before any export
    source_hash: str = ""
    key: str = ""

    def compute_key(self) -> str:
        """sha256 over the source files (names relative to their folder, and contents), the settings and the
        hidream_export version; the name of this component's folder in the shared store."""
        self.source_hash = sha256_files(self.source_files, root=self.source)
        doc = {"component": self.name, "source_sha256": self.source_hash, "settings": self.settings,
               "hidream_export": own_version()}
        self.key = hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()
        return self.key


# ---- inputs ---------------------------------------------------------------------------------------------

def resolve_llama(checkpoint: Path, llama: str | Path | None) -> Path:
    """The Llama folder: `llama` if given, else CHECKPOINT/llama. The HF HiDream-I1 repos do not ship
    Llama (the user downloads meta-llama/Meta-Llama-3.1-8B-Instruct), hence the flag in every message."""
    if llama is None:
        default = checkpoint / DEFAULT_LLAMA_SUBDIR
        if default.is_dir():
            return default
        raise ExportError(
            f"{checkpoint}: no Llama text encoder (HiDream-I1 repos do not ship it); pass --llama PATH to a "
            f"Meta-Llama-3.1-8B-Instruct folder, or put one at {default}")
    path = Path(llama)
    if not path.is_dir():
        raise ExportError(f"--llama {path}: no such folder")
    return path


def _subfolder(checkpoint: Path, sub: str, what: str) -> Path:
    folder = checkpoint / sub
    if not folder.is_dir():
        raise ExportError(f"{checkpoint}: no {sub}/ folder ({what}); a HiDream-I1 model folder has "
                          f"{', '.join(CHECKPOINT_SUBFOLDERS)} and transformer")
    return folder


def plan_shared_components(checkpoint: str | Path, llama: str | Path | None = None, *, encoder_dtype: str = "fp32",
                           opset: int = DEFAULT_OPSET, exporter: str = "auto",
                           encoder_quant=None) -> list[SharedComponent]:
    """Check that every shared component's source is there and say how each is made; nothing is written.
    encoder_quant (a QuantScheme): weight-only quantization of the streamed encoders (T5, Llama).

    Raises ExportError (a ValueError) naming the missing folder, file or flag."""
    checkpoint = Path(checkpoint)
    llama_dir = resolve_llama(checkpoint, llama)
    if encoder_dtype not in EXPORT_DTYPES:
        raise ExportError(f"--encoder-dtype {encoder_dtype!r} is not one of {EXPORT_DTYPES}")
    if exporter not in EXPORTERS:
        raise ExportError(f"--exporter {exporter!r} is not one of {EXPORTERS}")
    onnx_files = (ONNX_NAME, DATA_NAME)
    plan: list[SharedComponent] = []

    for name, spec in encoders_mod.ENCODERS.items():
        if spec.subfolder is None:
            folder, what = llama_dir, f"{spec.description} (--llama)"
        else:
            folder, what = _subfolder(checkpoint, spec.subfolder, spec.description), spec.description
        settings = {"recipe": encoders_mod.RECIPE_VERSION, "dtype": encoder_dtype, "opset": opset,
                    "exporter": exporter, "text_length": TEXT_LENGTH, "max_batch": MAX_TEXT_BATCH,
                    "streaming": name in encoders_mod.STREAMING}
        quant = encoder_quant if name in encoders_mod.STREAMING else None
        if quant is not None:  # absent otherwise, so unquantized store entries keep their keys
            settings["quant"] = quant.to_key()
        plan.append(SharedComponent(
            name, name, ONNX_NAME, onnx_files, folder, model_source_files(folder, what), settings,
            lambda out, n=name, f=folder, q=quant: encoders_mod.export_encoder(
                n, f, out, dtype=encoder_dtype, opset=opset, exporter=exporter, quant=q),
            lambda n=name, f=folder: encoders_mod.load_config(n, f)))

    vae_dir = _subfolder(checkpoint, "vae", "VAE")
    plan.append(SharedComponent(
        "vae_decoder", "vae_decoder", ONNX_NAME, onnx_files, vae_dir, vae_mod.vae_source_files(vae_dir),
        {"recipe": vae_mod.RECIPE_VERSION, "opset": opset, "exporter": exporter,
         "latent_range": [vae_mod.LATENT_MIN, vae_mod.LATENT_MAX], "max_batch": MAX_VAE_BATCH},
        lambda out: vae_mod.export_vae_decoder(vae_dir, out, opset=opset, exporter=exporter),
        lambda: vae_mod.load_config(vae_dir)))

    for name, spec in tokenizers_mod.TOKENIZERS.items():
        if spec.subfolder is None:
            folder, what = llama_dir, "Llama tokenizer (--llama)"
        else:
            folder, what = _subfolder(checkpoint, spec.subfolder, f"{name} tokenizer"), f"{name} tokenizer"
        settings = {"recipe": tokenizers_mod.RECIPE_VERSION, "max_length": TEXT_LENGTH, "loader": spec.loader,
                    "pad_with_eos": spec.pad_with_eos}
        plan.append(SharedComponent(
            spec.component, f"tokenizers/{name}", tokenizers_mod.TOKENIZER_FILE, (tokenizers_mod.TOKENIZER_FILE,),
            folder, tokenizers_mod.tokenizer_source_files(folder, what), settings,
            lambda out, n=name, f=folder: tokenizers_mod.convert_tokenizer(n, f, out),
            lambda n=name, f=folder: tokenizers_mod.load_reference_tokenizer(n, f)))
    return plan


def _check_source(comp: SharedComponent) -> None:
    try:
        comp.check()
    except HiDreamExportError:
        raise
    except Exception as exc:  # noqa: BLE001 - transformers/diffusers/tokenizers raise anything on a bad folder
        raise ExportError(f"{comp.source}: the {comp.name} source cannot be read ({type(exc).__name__}: "
                          f"{one_line(exc)[:300]})") from None


# ---- the shared store ------------------------------------------------------------------------------------

def _load_store_entry(folder: Path, comp: SharedComponent) -> dict | None:
    """The store entry's metadata if it is complete and every file still matches its hash, else None."""
    try:
        meta = json.loads((folder / STORE_META).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if meta.get("key") != comp.key or sorted(meta.get("files", {})) != sorted(comp.files):
        return None
    for name, info in meta["files"].items():
        path = folder / name
        if path.is_symlink() or not path.is_file() or path.stat().st_size != info["bytes"] \
                or sha256_file(path) != info["sha256"]:
            return None
    return meta


def ensure_shared(comp: SharedComponent, store: Path, force: bool = False) -> tuple[Path, dict, bool]:
    """The store folder holding `comp`, exporting it first unless a verified entry exists (or `force`).

    Returns (folder, metadata, reused)."""
    final = store / comp.key
    if final.is_dir() and not force:
        meta = _load_store_entry(final, comp)
        if meta is not None:
            log.info("%s: reusing shared export %s", comp.name, final)
            return final, meta, True
        log.warning("%s: shared export %s is incomplete or modified; exporting it again", comp.name, final)
    tmp = staged_dir(store, comp.key[:16])
    try:
        fields = comp.produce(tmp)
        produced = sorted(p.name for p in tmp.iterdir())
        if produced != sorted(comp.files):
            raise ExportError(f"{comp.name}: export wrote {produced}, expected {sorted(comp.files)}")
        meta = {"format_version": STORE_FORMAT, "component": comp.name, "key": comp.key,
                "source_sha256": comp.source_hash, "settings": comp.settings,
                "files": {name: file_record(tmp / name) for name in comp.files}, "fields": fields}
        atomic_write_json(tmp / STORE_META, meta)
        if final.exists():
            swap_dir(tmp, final)
        else:
            try:
                os.rename(tmp, final)
            except OSError as exc:
                # Another build (another variant, in parallel) finished the same key first: use theirs.
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY) or _load_store_entry(final, comp) is None:
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
                meta = _load_store_entry(final, comp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("%s: exported to %s", comp.name, final)
    return final, meta, False


_FICLONE = 0x40049409  # Linux ioctl: share the source's blocks copy-on-write (btrfs, XFS, bcachefs, ...)


def _reflink(src: Path, dst: Path) -> bool:
    """A copy-on-write clone of src at dst, if the file system can; False (and no dst) if not."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        return False
    try:
        with open(src, "rb") as s, open(dst, "wb") as d:
            fcntl.ioctl(d.fileno(), _FICLONE, s.fileno())
        shutil.copystat(src, dst)
        return True
    except OSError:
        dst.unlink(missing_ok=True)
        return False


def _place(src: Path, dst: Path, link: str, sha256: str) -> str:
    """Put a file of the store into a variant folder; return how: reflink, hardlink or copy.

    auto = reflink, else copy. A reflink is the best of both: no extra disk, and its own inode. Hard links
    save as much disk, but recent onnx (1.23 here: `onnx.load`, `onnx.checker`, hence Polygraphy) refuses
    external data files with more than one link ("potential hardlink attack"), so they are opt-in
    (`--link hardlink`, for folders only onnxruntime/TensorRT will read). Either way the export itself is
    done once and reused."""
    if link in ("auto", "reflink"):
        if _reflink(src, dst):
            return "reflink"
        if link == "reflink":
            raise ExportError(f"--link reflink: {dst.parent} is on a file system without reflinks")
    if link == "hardlink":
        try:
            os.link(src, dst)
            return "hardlink"
        except OSError as exc:
            if link == "hardlink":
                raise ExportError(f"--link hardlink: cannot link {src} to {dst} ({exc.strerror})") from None
    shutil.copy2(src, dst)
    if sha256_file(dst) != sha256:
        raise ExportError(f"{dst}: copy of {src} does not match its hash")
    return "copy"


def _installed(dst: Path, shared: Path, meta: dict, link: str) -> bool:
    """Whether dst already holds exactly the store entry's files, placed the way `link` asks (any way for
    auto): the same inodes for hard links, equal content (by hash) otherwise."""
    if not dst.is_dir() or sorted(p.name for p in dst.iterdir()) != sorted(meta["files"]):
        return False
    for name, info in meta["files"].items():
        same = os.path.samefile(dst / name, shared / name)
        if (link == "hardlink" and not same) or (link in ("reflink", "copy") and same):
            return False
        if not same and ((dst / name).stat().st_size != info["bytes"] or sha256_file(dst / name) != info["sha256"]):
            return False
    return True


def _install(comp: SharedComponent, shared: Path, meta: dict, out_dir: Path, link: str = "auto",
             previous: str | None = None) -> str:
    """Make out_dir/<comp.folder> hold the store entry's files; return how they got there (`previous`: what
    the old manifest recorded, reused when nothing needs to change)."""
    dst = out_dir / comp.folder
    if _installed(dst, shared, meta, link):
        if all(os.path.samefile(dst / name, shared / name) for name in comp.files):
            return "hardlink"
        return previous if previous in ("reflink", "copy") else "copy"
    tmp = staged_dir(dst.parent, dst.name)
    try:
        modes = {_place(shared / name, tmp / name, link, meta["files"][name]["sha256"]) for name in comp.files}
        swap_dir(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return "+".join(sorted(modes))


def _entry(comp: SharedComponent, shared: Path, meta: dict, mode: str, checkpoint: Path, out_dir: Path) -> Component:
    """The manifest record of a shared component placed in the variant folder (the export's own fields
    come from the store entry)."""
    record = component_from_dict(comp.name, {**meta["fields"], "path": f"{comp.folder}/{comp.main_file}",
                                             "files": {f"{comp.folder}/{n}": i for n, i in meta["files"].items()}})
    record.source = {"checkpoint": str(checkpoint.resolve()), "folder": str(comp.source.resolve()),
                     "checkpoint_sha256": comp.source_hash}
    record.shared = SharedRef(comp.key, os.path.relpath(shared.parent, out_dir), mode)
    return record


# ---- transformer and scheduler -------------------------------------------------------------------------------

def _read_scheduler(checkpoint: Path) -> dict | None:
    """CHECKPOINT/scheduler/scheduler_config.json, checked before any export starts."""
    src = checkpoint / SCHEDULER_FILE
    return read_json_object(src, "scheduler config", ExportError) if src.exists() else None


def _install_scheduler(checkpoint: Path, out_dir: Path, config: dict | None) -> SchedulerComponent | None:
    """Copy CHECKPOINT/scheduler/scheduler_config.json (diffusers format) into the folder, if there is one."""
    src = checkpoint / SCHEDULER_FILE
    dst = out_dir / "scheduler"
    if config is None:
        if dst.exists() or dst.is_symlink():
            remove_tree(dst)  # left from an earlier build of another checkpoint; no longer described
        return None
    tmp = staged_dir(out_dir, "scheduler")
    try:
        shutil.copyfile(src, tmp / src.name)
        os.chmod(tmp / src.name, 0o666 & ~_umask())
        swap_dir(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return SchedulerComponent(path=SCHEDULER_FILE, files={SCHEDULER_FILE: FileRecord.of(out_dir / SCHEDULER_FILE)},
                              source={"checkpoint": str(checkpoint.resolve()), "checkpoint_sha256": sha256_file(src)},
                              versions={"hidream_export": own_version()}, class_name=config.get("_class_name"))


def _umask() -> int:
    from hidream_export.files import umask

    return umask()


# ---- the build -----------------------------------------------------------------------------------------------

def build_pipeline(checkpoint: str | Path, variant: "str | Variant", out_dir: str | Path | None = None, *,
                   llama: str | Path | None = None, moe: str = "gather", target: str | None = None, dtype: str = "fp32",
                   encoder_dtype: str = "fp32", shared_root: str | Path | None = None, force: bool = False,
                   trt: bool = False, opset: int | None = None, exporter: str = "auto", link: str = "auto",
                   trt_options=None, loras: Sequence = (), quiet: bool = True, quant: str | None = None,
                   quant_block: int | None = None, calibration: str | Path | None = None,
                   ort_accuracy_level: int | None = None, quant_encoders: str | None = None) -> Manifest:
    """Export everything `variant` needs from a HiDream-I1 model folder into one engine folder; return its
    manifest (also written to OUT/manifest.json).

    checkpoint     model folder in the diffusers layout (transformer, text_encoder*, tokenizer*, vae, scheduler)
    out_dir        default engines/<variant>
    llama          Meta-Llama-3.1-8B-Instruct folder; default CHECKPOINT/llama (the CLI's --llama)
    moe, target, dtype  the transformer's MoE lowering, target runtime and dtype (export_transformer)
    encoder_dtype  text encoders' dtype (fp32 default; the VAE is always fp32)
    shared_root    the shared store; default <out_dir.parent>/.shared
    force          re-export everything, and allow replacing a folder built for another variant/checkpoint
    trt            also build TensorRT engines (trt_options: a build.trt.TrtBuildOptions); without TensorRT
                   one notice line, and the ONNX folder
    opset          ONNX opset of every graph (default 20; the transformer's follows its target and is at least 21
                   when quantized, the encoders' 21 with quant_encoders)
    quant, quant_block, calibration, ort_accuracy_level
                   the transformer's quantization (export_transformer; hidream_export.quant)
    quant_encoders weight-only int8/int4 of the T5 and Llama encoders (with quant_block when given)
    exporter       the encoders'/VAE's exporter ("auto": dynamo, TorchScript fallback recorded in the manifest)
    link           how variant folders get the shared files: auto (reflink, else copy), reflink, hardlink or copy
    loras          LoRAs fused into the transformer's weights (export_transformer's `loras`)
    quiet          no progress bar for the transformer's weights
    """
    v = get_variant(variant)
    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        raise ExportError(f"{checkpoint}: no such model folder (build takes a HiDream-I1 folder in the "
                          f"diffusers layout)")
    out_dir = Path(out_dir) if out_dir else v.default_out_dir
    store = Path(shared_root) if shared_root else out_dir.parent / SHARED_DIR
    if link not in LINK_MODES:
        raise ExportError(f"--link {link!r} is not one of {LINK_MODES}")
    from hidream_export.quant.scheme import MIN_OPSET, QuantScheme

    target, transformer_opset = resolve_target(target, moe, None if opset is None else check_opset(opset))
    if trt and target != TENSORRT:
        raise ExportError(f"--trt builds TensorRT engines, but the transformer would be an {target} graph "
                          f"(--moe {moe}, --target {target}); use --target {TENSORRT} with --moe gather, dense or "
                          f"plugin")
    if opset is None and quant_encoders:
        opset = MIN_OPSET  # the encoders' blocked DequantizeLinear
    opset = check_opset(opset)
    # --quant-block applies to the encoders too when given (their widths are multiples of 128 in the real model).
    encoder_quant = QuantScheme.parse(quant_encoders, quant_block if quant_encoders and quant != "fp8" else None,
                                      flag="--quant-encoders")
    if encoder_quant is not None and opset < MIN_OPSET:
        raise ExportError(f"--quant-encoders needs --opset {MIN_OPSET} or newer, got {opset}")

    trt_missing = None
    if trt:
        from hidream_export.moe.loader import tensorrt_unavailable_reason

        trt_missing = tensorrt_unavailable_reason()
        if trt_missing:
            print(f"notice: --trt: TensorRT is not available ({trt_missing.splitlines()[0]}); building the ONNX "
                  f"folder only", file=sys.stderr)

    # Every source is checked (read and hashed) before the transformer export, which can take an hour.
    plan = plan_shared_components(checkpoint, llama, encoder_dtype=encoder_dtype, opset=opset, exporter=exporter,
                                  encoder_quant=encoder_quant)
    scheduler_config = _read_scheduler(checkpoint)
    if loras:  # read and fitted to the checkpoint's headers before anything is written
        from hidream_export.model.checkpoint import locate_checkpoint

        with model_errors():
            ckpt = locate_checkpoint(checkpoint)
        loras = checkpoint_loras(ckpt, loras)
    check_out_dir(out_dir, [checkpoint, *{comp.source for comp in plan}])
    for comp in plan:
        _check_source(comp)
        comp.compute_key()

    with folder_lock(out_dir):
        # export_transformer reuses an up-to-date export (same checkpoint and settings, files intact) by itself.
        result = export_transformer(checkpoint, v, out_dir, moe=moe, target=target, dtype=dtype,
                                    opset=transformer_opset, force=force, loras=loras, quiet=quiet, quant=quant,
                                    quant_block=quant_block, calibration=calibration,
                                    ort_accuracy_level=ort_accuracy_level)
        if result.reused:
            log.info("transformer: %s is up to date; not exporting it again", out_dir / "transformer")

        ready = [(comp, *ensure_shared(comp, store, force)[:2]) for comp in plan]

        # Take the entries that are about to change out of the manifest before touching their folders.
        manifest = Manifest.read(out_dir)
        manifest.variant = v
        components = manifest.components
        previous = {name: components.pop(name, None) for name in [c.name for c in plan] + ["scheduler"]}
        manifest.write(out_dir)

        for comp, shared, meta in ready:
            before = previous[comp.name].shared.link if previous[comp.name] and previous[comp.name].shared else None
            mode = _install(comp, shared, meta, out_dir, link, before)
            components[comp.name] = _entry(comp, shared, meta, mode, checkpoint, out_dir)
        scheduler = _install_scheduler(checkpoint, out_dir, scheduler_config)
        if scheduler is not None:
            components["scheduler"] = scheduler
        manifest.write(out_dir)
        log.info("wrote %s (%d components)", out_dir / "manifest.json", len(components))

        if trt and not trt_missing:
            from hidream_export.build.trt import build_engines

            manifest = build_engines(out_dir, manifest, options=trt_options).manifest
    return manifest
