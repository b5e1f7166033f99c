"""LoRA files for the HiDream-I1 transformer: read, checked against a model, turned into weight deltas.

Torch-free (the runtime applies LoRAs at load time): tensors are read with safetensors' numpy API, and
only from .safetensors files; a pickle is refused without being opened.

Layouts read (each file has exactly one):

- "diffusers": `transformer.<module>.lora_A.weight` / `.lora_B.weight`, what `save_lora_weights` writes;
  alpha and rank per module from the file's `lora_adapter_metadata` (peft LoraConfig fields `r`,
  `lora_alpha`, `rank_pattern`, `alpha_pattern`, `use_rslora`) when it has them;
- "peft": the same with bare module names (what a model's `save_lora_adapter` writes);
- "non-diffusers": `diffusion_model.<module>.lora_A/lora_B.weight` (ai-toolkit, ComfyUI) or
  `.lora_down/.lora_up.weight` with an optional scalar `<module>.alpha` (kohya-style trainers).

Without metadata or alpha tensors, alpha = rank (scaling 1), as diffusers and peft assume. A module is
named as in the checkpoint (`double_stream_blocks.0.block.attn1.to_q`) and its LoRA changes the weight
`<module>.weight` (out, in) by

    scale * alpha / rank * (B @ A)        B = lora_B/up (out, r), A = lora_A/down (r, in)

(alpha / sqrt(rank) with rsLoRA), summed over the LoRAs applied together: peft's LoRA Linear, whose
unfused forward adds `scaling * B(A x)` to `W x`, with `set_adapters`' weight as `scale`.

Refused, each in one line naming the keys (first few) and nothing applied: other adapter schemes (DoRA,
LoHa, LoKr, ...), keys of other components (text encoders), modules absent from the model, shapes or
ranks that do not fit, NaN/inf, a missing file, a pickle.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

import ml_dtypes  # registers numpy's "bfloat16" dtype, so safetensors can hand out bf16 LoRA tensors
import numpy as np

from hidream_export.errors import CheckpointInputError
from hidream_export.files import sha256_file
from hidream_export.manifest import LoraRecord

__all__ = ["LoraFile", "LoraModule", "LoraRequest", "LoraSet", "load_loras", "looks_like_lora", "module_kind",
           "EXPORT_NUMPY_DTYPES"]

METADATA_KEY = "lora_adapter_metadata"  # where diffusers keeps the LoraConfig in a safetensors header
LAYOUT_PREFIXES = {"transformer.": "diffusers", "diffusion_model.": "non-diffusers"}
# key suffix -> which factor it is: A ("down", rank x in) or B ("up", out x rank), as each layout names them
FACTORS = {".lora_A.weight": "down", ".lora_B.weight": "up", ".lora_down.weight": "down", ".lora_up.weight": "up"}
ROLE_NAMES = {"down": "lora_A/lora_down", "up": "lora_B/lora_up"}
ALPHA = ".alpha"
# Key fragments of adapter schemes other than plain LoRA, for the refusal's message.
OTHER_SCHEMES = {"dora_scale": "DoRA", "lora_magnitude_vector": "DoRA", "hada_": "LoHa", "lokr_": "LoKr",
                 "lora_mid": "LoCon (Tucker)", ".diff": "full weight difference", "oft_": "OFT", "boft_": "BOFT",
                 "lora_A.bias": "LoRA with bias", "lora_B.bias": "LoRA with bias", "lora_up.bias": "LoRA with bias",
                 "lora_down.bias": "LoRA with bias", "ia3_": "IA3", ".w_norm": "GLoRA"}
# Keys of other pipeline components (the transformer's LoRA is the only one applied).
OTHER_COMPONENTS = ("text_encoder", "lora_te", "te_", "te1_", "te2_", "unet.", "lora_unet_", "vae.")
# LoraConfig fields that change what the adapter computes beyond plain LoRA: refused when set.
UNSUPPORTED_CONFIG = ("use_dora", "lora_bias", "fan_in_fan_out", "modules_to_save", "layer_replication",
                      "target_parameters", "trainable_token_indices", "alora_invocation_tokens")
# Module-name roots of other model families, for the refusal's hint.
FAMILY_HINTS = {"transformer_blocks": "Flux/SD3", "single_transformer_blocks": "Flux", "joint_blocks": "SD3",
                "down_blocks": "a UNet (SD/SDXL)", "up_blocks": "a UNet (SD/SDXL)", "mid_block": "a UNet (SD/SDXL)",
                "lora_unet": "a kohya UNet", "blocks": "Wan/LTX-style transformers"}
# The router weight is a bare parameter in diffusers' MoEGate (no nn.Linear), so peft cannot adapt it.
NOT_LINEAR = (".ff_i.gate.weight",)
_ITEMSIZE = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}  # the float dtypes a LoRA tensor may have
SCAN_BYTES = 64 * 2**20
EXPORT_NUMPY_DTYPES = {"fp32": np.dtype(np.float32), "fp16": np.dtype(np.float16), "bf16": np.dtype(ml_dtypes.bfloat16)}
SHOWN = 3  # keys named in a message before "(+n more)"


def _listing(keys: Sequence[str]) -> str:
    keys = list(keys)
    more = f" (+{len(keys) - SHOWN} more)" if len(keys) > SHOWN else ""
    return ", ".join(keys[:SHOWN]) + more


# ---- what the user asks for --------------------------------------------------------------------------------

@dataclass(frozen=True)
class LoraRequest:
    """One LoRA to apply: its file and its scale (the `set_adapters` weight; 1.0 by default)."""

    path: Path
    scale: float = 1.0

    @classmethod
    def parse(cls, text: str, flag: str = "--lora") -> "LoraRequest":
        """`FILE` or `FILE:SCALE` (the last colon splits only when what follows is a number)."""
        head, sep, tail = str(text).rpartition(":")
        if sep and head:
            try:
                scale = float(tail)
            except ValueError:
                pass
            else:
                return cls.of((head, scale), flag)
        return cls.of((text, 1.0), flag)

    @classmethod
    def of(cls, item: "LoraRequest | str | Path | tuple", flag: str = "loras") -> "LoraRequest":
        """From a LoraRequest, a path (scale 1.0) or a (path, scale) pair."""
        if isinstance(item, LoraRequest):
            path, scale = item.path, item.scale
        elif isinstance(item, (str, Path)):
            path, scale = item, 1.0
        elif isinstance(item, (tuple, list)) and len(item) == 2:
            path, scale = item
        else:
            raise CheckpointInputError(f"{flag}: expected a file or a (file, scale) pair, got {item!r}")
        if isinstance(scale, bool) or not isinstance(scale, (int, float, np.integer, np.floating)) \
                or not math.isfinite(float(scale)):
            raise CheckpointInputError(f"{flag} {path}: the scale must be a finite number, got {scale!r}")
        return cls(Path(path), float(scale))


# ---- one file ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LoraModule:
    """One adapted layer: the checkpoint key of the weight it changes, where its factors are, alpha/rank.

    Factors are read when a delta is computed, not held: a LoRA on every layer of the 17B model is
    gigabytes, and the export streams weights in memory that does not grow with the model."""

    key: str
    path: Path
    down_key: str  # A (rank, in)
    up_key: str  # B (out, rank)
    rank: int
    shape: tuple[int, int]  # the shape of the weight it fits: (out, in)
    scaling: float  # alpha / rank (alpha / sqrt(rank) with rsLoRA)

    def factors(self) -> tuple[np.ndarray, np.ndarray]:
        """(A, B) as float32, read from the file now."""
        from safetensors import safe_open

        with safe_open(str(self.path), framework="numpy") as fh:
            return fh.get_tensor(self.down_key).astype(np.float32), fh.get_tensor(self.up_key).astype(np.float32)


@dataclass(frozen=True)
class LoraFile:
    """A LoRA file as read: where it is, its hash, layout, and its modules by checkpoint weight key."""

    path: Path
    sha256: str
    layout: str  # "diffusers", "peft" or "non-diffusers"
    factors: str  # "lora_A/lora_B" or "lora_down/lora_up"
    alpha_from: str  # "metadata", "alpha tensors" or "none (alpha = rank)"
    rslora: bool
    modules: dict[str, LoraModule] = field(repr=False)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def ranks(self) -> list[int]:
        return sorted({m.rank for m in self.modules.values()})

    @classmethod
    def read(cls, path: str | Path) -> "LoraFile":
        """Read and check a LoRA file on its own (the model is checked by `check`)."""
        path = Path(path)
        shapes, scalars, metadata = _scan(path)
        layout, by_module, alphas = _split_keys(path, shapes, scalars)
        config = _adapter_config(path, metadata, layout)
        if config is not None and alphas:
            raise CheckpointInputError(f"{path}: has both alpha tensors ({_listing(sorted(alphas))}) and "
                                       f"{METADATA_KEY}; a LoRA gives its alphas one way")
        modules, factors = {}, set()
        for module, parts in sorted(by_module.items()):
            lacking = [ROLE_NAMES[role] for role in ("down", "up") if role not in parts]
            if lacking:
                raise CheckpointInputError(f"{path}: module {module!r} has no {' and no '.join(lacking)} factor (a "
                                           f"LoRA module needs both)")
            down_key, up_key = parts["down"], parts["up"]
            down, up = shapes[down_key], shapes[up_key]
            factors.add("lora_A/lora_B" if down_key.endswith(".lora_A.weight") else "lora_down/lora_up")
            if len(down) != 2 or len(up) != 2:
                raise CheckpointInputError(f"{path}: {down_key} {list(down)} and {up_key} {list(up)} are not 2-D "
                                           f"factors of a linear layer's LoRA")
            rank = down[0]
            if up[1] != rank:
                raise CheckpointInputError(f"{path}: rank mismatch in {module!r}: {down_key} has rank {rank}, {up_key} "
                                           f"has {up[1]} ({list(down)} vs {list(up)})")
            alpha = _module_alpha(path, module, rank, config, alphas)
            root = math.sqrt(rank) if config and config.get("use_rslora") else rank
            modules[f"{module}.weight"] = LoraModule(f"{module}.weight", path, down_key, up_key, rank,
                                                     (up[0], down[1]), float(alpha) / root)
        if len(factors) > 1:
            raise CheckpointInputError(f"{path}: mixes lora_A/lora_B and lora_down/lora_up factor names")
        alpha_from = "metadata" if config is not None else ("alpha tensors" if alphas else "none (alpha = rank)")
        return cls(path, sha256_file(path), layout, factors.pop(), alpha_from,
                   bool(config and config.get("use_rslora")), modules)

    def check(self, shapes: Mapping[str, Sequence[int]], model: str = "the model") -> None:
        """Refuse, in one line, a LoRA that does not fit a transformer whose weights have these shapes
        (checkpoint key -> shape): another model family, modules it lacks, wrong shapes, non-linear layers."""
        keys = sorted(self.modules)
        absent = [k for k in keys if k not in shapes]
        if absent and len(absent) == len(keys):
            roots = {k.split(".")[0] for k in keys}
            hint = next((f"; its module names are those of {FAMILY_HINTS[r]}" for r in sorted(roots) if r in FAMILY_HINTS),
                        "")
            raise CheckpointInputError(f"{self.path}: not a LoRA for this HiDream-I1 transformer: none of its {len(keys)} "
                                       f"modules is a layer of {model} (e.g. {_listing([_module(k) for k in keys])}){hint}")
        if absent:
            raise CheckpointInputError(f"{self.path}: {len(absent)} LoRA modules are not layers of {model}: "
                                       f"{_listing([_module(k) for k in absent])}")
        not_linear = [k for k in keys if len(shapes[k]) != 2 or k.endswith(NOT_LINEAR)]
        if not_linear:
            raise CheckpointInputError(f"{self.path}: LoRA on layers that are not linear layers of {model}: "
                                       f"{_listing([_module(k) for k in not_linear])}")
        wrong = [k for k in keys if tuple(shapes[k]) != self.modules[k].shape]
        if wrong:
            shown = [f"{_module(k)} (LoRA {list(self.modules[k].shape)}, weight {list(shapes[k])})" for k in wrong]
            raise CheckpointInputError(f"{self.path}: shape mismatch with {model}: {_listing(shown)}")


def _module(key: str) -> str:
    return key[: -len(".weight")] if key.endswith(".weight") else key


def module_kind(key: str) -> str:
    """The kind of layer a checkpoint key belongs to, for `info` and messages."""
    if ".attn1." in key:
        return "attention"
    if ".ff_i.experts." in key:
        return "MoE experts"
    if ".ff_i.shared_experts." in key:
        return "MoE shared expert"
    if ".ff_i." in key or ".ff_t." in key:
        return "feed-forward"
    if "adaLN_modulation" in key:
        return "adaLN modulation"
    return "embedders and output"


def looks_like_lora(path: str | Path) -> bool:
    """Whether a .safetensors file holds LoRA factors (for `info`, which also takes checkpoints)."""
    path = Path(path)
    if not path.is_file() or _pickled(path):
        return False
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as fh:
            return any(k.endswith(tuple(FACTORS)) for k in fh.keys())
    except Exception:  # noqa: BLE001 - not a readable safetensors file: not a LoRA either
        return False


def _pickled(path: Path) -> bool:
    """A torch.save zip archive or a bare pickle (0x80, protocol 2..5), and not a safetensors file (an
    8-byte little-endian header length, then the JSON header's "{")."""
    with open(path, "rb") as fh:
        head = fh.read(9)
        size = fh.seek(0, 2)
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") <= size - 8:
        return False
    return head[:4] == b"PK\x03\x04" or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"))


def _scan(path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, float], dict[str, str]]:
    """(every tensor's shape, every one-element tensor's value, the header's metadata), once every tensor
    is checked to be a finite float. The file is opened again every SCAN_BYTES of tensors: safetensors
    memory-maps it, and the pages a read touches stay resident until the file is closed."""
    from safetensors import SafetensorError, safe_open

    if not path.exists():
        raise CheckpointInputError(f"{path}: no such LoRA file")
    if not path.is_file():
        raise CheckpointInputError(f"{path}: not a file (a LoRA is one .safetensors file)")
    if _pickled(path):
        raise CheckpointInputError(f"{path}: a pickle (PyTorch .pt/.bin/.ckpt) file; LoRAs are read from .safetensors "
                                   f"only and pickles are never opened (convert it with safetensors)")
    shapes: dict[str, tuple[int, ...]] = {}
    scalars: dict[str, float] = {}
    not_finite = []
    try:
        with safe_open(str(path), framework="numpy") as fh:
            metadata = dict(fh.metadata() or {})
            slices = {k: fh.get_slice(k) for k in fh.keys()}
            dtypes = {k: sl.get_dtype() for k, sl in slices.items()}
            shapes = {k: tuple(int(d) for d in sl.get_shape()) for k, sl in slices.items()}
        bad = [f"{k} ({d})" for k, d in dtypes.items() if d not in _ITEMSIZE]
        if bad:
            raise CheckpointInputError(f"{path}: LoRA tensors must be floats: {_listing(sorted(bad))}")
        batches, size = [[]], 0
        for key in sorted(shapes):
            size += math.prod(shapes[key]) * _ITEMSIZE[dtypes[key]]
            if size > SCAN_BYTES and batches[-1]:
                batches.append([])
                size = math.prod(shapes[key]) * _ITEMSIZE[dtypes[key]]
            batches[-1].append(key)
        for batch in batches:
            with safe_open(str(path), framework="numpy") as fh:
                for key in batch:
                    tensor = fh.get_tensor(key).astype(np.float32)
                    if not np.isfinite(tensor).all():
                        not_finite.append(key)
                    if tensor.size == 1:
                        scalars[key] = float(tensor.reshape(-1)[0])
                    del tensor
    except (SafetensorError, OSError, ValueError, TypeError) as exc:
        if isinstance(exc, CheckpointInputError):
            raise
        raise CheckpointInputError(f"{path}: not a readable safetensors file ({' '.join(str(exc).split())[:200]})") \
            from None
    if not shapes:
        raise CheckpointInputError(f"{path}: holds no tensors")
    if not_finite:
        raise CheckpointInputError(f"{path}: NaN or inf in {len(not_finite)} tensor(s): {_listing(sorted(not_finite))}")
    return shapes, scalars, metadata


