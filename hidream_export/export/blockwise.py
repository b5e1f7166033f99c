"""Trace the transformer one block kind at a time and write its ONNX graph block by block.

A whole-model trace holds the FX graph and the ONNX IR of every block at once: about 8 MB per block, so
the streaming export's peak memory grew with depth (12 more blocks cost 100 MB) and tracing the real
48-block model took minutes (the `gather` lowering: far longer, its nonzero calls are traced per block).
But the blocks are two kinds repeated with different weights. So:

1. four parts are traced on fake tensors, each once: the prologue (embeddings, the per-block Llama
   projections, the attention context), ONE double-stream block, ONE single-stream block and the epilogue
   (final layer, unpatchify). The parts are the model's own (`HiDreamTransformer.split()`); blocks see
   each other only through those tensors, so nothing is lost;
2. each part's weightless graph is optimised on its own (`streaming.weightless_optimize`);
3. model.onnx is written as a protobuf stream: each part instance (block i = the block template with
   its values prefixed and its weights renamed to block i's checkpoint keys) is serialised as a piece of
   the GraphProto and appended to the file, then dropped. Protobuf concatenates repeated fields of a
   message written in pieces, so the file is one ordinary, flat graph: readers see no difference.

Memory: one part's trace plus one piece, whatever the depth. Node metadata (stack traces, 80% of the
bytes, identical in every copy of a block) is dropped; node names carry the instance prefix instead
(`double_stream_blocks.3/node_MatMul_12`), so a TensorRT layer still says which block it came from.
The graph writes ir_version/opsets from the trace and leaves intermediate shapes to ONNX shape inference,
which `export_transformer` runs on the saved file.
"""

from __future__ import annotations

import dataclasses
import gc
import os
from pathlib import Path

import onnx

from hidream_export.export import streaming
from hidream_export.export.spec import ExportSpec, dynamic_shapes, sample_inputs
from hidream_export.model.transformer import (CONTEXT, DoubleBlockPart, Epilogue, HiDreamTransformer, Prologue,
                                              SingleBlockPart)


@dataclasses.dataclass
class Part:
    """One traced part: its graph (weights as value-less external placeholders) and which of its
    initializers are weights (template name -> (dtype, shape))."""

    name: str
    graph: onnx.GraphProto
    weights: dict[str, tuple]
    model: onnx.ModelProto  # header fields only (opsets, functions, ir_version); its graph is empty


