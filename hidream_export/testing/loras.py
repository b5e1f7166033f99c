"""Random LoRA files for tests and benchmarks, in the layouts trainers write (nothing is downloaded).

    factors = random_factors(config, modules, rank=4, seed=0)        # module -> (A (r, in), B (out, r))
    write_lora(path, factors, "diffusers", alphas={...})              # transformer.*, alpha in the metadata
    write_lora(path, factors, "non-diffusers", alphas={...})          # diffusion_model.*, lora_down/up + alpha
    write_lora(path, factors, "ai-toolkit")                           # diffusion_model.*, lora_A/B, alpha = rank
    write_lora(path, factors, "peft", alphas={...})                   # bare module names, LoraConfig metadata

`alphas` (module -> alpha; default: alpha = rank) go where each layout keeps them: LoraConfig fields
(`r`, `lora_alpha` = the most common alpha, `alpha_pattern` for the others, anchored with `^` as
diffusers writes them) or one scalar `<module>.alpha` tensor per module.
"""

from __future__ import annotations

import collections
import hashlib
import json
import math
from pathlib import Path
from typing import Iterable, Mapping

import torch

from hidream_export.files import atomic_open
from hidream_export.model.checkpoint import expected_shapes
from hidream_export.model.config import TransformerConfig, resolve_config

LAYOUTS = ("diffusers", "peft", "ai-toolkit", "non-diffusers")
METADATA_KEY = "lora_adapter_metadata"

# The layers of block 0/1 of each kind a test LoRA touches: attention, routed and shared experts, the dense
# text feed-forward and adaLN, in both block kinds.
STYLE_MODULES = (
    "double_stream_blocks.0.block.attn1.to_q", "double_stream_blocks.0.block.attn1.to_k_t",
    "double_stream_blocks.0.block.attn1.to_out", "double_stream_blocks.0.block.ff_i.experts.0.w1",
    "double_stream_blocks.0.block.ff_i.experts.2.w2", "double_stream_blocks.0.block.ff_i.shared_experts.w3",
    "single_stream_blocks.1.block.attn1.to_v", "single_stream_blocks.1.block.ff_i.experts.3.w3",
    "single_stream_blocks.1.block.ff_i.shared_experts.w1", "single_stream_blocks.1.block.adaLN_modulation.1",
)
DETAIL_MODULES = (
    "double_stream_blocks.1.block.attn1.to_v", "double_stream_blocks.1.block.attn1.to_out_t",
    "double_stream_blocks.1.block.ff_i.experts.1.w2", "double_stream_blocks.1.block.ff_i.shared_experts.w2",
    "double_stream_blocks.1.block.ff_t.w1", "single_stream_blocks.0.block.attn1.to_q",
    "single_stream_blocks.0.block.ff_i.experts.0.w3", "single_stream_blocks.0.block.ff_i.shared_experts.w3",
)


def attention_modules(config: TransformerConfig) -> list[str]:
    """Every attention projection of every block (the layers most LoRA trainers adapt)."""
    return sorted(k.removesuffix(".weight") for k in expected_shapes(config)
                  if ".attn1.to_" in k and k.endswith(".weight"))


def random_factors(config: "TransformerConfig | str", modules: Iterable[str], rank: int, seed: int = 0,
                   strength: float = 0.5, dtype: torch.dtype = torch.float32) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module -> (A (rank, in), B (out, rank)) with B @ A about `strength` times a weight's typical size
    (the random checkpoints' weights are N(0, 1/in))."""
    shapes = expected_shapes(resolve_config(config))
    out = {}
    for module in modules:
        rows, cols = shapes[f"{module}.weight"]
        digest = hashlib.sha256(f"{seed}:{module}".encode()).digest()
        g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
        down = torch.randn(rank, cols, generator=g) / math.sqrt(cols)
        up = torch.randn(rows, rank, generator=g) * strength / math.sqrt(rank)
        out[module] = (down.to(dtype).contiguous(), up.to(dtype).contiguous())
    return out


def lora_config(factors: Mapping, alphas: Mapping[str, float] | None) -> dict:
    """The LoraConfig fields diffusers and peft write for these factors (rank_pattern/alpha_pattern for the
    modules off the most common value)."""
    ranks = {m: a.shape[0] for m, (a, _) in factors.items()}
    alphas = {m: float(alphas[m]) if alphas and m in alphas else float(ranks[m]) for m in factors}
    r = collections.Counter(ranks.values()).most_common(1)[0][0]
    alpha = collections.Counter(alphas.values()).most_common(1)[0][0]
    return {"r": r, "lora_alpha": alpha, "target_modules": sorted(factors),
            "rank_pattern": {f"^{m}": v for m, v in sorted(ranks.items()) if v != r},
            "alpha_pattern": {f"^{m}": v for m, v in sorted(alphas.items()) if v != alpha},
            "use_dora": False, "lora_bias": False, "peft_type": "LORA"}


def write_lora(path: str | Path, factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]], layout: str = "diffusers",
               alphas: Mapping[str, float] | None = None, extra: Mapping[str, torch.Tensor] | None = None,
               metadata: Mapping[str, str] | None = None) -> Path:
    """Write `factors` as a LoRA file in `layout` (one of LAYOUTS); `extra` tensors and `metadata` are added
    as given (tests use them to write files that must be refused)."""
    from safetensors.torch import save

    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r} is not one of {LAYOUTS}")
    if layout == "ai-toolkit" and alphas:
        raise ValueError("the ai-toolkit layout carries no alphas (alpha = rank)")
    prefix = {"diffusers": "transformer.", "peft": "", "ai-toolkit": "diffusion_model.",
              "non-diffusers": "diffusion_model."}[layout]
    names = ("lora_down", "lora_up") if layout == "non-diffusers" else ("lora_A", "lora_B")
    tensors = {}
    for module, (down, up) in factors.items():
        tensors[f"{prefix}{module}.{names[0]}.weight"] = down
        tensors[f"{prefix}{module}.{names[1]}.weight"] = up
        if layout == "non-diffusers" and alphas and module in alphas:
            tensors[f"{prefix}{module}.alpha"] = torch.tensor(float(alphas[module]))
    meta = {"format": "pt"}
    if layout in ("diffusers", "peft"):
        config = lora_config(factors, alphas)
        if layout == "diffusers":
            config = {f"transformer.{k}": v for k, v in config.items()}
        meta[METADATA_KEY] = json.dumps(config, indent=2, sort_keys=True)
    tensors.update(extra or {})
    meta.update(metadata or {})
    path = Path(path)
    with atomic_open(path, "wb") as fh:
        fh.write(save({k: v.clone().contiguous() for k, v in tensors.items()}, metadata=meta))
    return path