def _split_keys(path: Path, shapes: Mapping[str, tuple[int, ...]], scalars: Mapping[str, float]):
    """(layout, module -> {"down"/"up": key}, module -> alpha) with every key accounted for."""
    keys = sorted(shapes)
    others = [k for k in keys if k.startswith(OTHER_COMPONENTS)]
    if others:
        raise CheckpointInputError(f"{path}: has LoRA keys for other components than the transformer (text encoders?): "
                                   f"{_listing(others)}; only transformer LoRAs are supported")
    found = {layout for prefix, layout in LAYOUT_PREFIXES.items() if any(k.startswith(prefix) for k in keys)}
    if len(found) > 1 or (found and not all(k.startswith(tuple(LAYOUT_PREFIXES)) for k in keys)):
        raise CheckpointInputError(f"{path}: mixes key layouts (e.g. {keys[0]}, {keys[-1]}); expected all keys under "
                                   f"'transformer.', all under 'diffusion_model.', or bare module names")
    layout = found.pop() if found else "peft"
    prefix = next((p for p, name in LAYOUT_PREFIXES.items() if name == layout), "")
    schemes: dict[str, list[str]] = {}
    by_module: dict[str, dict[str, str]] = {}
    alphas: dict[str, float] = {}
    for key in keys:
        rest = key[len(prefix):]
        suffix = next((s for s in FACTORS if rest.endswith(s)), None)
        if suffix is not None:
            by_module.setdefault(rest[: -len(suffix)], {})[FACTORS[suffix]] = key
            continue
        if rest.endswith(ALPHA) and key in scalars:
            alphas[rest[: -len(ALPHA)]] = scalars[key]
            continue
        scheme = next((name for frag, name in OTHER_SCHEMES.items() if frag in rest), "not a LoRA factor")
        schemes.setdefault(scheme, []).append(key)
    if schemes:
        named = "; ".join(f"{scheme}: {_listing(ks)}" for scheme, ks in schemes.items())
        raise CheckpointInputError(f"{path}: unsupported adapter keys ({named}); only plain LoRA (lora_A/lora_B or "
                                   f"lora_down/lora_up, optional alpha) is supported")
    stray = sorted(set(alphas) - set(by_module))
    if stray:
        raise CheckpointInputError(f"{path}: alpha for modules without LoRA factors: {_listing(stray)}")
    if not by_module:
        raise CheckpointInputError(f"{path}: no LoRA factors (lora_A/lora_B or lora_down/lora_up weights)")
    return layout, by_module, alphas


