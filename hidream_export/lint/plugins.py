"""Plugins the TensorRT build registers, as the lint checks nodes against them. HiDreamMoE's rules are
hidream_export.moe.schema's (`check`); this module only maps ONNX facts onto it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Mapping

from onnx import AttributeProto

from hidream_export.errors import MoEContractError
from hidream_export.lint.graph import NodeCtx
from hidream_export.lint.report import ERROR
from hidream_export.lint.table import type_name
from hidream_export.moe import schema as moe_schema

# --------------------------------------------------------------------------------------------------------------
# Plugins the build will register


@dataclass(frozen=True)
class PluginSpec:
    """A plugin that the TensorRT build registers, so that nodes of this `op_type` reach it.

    The parser's fallback importer looks plugins up by node `op_type`, the string attribute `plugin_version`
    (default "1") and `plugin_namespace` (default ""); since TensorRT 10.10 it also reads the namespace from the
    node's domain. `attributes` maps each attribute the plugin expects to its ONNX attribute type; `validate`
    may add op-specific checks."""

    op_type: str
    namespace: str = ""
    version: str = "1"
    domain: str | None = None
    attributes: Mapping[str, int] = field(default_factory=dict)
    num_inputs: int | None = None
    num_outputs: int | None = None
    validate: Callable[["NodeCtx"], Iterable[tuple[str, str]]] | None = None

    @property
    def plugin_id(self) -> str:
        return f"{self.namespace}::{self.op_type}" if self.namespace else self.op_type

    @classmethod
    def parse(cls, text: str) -> "PluginSpec":
        """'namespace::OpType' or 'namespace::OpType:version' (no attribute checks)."""
        ns, _, rest = text.rpartition("::")
        name, _, version = rest.partition(":")
        return cls(op_type=name, namespace=ns, version=version or "1")


def _validate_hidream_moe(ctx: "NodeCtx") -> Iterator[tuple[str, str]]:
    """The HiDreamMoE contract (moe.schema) on what the graph says of the node: attribute values always,
    the six dtypes when all are known, the six shapes (and attributes against them) when all are known."""
    node = ctx.node
    top_k, num_experts = ctx.attr("top_k"), ctx.attr("num_experts")
    checks = [lambda: moe_schema.check_attributes(top_k, num_experts)]
    if len(node.input) == len(moe_schema.INPUT_NAMES):
        elems = [ctx.elem_type(name) for name in node.input]
        if all(e is not None for e in elems):
            checks.append(lambda: moe_schema.check_dtypes([type_name(e) for e in elems]))
        shapes = [ctx.shape(name) for name in node.input]
        if all(s is not None for s in shapes):
            checks.append(lambda: moe_schema.check(shapes, top_k=top_k, num_experts=num_experts))
    for check in checks:
        try:
            check()
        except MoEContractError as exc:
            yield ERROR, str(exc)


def _attribute_types(example: Mapping[str, object]) -> dict[str, int]:
    """ONNX attribute types of an example attribute dict, so the schema module stays the one definition."""
    kinds = {str: AttributeProto.STRING, int: AttributeProto.INT, float: AttributeProto.FLOAT}
    return {name: kinds[type(value)] for name, value in example.items()}


HIDREAM_MOE_PLUGIN = PluginSpec(
    op_type=moe_schema.OP_TYPE,
    namespace=moe_schema.PLUGIN_NAMESPACE,
    version=moe_schema.PLUGIN_VERSION,
    domain=moe_schema.DOMAIN,
    attributes=_attribute_types(moe_schema.node_attributes(top_k=1, num_experts=1)),
    num_inputs=len(moe_schema.INPUT_NAMES),
    num_outputs=len(moe_schema.OUTPUT_NAMES),
    validate=_validate_hidream_moe,
)
DEFAULT_PLUGINS: tuple[PluginSpec, ...] = (HIDREAM_MOE_PLUGIN,)