def trace_parts(spec: ExportSpec) -> list[Part]:
    """Trace the prologue, one block of each kind and the epilogue on fake tensors (no weight is
    allocated) and optimise each weightless graph. Parts for an absent block kind are skipped."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.export import Dim

    translation = spec.translation_table()  # before tracing: it defines the op the `plugin` lowering calls
    auto = Dim.AUTO
    model_dims = dynamic_shapes(spec)
    with FakeTensorMode():
        previous = torch.get_default_dtype()
        torch.set_default_dtype(spec.torch_dtype)  # Module.to() cannot swap fake parameters: build in the export dtype
        try:
            parts = HiDreamTransformer(spec.config, moe_lowering=spec.moe, rope_dtype="float32",
                                       rope_max_positions=spec.max_positions).eval().split()
        finally:
            torch.set_default_dtype(previous)
        args = sample_inputs(spec)
        with torch.no_grad():
            img, temb, txt0, cos, sin, key_scale, bias, *llama = parts.prologue(*args)
            h = torch.cat([img, txt0], dim=1)
        ctx = (cos, sin, key_scale, bias)
        n_llama = len(llama)
        specs = [
            ("prologue", parts.prologue, args, model_dims, list(Prologue.INPUTS),
             [*Prologue.OUTPUTS, *(f"llama.{i}" for i in range(n_llama))]),
            ("double", parts.double, (img, txt0, llama[0], temb, *ctx),
             ({0: auto, 1: auto}, {0: auto}, {0: auto}, {0: auto}, {0: auto}, {0: auto}, {0: auto}, {0: auto}),
             list(DoubleBlockPart.INPUTS), list(DoubleBlockPart.OUTPUTS)),
            ("single", parts.single, (h, llama[0], temb, *ctx),
             ({0: auto, 1: auto}, {0: auto}, {0: auto}, {0: auto}, {0: auto}, {0: auto}, {0: auto}),
             list(SingleBlockPart.INPUTS), list(SingleBlockPart.OUTPUTS)),
            ("epilogue", parts.epilogue, (h, temb, args[0]), ({0: auto, 1: auto}, {0: auto}, model_dims[0]),
             list(Epilogue.INPUTS), list(Epilogue.OUTPUTS)),
        ]
        traced = []
        for name, module, part_args, dims, input_names, output_names in specs:
            if module is None:
                continue
            traced.append(_trace_part(name, module, part_args, dims, input_names, output_names, spec, translation))
    return traced


def _trace_part(name, module, args, dims, input_names, output_names, spec: ExportSpec, translation) -> Part:
    import onnx_ir as ir
    import torch

    program = torch.export.export(module, tuple(args), dynamic_shapes=tuple(dims), strict=False)
    onnx_program = torch.onnx.export(program, dynamo=True, optimize=False, verbose=False, input_names=input_names,
                                     output_names=output_names, opset_version=spec.opset,
                                     custom_translation_table=translation)
    _name_axes(onnx_program, dims)
    _check_dynamic(name, onnx_program, args, dims)
    model = onnx_program.model
    del program, onnx_program
    gc.collect()
    if spec.moe == "ort" and name in ("double", "single"):
        from hidream_export.moe import ort_moe

        ort_moe.name_fused_weights(model, spec.config.num_routed_experts)  # fc1/fc2 in the op's layout
    weights = streaming.weightless_optimize(model)
    if spec.quant is not None:
        from hidream_export.quant.graph import quantize_graph
        from hidream_export.quant.policy import transformer_quantizes

        weights, _ = quantize_graph(model, weights, spec.quant, transformer_quantizes)
    if spec.moe == "plugin" and name in ("double", "single"):
        from hidream_export.moe import onnx_node

        onnx_node.attach_function(model, spec.opset)
    # External references so the proto serialises; the real offsets are set per instance.
    info = {s.name: (s.dtype, s.shape) for s in streaming.layout(model, weights, "placeholder")}
    proto = ir.serde.serialize_model(model)
    del model
    graph = onnx.GraphProto()
    graph.CopyFrom(proto.graph)
    proto.ClearField("graph")
    for node in graph.node:
        del node.metadata_props[:]
    # The exporter's graph metadata (the ExportedProgram's signature and range constraints) would be repeated
    # once per block, and its range constraints come out in hash order: model.onnx must be the same bytes
    # for the same checkpoint and settings in any process.
    del graph.metadata_props[:]
    del graph.value_info[:]
    return Part(name, graph, info, proto)


def _check_dynamic(part: str, onnx_program, args, dims) -> None:
    """A block traced with an axis left to Dim.AUTO must keep it symbolic: had torch.export pinned it to
    the sample's size, the stitched graph would only run at that size (sizes 0 and 1 are pinned by design,
    e.g. a fixed batch of one)."""
    import onnx_ir as ir
    from torch.export import Dim

    for value, arg, axes in zip(onnx_program.model.graph.inputs, args, dims):
        for axis, dim in (axes or {}).items():
            traced = value.shape[axis]
            # A pinned axis comes out as an int, or as a "symbol" that is just the number ('4').
            symbolic = isinstance(traced, ir.SymbolicDim) and not str(traced.value).isdigit()
            if dim is Dim.AUTO and int(arg.shape[axis]) > 1 and not symbolic:
                raise ValueError(f"{part} part: input {value.name!r} axis {axis} was traced as fixed size "
                                 f"{value.shape[axis]}; the exported graph would only run at that size")


def _name_axes(onnx_program, dims) -> None:
    """Give the model's axes their declared names ("2*images", "2*latent_height_16px"), as torch.onnx does
    when it traces a module itself; axes left to Dim.AUTO (inside the graph) keep their symbols."""
    import onnx_ir as ir

    mapping = {}
    for value, axes in zip(onnx_program.model.graph.inputs, dims):
        for axis, dim in (axes or {}).items():
            name = getattr(dim, "__name__", None)
            symbol = value.shape[axis]
            if isinstance(name, str) and isinstance(symbol, ir.SymbolicDim) and isinstance(symbol.value, str):
                mapping.setdefault(symbol.value, name)
    if mapping:
        onnx_program.rename_axes(mapping)


@dataclasses.dataclass
class Instance:
    """One part at one position: how its template names become the stitched graph's names."""

    part: Part
    prefix: str
    inputs: dict[str, str]      # template input -> stitched value
    weight_prefix: tuple[str, str] | None = None  # ("double_stream_blocks.0.", "double_stream_blocks.7.")
    keep_outputs: bool = False  # the epilogue's output keeps its name ("sample")

    def weight_name(self, template: str) -> str:
        if self.weight_prefix and template.startswith(self.weight_prefix[0]):
            return self.weight_prefix[1] + template[len(self.weight_prefix[0]):]
        return template

    def output(self, template: str) -> str:
        return template if self.keep_outputs else f"{self.prefix}/{template}"


