"""The ONNX file the TensorRT parser reads: the export with the model-local functions that shadow a
plugin op removed, written next to it (so it finds the same external data)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from hidream_export.build.plan import PREPARED_ONNX_NAME
from hidream_export.errors import BuildPlanError
from hidream_export.files import atomic_open
from hidream_export.moe import schema

__all__ = ["plugin_functions", "strip_plugin_functions", "write_prepared_onnx"]


def plugin_functions(model, plugins: Iterable[tuple[str, str]] | None = None) -> list[tuple[str, str]]:
    """(domain, name) of the model-local functions that shadow a plugin op: functions named like a node
    op that TensorRT implements as a plugin (by default hidream::HiDreamMoE) and actually used as such."""
    targets = set(plugins) if plugins is not None else {(schema.DOMAIN, schema.OP_TYPE)}
    used = {(n.domain, n.op_type) for n in model.graph.node}
    return [(f.domain, f.name) for f in model.functions if (f.domain, f.name) in targets and (f.domain, f.name) in used]


def strip_plugin_functions(model, plugins: Iterable[tuple[str, str]] | None = None):
    """A copy of `model` without the model-local functions that shadow plugin ops.

    The `plugin` export carries a HiDreamMoE function so ONNX Runtime can run the file; TensorRT's parser
    imports a node through a local function of the same name unless a plugin is registered, and whether it
    prefers the plugin is version-dependent. Removing the function leaves the parser one way: the plugin
    (or a clear "Plugin not found"). Nodes, attributes, opset imports and external-data references are
    untouched, so the copy reads the same weights file. Never reads external data."""
    out = type(model)()
    out.CopyFrom(model)
    drop = set(plugin_functions(model, plugins))
    kept = [f for f in out.functions if (f.domain, f.name) not in drop]
    del out.functions[:]
    out.functions.extend(kept)
    return out


def write_prepared_onnx(src: str | Path, dst: str | Path | None = None,
                        plugins: Iterable[tuple[str, str]] | None = None) -> Path:
    """Write the parser's copy of `src` (plugin functions stripped) next to it, atomically; return its path.
    The copy must stay in the same folder: its initializers point at the same external data file."""
    import onnx

    src = Path(src)
    dst = Path(dst) if dst is not None else src.with_name(PREPARED_ONNX_NAME)
    if dst.parent.resolve() != src.parent.resolve():
        raise BuildPlanError(f"{dst}: the prepared ONNX must sit next to {src} to find its external data")
    model = strip_plugin_functions(onnx.load(str(src), load_external_data=False), plugins)
    with atomic_open(dst, "wb") as fh:
        fh.write(model.SerializeToString())
    return dst


