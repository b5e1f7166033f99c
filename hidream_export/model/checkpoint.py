"""Reading and writing HiDream-I1 transformer checkpoints in the real on-disk format.

Accepted layouts:
- a diffusers `transformer/` folder: config.json + diffusion_pytorch_model.safetensors, or shards listed
  in diffusion_pytorch_model.safetensors.index.json;
- the parent model folder (its `transformer/` is used);
- a single .safetensors file (ComfyUI / original layout, keys may carry `model.diffusion_model.`), with
  the config given separately (preset name, config.json path, or TransformerConfig).

Why not `safetensors.safe_open(...).get_tensor`: it hands out memory-mapped tensors, and copying or
casting them leaves the touched file pages resident, so peak RSS reaches twice the checkpoint (measured:
2.27 GB for a 1 GiB file). Here each tensor is read with a plain file read into its final, already
allocated buffer, and cast on the way: peak stays at one copy of the weights plus one tensor. The header
format is tiny (8-byte length, JSON, raw little-endian data) and is validated before any byte is used.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ConfigError, TransformerConfig, resolve_config

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
CONFIG_NAME = "config.json"
SINGLE_FILE_PREFIX = "model.diffusion_model."

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
# Every transformer parameter is a float; an integer, bool or FP8 tensor means a quantized or foreign
# checkpoint, which a plain cast would silently turn into garbage weights.
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as it is; the message names the file and what is wrong."""


# ---- safetensors headers ------------------------------------------------------------------------

@dataclass(frozen=True)
class TensorEntry:
    file: Path
    key: str  # as stored in the file
    dtype: str  # safetensors dtype string
    shape: tuple[int, ...]
    begin: int  # absolute file offsets
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def read_header(path: str | Path) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """Parse and validate one safetensors header; raise CheckpointError naming the file."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            raw_len = fh.read(8)
            if len(raw_len) < 8:
                raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes)")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > size - 8 or header_len > 100 * 2**20:
                raise CheckpointError(
                    f"{path}: corrupt or truncated safetensors file (header claims {header_len} bytes, "
                    f"file has {size})")
            header = json.loads(fh.read(header_len))
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: corrupt safetensors header ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + header_len
    entries = {}
    for key, info in header.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt safetensors header entry for {key!r}") from None
        if dtype not in DTYPES:
            raise CheckpointError(f"{path}: tensor {key!r} has unsupported dtype {dtype}")
        expected = math.prod(shape) * DTYPES[dtype].itemsize
        if end - begin != expected or begin < 0:
            raise CheckpointError(
                f"{path}: corrupt safetensors header: {key!r} {dtype}{list(shape)} needs {expected} bytes, "
                f"offsets give {end - begin}")
        if data_start + end > size:
            raise CheckpointError(
                f"{path}: truncated safetensors file: tensor {key!r} ends at byte {data_start + end}, "
                f"file has {size} bytes")
        entries[key] = TensorEntry(path, key, dtype, shape, data_start + begin, data_start + end)
    return entries, metadata


def read_tensor(fh, entry: TensorEntry, dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Read one tensor with a plain file read (no mmap), casting to `dtype` if given."""
    raw = torch.empty(entry.shape, dtype=DTYPES[entry.dtype])
    if raw.numel():
        fh.seek(entry.begin)
        view = memoryview(raw.reshape(-1).view(torch.uint8).numpy())
        if fh.readinto(view) != entry.nbytes:
            raise CheckpointError(f"{entry.file}: truncated while reading {entry.key!r}")
    if out is not None:
        out.copy_(raw)
        return out
    return raw if dtype is None or dtype == raw.dtype else raw.to(dtype)


