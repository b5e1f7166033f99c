"""TensorRT's ONNX parser support matrix (onnx-tensorrt `docs/operators.md`, transcribed into
`hidream_export/data/trt_onnx_ops.json`, which names the TensorRT version it is for): the data the lint
checks graphs against. The code never decides from memory what TensorRT supports."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Mapping

from onnx import TensorProto, helper

DEFAULT_DOMAINS = ("", "ai.onnx")

# ONNX element types as the table names them. FLOAT8E4M3FN is TensorRT's only FP8 format; the other FP8
# variants, INT16, UINT16/32/64, STRING and COMPLEX have no TensorRT type and keep their ONNX names, so they
# never match a table entry.
_TABLE_TYPE_NAMES = {
    TensorProto.FLOAT: "FP32",
    TensorProto.FLOAT16: "FP16",
    TensorProto.BFLOAT16: "BF16",
    TensorProto.DOUBLE: "DOUBLE",
    TensorProto.INT32: "INT32",
    TensorProto.INT64: "INT64",
    TensorProto.INT8: "INT8",
    TensorProto.UINT8: "UINT8",
    TensorProto.BOOL: "BOOL",
    TensorProto.INT4: "INT4",
    TensorProto.FLOAT8E4M3FN: "FP8",
    TensorProto.FLOAT4E2M1: "FP4",
}
# The table's global list spells some types differently from its per-op column.
_GLOBAL_TYPE_ALIASES = {"FLOAT32": "FP32", "FLOAT16": "FP16", "BFLOAT16": "BF16"}


def flat(text: str) -> str:
    """Restriction text as one line (the table separates some clauses with HTML line breaks)."""
    return " ".join(text.replace("<br />", " ").split())


def type_name(elem_type: int) -> str:
    if elem_type in _TABLE_TYPE_NAMES:
        return _TABLE_TYPE_NAMES[elem_type]
    return helper.tensor_dtype_to_string(elem_type).replace("TensorProto.", "")



# --------------------------------------------------------------------------------------------------------------
# The table


@dataclass(frozen=True)
class OpEntry:
    """One row of the parser's support matrix, as transcribed."""

    name: str
    supported: bool
    types: tuple[str, ...]
    restrictions: str


@dataclass(frozen=True)
class OpTable:
    """The transcribed support matrix plus the TensorRT custom ops, read from the packaged JSON."""

    tensorrt_version: str
    opset_range: tuple[int, int]
    supported_types: frozenset[str]
    ops: Mapping[str, OpEntry]
    custom_ops: Mapping[str, Mapping]
    source: Mapping

    @classmethod
    def from_json(cls, data: Mapping) -> "OpTable":
        ops = {name: OpEntry(name, bool(row["supported"]), tuple(row.get("types", ())), row.get("restrictions", ""))
               for name, row in data["operators"].items()}
        types = frozenset(_GLOBAL_TYPE_ALIASES.get(t, t) for t in data["supported_data_types"])
        lo, hi = data["opset_range"]
        return cls(tensorrt_version=str(data["source"]["tensorrt_version"]), opset_range=(int(lo), int(hi)),
                   supported_types=types, ops=ops, custom_ops=dict(data.get("custom_ops", {}).get("ops", {})),
                   source=dict(data["source"]))


@lru_cache(maxsize=4)
def _load_packaged_table() -> OpTable:
    text = resources.files("hidream_export").joinpath("data/trt_onnx_ops.json").read_text(encoding="utf-8")
    return OpTable.from_json(json.loads(text))


def load_op_table(path: str | Path | None = None) -> OpTable:
    """The packaged table, or another transcription (e.g. for a different TensorRT version) from `path`."""
    if path is None:
        return _load_packaged_table()
    return OpTable.from_json(json.loads(Path(path).read_text(encoding="utf-8")))