def plan_instances(cfg, parts: list[Part]) -> list:
    """The stitched graph, in execution order: Instances, plus ("Concat", inputs, output) joins."""
    by_name = {p.name: p for p in parts}
    pro = Instance(by_name["prologue"], "prologue", {})
    seq: list = [pro]
    img, txt0, temb = pro.output("img"), pro.output("txt0"), pro.output("temb")
    ctx = {k: pro.output(k) for k in CONTEXT}
    llama = [pro.output(f"llama.{i}") for i in range(cfg.num_blocks)]
    for i in range(cfg.num_layers):
        inst = Instance(by_name["double"], f"double_stream_blocks.{i}",
                        {"img": img, "txt0": txt0, "llama": llama[i], "temb": temb, **ctx},
                        (DoubleBlockPart.PREFIX, f"double_stream_blocks.{i}."))
        seq.append(inst)
        img, txt0 = inst.output("img_out"), inst.output("txt0_out")
    h = "join/h"
    seq.append(("Concat", [img, txt0], h))
    for j in range(cfg.num_single_layers):
        inst = Instance(by_name["single"], f"single_stream_blocks.{j}",
                        {"h": h, "llama": llama[cfg.num_layers + j], "temb": temb, **ctx},
                        (SingleBlockPart.PREFIX, f"single_stream_blocks.{j}."))
        seq.append(inst)
        h = inst.output("h_out")
    seq.append(Instance(by_name["epilogue"], "epilogue", {"h": h, "temb": temb, "hidden_states": "hidden_states"},
                        keep_outputs=True))
    return seq


def weight_slots(seq: list) -> list[streaming.Slot]:
    """Every weight of the stitched graph, in graph order, with its aligned slot in the data file."""
    tensors, seen = [], set()
    for inst in seq:
        if not isinstance(inst, Instance):
            continue
        for template, (dtype, shape) in inst.part.weights.items():
            name = inst.weight_name(template)
            if name in seen:
                raise ValueError(f"weight {name!r} would be written twice (instance {inst.prefix})")
            seen.add(name)
            tensors.append((name, dtype, shape))
    return streaming.assign_slots(tensors)