def read_tensor_chunks(fh, entry: TensorEntry, dtype: torch.dtype | None = None, chunk_bytes: int = 8 * 2**20):
    """Yield one tensor's bytes (cast to `dtype` if given), in order, a piece of at most ~chunk_bytes at a
    time, so that nothing the size of the tensor is ever held. Each piece is a view of a reused buffer:
    consume it before asking for the next one."""
    src = DTYPES[entry.dtype]
    dst = dtype or src
    n = math.prod(entry.shape)
    per = max(1, chunk_bytes // max(src.itemsize, dst.itemsize))
    buf = torch.empty(min(per, n), dtype=src)
    fh.seek(entry.begin)
    for start in range(0, n, per):
        k = min(per, n - start)
        piece = buf[:k]
        if fh.readinto(memoryview(piece.view(torch.uint8).numpy())) != k * src.itemsize:
            raise CheckpointError(f"{entry.file}: truncated while reading {entry.key!r}")
        if dst != src:
            piece = piece.to(dst)  # elementwise, so the same numbers as casting the whole tensor
        yield memoryview(piece.view(torch.uint8).numpy())


# ---- locating a checkpoint ------------------------------------------------------------------------

@dataclass
class CheckpointFiles:
    """Where a transformer checkpoint's tensors and config are."""

    root: Path  # folder or single file the user gave (for messages)
    config: TransformerConfig
    config_file: Path | None
    entries: dict[str, TensorEntry]  # model key -> entry (prefix already stripped)
    metadata: dict[str, str]

    @property
    def files(self) -> list[Path]:
        return sorted({e.file for e in self.entries.values()})

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())

    def dtypes(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for e in self.entries.values():
            counts[e.dtype] = counts.get(e.dtype, 0) + 1
        return counts


def _transformer_dir(path: Path) -> Path:
    if (path / CONFIG_NAME).exists() and ((path / WEIGHTS_NAME).exists() or (path / INDEX_NAME).exists()):
        return path
    if (path / "transformer").is_dir():
        return _transformer_dir(path / "transformer")
    raise CheckpointError(
        f"{path}: not a HiDream-I1 checkpoint folder: expected {CONFIG_NAME} with {WEIGHTS_NAME} or "
        f"{INDEX_NAME} here or in {path / 'transformer'}")


def _shard_files(folder: Path) -> list[Path]:
    index = folder / INDEX_NAME
    if not index.exists():
        return [folder / WEIGHTS_NAME]
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{index}: not a valid safetensors index ({exc})") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index}: weight_map must map tensor names to shard file names")
    files = sorted(set(weight_map.values()))
    outside = [f for f in files if Path(f).name != f or f in ("", ".", "..")]
    if outside:
        raise CheckpointError(f"{index}: shard {outside[0]!r} is not a file name in {folder}; an index names "
                              f"shards beside it")
    missing = [f for f in files if not (folder / f).exists()]
    if missing:
        raise CheckpointError(f"{index}: lists {len(missing)} shard file(s) that do not exist: {missing[:3]}")
    return [folder / f for f in files]


def _resolve(config) -> TransformerConfig:
    try:
        return resolve_config(config)
    except ConfigError as exc:
        raise CheckpointError(f"--config: {exc}") from None


