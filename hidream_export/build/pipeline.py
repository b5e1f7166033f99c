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
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable

from hidream_export.export import encoders as encoders_mod
from hidream_export.export import tokenizers as tokenizers_mod
from hidream_export.export import vae as vae_mod
from hidream_export.export.transformer import DATA_NAME, DEFAULT_OPSET, ONNX_NAME, ExportError, export_transformer
from hidream_export.manifest import file_hashes, read_manifest, sha256_file, sha256_files, write_json_atomic
from hidream_export.variants import TEXT_LENGTH, get_variant

log = logging.getLogger(__name__)

__all__ = ["build_pipeline", "plan_shared_components", "resolve_llama", "SharedComponent", "SHARED_DIR_NAME",
           "STORE_META", "DEFAULT_LLAMA_SUBDIR"]

SHARED_DIR_NAME = ".shared"
STORE_META = "component.json"  # inside a store entry: key, settings, file hashes, manifest fields
STORE_FORMAT = 1
# Where a model folder may keep its Llama (hidream_export.tiny_pipeline.LLAMA_SUBDIR writes it there).
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
    source_hash: str = ""
    key: str = ""

    def compute_key(self) -> str:
        """sha256 over the source files (names relative to their folder, and contents), the settings and the
        hidream_export version; the name of this component's folder in the shared store."""
        from hidream_export import __version__

        self.source_hash = sha256_files(self.source_files, root=self.source)
        doc = {"component": self.name, "source_sha256": self.source_hash, "settings": self.settings,
               "hidream_export": __version__}
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
                           opset: int = DEFAULT_OPSET, exporter: str = "auto") -> list[SharedComponent]:
    """Check that every shared component's source is there and say how each is made; nothing is written.

    Raises ExportError (a ValueError) naming the missing folder, file or flag."""
    checkpoint = Path(checkpoint)
    llama_dir = resolve_llama(checkpoint, llama)
    if encoder_dtype not in ("fp32", "fp16", "bf16"):
        raise ExportError(f"--encoder-dtype {encoder_dtype!r} is not one of ('fp32', 'fp16', 'bf16')")
    if exporter not in encoders_mod.EXPORTERS:
        raise ExportError(f"--exporter {exporter!r} is not one of {encoders_mod.EXPORTERS}")
    onnx_files = (ONNX_NAME, DATA_NAME)
    plan: list[SharedComponent] = []

    for name, spec in encoders_mod.ENCODERS.items():
        if spec.subfolder is None:
            folder, what = llama_dir, f"{spec.description} (--llama)"
        else:
            folder, what = _subfolder(checkpoint, spec.subfolder, spec.description), spec.description
        settings = {"recipe": encoders_mod.RECIPE_VERSION, "dtype": encoder_dtype, "opset": opset,
                    "exporter": exporter, "text_length": TEXT_LENGTH, "max_batch": encoders_mod.MAX_TEXT_BATCH,
                    "streaming": name in encoders_mod.STREAMING}
        plan.append(SharedComponent(
            name, name, ONNX_NAME, onnx_files, folder, encoders_mod.model_source_files(folder, what), settings,
            lambda out, n=name, f=folder: encoders_mod.export_encoder(n, f, out, dtype=encoder_dtype, opset=opset,
                                                                      exporter=exporter)))

    vae_dir = _subfolder(checkpoint, "vae", "VAE")
    plan.append(SharedComponent(
        "vae_decoder", "vae_decoder", ONNX_NAME, onnx_files, vae_dir, vae_mod.vae_source_files(vae_dir),
        {"recipe": vae_mod.RECIPE_VERSION, "opset": opset, "exporter": exporter,
         "latent_range": [vae_mod.LATENT_MIN, vae_mod.LATENT_MAX], "max_batch": vae_mod.MAX_VAE_BATCH},
        lambda out: vae_mod.export_vae_decoder(vae_dir, out, opset=opset, exporter=exporter)))

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
            lambda out, n=name, f=folder: tokenizers_mod.convert_tokenizer(n, f, out)))
    return plan


