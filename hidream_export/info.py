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


def engine_folder_info(folder: str | Path) -> dict:
    """`info` on an engine folder (one with manifest.json): its variant and each component's kind, dtype,
    size and quantization, from the manifest alone."""
    from hidream_export.manifest import Manifest, OnnxComponent, TransformerComponent

    manifest = Manifest.read(folder)
    components = {}
    for name, comp in manifest.components.items():
        entry = {"kind": comp.kind, "path": comp.path, "bytes": sum(f.bytes for f in comp.files.values())}
        if isinstance(comp, OnnxComponent):
            entry["dtype"] = comp.dtype
            entry["quant"] = comp.quant.to_dict() if comp.quant else None
        if isinstance(comp, TransformerComponent):
            entry["moe_lowering"] = comp.moe_lowering
            entry["opset"] = comp.opset
        components[name] = entry
    return {"folder": str(folder), "variant": manifest.variant.name, "components": components}


def format_engine_folder_info(info: dict) -> str:
    lines = [f"engine folder {info['folder']} (variant {info['variant']})"]
    for name, c in info["components"].items():
        quant = c.get("quant")
        what = f"{c['kind']}" + (f", {c['dtype']}" if c.get("dtype") else "")
        if "moe_lowering" in c:
            what += f", moe {c['moe_lowering']}, opset {c['opset']}"
        if quant:
            block = f" block {quant['block_size']}" if quant.get("block_size") else ""
            what += f", quant {quant['scheme']}{block} ({quant['quantized_weights']} weights)"
        lines.append(f"  {name:<16} {c['bytes'] / 2**20:>10,.1f} MiB  {what}")
    return "\n".join(lines)
