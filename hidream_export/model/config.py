"""Transformer hyper-parameters, named exactly like the diffusers `transformer/config.json` keys.

A config read from a real checkpoint and one built from a preset are the same object, so every later
stage (export, engine build, runtime) derives its shapes from here and nowhere else.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A transformer config that cannot describe a HiDream-I1 model; the message names the field."""


# Sanity bounds, far above any HiDream-I1 size but low enough that a typo cannot make the model builder
# allocate for minutes before the weights are compared with the config.
MAX_LAYERS = 1024
MAX_WIDTH = 65536
MAX_EXPERTS = 1024


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def swiglu_hidden_dim(hidden_dim: int, multiple_of: int = 256) -> int:
    """Hidden width of HiDream's SwiGLU for a nominal `hidden_dim` (2/3 of it, rounded up to 256)."""
    hidden = int(2 * hidden_dim / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


@dataclass(frozen=True)
class TransformerConfig:
    patch_size: int = 2
    in_channels: int = 16
    out_channels: int | None = 16
    num_layers: int = 16
    num_single_layers: int = 32
    attention_head_dim: int = 128
    num_attention_heads: int = 20
    caption_channels: tuple[int, int] = (4096, 4096)
    text_emb_dim: int = 2048
    num_routed_experts: int = 4
    num_activated_experts: int = 2
    axes_dims_rope: tuple[int, ...] = (64, 32, 32)
    max_resolution: tuple[int, int] = (128, 128)
    llama_layers: tuple[int, ...] = field(default_factory=lambda: tuple(range(32)) + (31,) * 16)

    def __post_init__(self) -> None:
        # Accept lists from JSON but store tuples so the config is hashable and immutable.
        for name in ("caption_channels", "axes_dims_rope", "max_resolution", "llama_layers"):
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)) or not all(_is_int(v) for v in value):
                raise ConfigError(f"TransformerConfig.{name} must be a list of integers, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        if self.out_channels is None:
            object.__setattr__(self, "out_channels", self.in_channels)
        self.validate()

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def num_blocks(self) -> int:
        return self.num_layers + self.num_single_layers

    @property
    def max_seq(self) -> int:
        """Image-token count that non-square latents are padded to (the official quirk)."""
        return self.max_resolution[0] * self.max_resolution[1] // (self.patch_size * self.patch_size)

    @property
    def expert_hidden_dim(self) -> int:
        return swiglu_hidden_dim(4 * self.inner_dim)

    @property
    def shared_expert_hidden_dim(self) -> int:
        return swiglu_hidden_dim(2 * self.inner_dim)

    @property
    def num_llama_layers(self) -> int:
        """Length of the Llama hidden-state stack the model indexes (first axis of its input)."""
        return max(self.llama_layers) + 1

    @property
    def t5_dim(self) -> int:
        return self.caption_channels[0]

    @property
    def llama_dim(self) -> int:
        return self.caption_channels[1]

    # ---- validation ----------------------------------------------------------------------------
    def validate(self) -> None:
        """Types and bounds of every field, before anything is built from the config."""
        def integer(name: str, lo: int, hi: int) -> None:
            value = getattr(self, name)
            if not _is_int(value) or not lo <= value <= hi:
                raise ConfigError(f"TransformerConfig.{name} must be an integer in {lo}..{hi}, got {value!r}")

        for name in ("patch_size", "in_channels", "out_channels", "attention_head_dim", "num_attention_heads"):
            integer(name, 1, 4096)
        integer("text_emb_dim", 1, MAX_WIDTH)
        for name in ("num_layers", "num_single_layers"):
            integer(name, 0, MAX_LAYERS)
        integer("num_routed_experts", 0, MAX_EXPERTS)
        integer("num_activated_experts", 0, MAX_EXPERTS)
        # Checked in order; the first rule that fails is the message. Lambdas, because a rule may only be
        # evaluated once the ones before it hold (the rope check sums entries the length check counted).
        caption, rope, res, llama = (list(self.caption_channels), list(self.axes_dims_rope),
                                     list(self.max_resolution), list(self.llama_layers))
        rules = (
            (lambda: self.inner_dim <= MAX_WIDTH,
             f"num_attention_heads * attention_head_dim = {self.inner_dim} exceeds {MAX_WIDTH}"),
            (lambda: len(caption) == 2 and all(0 < d <= MAX_WIDTH for d in caption),
             f"caption_channels must be [t5_dim, llama_dim], two integers in 1..{MAX_WIDTH}, got {caption}"),
            (lambda: len(res) == 2 and all(0 < r <= 4096 and r % self.patch_size == 0 for r in res),
             f"max_resolution must be two multiples of patch_size={self.patch_size} in 1..4096, got {res}"),
            (lambda: self.num_blocks > 0, "num_layers + num_single_layers must be >= 1 (at least one block), got 0"),
            (lambda: self.num_routed_experts == 0 or 1 <= self.num_activated_experts <= self.num_routed_experts,
             f"num_activated_experts must be in 1..num_routed_experts={self.num_routed_experts}, "
             f"got {self.num_activated_experts}"),
            (lambda: all(d > 0 and d % 2 == 0 for d in rope),
             f"axes_dims_rope entries must be positive and even, got {rope}"),
            (lambda: len(rope) == 3, f"axes_dims_rope must have 3 entries (one per id axis), got {len(rope)}: {rope}"),
            (lambda: sum(rope) == self.attention_head_dim,
             f"axes_dims_rope must sum to attention_head_dim={self.attention_head_dim}, got sum({rope}) = {sum(rope)}"),
            (lambda: len(llama) == self.num_blocks,
             f"llama_layers needs one entry per block: num_layers + num_single_layers = {self.num_layers} + "
             f"{self.num_single_layers} = {self.num_blocks}, got {len(llama)}"),
            (lambda: min(llama) >= 0, f"llama_layers must be >= 0, got {llama}"),
        )
        for holds, message in rules:
            if not holds():
                raise ConfigError(f"TransformerConfig.{message}")

    # ---- (de)serialisation ---------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TransformerConfig":
        """Build from a diffusers config dict; keys that are not transformer shape parameters
        (`_class_name`, `_diffusers_version`, `force_inference_output`, ...) are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    @classmethod
    def from_file(cls, path: str | Path) -> "TransformerConfig":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"transformer config not found: {path}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc})") from None
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read ({exc.strerror or exc})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: not a JSON object")
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as exc:  # ConfigError, or a field type the dataclass rejects
            raise ConfigError(f"{path}: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        """The diffusers `config.json` content for this config."""
        out: dict[str, Any] = {"_class_name": "HiDreamImageTransformer2DModel"}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    # ---- work per forward (no model needed) ------------------------------------------------------
    def forward_flops(self, width_px: int, height_px: int, batch: int = 1, text_tokens: int = 128) -> int:
        """Floating-point operations (2 per multiply-add) of one forward at a square size, with each token
        through its top-k routed experts only: what the model needs, not what a dense lowering spends.
        Counts matmuls and attention; norms, activations and routing softmax are below 0.1%.
        77.8 TFLOP for the real config at 1024x1024, batch 1."""
        D, p = self.inner_dim, self.patch_size
        n_img = (height_px // (8 * p)) * (width_px // (8 * p)) + 1  # + the padding token
        t5, llama = text_tokens, text_tokens
        k = self.num_activated_experts if self.num_routed_experts else 0

        def ffn(tokens: int) -> int:  # shared expert + k routed experts + router, or a dense SwiGLU
            if not self.num_routed_experts:
                return 2 * tokens * 3 * D * self.expert_hidden_dim
            return 2 * tokens * (3 * D * self.shared_expert_hidden_dim + k * 3 * D * self.expert_hidden_dim
                                 + D * self.num_routed_experts)

        txt = t5 + llama + llama  # T5 + the last Llama layer, + this block's Llama layer
        seq = n_img + txt
        double = 8 * (n_img + txt) * D * D + 4 * seq * seq * D + ffn(n_img) + 2 * txt * 3 * D * self.expert_hidden_dim
        single = 8 * seq * D * D + 4 * seq * seq * D + ffn(seq)
        prologue = (2 * llama * self.llama_dim * D * self.num_blocks + 2 * t5 * self.t5_dim * D
                    + 2 * n_img * p * p * self.in_channels * D)
        epilogue = 2 * n_img * D * p * p * self.out_channels
        return batch * (self.num_layers * double + self.num_single_layers * single + prologue + epilogue)

    # ---- parameter counts (no model needed) ----------------------------------------------------
    def parameter_counts(self) -> dict[str, int]:
        """Total and per-image-token active parameter counts, derived from the shapes alone."""
        D, E, k = self.inner_dim, self.num_routed_experts, self.num_activated_experts
        ffn = 3 * D * self.expert_hidden_dim
        shared = 3 * D * self.shared_expert_hidden_dim
        attn_stream = 4 * (D * D + D) + 2 * D
        if E > 0:
            moe_total, moe_active = E * D + shared + E * ffn, E * D + shared + k * ffn
        else:
            moe_total = moe_active = ffn
        double = (12 * D * D + 12 * D) + 2 * attn_stream + ffn
        single = (6 * D * D + 6 * D) + attn_stream
        embed = (256 * D + D + D * D + D) + (self.text_emb_dim * D + D + D * D + D) + (
            self.patch_size ** 2 * self.in_channels * D + D)
        final = (2 * D * D + 2 * D) + (D * self.patch_size ** 2 * self.out_channels + self.patch_size ** 2 * self.out_channels)
        captions = self.num_blocks * self.llama_dim * D + self.t5_dim * D
        dense_part = embed + final + captions + self.num_layers * double + self.num_single_layers * single
        total = dense_part + self.num_blocks * moe_total
        active = dense_part + self.num_blocks * moe_active
        return {"total": total, "active_per_token": active}


PRESETS: dict[str, TransformerConfig] = {
    # The 17.1B configuration shared by HiDream-I1 Full, Dev and Fast.
    "real": TransformerConfig(),
    # A few hundred million parameters with the real text widths: for benchmarks.
    "small": TransformerConfig(
        num_layers=4, num_single_layers=8, attention_head_dim=64, num_attention_heads=10,
        axes_dims_rope=(32, 16, 16),
        llama_layers=(0, 4, 8, 12, 16, 20, 24, 28, 31, 31, 31, 31)),
    # About 10x `small` (3.1B parameters, 6.2 GB in bf16): the export scaling benchmark.
    "large": TransformerConfig(
        num_layers=8, num_single_layers=16, attention_head_dim=128, num_attention_heads=12,
        llama_layers=(0, 4, 8, 12, 16, 20, 24, 28) + (31,) * 16),
    # Fast enough for unit tests; keeps every structural feature (4 experts top-2, both block kinds,
    # more than one Llama layer, distinct T5 and Llama widths).
    "tiny": TransformerConfig(
        in_channels=16, out_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, caption_channels=(32, 24), text_emb_dim=32, axes_dims_rope=(8, 4, 4),
        max_resolution=(32, 32), llama_layers=(0, 1, 2, 2)),
}


def get_preset(name: str) -> TransformerConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown transformer preset {name!r}; expected one of {sorted(PRESETS)}") from None


def resolve_config(config: "TransformerConfig | str | Path | dict") -> TransformerConfig:
    """A config object, a preset name, a path to config.json, or a dict."""
    if isinstance(config, TransformerConfig):
        return config
    if isinstance(config, dict):
        return TransformerConfig.from_dict(config)
    if isinstance(config, str) and config in PRESETS:
        return PRESETS[config]
    path = Path(config)
    if path.is_dir():
        path = path / "config.json"
    if path.suffix == ".json" or path.exists():
        return TransformerConfig.from_file(path)
    raise ConfigError(f"config {str(config)!r} is neither a preset {sorted(PRESETS)} nor a config.json file")