# ---- the shared store ------------------------------------------------------------------------------------

def _tempdir(parent: Path, name: str) -> Path:
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=parent))


def _swap_in(src: Path, dst: Path) -> None:
    """Put the finished folder `src` at `dst`; an old `dst` is moved aside first and removed last, so `dst`
    is always either the old or the new complete folder."""
    old = None
    if dst.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".old", dir=dst.parent))
        os.replace(dst, old / "x")
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


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
        if not path.is_file() or path.stat().st_size != info["bytes"] or sha256_file(path) != info["sha256"]:
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
    tmp = _tempdir(store, comp.key[:16])
    try:
        fields = comp.produce(tmp)
        produced = sorted(p.name for p in tmp.iterdir())
        if produced != sorted(comp.files):
            raise ExportError(f"{comp.name}: export wrote {produced}, expected {sorted(comp.files)}")
        meta = {"format_version": STORE_FORMAT, "component": comp.name, "key": comp.key,
                "source_sha256": comp.source_hash, "settings": comp.settings,
                "files": file_hashes(tmp, list(comp.files)), "fields": fields}
        write_json_atomic(tmp / STORE_META, meta)
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700; engine folders are normally world-readable
        if final.exists():
            _swap_in(tmp, final)
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
    tmp = _tempdir(dst.parent, dst.name)
    try:
        modes = {_place(shared / name, tmp / name, link, meta["files"][name]["sha256"]) for name in comp.files}
        os.chmod(tmp, 0o755)
        _swap_in(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return "+".join(sorted(modes))


def _entry(comp: SharedComponent, shared: Path, meta: dict, mode: str, checkpoint: Path, out_dir: Path) -> dict:
    fields = dict(meta["fields"])
    kind = fields.pop("kind")
    return {
        "kind": kind,
        "path": f"{comp.folder}/{comp.main_file}",
        "files": {f"{comp.folder}/{name}": info for name, info in meta["files"].items()},
        **fields,
        "source": {"checkpoint": str(checkpoint.resolve()), "folder": str(comp.source.resolve()),
                   "checkpoint_sha256": comp.source_hash},
        "shared": {"key": comp.key, "store": os.path.relpath(shared.parent, out_dir), "link": mode},
    }


# ---- transformer and scheduler -------------------------------------------------------------------------------

def _install_scheduler(checkpoint: Path, out_dir: Path) -> dict | None:
    """Copy CHECKPOINT/scheduler/scheduler_config.json (diffusers format) into the folder, if there is one."""
    from hidream_export import __version__

    src = checkpoint / SCHEDULER_FILE
    dst = out_dir / "scheduler"
    if not src.is_file():
        if dst.exists():
            shutil.rmtree(dst)  # left from an earlier build of another checkpoint; no longer described
        return None
    tmp = _tempdir(out_dir, "scheduler")
    try:
        shutil.copy2(src, tmp / src.name)
        os.chmod(tmp, 0o755)
        _swap_in(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    config = json.loads(src.read_text())
    return {"kind": "scheduler", "path": SCHEDULER_FILE, "files": file_hashes(out_dir, [SCHEDULER_FILE]),
            "class_name": config.get("_class_name"),
            "source": {"checkpoint": str(checkpoint.resolve()), "checkpoint_sha256": sha256_file(src)},
            "versions": {"hidream_export": __version__}}


# ---- TensorRT hook -------------------------------------------------------------------------------------------

TRT_MODULE = "hidream_export.build.trt"  # the TensorRT issue adds it: build_engines(out_dir, manifest) -> manifest


def _tensorrt_missing() -> str | None:
    """Why TensorRT cannot be used here, or None if it imports."""
    try:
        import tensorrt  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - ImportError, or a broken CUDA install failing at import
        return f"{type(exc).__name__}: {exc}"
    return None


# ---- the build -----------------------------------------------------------------------------------------------

def build_pipeline(checkpoint: str | Path, variant: str, out_dir: str | Path | None = None, *,
                   llama: str | Path | None = None, moe: str = "gather", dtype: str = "fp32",
                   encoder_dtype: str = "fp32", shared_root: str | Path | None = None, force: bool = False,
                   trt: bool = False, opset: int = DEFAULT_OPSET, exporter: str = "auto", link: str = "auto",
                   trt_options: dict | None = None) -> dict:
    """Export everything `variant` needs from a HiDream-I1 model folder into one engine folder; return its
    manifest (also written to OUT/manifest.json).

    checkpoint     model folder in the diffusers layout (transformer, text_encoder*, tokenizer*, vae, scheduler)
    out_dir        default engines/<variant>
    llama          Meta-Llama-3.1-8B-Instruct folder; default CHECKPOINT/llama (the CLI's --llama)
    moe, dtype     the transformer's MoE lowering and dtype (export_transformer)
    encoder_dtype  text encoders' dtype (fp32 default; the VAE is always fp32)
    shared_root    the shared store; default <out_dir.parent>/.shared
    force          re-export everything, and allow replacing a folder built for another variant/checkpoint
    trt            also build TensorRT engines; without TensorRT one notice line, and the ONNX folder
    opset          ONNX opset of every graph
    exporter       the encoders'/VAE's exporter ("auto": dynamo, TorchScript fallback recorded in the manifest)
    link           how variant folders get the shared files: auto (reflink, else hard link, else copy),
                   reflink, hardlink or copy
    """
    v = get_variant(variant)
    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        raise ExportError(f"{checkpoint}: no such model folder (build takes a HiDream-I1 folder in the "
                          f"diffusers layout)")
    out_dir = Path(out_dir) if out_dir else Path("engines") / v.name
    store = Path(shared_root) if shared_root else out_dir.parent / SHARED_DIR_NAME
    if link not in LINK_MODES:
        raise ExportError(f"--link {link!r} is not one of {LINK_MODES}")

    trt_missing = _tensorrt_missing() if trt else None
    if trt_missing:
        print(f"notice: --trt: TensorRT is not available ({trt_missing.splitlines()[0]}); building the ONNX "
              f"folder only", file=sys.stderr)

    # Every source is checked (and hashed) before the transformer export, which can take an hour.
    plan = plan_shared_components(checkpoint, llama, encoder_dtype=encoder_dtype, opset=opset, exporter=exporter)
    for comp in plan:
        comp.compute_key()

    # export_transformer reuses an up-to-date export (same checkpoint and settings, files intact) by itself.
    if export_transformer(checkpoint, v.name, out_dir, moe=moe, dtype=dtype, opset=opset, force=force).get("reused"):
        log.info("transformer: %s is up to date; not exporting it again", out_dir / "transformer")

    ready = [(comp, *ensure_shared(comp, store, force)[:2]) for comp in plan]

    # Take the entries that are about to change out of the manifest before touching their folders.
    manifest = read_manifest(out_dir)
    manifest["variant"] = v.to_dict()
    components = manifest["components"]
    previous = {name: components.pop(name, None) for name in [c.name for c in plan] + ["scheduler"]}
    write_json_atomic(out_dir / "manifest.json", manifest)

    for comp, shared, meta in ready:
        before = ((previous[comp.name] or {}).get("shared") or {}).get("link")
        mode = _install(comp, shared, meta, out_dir, link, before)
        components[comp.name] = _entry(comp, shared, meta, mode, checkpoint, out_dir)
    scheduler = _install_scheduler(checkpoint, out_dir)
    if scheduler is not None:
        components["scheduler"] = scheduler
    write_json_atomic(out_dir / "manifest.json", manifest)
    log.info("wrote %s (%d components)", out_dir / "manifest.json", len(components))

    if trt and not trt_missing:
        if importlib.util.find_spec(TRT_MODULE) is None:
            print("notice: --trt: this hidream-export cannot build TensorRT engines yet; built the ONNX folder "
                  "only", file=sys.stderr)
        else:
            manifest = importlib.import_module(TRT_MODULE).build_engines(out_dir, manifest, **(trt_options or {})).manifest
    return manifest
