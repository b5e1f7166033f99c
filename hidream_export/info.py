"""`hidream-export info`: what a checkpoint holds, read from its headers alone (no weights loaded), or what
a LoRA file adapts and whether it fits a given checkpoint or config, or an engine folder's components (from its
manifest)."""

from __future__ import annotations

import math
from pathlib import Path

from hidream_export.errors import CheckpointInputError, one_line
from hidream_export.export.common import model_errors
from hidream_export.lora import LoraFile, module_kind
from hidream_export.model.checkpoint import expected_shapes, locate_checkpoint
from hidream_export.model.config import resolve_config

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
            entry["target"] = comp.target
            entry["opset"] = comp.opset
        components[name] = entry
    return {"folder": str(folder), "variant": manifest.variant.name, "components": components}


def format_engine_folder_info(info: dict) -> str:
    lines = [f"engine folder {info['folder']} (variant {info['variant']})"]
    for name, c in info["components"].items():
        quant = c.get("quant")
        what = f"{c['kind']}" + (f", {c['dtype']}" if c.get("dtype") else "")
        if "moe_lowering" in c:
            what += f", moe {c['moe_lowering']}, target {c['target']}, opset {c['opset']}"
        if quant:
            block = f" block {quant['block_size']}" if quant.get("block_size") else ""
            what += f", quant {quant['scheme']}{block} ({quant['quantized_weights']} weights)"
        lines.append(f"  {name:<16} {c['bytes'] / 2**20:>10,.1f} MiB  {what}")
    return "\n".join(lines)


def lora_info(path: str | Path, checkpoint: str | Path | None = None, config=None) -> dict:
    """Layout, ranks, alphas and adapted layers of a LoRA file; with `checkpoint` (and `config` for a
    single-file one) or `config` alone, whether it fits that transformer (and why not)."""
    lora = LoraFile.read(path)
    layers: dict[str, list[str]] = {}
    for key in sorted(lora.modules):
        layers.setdefault(module_kind(key), []).append(key.removesuffix(".weight"))
    info = {"path": str(lora.path), "kind": "lora", "sha256": lora.sha256, "layout": lora.layout, "factors": lora.factors,
            "alpha": lora.alpha_from, "rslora": lora.rslora, "ranks": lora.ranks,
            "scalings": sorted({round(m.scaling, 6) for m in lora.modules.values()}), "modules": len(lora.modules),
            "parameters": sum(m.rank * sum(m.shape) for m in lora.modules.values()),
            "targets": {kind: len(keys) for kind, keys in sorted(layers.items())}, "layers": dict(sorted(layers.items()))}
    if checkpoint is None and config is None:
        return info
    with model_errors():
        if checkpoint is not None:
            ckpt = locate_checkpoint(checkpoint, config)
            shapes, model = {k: e.shape for k, e in ckpt.entries.items()}, f"the checkpoint {checkpoint}"
        else:
            shapes, model = expected_shapes(resolve_config(config)), f"config {config}"
    info["checked_against"] = model
    try:
        lora.check(shapes, model)
        info["fits"], info["reason"] = True, None
    except CheckpointInputError as exc:
        info["fits"], info["reason"] = False, one_line(exc)
    return info


def format_lora_info(info: dict) -> str:
    lines = [
        f"LoRA         {info['path']}",
        f"sha256       {info['sha256']}",
        f"layout       {info['layout']} ({info['factors']})",
        f"rank         {', '.join(map(str, info['ranks']))}",
        f"alpha        {info['alpha']}{', rsLoRA' if info['rslora'] else ''}; alpha/rank "
        + ", ".join(f"{s:g}" for s in info["scalings"]),
        f"modules      {info['modules']} ({info['parameters']:,} parameters)",
        "targets      " + ", ".join(f"{kind}: {n}" for kind, n in info["targets"].items()),
    ]
    if "fits" in info:
        verdict = "yes" if info["fits"] else f"no: {info['reason']}"
        lines.append(f"fits         {info['checked_against']}: {verdict}")
    return "\n".join(lines)