def _adapter_config(path: Path, metadata: Mapping[str, str], layout: str) -> dict | None:
    """The transformer's LoraConfig fields from the header, or None without any (alpha = rank then)."""
    raw = metadata.get(METADATA_KEY)
    if not raw:
        return None
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise CheckpointInputError(f"{path}: {METADATA_KEY} is not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointInputError(f"{path}: {METADATA_KEY} is not a JSON object")
    # diffusers prefixes each field with the component ("transformer.r"); a model's own save does not.
    prefixed = {k[len("transformer."):]: v for k, v in data.items() if k.startswith("transformer.")}
    config = prefixed if layout != "peft" or prefixed else data
    if not config:
        return None
    if str(config.get("peft_type") or "LORA").upper() != "LORA":
        raise CheckpointInputError(f"{path}: {METADATA_KEY} describes a {config['peft_type']} adapter; only LoRA is "
                                   f"supported")
    unsupported = [f"{k}={config[k]!r}" for k in UNSUPPORTED_CONFIG if config.get(k)]
    if unsupported:
        raise CheckpointInputError(f"{path}: unsupported LoRA settings in {METADATA_KEY}: {', '.join(unsupported)}")
    for name in ("r", "lora_alpha"):
        value = config.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value)):
            raise CheckpointInputError(f"{path}: {METADATA_KEY} field {name} must be a number, got {value!r}")
    return config


