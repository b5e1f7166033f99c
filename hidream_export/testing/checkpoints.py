"""Random-weight checkpoints in the exact on-disk layout of the real HiDream-I1 ones.

Tests and the README's demo never download anything: they run on folders written here. Tensors are
generated one key at a time (seeded per key), so even the real 17B layout can be written while holding
only one shard in memory.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from hidream_export.files import atomic_open, staged_dir, swap_dir
from hidream_export.model.checkpoint import CONFIG_NAME, INDEX_NAME, WEIGHTS_NAME, expected_shapes
from hidream_export.model.config import TransformerConfig, resolve_config

# The real checkpoint ships as 7 shards (~5 GB each); smaller presets use this shard size when sharded.
REAL_SHARD_BYTES = 5 * 10**9


def _key_generator(seed: int, key: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def random_tensor(key: str, shape: tuple[int, ...], seed: int, dtype: torch.dtype) -> torch.Tensor:
    """A plausible random value for a transformer weight: norms at 1, small biases, fan-in scaled weights.

    Biases are non-zero on purpose: the padding tokens of non-square inputs are the patch-embed bias, and
    a zero bias would hide mistakes in that path."""
    gen = _key_generator(seed, key)
    if key.endswith("rms_norm.weight") or key.endswith("rms_norm_t.weight"):
        return (1 + 0.1 * torch.randn(shape, generator=gen)).to(dtype)
    if len(shape) == 1:
        return (0.02 * torch.randn(shape, generator=gen)).to(dtype)
    fan_in = shape[-1]
    return (torch.randn(shape, generator=gen) / math.sqrt(fan_in)).to(dtype)


def random_state(config: TransformerConfig, seed: int = 0, dtype: torch.dtype = torch.float32
                 ) -> Iterator[tuple[str, torch.Tensor]]:
    for key, shape in expected_shapes(config).items():
        yield key, random_tensor(key, shape, seed, dtype)


def write_transformer(out_dir: str | Path, config: "TransformerConfig | str" = "tiny", seed: int = 0,
                      dtype: torch.dtype = torch.float32, shards: int | None = None,
                      single_file: bool = False) -> Path:
    """Write `out_dir` as a diffusers `transformer/` folder (or, with single_file, one .safetensors file
    with the `model.diffusion_model.` prefix, ComfyUI style). `shards=n` splits into about n shards with
    an index file, like the real checkpoint (7 shards)."""
    config = resolve_config(config)
    shapes = expected_shapes(config)
    if single_file:
        from safetensors.torch import save

        out = Path(out_dir)
        with atomic_open(out, "wb") as fh:
            fh.write(save({f"model.diffusion_model.{k}": v for k, v in random_state(config, seed, dtype)}))
        return out
    shard_of = None
    if shards and shards > 1:
        # Cut by byte offset so the folder has exactly `shards` files of about equal size.
        sizes = {k: math.prod(s) for k, s in shapes.items()}
        total, start, shard_of = sum(sizes.values()), 0, {}
        for key, size in sizes.items():
            shard_of[key] = min(shards - 1, start * shards // total)
            start += size
    # No extra metadata: safetensors writes metadata keys in hash-map order, and the same seed must give
    # byte-identical files.
    return save_transformer(random_state(config, seed, dtype), config, out_dir, shard_of=shard_of)


def save_transformer(tensors: Iterable[tuple[str, torch.Tensor]], config: TransformerConfig, out_dir: str | Path,
                     shard_of: dict[str, int] | None = None, metadata: dict[str, str] | None = None) -> Path:
    """Write a diffusers-format `transformer/` folder: config.json + one safetensors file, or shards
    `diffusion_pytorch_model-0000i-of-0000n.safetensors` with the index file when `shard_of` (key ->
    shard number, non-decreasing in iteration order) is given.

    `tensors` may be a generator: at most one shard is held in memory. The folder is written next to
    its destination and renamed into place, so a crash never leaves a half-written checkpoint.
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    tmp = staged_dir(out_dir.parent, out_dir.name)
    try:
        shards: list[list[str]] = []
        weight_map: dict[str, str] = {}
        total = 0
        current: dict[str, torch.Tensor] = {}
        meta = {"format": "pt", **(metadata or {})}

        def flush() -> None:
            nonlocal current
            if current:
                save_file(current, tmp / f"shard-{len(shards):05d}.tmp", metadata=meta)
                shards.append(list(current))
                current = {}

        shard = 0
        for name, tensor in tensors:
            if shard_of is not None and shard_of[name] != shard:
                flush()
                shard = shard_of[name]
            current[name] = tensor.contiguous()
            total += tensor.numel() * tensor.element_size()
        flush()
        if shard_of is None:
            os.replace(tmp / "shard-00000.tmp", tmp / WEIGHTS_NAME)
        else:
            n = len(shards)
            for i, keys in enumerate(shards):
                fname = f"diffusion_pytorch_model-{i + 1:05d}-of-{n:05d}.safetensors"
                os.replace(tmp / f"shard-{i:05d}.tmp", tmp / fname)
                weight_map.update({k: fname for k in keys})
            (tmp / INDEX_NAME).write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
        (tmp / CONFIG_NAME).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        swap_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