def locate_checkpoint(path: str | Path, config: "TransformerConfig | str | Path | None" = None) -> CheckpointFiles:
    """Resolve a checkpoint path into its config and tensor entries (reads headers only)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    config_file = None
    if path.is_dir():
        folder = _transformer_dir(path)
        files = _shard_files(folder)
        if config is None:
            config_file = folder / CONFIG_NAME
            try:
                cfg = TransformerConfig.from_file(config_file)
            except ConfigError as exc:
                raise CheckpointError(str(exc)) from None
        else:
            cfg = _resolve(config)
    else:
        if config is None:
            raise CheckpointError(
                f"{path}: a single-file checkpoint carries no config; pass --config with a preset name "
                f"(e.g. 'real') or a config.json path")
        files, cfg = [path], _resolve(config)
        if not isinstance(config, TransformerConfig) and Path(str(config)).exists():
            config_file = Path(str(config))
    entries: dict[str, TensorEntry] = {}
    metadata: dict[str, str] = {}
    for f in files:
        file_entries, meta = read_header(f)
        metadata.update(meta)
        for key, entry in file_entries.items():
            name = key[len(SINGLE_FILE_PREFIX):] if key.startswith(SINGLE_FILE_PREFIX) else key
            if name in entries:
                raise CheckpointError(f"{f}: tensor {name!r} also appears in {entries[name].file}")
            entries[name] = entry
    return CheckpointFiles(path, cfg, config_file, entries, metadata)


# ---- checking keys and shapes --------------------------------------------------------------------

def expected_shapes(config: TransformerConfig) -> dict[str, tuple[int, ...]]:
    """State-dict key -> shape for a config, computed on the meta device (no memory)."""
    from .transformer import HiDreamTransformer

    with torch.device("meta"):
        model = HiDreamTransformer(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _config_hints(config: TransformerConfig, found: dict[str, tuple[int, ...]]) -> list[str]:
    """Name config fields that contradict the weights (the usual cause of many shape errors)."""
    hints = []

    def check(key: str, dim: int, field: str, value: int, derive=lambda v: v) -> None:
        if key in found and len(found[key]) > dim and derive(found[key][dim]) != value:
            hints.append(f"{field}={value} but {key} implies {derive(found[key][dim])}")

    p2 = config.patch_size ** 2
    check("x_embedder.proj.weight", 0, "num_attention_heads*attention_head_dim", config.inner_dim)
    check("x_embedder.proj.weight", 1, "in_channels", config.in_channels, lambda v: v // p2)
    check("final_layer.linear.weight", 0, "out_channels", config.out_channels, lambda v: v // p2)
    check("p_embedder.pooled_embedder.linear_1.weight", 1, "text_emb_dim", config.text_emb_dim)
    check("caption_projection.0.linear.weight", 1, "caption_channels[1] (llama)", config.llama_dim)
    check("double_stream_blocks.0.block.ff_i.gate.weight", 0, "num_routed_experts", config.num_routed_experts)
    hints += _block_hints(config, found)
    n_caption = len({k.split(".")[1] for k in found if k.startswith("caption_projection.")})
    t5_key = f"caption_projection.{n_caption - 1}.linear.weight"
    if t5_key in found and found[t5_key][1] != config.t5_dim:
        hints.append(f"caption_channels[0] (t5)={config.t5_dim} but {t5_key} implies {found[t5_key][1]}")
    return hints


def _block_hints(config: TransformerConfig, found: dict[str, tuple[int, ...]]) -> list[str]:
    """Block and caption-projection counts of the weights that contradict the config."""
    hints = []
    n_double = len({k.split(".")[1] for k in found if k.startswith("double_stream_blocks.")})
    n_single = len({k.split(".")[1] for k in found if k.startswith("single_stream_blocks.")})
    n_caption = len({k.split(".")[1] for k in found if k.startswith("caption_projection.")})
    if n_double != config.num_layers:
        hints.append(f"num_layers={config.num_layers} but the weights have {n_double} double-stream blocks")
    if n_single != config.num_single_layers:
        hints.append(f"num_single_layers={config.num_single_layers} but the weights have {n_single} single-stream blocks")
    if n_caption and n_caption != config.num_blocks + 1:
        hints.append(f"llama_layers/num blocks imply {config.num_blocks + 1} caption projections, weights have {n_caption}")
    return hints


def check_keys(ckpt: CheckpointFiles) -> None:
    """Raise CheckpointError listing missing, unexpected and wrong-shaped keys (first few, with counts),
    or naming a tensor that is not a float. Block counts are compared first, from the headers alone, so
    a config that disagrees with the weights fails before a model is built from it."""
    found = {k: e.shape for k, e in ckpt.entries.items()}
    not_float = sorted(k for k, e in ckpt.entries.items() if e.dtype not in FLOAT_DTYPES)
    if not_float:
        e = ckpt.entries[not_float[0]]
        raise CheckpointError(
            f"{e.file}: tensor {e.key!r} is {e.dtype}, and {len(not_float)} tensor(s) in all are not floats "
            f"({', '.join(not_float[:3])}{', ...' if len(not_float) > 3 else ''}); a HiDream-I1 transformer "
            f"checkpoint holds {'/'.join(FLOAT_DTYPES)} weights (quantized checkpoints are not supported)")
    counts = _block_hints(ckpt.config, found)
    if counts:
        where = ckpt.config_file or "the given config"
        raise CheckpointError(f"{ckpt.root}: checkpoint does not match the transformer config ({where}): "
                              + "; ".join(counts))
    want = expected_shapes(ckpt.config)
    missing = sorted(set(want) - set(found))
    unexpected = sorted(set(found) - set(want))
    wrong = sorted(k for k in set(want) & set(found) if want[k] != found[k])
    if not (missing or unexpected or wrong):
        return

    def listing(title: str, keys: list[str], fmt=lambda k: k) -> str:
        shown = ", ".join(fmt(k) for k in keys[:5])
        more = f", ... (+{len(keys) - 5} more)" if len(keys) > 5 else ""
        return f"\n  {len(keys)} {title}: {shown}{more}"

    files = ", ".join(str(f) for f in ckpt.files[:3]) + (" ..." if len(ckpt.files) > 3 else "")
    msg = f"{ckpt.root}: checkpoint does not match the transformer config ({files})"
    if missing:
        msg += listing("missing", missing)
    if unexpected:
        msg += listing("unexpected", unexpected)
    if wrong:
        msg += listing("wrong-shaped", wrong, lambda k: f"{k} {list(found[k])} (expected {list(want[k])})")
    hints = _config_hints(ckpt.config, found)
    if hints:
        where = ckpt.config_file or "the given config"
        msg += f"\n  config fields that disagree with the weights ({where}): " + "; ".join(hints)
    raise CheckpointError(msg)


# ---- loading ---------------------------------------------------------------------------------------

def _resolve_dtype(dtype, ckpt: CheckpointFiles) -> torch.dtype:
    if dtype is None:
        kinds = {e.dtype for e in ckpt.entries.values()}
        if len(kinds) != 1:
            raise CheckpointError(f"{ckpt.root}: tensors have mixed dtypes {sorted(kinds)}; pass dtype=")
        return DTYPES[kinds.pop()]
    if isinstance(dtype, str):
        names = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
                 "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
        if dtype not in names:
            raise CheckpointError(f"--dtype {dtype!r} is not one of {sorted(names)}")
        return names[dtype]
    return dtype


def iter_tensors(ckpt: CheckpointFiles, dtype: torch.dtype | None = None,
                 keys: Iterable[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (key, tensor) one at a time, file by file in on-disk order, cast to `dtype`."""
    wanted = set(ckpt.entries) if keys is None else set(keys)
    by_file: dict[Path, list[tuple[str, TensorEntry]]] = {}
    for name, entry in ckpt.entries.items():
        if name in wanted:
            by_file.setdefault(entry.file, []).append((name, entry))
    for file, items in sorted(by_file.items()):
        with open(file, "rb") as fh:
            for name, entry in sorted(items, key=lambda it: it[1].begin):
                yield name, read_tensor(fh, entry, dtype)