def _instance_piece(inst: Instance, slot_of: dict, data_name: str) -> onnx.GraphProto:
    """The part's graph with every name made the instance's own (a fresh copy; the template is untouched)."""
    g = onnx.GraphProto()
    g.CopyFrom(inst.part.graph)
    inputs = {vi.name for vi in g.input}
    outputs = {vi.name for vi in g.output}
    weights = inst.part.weights

    def rename(name: str) -> str:
        if not name:
            return name  # an omitted optional input
        if name in inst.inputs:
            return inst.inputs[name]
        if name in weights:
            return inst.weight_name(name)
        if name in outputs:
            return inst.output(name)
        if inst.part.name == "prologue" and name in inputs:
            return name  # the model's own inputs
        return f"{inst.prefix}/{name}"

    for node in g.node:
        node.name = f"{inst.prefix}/{node.name}"
        for field in (node.input, node.output):
            for k, name in enumerate(field):
                field[k] = rename(name)
        for attr in node.attribute:
            if attr.HasField("g") or len(attr.graphs):
                raise ValueError(f"{inst.part.name} part: node {node.name} has a subgraph; blockwise export "
                                 f"supports straight-line graphs only")
    for init in g.initializer:
        template = init.name
        init.name = rename(template)
        if template in weights:
            slot = slot_of[init.name]
            del init.external_data[:]
            for key, value in (("location", data_name), ("offset", str(slot.offset)), ("length", str(slot.length))):
                entry = init.external_data.add()
                entry.key, entry.value = key, value
    del g.input[:]
    del g.output[:]
    return g


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


GRAPH_FIELD = 7  # ModelProto.graph


def write_graph(parts: list[Part], seq: list, slots: list[streaming.Slot], path: Path, data_name: str) -> None:
    """Write the stitched model.onnx piece by piece (via `path`.body, renamed into place at the end)."""
    slot_of = {s.name: s for s in slots}
    by_name = {p.name: p for p in parts}
    header = onnx.ModelProto()
    header.CopyFrom(by_name["prologue"].model)
    opsets = {o.domain: o.version for o in header.opset_import}
    functions = {(f.domain, f.name, f.overload) for f in header.functions}
    for part in parts:
        for o in part.model.opset_import:
            if opsets.setdefault(o.domain, o.version) != o.version:
                raise ValueError(f"parts disagree on opset {o.domain or 'ai.onnx'}: {opsets[o.domain]} vs {o.version}")
        for f in part.model.functions:
            if (f.domain, f.name, f.overload) not in functions:
                functions.add((f.domain, f.name, f.overload))
                header.functions.append(f)
    del header.opset_import[:]
    header.opset_import.extend(onnx.helper.make_opsetid(d, v) for d, v in sorted(opsets.items()))

    head = onnx.GraphProto(name="main_graph")
    head.input.extend(by_name["prologue"].graph.input)
    head.output.extend(by_name["epilogue"].graph.output)
    body = path.with_name(path.name + ".body")
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(body, "wb") as fh:
            fh.write(head.SerializeToString())
            for inst in seq:
                if isinstance(inst, Instance):
                    piece = _instance_piece(inst, slot_of, data_name)
                else:
                    op, inputs, output = inst
                    piece = onnx.GraphProto(node=[onnx.helper.make_node(op, inputs, [output], name=f"{output}/{op}",
                                                                        axis=1)])
                fh.write(piece.SerializeToString())
                del piece
            size = fh.tell()
        with open(tmp, "wb") as out, open(body, "rb") as src:
            out.write(header.SerializeToString())
            out.write(_varint(GRAPH_FIELD << 3 | 2) + _varint(size))
            while chunk := src.read(1 << 20):
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    finally:
        body.unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)


def export_graph(spec: ExportSpec, path: Path, data_name: str) -> list[streaming.Slot]:
    """Trace the parts, stitch them into `path` (weights as external references into `data_name`),
    and return the weights' slots in file order."""
    parts = trace_parts(spec)
    seq = plan_instances(spec.config, parts)
    slots = weight_slots(seq)
    write_graph(parts, seq, slots, path, data_name)
    return slots