def _pattern_value(patterns: Mapping[str, object] | None, module: str, default):
    """peft's rank_pattern/alpha_pattern lookup: the first pattern matching the module name's end."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def _targeted(config: Mapping, module: str) -> bool:
    """Whether peft would put an adapter on `module` given target_modules (a list or a regex)."""
    targets = config.get("target_modules")
    if targets is None or targets == "all-linear":
        return True
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    return any(module == t or module.endswith(f".{t}") for t in targets)


def _module_alpha(path: Path, module: str, rank: int, config: Mapping | None, alphas: Mapping[str, float]) -> float:
    if config is None:
        alpha = alphas.get(module, rank)
        if not math.isfinite(alpha):
            raise CheckpointInputError(f"{path}: alpha of {module!r} is not finite")
        return alpha
    if not _targeted(config, module):
        raise CheckpointInputError(f"{path}: has factors for {module!r}, which its {METADATA_KEY} target_modules "
                                   f"does not list (peft would leave them unused)")
    declared = _pattern_value(config.get("rank_pattern"), module, config.get("r", 8))
    if declared != rank:
        raise CheckpointInputError(f"{path}: rank mismatch in {module!r}: {METADATA_KEY} gives r={declared}, its "
                                   f"factors have rank {rank}")
    return float(_pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", 8)))


# ---- applied together ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LoraSet:
    """LoRAs applied together, in order: (file, scale) pairs. Empty: the model as it is."""

    items: tuple[tuple[LoraFile, float], ...] = ()

    def __bool__(self) -> bool:
        return bool(self.items)

    @property
    def keys(self) -> list[str]:
        """Checkpoint keys of every weight some LoRA changes."""
        return sorted({k for f, _ in self.items for k in f.modules})

    def check(self, shapes: Mapping[str, Sequence[int]], model: str = "the model") -> None:
        """LoraFile.check for each LoRA."""
        for lora, _ in self.items:
            lora.check(shapes, model)

    def records(self) -> list[LoraRecord]:
        return [LoraRecord(f.name, f.sha256, s) for f, s in self.items]

    def identity(self) -> list[dict]:
        """What makes two sets give the same weights (hash and scale, in order; not the file names)."""
        return [{"sha256": f.sha256, "scale": s} for f, s in self.items]

    def terms(self, key: str) -> list[tuple[np.float32, np.ndarray, np.ndarray]]:
        """(scale * alpha/rank, A, B) of every LoRA that changes weight `key`, factors read now."""
        terms = []
        for lora, scale in self.items:
            module = lora.modules.get(key)
            if module is not None:
                terms.append((np.float32(scale * module.scaling), *module.factors()))
        if not terms:
            raise KeyError(key)
        return terms

    @staticmethod
    def delta(terms, rows: slice = slice(None)) -> np.ndarray:
        """float32 delta (its `rows`) of one weight: sum of scale * alpha/rank * (B @ A) over `terms` (the
        small factor B is scaled, not the product: one weight-sized array, not two)."""
        out = None
        for coefficient, down, up in terms:
            part = np.matmul(up[rows] * coefficient, down)
            if out is None:
                out = part
            else:
                out += part
        return out

    def fused(self, key: str, base: np.ndarray) -> np.ndarray:
        """`base` + delta, added in float32 and cast back to base's dtype once."""
        out = self.delta(self.terms(key))
        np.add(base, out, out=out)
        return out if base.dtype == out.dtype else out.astype(base.dtype)

    def fuse_pieces(self, key: str, shape: Sequence[int], pieces: Iterable[np.ndarray], dtype: np.dtype
                    ) -> Iterator[memoryview]:
        """The bytes of weight `key` + delta as `dtype`, from its float32 values given in order, piece by
        piece (flat arrays of any length): only the delta rows a piece covers are computed, so memory
        stays at one piece whatever the weight's size."""
        cols = int(shape[1])
        terms = self.terms(key)
        start = 0
        for piece in pieces:
            n = piece.size
            if not n:
                continue
            first, last = start // cols, (start + n - 1) // cols + 1
            rows = self.delta(terms, slice(first, last)).reshape(-1)
            offset = start - first * cols
            out = np.add(piece, rows[offset:offset + n], dtype=np.float32).astype(dtype, copy=False)
            start += n
            yield memoryview(out.view(np.uint8))
        total = math.prod(int(d) for d in shape)
        if start != total:
            raise ValueError(f"weight {key!r}: got {start} values for shape {list(shape)} ({total})")


def load_loras(requests: Iterable["LoraRequest | str | Path | tuple"]) -> LoraSet:
    """Read every requested LoRA (in order) as one LoraSet; the first that is refused raises."""
    return LoraSet(tuple((LoraFile.read(r.path), r.scale) for r in map(LoraRequest.of, requests)))