def load_transformer(path: str | Path, dtype: "torch.dtype | str | None" = None, device: "str | torch.device" = "cpu",
                     moe_lowering: str = "reference", config: "TransformerConfig | str | Path | None" = None,
                     rope_dtype: str = "float64", rope_max_positions: int | None = None):
    """Load a HiDream-I1 transformer checkpoint into `HiDreamTransformer` (eval mode).

    The model is built on the meta device and each tensor is read straight from disk, cast to `dtype`
    (default: the checkpoint's own) and assigned, so peak memory stays near one copy of the weights.
    Keys and shapes are all checked from the headers before a single weight is read.
    """
    from .embeddings import RopeTables
    from .transformer import HiDreamTransformer

    ckpt = locate_checkpoint(path, config)
    check_keys(ckpt)
    target = _resolve_dtype(dtype, ckpt)
    device = torch.device(device)
    with torch.device("meta"):
        model = HiDreamTransformer(ckpt.config, moe_lowering=moe_lowering, rope_dtype=rope_dtype,
                                   rope_max_positions=rope_max_positions)
    state = {}
    for name, tensor in iter_tensors(ckpt, target):
        state[name] = tensor.to(device)
    model.load_state_dict(state, strict=True, assign=True)
    del state
    # Non-persistent buffers are not in the checkpoint: rebuild them for real on the target device.
    model.rope = RopeTables(ckpt.config.axes_dims_rope, model.rope.max_positions, rope_dtype).to(device)
    return model.eval()
