"""Where a TensorRT refit takes each engine weight from: the explicit initializer -> engine weight name
map, and each initializer's origin in the checkpoint (for refits from a checkpoint rather than an export).
Reads graphs only, never external data."""

from __future__ import annotations

import json
from typing import Mapping

from hidream_export.moe import schema

__all__ = ["refit_name_map", "refit_sources"]


def _load_graph(onnx_path):
    import onnx

    if isinstance(onnx_path, onnx.ModelProto):
        return onnx_path
    return onnx.load(str(onnx_path), load_external_data=False)


def refit_name_map(onnx_path) -> dict[str, str]:
    """ONNX initializer name -> TensorRT engine weight name, explicitly (no hash matching).

    TensorRT's ONNX parser names every weight after its initializer (INetworkDefinition.setWeightsName,
    per the TensorRT refit docs), so the map is the identity over the graph's initializers. It is written
    out anyway, into the engine's manifest entry, so a refit is a lookup that fails loudly on a name the
    engine does not know, and so the stacked MoE weights (generated names such as `stack_2`) stay
    traceable through `refit_sources`. Reads the graph only, never the external data."""
    model = _load_graph(onnx_path)
    return {init.name: init.name for init in model.graph.initializer}


def _moe_scope(node) -> str | None:
    """The model path of a HiDreamMoE node's MoE module (e.g. double_stream_blocks.0.block.ff_i), from the
    name scopes the torch exporter records in the node's metadata."""
    meta = {p.key: p.value for p in node.metadata_props}
    scopes = meta.get("pkg.torch.onnx.name_scopes")
    if not scopes:
        return None
    try:
        names = json.loads(scopes.replace("'", '"'))
    except json.JSONDecodeError:
        return None
    names = [n for n in names if n]
    # [..., 'double_stream_blocks.1.block.ff_i', 'HiDreamMoE_1']: the op call's scope is numbered per call
    if len(names) >= 2 and names[-1].split(".")[-1].rstrip("0123456789").rstrip("_") == schema.OP_TYPE:
        return names[-2]
    return None


def refit_sources(onnx_path, initializer_map: Mapping[str, str] | None = None) -> dict[str, dict]:
    """Where each initializer's values come from, for refits from a checkpoint rather than an export.

    {"checkpoint": key} for a checkpoint tensor (initializer_map: the export's initializer -> checkpoint
    key map, identity by default), {"stack": [keys], "transpose": true, "role": "gate|up|down"} for the
    stacked expert weights of a HiDreamMoE node (gate = w1^T, up = w3^T, down = w2^T stacked over
    experts, the TRT_MoE layout of schema.py), {"computed": true} otherwise (e.g. RoPE tables)."""
    model = _load_graph(onnx_path)
    names = {init.name for init in model.graph.initializer}
    sources: dict[str, dict] = {}
    roles = {3: ("gate", "w1"), 4: ("up", "w3"), 5: ("down", "w2")}
    for node in model.graph.node:
        if (node.domain, node.op_type) != (schema.DOMAIN, schema.OP_TYPE):
            continue
        scope = _moe_scope(node)
        num_experts = next((a.i for a in node.attribute if a.name == "num_experts"), None)
        for index, (role, weight) in roles.items():
            if index < len(node.input) and node.input[index] in names and scope and num_experts:
                sources[node.input[index]] = {
                    "stack": [f"{scope}.experts.{e}.{weight}.weight" for e in range(num_experts)],
                    "transpose": True, "role": role}
    mapping = dict(initializer_map or {})
    for name in names:
        if name in sources:
            continue
        key = mapping.get(name, name)
        if (isinstance(key, str) and key.startswith("computed:")) or name.startswith("rope."):
            sources[name] = {"computed": True}
        elif initializer_map is None or name in mapping:
            sources[name] = {"checkpoint": key}
        else:
            sources[name] = {"computed": True}
    return dict(sorted(sources.items()))
