"""`hidream-export info`: what a checkpoint holds, read from its headers alone (no weights loaded)."""

from __future__ import annotations

import math
from pathlib import Path

from hidream_export.export.common import model_errors
from hidream_export.model.checkpoint import locate_checkpoint

GROUPS = ("t_embedder", "p_embedder", "x_embedder", "caption_projection", "double_stream_blocks",
          "single_stream_blocks", "final_layer")


def checkpoint_info(path: str | Path, config=None) -> dict:
    with model_errors():
        ckpt = locate_checkpoint(path, config)
    groups: dict[str, dict] = {}
    total = 0
    for name, entry in ckpt.entries.items():
        group = name.split(".")[0] if name.split(".")[0] in GROUPS else "other"
        if group in ("double_stream_blocks", "single_stream_blocks") and ".ff_i." in name:
            group += ".moe"
        n = math.prod(entry.shape)
        total += n
        g = groups.setdefault(group, {"tensors": 0, "parameters": 0, "dtypes": {}})
        g["tensors"] += 1
        g["parameters"] += n
        g["dtypes"][entry.dtype] = g["dtypes"].get(entry.dtype, 0) + 1
    counts = ckpt.config.parameter_counts()
    return {
        "path": str(ckpt.root),
        "files": [str(f) for f in ckpt.files],
        "bytes": ckpt.nbytes,
        "config": ckpt.config.to_dict(),
        "tensors": len(ckpt.entries),
        "parameters": total,
        "parameters_expected_from_config": counts["total"],
        "active_parameters_per_image_token": counts["active_per_token"],
        "dtypes": ckpt.dtypes(),
        "groups": dict(sorted(groups.items())),
    }


def format_info(info: dict) -> str:
    cfg = info["config"]
    lines = [
        f"checkpoint   {info['path']}",
        f"files        {len(info['files'])} ({info['bytes'] / 1e9:.3f} GB)",
        f"tensors      {info['tensors']}",
        f"parameters   {info['parameters']:,} ({info['parameters'] / 1e9:.3f} B)"
        + ("" if info["parameters"] == info["parameters_expected_from_config"]
           else f"  [config implies {info['parameters_expected_from_config']:,}]"),
        f"active/token {info['active_parameters_per_image_token']:,} "
        f"({cfg['num_activated_experts']} of {cfg['num_routed_experts']} routed experts + shared expert + dense weights)",
        "dtypes       " + ", ".join(f"{k}: {v} tensors" for k, v in sorted(info["dtypes"].items())),
        "config       " + ", ".join(f"{k}={v}" for k, v in cfg.items() if k not in ("_class_name", "llama_layers")),
        f"llama_layers {cfg['llama_layers']}",
        "groups:",
    ]
    for name, g in info["groups"].items():
        dtypes = ", ".join(f"{k}x{v}" for k, v in sorted(g["dtypes"].items()))
        lines.append(f"  {name:<28} {g['parameters']:>16,} params  {g['tensors']:>5} tensors  {dtypes}")
    return "\n".join(lines)
