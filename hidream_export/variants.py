"""The three HiDream-I1 variants: the one place their sampling recipes and export ranges live.

Every command (export, build, generate) and the runtime read these; nothing else hard-codes steps,
guidance, shifts, batch factors or the default output folder. The values are those of the official
HiDream-I1 inference.py and of the scheduler configs shipped in the HiDream-I1 model folders. Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hidream_export.errors import ExportError, RequestError

# HiDream pipelines rescale every request to about one megapixel (1024^2), in multiples of 16 px.
TARGET_AREA = 1024 * 1024
SIZE_MULTIPLE = 16
VAE_SCALE = 8  # pixels per latent cell
TEXT_LENGTH = 128  # tokens, every text encoder

# Recommended sizes (official inference.py), as (width, height).
RECOMMENDED_SIZES = ((1024, 1024), (768, 1360), (1360, 768), (880, 1168), (1168, 880), (1248, 832), (832, 1248))


def parse_size(text: str) -> tuple[int, int]:
    """'1024x768' -> (1024, 768) as (width, height)."""
    try:
        w, h = (int(v) for v in str(text).lower().split("x"))
    except ValueError:
        raise RequestError(f"size {text!r} must look like WIDTHxHEIGHT, e.g. 1024x1024") from None
    return w, h


@dataclass(frozen=True)
class SizeRange:
    """Pixel sizes an export serves, as (width, height) pairs: every size with min <= size <= max per
    axis, in multiples of SIZE_MULTIPLE; `opt` is what the TensorRT profile optimises for."""

    min: tuple[int, int]
    max: tuple[int, int]
    opt: tuple[int, int]

    def __post_init__(self) -> None:
        for name in ("min", "max", "opt"):
            value = getattr(self, name)
            if len(value) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
                raise ExportError(f"--{name}-size must be two integers WIDTHxHEIGHT, got {value!r}")
            w, h = value
            if w % SIZE_MULTIPLE or h % SIZE_MULTIPLE or w <= 0 or h <= 0:
                raise ExportError(f"--{name}-size {w}x{h} must be positive multiples of {SIZE_MULTIPLE}")
        if not (self.min[0] <= self.opt[0] <= self.max[0] and self.min[1] <= self.opt[1] <= self.max[1]):
            raise ExportError(
                f"sizes must satisfy min <= opt <= max per axis, got --min-size {self.min[0]}x{self.min[1]} "
                f"--opt-size {self.opt[0]}x{self.opt[1]} --max-size {self.max[0]}x{self.max[1]}")

    def check(self, width: int, height: int, max_seq: int | None = None, patch_px: int = SIZE_MULTIPLE) -> None:
        """Raise RequestError unless (width, height) is in range; with `max_seq`, also unless the transformer
        can run it (non-square inputs are padded to max_seq image tokens of patch_px x patch_px pixels)."""
        for name, v, lo, hi in (("width", width, self.min[0], self.max[0]), ("height", height, self.min[1], self.max[1])):
            if not isinstance(v, int) or isinstance(v, bool) or v % SIZE_MULTIPLE:
                raise RequestError(f"{name}={v!r} must be an integer multiple of {SIZE_MULTIPLE}")
            if not lo <= v <= hi:
                raise RequestError(
                    f"{name}={v} is outside the exported range {self.describe()}")
        tokens = (width // patch_px) * (height // patch_px)
        if max_seq is not None and width != height and tokens > max_seq:
            raise RequestError(
                f"{width}x{height} is not square and needs {tokens} image tokens, but the transformer pads "
                f"non-square inputs to max_seq={max_seq} tokens (a {patch_px}-px patch each), so it "
                f"cannot run; use a square size or one with (width/{patch_px})*(height/{patch_px}) <= "
                f"{max_seq} within {self.describe()}")

    def describe(self) -> str:
        return (f"{self.min[0]}x{self.min[1]} .. {self.max[0]}x{self.max[1]} px (WxH, multiples of "
                f"{SIZE_MULTIPLE})")

    def to_dict(self) -> dict:
        return {"min": list(self.min), "max": list(self.max), "opt": list(self.opt)}

    @classmethod
    def from_dict(cls, d: dict) -> "SizeRange":
        return cls(tuple(d["min"]), tuple(d["max"]), tuple(d["opt"]))

    def contains(self, width: int, height: int) -> bool:
        return self.min[0] <= width <= self.max[0] and self.min[1] <= height <= self.max[1]


@dataclass(frozen=True)
class Variant:
    name: str
    steps: int
    guidance_scale: float
    shift: float
    scheduler: str  # "flow_unipc" (Full) or "flash_flow_euler" (Dev, Fast)
    diffusers_scheduler: str  # class named in the HF model folder's scheduler_config.json
    timestep_dtype: str  # what the transformer is fed: int64 (UniPC truncates) or float32
    # The real model's default export range; size_range_for() scales it for smaller configs. What an
    # export serves is the range its manifest's transformer entry records, not this.
    size_range: SizeRange = SizeRange((512, 512), (1360, 1360), (1024, 1024))

    @property
    def uses_cfg(self) -> bool:
        return self.guidance_scale > 1.0

    @property
    def cfg_batch_factor(self) -> int:
        """Transformer batch per image: CFG feeds [negative, positive]."""
        return 2 if self.uses_cfg else 1

    @property
    def default_out_dir(self) -> Path:
        """Where export and build write this variant unless told (`--out`)."""
        return Path("engines") / self.name


VARIANTS: dict[str, Variant] = {
    "full": Variant("full", 50, 5.0, 3.0, "flow_unipc", "UniPCMultistepScheduler", "int64"),
    "dev": Variant("dev", 28, 0.0, 6.0, "flash_flow_euler", "FlowMatchLCMScheduler", "float32"),
    "fast": Variant("fast", 16, 0.0, 3.0, "flash_flow_euler", "FlowMatchLCMScheduler", "float32"),
}


def get_variant(variant: "str | Variant") -> Variant:
    """A Variant from its name (a Variant is returned as it is)."""
    if isinstance(variant, Variant):
        return variant
    try:
        return VARIANTS[variant]
    except (KeyError, TypeError):
        raise ExportError(f"--variant {variant!r} is not one of {sorted(VARIANTS)}") from None


def size_range_for(variant: Variant, max_resolution: tuple[int, int]) -> SizeRange:
    """The variant's pixel range, scaled to a model whose trained latent grid is `max_resolution`
    (the real model's is 128x128 latents = 1024 px; tiny test models are smaller)."""
    scale = max(max_resolution) / 128
    if scale == 1:
        return variant.size_range

    def px(v: float) -> int:
        return max(SIZE_MULTIPLE, int(round(v * scale / SIZE_MULTIPLE)) * SIZE_MULTIPLE)

    r = variant.size_range
    return SizeRange((px(r.min[0]), px(r.min[1])), (px(r.max[0]), px(r.max[1])), (px(r.opt[0]), px(r.opt[1])))


def default_size(target_area: int = TARGET_AREA, width: int | None = None, height: int | None = None) -> tuple[int, int]:
    """HiDream's size rule: rescale (width, height) to about `target_area` pixels, floor to multiples of 16.

    Same arithmetic as the reference pipelines: scale = sqrt(area / (W*H)), side = int(side*scale // 16 * 16).
    """
    side = int(round(target_area ** 0.5))
    width = width or side
    height = height or side
    scale = (target_area / (width * height)) ** 0.5
    return int(width * scale // SIZE_MULTIPLE * SIZE_MULTIPLE), int(height * scale // SIZE_MULTIPLE * SIZE_MULTIPLE)
